"""nnU-Net v2 results folders as models (asfda.models.nnunet, asfda.models.nnunet_preprocessing).

A tiny nnU-Net v2 model is trained once by nnunetv2's own planner, preprocessor and trainer (`_nnunet_fixture.py`,
cached in .cache/nnunet_fixture/); the tests check that asfda preprocesses and segments exactly as nnU-Net does,
refuses a checkpoint whose pickle would run code, and writes an adapted model back as a results folder that
``nnUNetv2_predict_from_modelfolder`` runs. Skipped when nnunetv2 (the ``test`` extra) is not installed.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any, cast

import nibabel as nib
import numpy as np
import pytest
import torch

from asfda.cli import main
from asfda.errors import AsfdaError
from asfda.io.nifti import read_nifti
from asfda.models import load_model, nnunet
from asfda.models.nnunet import NnUNetEnsemble, is_nnunet_source, load_checkpoint
from conftest import load_nifti

pytestmark = pytest.mark.skipif(importlib.util.find_spec("nnunetv2") is None,
                                reason="nnunetv2 is not installed (pip install 'asfda[test]')")

from _repo import REPO  # noqa: E402

SCRIPT = REPO / "tests" / "support" / "_nnunet_fixture.py"
CACHE = REPO / ".cache" / "nnunet_fixture"
CLASSES = (1, 2)


@pytest.fixture(scope="session")
def nn() -> dict[str, Path]:
    """The trained results folder (folds 0 and 1) and its raw dataset, built once per fixture script and nnunetv2
    version (about a minute on 2 CPU cores), then reused."""
    from importlib.metadata import version

    key = hashlib.sha256(SCRIPT.read_bytes() + version("nnunetv2").encode() + torch.__version__.encode()).hexdigest()
    dest = CACHE / key[:12]
    if not (dest / "fixture.json").is_file():
        tmp = CACHE / f"{key[:12]}.tmp{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        proc = subprocess.run([sys.executable, str(SCRIPT), str(tmp)], capture_output=True, text=True, timeout=900,
                              check=False)
        assert proc.returncode == 0, (proc.stdout[-2000:], proc.stderr[-4000:])
        try:
            tmp.rename(dest)
        except OSError:  # built meanwhile by another test process
            shutil.rmtree(tmp, ignore_errors=True)
    info = json.loads((dest / "fixture.json").read_text())
    return {"model": dest / info["model"], "raw": dest / info["dataset"]}


def _dice(a: np.ndarray, b: np.ndarray, c: int) -> float:
    denom = (a == c).sum() + (b == c).sum()
    return 1.0 if denom == 0 else float(2 * ((a == c) & (b == c)).sum() / denom)


def _nnunet_labels(model: Path, images: list[Path], folds: tuple[str, ...], mirroring: bool = False
                   ) -> dict[str, np.ndarray]:
    """nnUNetPredictor's label maps (no mirroring, or its default mirroring), in nibabel's axis order."""
    from nnunetv2.imageio.simpleitk_reader_writer import SimpleITKIO
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    pred = nnUNetPredictor(use_mirroring=mirroring, device=torch.device("cpu"), perform_everything_on_device=False,
                           allow_tqdm=False)
    pred.initialize_from_trained_model_folder(str(model), use_folds=folds)
    out = {}
    for img in images:
        arr, props = SimpleITKIO().read_images([str(img)])
        out[img.name[:-len("_0000.nii.gz")]] = pred.predict_single_npy_array(arr, props, None, None, False).T
    return out


def _assert_same_labels(ours: dict[str, np.ndarray], theirs: dict[str, np.ndarray]) -> None:
    assert sorted(ours) == sorted(theirs)
    for cid, ref in theirs.items():
        assert ours[cid].shape == ref.shape, cid
        for c in CLASSES:
            assert (ref == c).sum() > 20, f"{cid}: nnU-Net predicts no class {c}; the fixture is untrained"
            assert _dice(ours[cid], ref, c) >= 0.99, (cid, c, _dice(ours[cid], ref, c))


def _read_labels(folder: Path) -> dict[str, np.ndarray]:
    return {p.name[:-7]: np.asarray(load_nifti(p).dataobj) for p in sorted(folder.glob("*.nii.gz"))}


# -- loading ---------------------------------------------------------------------------------------------------------

def test_results_folder_fold_folder_and_checkpoint_are_recognised(nn: dict, tmp_path: Path) -> None:
    model = nn["model"]
    assert is_nnunet_source(model) and is_nnunet_source(model / "fold_0")
    assert is_nnunet_source(model / "fold_0" / "checkpoint_final.pth")
    assert not is_nnunet_source(nn["raw"])
    ens = load_model(model)
    assert isinstance(ens.network, NnUNetEnsemble) and len(ens.network.folds) == 2
    assert ens.class_names == ["background", "liver", "spleen"] and ens.sw_mode == nnunet.SW_MODE
    # TTA mirrors the axes nnU-Net's trainer allowed (all three for 3D, left-right included), as nnU-Net's predictor
    assert cast(Any, ens.preprocessing).axes == (0, 2, 1) and ens.tta_axes == (0, 1, 2)
    plans = json.loads((model / "plans.json").read_text())["configurations"]["3d_fullres"]
    assert list(ens.roi_size) == plans["patch_size"] and ens.overlap == 0.5
    one = load_model(model / "fold_1")
    assert not isinstance(one.network, NnUNetEnsemble) and one.metadata["nnunet"]["folds"] == ["1"]
    # a bare checkpoint (copied out of its results folder): plans and dataset.json from its init_args
    bare = load_model(shutil.copy(model / "fold_0" / "checkpoint_final.pth", tmp_path / "bare.pth"))
    assert bare.weights_hash == load_model(model / "fold_0").weights_hash
    assert bare.preprocessing.cache_key() == ens.preprocessing.cache_key()


def test_preprocessing_is_nnunets(nn: dict) -> None:
    """asfda's preprocessing of an image (and label) is nnU-Net's DefaultPreprocessor's, value for value: transpose,
    crop to non-zero, masked z-score, resampling (cubic; separate-z for the anisotropic case), for the plans' scheme
    and for CTNormalization and the reorienting reader too."""
    from nnunetv2.preprocessing.preprocessors.default_preprocessor import (
        DefaultPreprocessor,
    )
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    from asfda.models.nnunet_preprocessing import NnUNetPreprocessing

    model = nn["model"]
    plans, dataset = json.loads((model / "plans.json").read_text()), json.loads((model / "dataset.json").read_text())
    ct = json.loads(json.dumps(plans))
    ct["configurations"]["3d_fullres"]["normalization_schemes"] = ["CTNormalization"]
    reorient = json.loads(json.dumps(plans))
    reorient["image_reader_writer"] = "NibabelIOWithReorient"
    for p in (plans, ct, reorient):
        pm = PlansManager(p)
        cm = pm.get_configuration("3d_fullres")
        ours = NnUNetPreprocessing.from_plans(p, p["configurations"]["3d_fullres"], dataset)
        for img in sorted((nn["raw"] / "imagesTs").glob("*.nii.gz")):
            lab = nn["raw"] / "labelsTs" / img.name.replace("_0000", "")
            data, seg, _ = DefaultPreprocessor(verbose=False).run_case([str(img)], str(lab), pm, cm, dataset)
            image, affine = read_nifti(img)
            x, y, _ = ours(image, affine, read_nifti(lab)[0])
            assert tuple(x.shape) == data.shape and y is not None, img.name
            np.testing.assert_allclose(x.numpy(), data, atol=1e-5, err_msg=f"{img.name} {p['image_reader_writer']}")
            assert np.array_equal(y.numpy(), np.maximum(seg[0], 0)), img.name


def test_predict_gives_nnunets_labels_one_fold_and_ensemble(nn: dict, tmp_path: Path) -> None:
    """`asfda predict` (CLI) on test images of other spacings, orientations and sizes (one of them several windows
    large) writes nnUNetPredictor's labels: Dice >= 0.99 per class, for fold 0 and for the two folds' ensemble."""
    images = sorted((nn["raw"] / "imagesTs").glob("*.nii.gz"))
    for source, folds in ((nn["model"] / "fold_0", ("0",)), (nn["model"], ("0", "1"))):
        out = tmp_path / f"pred_{len(folds)}"
        assert main(["predict", "--model", str(source), "--images", str(nn["raw"] / "imagesTs"), "--out", str(out),
                     "--device", "cpu", "--no-progress"]) == 0
        ours = _read_labels(out)
        for img in images:  # written on each image's own grid
            assert ours[img.name[:-12]].shape == load_nifti(img).shape
        _assert_same_labels(ours, _nnunet_labels(nn["model"], images, folds))


def test_score_runs_on_an_nnunet_model(nn: dict, tmp_path: Path) -> None:
    out = tmp_path / "scores.csv"
    assert main(["score", "--model", str(nn["model"] / "fold_0"), "--data", str(nn["raw"]), "--out", str(out),
                 "--device", "cpu", "--no-progress"]) == 0
    lines = out.read_text().splitlines()
    assert len(lines) == 1 + 6 and "asd" in lines[0].lower()


# -- safety ----------------------------------------------------------------------------------------------------------

class _Payload:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_a_checkpoint_that_runs_code_is_refused(nn: dict, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil"
    (evil / "fold_0").mkdir(parents=True)
    for name in ("plans.json", "dataset.json"):
        shutil.copy(nn["model"] / name, evil / name)
    ckpt = torch.load(nn["model"] / "fold_0" / "checkpoint_final.pth", weights_only=False)
    ckpt["logging"] = {"note": _Payload(marker)}
    torch.save(ckpt, evil / "fold_0" / "checkpoint_final.pth")
    with pytest.raises(AsfdaError, match="needs code to load") as err:
        load_model(evil)
    assert "posix.system" in str(err.value) or "os.system" in str(err.value)
    with pytest.raises(AsfdaError, match="needs code to load"):
        load_checkpoint(evil / "fold_0" / "checkpoint_final.pth")
    capsys.readouterr()
    assert main(["predict", "--model", str(evil), "--images", str(nn["raw"] / "imagesTs"), "--out",
                 str(tmp_path / "out"), "--no-progress"]) == 2
    err_lines = capsys.readouterr().err.strip().splitlines()
    assert len(err_lines) == 1 and "needs code to load" in err_lines[0]
    assert not marker.exists()
    # the genuine checkpoint (numpy scalars in its training log) loads under the same allow-list
    assert isinstance(load_checkpoint(nn["model"] / "fold_0" / "checkpoint_final.pth")["_best_ema"], np.floating)


def test_plans_cannot_name_code(nn: dict, tmp_path: Path) -> None:
    bad = tmp_path / "bad"
    shutil.copytree(nn["model"], bad, ignore=shutil.ignore_patterns("fold_1"))
    plans = json.loads((bad / "plans.json").read_text())
    plans["configurations"]["3d_fullres"]["architecture"]["arch_kwargs"]["nonlin"] = "os.system"
    (bad / "plans.json").write_text(json.dumps(plans))
    with pytest.raises(AsfdaError, match="does not build"):
        load_model(bad)
    plans["configurations"]["3d_fullres"]["architecture"]["arch_kwargs"]["nonlin"] = "torch.nn.LeakyReLU"
    plans["configurations"]["3d_fullres"]["architecture"]["network_class_name"] = "subprocess.Popen"
    (bad / "plans.json").write_text(json.dumps(plans))
    with pytest.raises(AsfdaError, match="network class"):
        load_model(bad)


def _copy_model(nn: dict, dest: Path) -> Path:
    shutil.copytree(nn["model"], dest, ignore=shutil.ignore_patterns("fold_1"))
    return dest


class _ScriptedPayload(torch.nn.Module):
    def __init__(self, marker: str) -> None:
        super().__init__()
        self.marker = marker
        self.touched = torch.zeros(1, dtype=torch.uint8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.touched = torch.from_file(self.marker, shared=True, size=1, dtype=torch.uint8)
        return x


def test_a_torchscript_checkpoint_is_refused_unopened(nn: dict, tmp_path: Path) -> None:
    """A fold's checkpoint_final.pth that is TorchScript (a program) is refused as such, with or without the trust
    flag (nnU-Net checkpoints are read with weights_only=True only), and nothing of it runs."""
    model = _copy_model(nn, tmp_path / "ts")
    marker = tmp_path / "pwned"
    torch.jit.save(torch.jit.script(_ScriptedPayload(str(marker))), str(model / "fold_0" / "checkpoint_final.pth"))
    for trust in (False, True):
        with pytest.raises(AsfdaError, match="TorchScript model"):
            load_model(model, allow_code=trust)
    assert not marker.exists()


def test_nan_weights_duplicate_labels_and_deep_json_are_refused(nn: dict, tmp_path: Path) -> None:
    """NaN weights (naming the tensor), two labels of one name (the class map could not tell them apart), and a
    plans.json of 100,000 nested lists: each one line, no traceback."""
    nan = _copy_model(nn, tmp_path / "nan")
    ckpt_path = nan / "fold_0" / "checkpoint_final.pth"
    ckpt = torch.load(ckpt_path, weights_only=False)
    name = next(k for k, v in ckpt["network_weights"].items() if v.is_floating_point())
    ckpt["network_weights"][name] = torch.full_like(ckpt["network_weights"][name], float("nan"))
    torch.save(ckpt, ckpt_path)
    with pytest.raises(AsfdaError, match=f"NaN or infinite values \\(in {name}"):
        load_model(nan)
    dup = _copy_model(nn, tmp_path / "dup")
    dataset = json.loads((dup / "dataset.json").read_text())
    dataset["labels"] = {"background": 0, "Liver": 1, "liver": 2}
    (dup / "dataset.json").write_text(json.dumps(dataset))
    with pytest.raises(AsfdaError, match="two output classes alike") as err:
        load_model(dup)
    assert "dataset.json" in str(err.value)
    deep = _copy_model(nn, tmp_path / "deep")
    (deep / "plans.json").write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(AsfdaError, match="nested too deeply"):
        load_model(deep)


# -- adaptation and writing back -------------------------------------------------------------------------------------

def test_adapted_model_is_a_results_folder_nnunet_runs(nn: dict, tmp_path: Path) -> None:
    """One annotation round on an nnU-Net model (scoring and selection in `next`, fine-tuning in `finetune`) writes
    proj/model/ as an nnU-Net results folder: new weights, the source's checkpoint keys, and
    nnUNetv2_predict_from_modelfolder segments with it as asfda does."""
    pool = tmp_path / "pool"
    shutil.copytree(nn["raw"], pool, ignore=shutil.ignore_patterns("labelsTr", "imagesTs", "labelsTs"))
    proj = tmp_path / "proj"
    assert main(["init", str(proj), "--model", str(nn["model"] / "fold_0"), "--pool", str(pool), "--budget", "1",
                 "--steps", "3", "--device", "cpu", "--no-progress", "--no-guard"]) == 0
    assert main(["next", str(proj), "--no-progress"]) == 0
    query = json.loads((proj / "project.json").read_text())["query"]
    (tmp_path / "ann").mkdir()
    for cid in query["ids"]:
        shutil.copy(nn["raw"] / "labelsTr" / f"{cid}.nii.gz", tmp_path / "ann" / f"{cid}.nii.gz")
        pre = load_nifti(proj / query["folder"] / "presegmentations" / f"{cid}.nii.gz")
        assert pre.shape == load_nifti(pool / "imagesTr" / f"{cid}_0000.nii.gz").shape
    assert main(["ingest", str(tmp_path / "ann"), str(proj), "--no-progress"]) == 0
    assert main(["finetune", str(proj), "--no-progress"]) == 0

    adapted = proj / "model"
    assert {"asfda.json", "dataset.json", "fold_0", "plans.json"} <= {p.name for p in adapted.iterdir()}
    assert json.loads((adapted / "plans.json").read_text()) == json.loads((nn["model"] / "plans.json").read_text())
    old = load_checkpoint(nn["model"] / "fold_0" / "checkpoint_final.pth")
    new = load_checkpoint(adapted / "fold_0" / "checkpoint_final.pth")
    assert sorted(new) == sorted(old) and new["trainer_name"] == old["trainer_name"]
    assert any(not torch.equal(new["network_weights"][k], v) for k, v in old["network_weights"].items())
    meta = json.loads((adapted / "asfda.json").read_text())["asfda"]
    assert meta["weights_sha256_16"] == load_model(adapted).weights_hash

    images = tmp_path / "images"
    shutil.copytree(nn["raw"] / "imagesTs", images)
    theirs = tmp_path / "nnunet_out"
    env = {**os.environ, "nnUNet_raw": str(tmp_path), "nnUNet_preprocessed": str(tmp_path),
           "nnUNet_results": str(tmp_path), "nnUNet_compile": "f"}
    proc = subprocess.run([str(Path(sys.executable).with_name("nnUNetv2_predict_from_modelfolder")), "-i", str(images),
                           "-o", str(theirs), "-m", str(adapted), "-f", "0", "-device", "cpu", "--disable_tta",
                           "-npp", "1", "-nps", "1", "--disable_progress_bar"],
                          capture_output=True, text=True, timeout=600, env=env, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ours = tmp_path / "asfda_out"
    assert main(["predict", "--model", str(adapted), "--images", str(images), "--out", str(ours), "--device", "cpu",
                 "--no-progress"]) == 0
    _assert_same_labels(_read_labels(ours), _read_labels(theirs))


# -- parity on an anisotropic volume ---------------------------------------------------------------------------------

ANISO_SPACING = (2.0, 1.0, 3.5)  # the slice axis 3.5 times the in-plane voxel: nnU-Net resamples it apart (order 0)


def _anisotropic_image(folder: Path) -> Path:
    """A phantom case twice the fixture's anatomy on an anisotropic, left-right mirrored (LAS-like) grid: nnU-Net crops
    it to the body, resamples it with separate z, and tiles the model grid with three windows along an axis."""
    from _nnunet_fixture import make_case

    image, _, affine = make_case(300, ANISO_SPACING, (56, 64, 18), (True, False, False), size=2.0)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "aniso_000_0000.nii.gz"
    nib.save(nib.Nifti1Image(image, affine), str(path))
    return path


def _fraction_differing(ours: np.ndarray, theirs: np.ndarray) -> float:
    assert ours.shape == theirs.shape
    for c in CLASSES:
        assert (theirs == c).sum() > 20, f"nnU-Net predicts no class {c} on the anisotropic phantom"
    return float((ours != theirs).mean())


def test_nnunet_tiling_on_an_anisotropic_volume_is_nnunets(nn: dict, tmp_path: Path) -> None:
    """asfda's nnU-Net path on an anisotropic volume (preprocessing with separate-z resampling, nnU-Net's tiling of
    `asfda.models.nnunet_window`, the export back to the native grid) gives nnUNetPredictor's labels, without and
    with nnU-Net's default mirroring (all axis combinations), within 0.1 % of the voxels. MONAI's tiling (positions
    and Gaussian) differs on this grid, so the test fails with it."""
    from monai.data.utils import dense_patch_slices
    from monai.inferers.utils import _get_scan_interval

    from asfda.models.nnunet_window import sliding_window, window_starts

    img = _anisotropic_image(tmp_path)
    loaded = load_model(nn["model"] / "fold_0")
    image, affine = read_nifti(img)
    x, _, grid_affine = loaded.preprocessing(image, affine)
    size, patch = tuple(x.shape[1:]), loaded.roi_size
    monai = dense_patch_slices(size, patch, _get_scan_interval(size, patch, 3, (0.5,) * 3))
    assert [sorted({s[d].start for s in monai}) for d in range(3)] != window_starts(size, patch), "not a test of tiling"
    for mirroring in (False, True):
        theirs = _nnunet_labels(nn["model"], [img], ("0",), mirroring)["aniso_000"]
        with torch.inference_mode():
            logits = sliding_window(x[None], loaded.network, patch, sw_batch_size=loaded.sw_batch_size,
                                    mirror_axes=loaded.tta_axes if mirroring else ())[0]
        ours = cast(Any, loaded.preprocessing).label_map_on_native_grid(logits, CLASSES, CLASSES, grid_affine, affine,
                                                                        image.shape)
        assert ours is not None
        assert _fraction_differing(ours, theirs) <= 0.001, (mirroring, _fraction_differing(ours, theirs))


def test_predict_on_an_anisotropic_volume_is_nnunets(nn: dict, tmp_path: Path) -> None:
    """`asfda predict` (and `--tta`) on the anisotropic volume writes nnUNetPredictor's labels without (and with)
    mirroring, within 0.1 % of the voxels."""
    img = _anisotropic_image(tmp_path / "images")
    for tta in (False, True):
        out = tmp_path / f"pred_{tta}"
        assert main(["predict", "--model", str(nn["model"] / "fold_0"), "--images", str(img.parent), "--out", str(out),
                     "--device", "cpu", "--no-progress", *(["--tta"] if tta else [])]) == 0
        theirs = _nnunet_labels(nn["model"], [img], ("0",), tta)["aniso_000"]
        ours = _read_labels(out)["aniso_000"]
        assert _fraction_differing(ours, theirs) <= 0.001, (tta, _fraction_differing(ours, theirs))
