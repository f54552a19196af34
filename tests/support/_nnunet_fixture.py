"""Builds a tiny nnU-Net v2 model with nnunetv2's own planner, preprocessor and trainer, on CPU
(tests/models/test_nnunet.py).

Run as a script in a subprocess (``python tests/support/_nnunet_fixture.py OUT``): nnunetv2 reads its ``nnUNet_raw`` /
``nnUNet_preprocessed`` / ``nnUNet_results`` paths when it is imported, so they are set here, inside ``OUT``, before
any nnunetv2 import. Writes into ``OUT``:

* ``raw/Dataset990_AsfdaTiny`` (6 training cases and ``imagesTs``: 2 cases on other grids), nnU-Net raw layout;
* ``results/Dataset990_AsfdaTiny/nnUNetTrainer__nnUNetPlans__3d_fullres/fold_0/checkpoint_final.pth``: nnU-Net's
  standard trainer for one epoch of a few iterations (set on the instance, as ``nnUNetTrainer_1epoch`` sets its epochs;
  the checkpoint names ``nnUNetTrainer``, which nnU-Net's predictor finds without importing its other trainers, some
  of which need torchvision, whose CUDA wheel does not load next to the CPU build of torch);
* ``fold_1``: fold 0's checkpoint with perturbed weights (the ensemble tests need two folds; training a second one
  would double the time).

The phantom: an MR-like body (zero outside it, so nnU-Net crops to the non-zero box and normalises inside the mask)
holding a "liver" and a "spleen"; voxels of 2 x 1 x 1 mm (so the plans transpose the axes), and test cases with
other spacings, shapes and orientations (so nnU-Net resamples them, and the inverse must undo all of it).
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import numpy as np

DATASET_ID = 990
DATASET = "Dataset990_AsfdaTiny"
LABELS = {"background": 0, "liver": 1, "spleen": 2}
ITERATIONS = 40
LEARNING_RATE = 0.05  # nnU-Net's 0.01 is for 1000 epochs of 250 iterations
BASE_FEATURES = 8  # nnU-Net's planner with 8 instead of 32 base features: a 16x cheaper network, same layout


def make_case(seed: int, spacing: tuple[float, float, float], shape: tuple[int, int, int],
              flip: tuple[bool, bool, bool] = (False, False, False), size: float = 1.0
              ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Image, label and affine of one phantom case; anatomy in millimetres about the grid's centre."""
    rng = np.random.default_rng(seed)
    sp = np.asarray(spacing, float)
    idx = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), -1).astype(float)
    mm = (idx - (np.asarray(shape) - 1) / 2) * sp / size  # voxel centres in mm about the centre (anatomy x size)
    for a in range(3):
        if flip[a]:
            mm[..., a] *= -1

    def ellipsoid(centre, radii):
        return (((mm - np.asarray(centre)) / np.asarray(radii)) ** 2).sum(-1) <= 1

    body = ellipsoid(rng.uniform(-1.5, 1.5, 3), (24 + rng.uniform(-2, 2), 13 + rng.uniform(-1, 1), 13))
    liver = ellipsoid((-9 + rng.uniform(-2, 2), rng.uniform(-1, 1), 1), (9 + rng.uniform(-1, 1), 6, 7)) & body
    spleen = ellipsoid((12 + rng.uniform(-2, 2), -2, rng.uniform(-1, 1)), (5, 4 + rng.uniform(-1, 1), 5)) & body
    label = np.zeros(shape, np.uint8)
    label[liver] = 1
    label[spleen] = 2
    image = np.where(body, 300.0, 0.0) + 250.0 * liver + 500.0 * spleen
    image = np.where(body, image + rng.normal(0, 25, shape), 0.0).astype(np.float32)
    affine = np.diag([*sp, 1.0])
    for a in range(3):
        if flip[a]:
            affine[a, a] *= -1
    affine[:3, 3] = rng.uniform(-50, 50, 3)
    return image, label, affine


TRAIN = [((2.0, 1.0, 1.0), (28, 34, 32)), ((2.0, 1.0, 1.0), (30, 32, 30)), ((2.0, 1.0, 1.0), (28, 32, 32)),
         ((2.2, 1.0, 1.0), (26, 34, 32)), ((1.8, 1.0, 1.0), (32, 32, 30)), ((2.0, 1.0, 1.0), (30, 34, 32))]
TEST = [((1.6, 1.25, 0.9), (36, 28, 36), (False, False, False)),  # other spacing: resampled to the plans' grid
        ((2.5, 0.8, 1.1), (22, 42, 30), (True, True, False)),    # an LPS-like orientation, anisotropic (> 3)
        ((2.0, 1.0, 1.0), (36, 48, 44), (False, False, False))]  # a larger body: several sliding windows
TEST_SIZE = (1.0, 1.0, 1.4)


def write_raw(root: Path) -> Path:
    import nibabel as nib

    ds = root / DATASET
    for sub in ("imagesTr", "labelsTr", "imagesTs", "labelsTs"):
        (ds / sub).mkdir(parents=True, exist_ok=True)
    for i, (sp, shape) in enumerate(TRAIN):
        image, label, affine = make_case(100 + i, sp, shape)
        nib.save(nib.Nifti1Image(image, affine), str(ds / "imagesTr" / f"tiny_{i:03d}_0000.nii.gz"))
        nib.save(nib.Nifti1Image(label, affine), str(ds / "labelsTr" / f"tiny_{i:03d}.nii.gz"))
    for i, (sp, shape, flip) in enumerate(TEST):
        image, label, affine = make_case(200 + i, sp, shape, flip, TEST_SIZE[i])
        nib.save(nib.Nifti1Image(image, affine), str(ds / "imagesTs" / f"test_{i:03d}_0000.nii.gz"))
        nib.save(nib.Nifti1Image(label, affine), str(ds / "labelsTs" / f"test_{i:03d}.nii.gz"))
    (ds / "dataset.json").write_text(json.dumps({
        "channel_names": {"0": "MR"}, "labels": LABELS, "numTraining": len(TRAIN), "file_ending": ".nii.gz",
        "name": "asfda tiny phantom"}, indent=2))
    return ds


def main(out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    for name in ("raw", "preprocessed", "results"):
        (out / name).mkdir(exist_ok=True)
    os.environ.update(nnUNet_raw=str(out / "raw"), nnUNet_preprocessed=str(out / "preprocessed"),
                      nnUNet_results=str(out / "results"), nnUNet_n_proc_DA="1", nnUNet_compile="f",
                      nnUNet_def_n_proc="1")
    t0 = time.time()
    write_raw(out / "raw")

    import random

    import torch
    from batchgenerators.utilities.file_and_folder_operations import load_json
    from nnunetv2.experiment_planning.experiment_planners.default_experiment_planner import (
        ExperimentPlanner,
    )
    from nnunetv2.experiment_planning.plan_and_preprocess_api import (
        extract_fingerprints,
        preprocess,
    )
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    torch.set_num_threads(2)
    extract_fingerprints([DATASET_ID], num_processes=1, check_dataset_integrity=True, verbose=False,
                         show_progress_bar=False)
    planner = ExperimentPlanner(DATASET_ID)
    planner.UNet_base_num_features = BASE_FEATURES
    planner.plan_experiment()
    preprocess([DATASET_ID], configurations=("3d_fullres",), num_processes=(1,), verbose=False)
    pre = out / "preprocessed" / DATASET
    os.environ["nnUNet_n_proc_DA"] = "0"  # augmentation in this process: no worker processes (the planner needs >= 1)
    plans = {**load_json(str(pre / "nnUNetPlans.json")), "continue_training": False}  # as nnunetv2's run_training
    trainer = nnUNetTrainer(plans, "3d_fullres", 0, load_json(str(pre / "dataset.json")), device=torch.device("cpu"))
    trainer.num_epochs = 1  # what nnUNetTrainer_1epoch sets, and fewer iterations
    trainer.initial_lr = LEARNING_RATE
    trainer.num_iterations_per_epoch = ITERATIONS
    trainer.num_val_iterations_per_epoch = 1
    trainer.run_training()

    model = out / "results" / DATASET / "nnUNetTrainer__nnUNetPlans__3d_fullres"
    ckpt = torch.load(model / "fold_0" / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    gen = torch.Generator().manual_seed(1)
    ckpt["network_weights"] = {k: (v + 0.02 * v.std().nan_to_num() * torch.randn(v.shape, generator=gen)
                                   if v.is_floating_point() and v.numel() > 1 else v)
                               for k, v in ckpt["network_weights"].items()}
    ckpt["init_args"] = {**ckpt["init_args"], "fold": 1}
    (model / "fold_1").mkdir(exist_ok=True)
    torch.save(ckpt, model / "fold_1" / "checkpoint_final.pth")
    (out / "fixture.json").write_text(json.dumps({"model": str(model.relative_to(out)),
                                                  "dataset": f"raw/{DATASET}", "seconds": round(time.time() - t0, 1)}))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
