"""asfda's `predict` on an nnU-Net v2 results folder against nnU-Net's own predictor, on real anisotropic MR volumes.

No nnU-Net model of this anatomy ships here, so the script builds one (once, cached under ``--cache-dir``): a results
folder whose ``plans.json`` is what nnU-Net's planner writes for CHAOS-like T2 data (``transpose_forward`` [0, 1, 2],
the 7.7 mm slice axis first; 3d_fullres spacing ``--spacing``, anisotropic, so nnU-Net resamples with separate z;
patch ``--patch``), and ``fold_0/checkpoint_final.pth`` with weights of nnU-Net's own network class
(dynamic-network-architectures' PlainConvUNet, 8 base features) trained for ``--steps`` steps (seeded, plain torch) on
``--train`` volumes preprocessed as nnU-Net preprocesses them, so that the outputs are confident and spatially
structured, not random-weight ties. Then, per ``--cases`` volume:

* nnU-Net: ``nnUNetPredictor(use_mirroring=False)`` (what ``nnUNetv2_predict_from_modelfolder --disable_tta`` runs),
  and with its default mirroring (over the checkpoint's ``inference_allowed_mirroring_axes``, all three);
* asfda: ``asfda.predict.predict_model`` (what ``asfda predict`` runs) without and with ``tta``;

and reports the voxels whose labels differ (count and % of the volume), Dice per organ between the two, and nnU-Net's
own probability margin (top-1 minus top-2 softmax) at the differing voxels. ``--stages`` also compares the stages
(preprocessed input, model-grid logits, export) on the same inputs.

    .venv/bin/python benchmarks/nnunet_parity.py [--data ../shared/data/mr_chaos_t2] [--cases chaos_003 chaos_005] \
        [--threads 2] [--out benchmarks/results/nnunet_parity.md]

Reads the volumes by path (nothing is copied into the repository); needs the ``nnunet`` and ``test`` extras
(dynamic-network-architectures, nnunetv2).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import cast

import nibabel as nib
import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
BASE_FEATURES = 8


def _nifti(path: Path) -> nib.Nifti1Image:
    """``nib.load`` typed as what it returns for a .nii.gz (nibabel annotates the base image class)."""
    return cast(nib.Nifti1Image, nib.load(str(path)))


def plans_for(spacing: list[float], patch: list[int], median_shape: list[int]) -> dict:
    """An nnU-Net v2 ``plans.json`` with one 3d_fullres configuration (PlainConvUNet, anisotropic first stages)."""
    stages = 5
    strides = [[1, 1, 1], [1, 2, 2], [1, 2, 2], [2, 2, 2], [2, 2, 2]]
    kernels = [[1, 3, 3], [1, 3, 3], [3, 3, 3], [3, 3, 3], [3, 3, 3]]
    for a in range(3):
        total = int(np.prod([s[a] for s in strides]))
        if patch[a] % total:
            raise SystemExit(f"--patch {patch}: axis {a} must be a multiple of {total}")
    resampling = {"is_seg": False, "order": 3, "order_z": 0, "force_separate_z": None}
    config = {
        "data_identifier": "nnUNetPlans_3d_fullres", "preprocessor_name": "DefaultPreprocessor", "batch_size": 2,
        "patch_size": list(patch), "median_image_size_in_voxels": list(median_shape), "spacing": list(spacing),
        "normalization_schemes": ["ZScoreNormalization"], "use_mask_for_norm": [False],
        "resampling_fn_data": "resample_data_or_seg_to_shape", "resampling_fn_seg": "resample_data_or_seg_to_shape",
        "resampling_fn_data_kwargs": resampling,
        "resampling_fn_seg_kwargs": {**resampling, "is_seg": True, "order": 1},
        "resampling_fn_probabilities": "resample_data_or_seg_to_shape",
        "resampling_fn_probabilities_kwargs": {**resampling, "order": 1},
        "architecture": {
            "network_class_name": "dynamic_network_architectures.architectures.unet.PlainConvUNet",
            "arch_kwargs": {
                "n_stages": stages, "features_per_stage": [min(BASE_FEATURES * 2 ** i, 80) for i in range(stages)],
                "conv_op": "torch.nn.modules.conv.Conv3d", "kernel_sizes": kernels, "strides": strides,
                "n_conv_per_stage": [2] * stages, "n_conv_per_stage_decoder": [2] * (stages - 1), "conv_bias": True,
                "norm_op": "torch.nn.modules.instancenorm.InstanceNorm3d",
                "norm_op_kwargs": {"eps": 1e-05, "affine": True}, "dropout_op": None, "dropout_op_kwargs": None,
                "nonlin": "torch.nn.LeakyReLU", "nonlin_kwargs": {"inplace": True}},
            "_kw_requires_import": ["conv_op", "norm_op", "dropout_op", "nonlin"]},
        "batch_dice": False}
    return {"dataset_name": "Dataset991_ChaosT2", "plans_name": "nnUNetPlans",
            "original_median_spacing_after_transp": [7.7, 1.25, 1.25],
            "original_median_shape_after_transp": [36, 256, 256], "image_reader_writer": "SimpleITKIO",
            "transpose_forward": [0, 1, 2], "transpose_backward": [0, 1, 2],
            "configurations": {"3d_fullres": config}, "experiment_planner_used": "ExperimentPlanner",
            "label_manager": "LabelManager",
            "foreground_intensity_properties_per_channel": {"0": {
                "max": 993.0, "mean": 300.0, "median": 290.0, "min": 0.0, "percentile_00_5": 20.0,
                "percentile_99_5": 800.0, "std": 120.0}}}


def _dice_ce(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    ce = torch.nn.functional.cross_entropy(logits, target)
    prob = logits.softmax(1)
    onehot = torch.nn.functional.one_hot(target, logits.shape[1]).permute(0, 4, 1, 2, 3).float()
    inter = (prob * onehot).sum((0, 2, 3, 4))
    dice = (2 * inter + 1e-5) / (prob.sum((0, 2, 3, 4)) + onehot.sum((0, 2, 3, 4)) + 1e-5)
    return ce + 1 - dice[1:].mean()


def build_model(data: Path, out: Path, *, spacing: list[float], patch: list[int], train: list[str], steps: int,
                crop: list[int], seed: int = 0) -> Path:
    """Writes (once) ``out/<key>/nnUNetTrainer__nnUNetPlans__3d_fullres`` and returns it (see the module docstring)."""
    from asfda.models.nnunet import build_network
    from asfda.models.nnunet_preprocessing import NnUNetPreprocessing

    dataset = json.loads((data / "dataset.json").read_text())
    plans = plans_for(spacing, patch, [40, 214, 214])
    key = hashlib.sha256(json.dumps([plans, dataset["labels"], train, steps, crop, seed, torch.__version__],
                                    sort_keys=True).encode()).hexdigest()[:12]
    model = out / key / "nnUNetTrainer__nnUNetPlans__3d_fullres"
    if (model / "fold_0" / "checkpoint_final.pth").is_file():
        return model
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    config = plans["configurations"]["3d_fullres"]
    net = build_network(config["architecture"], 1, len(dataset["labels"]))
    prep = NnUNetPreprocessing.from_plans(plans, config, dataset)
    volumes = []
    for cid in train:
        img = _nifti(data / "imagesTr" / f"{cid}_0000.nii.gz")
        lab = np.asarray(_nifti(data / "labelsTr" / f"{cid}.nii.gz").dataobj)
        x, y, _ = prep(np.asarray(img.dataobj, dtype=np.float32), img.affine, lab.astype(np.float32))
        assert y is not None
        pad = [max(p - s, 0) for p, s in zip(crop, x.shape[1:])]
        widths = [(0, 0)] + [(p // 2, p - p // 2) for p in pad]
        volumes.append((np.pad(x.numpy(), widths), np.pad(y.numpy(), widths[1:])))
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    net.train()
    t0 = time.perf_counter()
    for step in range(steps):
        xs, ys = [], []
        for _ in range(2):
            xv, yv = volumes[int(rng.integers(len(volumes)))]
            start = [int(rng.integers(0, s - p + 1)) for s, p in zip(yv.shape, crop)]
            box = tuple(slice(s, s + p) for s, p in zip(start, crop))
            xs.append(torch.from_numpy(xv[(slice(None), *box)].copy()))
            ys.append(torch.from_numpy(yv[box].astype(np.int64)))
        loss = _dice_ce(net(torch.stack(xs)), torch.stack(ys))
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 10 == 0 or step == steps - 1:
            print(f"train step {step}: loss {loss.item():.3f} ({time.perf_counter() - t0:.0f} s)", flush=True)
    tmp = model.with_name(model.name + f".tmp{os.getpid()}")
    (tmp / "fold_0").mkdir(parents=True, exist_ok=True)
    (tmp / "plans.json").write_text(json.dumps(plans, indent=2))
    (tmp / "dataset.json").write_text(json.dumps({**dataset, "numTraining": len(train)}, indent=2))
    ckpt = {"network_weights": {k: v.detach().clone() for k, v in net.state_dict().items()},
            "trainer_name": "nnUNetTrainer", "inference_allowed_mirroring_axes": (0, 1, 2), "current_epoch": 1,
            "init_args": {"plans": plans, "configuration": "3d_fullres", "fold": 0, "dataset_json": dataset}}
    torch.save(ckpt, tmp / "fold_0" / "checkpoint_final.pth")
    tmp.rename(model)
    return model


def nnunet_predictor(model: Path, mirroring: bool):
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    pred = nnUNetPredictor(use_mirroring=mirroring, device=torch.device("cpu"), perform_everything_on_device=False,
                           allow_tqdm=False)
    pred.initialize_from_trained_model_folder(str(model), use_folds=("0",))
    return pred


def nnunet_prediction(pred, image: Path) -> tuple[np.ndarray, np.ndarray]:
    """nnU-Net's label map and softmax probabilities of one image, in nibabel's axis order."""
    from nnunetv2.imageio.simpleitk_reader_writer import SimpleITKIO

    arr, props = SimpleITKIO().read_images([str(image)])
    seg, prob = pred.predict_single_npy_array(arr, props, None, None, True)
    return np.asarray(seg).T, np.asarray(prob).transpose(0, 3, 2, 1)


def asfda_predictions(model: Path, images: list[Path], tta: bool) -> dict[str, np.ndarray]:
    """``asfda.predict.predict_model`` (what ``asfda predict`` runs) on the images (linked into a temporary folder)."""
    from asfda.predict import predict_model

    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "images"
        src.mkdir()
        for img in images:
            (src / img.name).symlink_to(img.resolve())
        out = Path(tmp) / "out"
        predict_model(model, src, out, tta=tta, device="cpu", progress=False)
        return {p.name[:-7]: np.asarray(_nifti(p).dataobj) for p in out.glob("*.nii.gz")}


def compare(ours: np.ndarray, theirs: np.ndarray, prob: np.ndarray, labels: dict[str, int]) -> dict:
    diff = ours != theirs
    top2 = np.sort(prob, axis=0)[-2:]
    margin = (top2[1] - top2[0])[diff]
    dice = {}
    for name, v in labels.items():
        if v == 0:
            continue
        denom = (ours == v).sum() + (theirs == v).sum()
        dice[name] = float(2 * ((ours == v) & (theirs == v)).sum() / denom) if denom else 1.0
    return {"voxels": int(diff.sum()), "fraction": float(diff.mean()), "dice": dice,
            "margin_median": float(np.median(margin)) if margin.size else None}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "mr_chaos_t2"))
    ap.add_argument("--cases", nargs="+", default=["chaos_003", "chaos_005"])
    ap.add_argument("--train", nargs="+", default=["chaos_013", "chaos_019"])
    ap.add_argument("--spacing", type=float, nargs=3, default=[6.5, 1.5, 1.5])
    ap.add_argument("--patch", type=int, nargs=3, default=[32, 128, 128])
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--crop", type=int, nargs=3, default=[32, 96, 96], help="training crops (voxels)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--cache-dir", default=str(ROOT / ".cache" / "nnunet_parity"))
    ap.add_argument("--mirroring", choices=("none", "all", "both"), default="both",
                    help="compare without mirroring (nnU-Net --disable_tta, asfda without --tta), with nnU-Net's "
                    "default mirroring (asfda --tta), or both")
    ap.add_argument("--label", default="after", help="the row label in the output (e.g. before / after a change)")
    ap.add_argument("--out", default="", help="append the rows (markdown) to this file")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    os.environ.setdefault("nnUNet_compile", "f")
    for var in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        os.environ.setdefault(var, str(Path(args.cache_dir) / "unused"))
    data = Path(args.data)
    model = build_model(data, Path(args.cache_dir), spacing=args.spacing, patch=args.patch, train=args.train,
                        steps=args.steps, crop=args.crop)
    labels = json.loads((model / "dataset.json").read_text())["labels"]
    images = [data / "imagesTr" / f"{c}_0000.nii.gz" for c in args.cases]
    rows = []
    for mirroring in {"none": (False,), "all": (True,), "both": (False, True)}[args.mirroring]:
        t0 = time.perf_counter()
        ours = asfda_predictions(model, images, tta=mirroring)
        t_ours = time.perf_counter() - t0
        for img, cid in zip(images, args.cases):
            cached = model.parent / f"nnunet_{cid}_{'mirrored' if mirroring else 'plain'}.npz"
            if not cached.is_file():  # nnU-Net's side depends on the model and the image only: computed once
                seg, prob = nnunet_prediction(nnunet_predictor(model, mirroring), img)
                np.savez_compressed(cached, seg=seg, prob=prob.astype(np.float16))
            with np.load(cached) as z:
                seg, prob = z["seg"], z["prob"].astype(np.float32)
            row = {"case": cid, "mirroring": mirroring, **compare(ours[cid], seg, prob, labels),
                   "shape": list(seg.shape), "asfda_s": t_ours / len(images)}
            rows.append(row)
            print(json.dumps(row), flush=True)
    if args.out:
        write_rows(Path(args.out), rows, args)
    return 0


def write_rows(out: Path, rows: list[dict], args: argparse.Namespace) -> None:
    from _machine import code_version, machine

    lines = [f"\n### {args.label}: code {code_version()}, {datetime.now(UTC):%Y-%m-%dT%H:%M}+00:00, {machine()}\n",
             "| case | mirroring | voxels differing | % of volume | Dice per organ (asfda vs nnU-Net) | "
             "nnU-Net margin at differing voxels (median) |", "|---|---|---|---|---|---|"]
    for r in rows:
        dice = ", ".join(f"{k} {v:.4f}" for k, v in r["dice"].items())
        margin = "-" if r["margin_median"] is None else f"{r['margin_median']:.3f}"
        lines.append(f"| {r['case']} | {'all axes' if r['mirroring'] else 'none'} | {r['voxels']} | "
                     f"{100 * r['fraction']:.3f}% | {dice} | {margin} |")
    with out.open("a") as f:
        f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    raise SystemExit(main())
