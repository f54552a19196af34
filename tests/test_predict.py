from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, cast

import nibabel as nib
import numpy as np
import pytest
import torch
from torch import nn

from asfda.cli import main
from asfda.cli.commands import predict_summary
from asfda.errors import AsfdaError
from asfda.models import LoadedModel, Preprocessing, load_model
from asfda.predict import label_map_on_native_grid, predict_model
from conftest import TINY_LABELS, TINY_NET, load_nifti, make_volume, write_bundle, write_nifti, write_nnunet

# LPS, anisotropic, and one with permuted axes (the fake models below run on a RAS grid at 0.5 x 0.5 x 1 mm)
LPS_ANISO = np.array([[-0.8, 0, 0, 10], [0, -0.9, 0, 20], [0, 0, 2.5, -30], [0, 0, 0, 1.0]])
PERMUTED = np.array([[0, 0, -1.5, 5], [1.2, 0, 0, -4], [0, -0.7, 0, 8], [0, 0, 0, 1.0]])


class NearestIntensity(nn.Module):
    """Fake network: channel c scores how close the voxel intensity is to ``centers[c]``.

    The conftest volumes are about 0 (background), 0.4 (label 1) and 0.8 (label 2), so with centers
    (0, 0.4, 0.8) the prediction is the true label: a geometry check of predict end to end.
    """

    centers: torch.Tensor

    def __init__(self, centers: tuple[float, ...], sigmoid: bool = False) -> None:
        super().__init__()
        self.register_buffer("centers", torch.tensor(centers).view(1, -1, 1, 1, 1))
        self.sigmoid = sigmoid

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = -((x - self.centers) ** 2) / 0.02
        return z + 4.0 if self.sigmoid else z  # sigmoid: p >= 0.5 within ~0.28 of a center


def _fake_model(class_names: list[str], centers: tuple[float, ...], activation: str = "softmax") -> LoadedModel:
    prep = Preprocessing(axcodes="RAS", pixdim_mm=(0.5, 0.5, 1.0), description={"fake": True})
    net = NearestIntensity(centers, sigmoid=activation == "sigmoid").eval()
    return LoadedModel(net, class_names, prep, (16, 16, 8), 2, 0.25, activation)


def _read(path: Path) -> tuple[np.ndarray, np.ndarray, nib.Nifti1Image]:
    img = load_nifti(str(path))
    return np.asarray(img.dataobj), img.affine, img


def _dice(a: np.ndarray, b: np.ndarray, value: int) -> float:
    x, y = a == value, b == value
    return 2 * float((x & y).sum()) / max(float(x.sum() + y.sum()), 1.0)


def test_predict_bundle_writes_uint8_maps_on_the_input_grid(tmp_path: Path, tiny_bundle: Path) -> None:
    ds = write_nnunet(tmp_path / "ds", n=2)
    result = predict_model(tiny_bundle, ds, tmp_path / "out", progress=False)
    assert result["written"] == ["case00", "case01"] and result["skipped"] == []
    assert json.loads((tmp_path / "out" / "labels.json").read_text()) == TINY_LABELS
    for cid in ("case00", "case01"):
        src = load_nifti(str(ds / "imagesTr" / f"{cid}_0000.nii.gz"))
        data, affine, img = _read(tmp_path / "out" / f"{cid}.nii.gz")
        assert data.dtype == np.uint8 and img.get_data_dtype() == np.uint8
        assert data.shape == src.shape and np.allclose(affine, src.affine)
        assert set(np.unique(data)) <= set(TINY_LABELS.values())
        side = json.loads((tmp_path / "out" / f"{cid}.asfda.json").read_text())
        assert side["settings"]["model_weights_sha256_16"] == result["model_weights_sha256_16"]
    assert not [p for p in (tmp_path / "out").iterdir() if p.name.startswith(".")]  # no temporaries


@pytest.mark.parametrize("affine", [LPS_ANISO, PERMUTED], ids=["lps_anisotropic", "permuted_axes"])
def test_predict_overlays_the_input_for_any_orientation(tmp_path: Path, affine: np.ndarray,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    ds = write_nnunet(tmp_path / "ds", n=1, affine=affine)
    model = _fake_model(["background", "liver", "spleen"], (0.0, 0.4, 0.8))
    monkeypatch.setattr("asfda.predict.load_model", lambda *a, **k: model)
    predict_model("fake", ds, tmp_path / "out", progress=False)
    data, out_affine, _ = _read(tmp_path / "out" / "case00.nii.gz")
    truth, truth_affine, _ = _read(ds / "labelsTr" / "case00.nii.gz")
    assert data.shape == truth.shape and np.allclose(out_affine, truth_affine)
    assert _dice(data, truth, 1) > 0.95 and _dice(data, truth, 2) > 0.95  # a flipped axis would give ~0


def test_predict_skips_up_to_date_cases(tmp_path: Path, tiny_bundle: Path) -> None:
    ds = write_nnunet(tmp_path / "ds", n=2)
    out = tmp_path / "out"
    predict_model(tiny_bundle, ds, out, progress=False)
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    again = predict_model(tiny_bundle, ds, out, progress=False)
    assert again["written"] == [] and again["skipped"] == ["case00", "case01"]
    assert "2 skipped" in predict_summary(again)  # what `asfda predict` prints
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before  # nothing rewritten
    # an image newer than its output is redone
    older = (ds / "imagesTr" / "case01_0000.nii.gz").stat().st_mtime_ns - 10**9
    os.utime(out / "case01.nii.gz", ns=(older, older))
    assert predict_model(tiny_bundle, ds, out, progress=False)["written"] == ["case01"]
    # other weights, or TTA, are other settings
    other = write_bundle(tmp_path / "other", seed=1)
    assert predict_model(other, ds, out, progress=False)["written"] == ["case00", "case01"]
    assert predict_model(other, ds, out, tta=True, progress=False)["written"] == ["case00", "case01"]
    assert predict_model(other, ds, out, tta=True, progress=False)["skipped"] == ["case00", "case01"]
    # a sidecar that is only the claim written before the label map (killed between the two writes) means redo
    side = json.loads((out / "case00.asfda.json").read_text())
    (out / "case00.asfda.json").write_text(json.dumps({**side, "settings": None}))
    assert predict_model(other, ds, out, tta=True, progress=False)["written"] == ["case00"]
    # a label map with no sidecar at all is not predict's to replace (tests/io/test_outputs.py has more of these)
    (out / "case00.asfda.json").unlink()
    with pytest.raises(AsfdaError, match="case00.nii.gz exists and was not written by asfda predict"):
        predict_model(other, ds, out, tta=True, overwrite=True, progress=False)


def test_predict_plain_folder_writes_model_indices_and_names(tmp_path: Path, tiny_bundle: Path) -> None:
    image, _ = make_volume(0)
    write_nifti(tmp_path / "imgs" / "scan_a.nii.gz", image, LPS_ANISO)
    result = predict_model(tiny_bundle, tmp_path / "imgs", tmp_path / "out", tta=True, progress=False)
    assert result["written"] == ["scan_a"]
    assert json.loads((tmp_path / "out" / "labels.json").read_text()) == {"background": 0, "liver": 1, "spleen": 2}
    data, affine, _ = _read(tmp_path / "out" / "scan_a.nii.gz")
    assert data.shape == image.shape and np.allclose(affine, LPS_ANISO)
    assert json.loads((tmp_path / "out" / "scan_a.asfda.json").read_text())["n_passes"] == 3


def test_sigmoid_threshold_and_overlaps_resolved_by_highest_probability() -> None:
    # channels: 0 and 1 both above 0.5 in the first voxel (1 higher), 0 alone in the second, none in the third
    logits = torch.tensor([[2.0, 1.0, -1.0], [3.0, -2.0, -0.5], [0.0, -5.0, -5.0]]).view(3, 3, 1, 1)
    eye = np.eye(4)
    label = label_map_on_native_grid(logits, "sigmoid", (0, 1, 2), (1, 2, 3), eye, eye, (3, 1, 1))
    assert label.ravel().tolist() == [2, 1, 0]
    # p = sigmoid(0) = 0.5 counts as above the threshold
    label = label_map_on_native_grid(logits[2:], "sigmoid", (0,), (7,), eye, eye, (3, 1, 1))
    assert label.ravel().tolist() == [7, 0, 0]
    soft = label_map_on_native_grid(logits, "softmax", (1, 2), (1, 2), eye, eye, (3, 1, 1))
    assert soft.ravel().tolist() == logits.argmax(0).ravel().tolist()


def test_predict_with_a_sigmoid_head(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ds = write_nnunet(tmp_path / "ds", n=1, affine=LPS_ANISO)
    # multi-label head without a background channel, classes in another order than the dataset's
    model = _fake_model(["spleen", "liver", "kidney"], (0.8, 0.4, 5.0), activation="sigmoid")
    monkeypatch.setattr("asfda.predict.load_model", lambda *a, **k: model)
    predict_model("fake", ds, tmp_path / "out", progress=False)
    data, _, _ = _read(tmp_path / "out" / "case00.nii.gz")
    truth, _, _ = _read(ds / "labelsTr" / "case00.nii.gz")
    assert _dice(data, truth, 1) > 0.95 and _dice(data, truth, 2) > 0.95
    # a plain folder: the model's channels, shifted by one for the background
    image, _ = make_volume(0)
    write_nifti(tmp_path / "imgs" / "a.nii.gz", image)
    predict_model("fake", tmp_path / "imgs", tmp_path / "out2", progress=False)
    assert json.loads((tmp_path / "out2" / "labels.json").read_text()) == {
        "background": 0, "spleen": 1, "liver": 2, "kidney": 3}
    assert set(np.unique(_read(tmp_path / "out2" / "a.nii.gz")[0])) == {0, 1, 2}


def test_torchscript_model_loads_with_config_and_predicts(tmp_path: Path) -> None:
    from monai.networks.nets import UNet

    torch.manual_seed(0)
    net = UNet(**cast(dict[str, Any], {k: v for k, v in TINY_NET.items() if k != "_target_"})).eval()
    ts = tmp_path / "tiny.ts"
    torch.jit.save(torch.jit.script(net), str(ts))
    bundle = write_bundle(tmp_path / "b")
    cfg = json.loads((bundle / "configs" / "inference.json").read_text())
    del cfg["network_def"]
    cfg["channel_def"] = {"0": "background", "1": "liver", "2": "spleen"}
    cfg_path = tmp_path / "ts_config.json"
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(AsfdaError, match="TorchScript model.*--trust-model-code"):  # a program: only when trusted
        load_model(ts, config=cfg_path)
    loaded = load_model(ts, config=cfg_path, allow_code=True)
    assert loaded.class_names == ["background", "liver", "spleen"]
    assert loaded.preprocessing.axcodes == "RAS" and loaded.preprocessing.pixdim_mm == (2.0, 2.0, 3.0)
    assert loaded.roi_size == (16, 16, 8)
    ds = write_nnunet(tmp_path / "ds", n=1, affine=LPS_ANISO)
    code = main(["predict", "--model", str(ts), "--model-config", str(cfg_path), "--images", str(ds),
                 "--out", str(tmp_path / "out"), "--tta", "--no-progress", "--trust-model-code"])
    assert code == 0
    data, affine, _ = _read(tmp_path / "out" / "case00.nii.gz")
    assert data.shape == (20, 18, 12) and np.allclose(affine, LPS_ANISO)


def test_predict_cli_reports_bad_input_in_one_line(tmp_path: Path, tiny_bundle: Path,
                                                   capsys: pytest.CaptureFixture) -> None:
    (tmp_path / "empty").mkdir()
    assert main(["predict", "--model", str(tiny_bundle), "--images", str(tmp_path / "empty"),
                 "--out", str(tmp_path / "out"), "--no-progress"]) == 2
    assert "no .nii" in capsys.readouterr().err


@pytest.mark.parametrize("where", ["labelsTr", "imagesTr"])
def test_predict_never_writes_into_input_folders(tmp_path: Path, tiny_bundle: Path, where: str) -> None:
    from asfda.errors import AsfdaError

    data = write_nnunet(tmp_path / "ds", n=1)
    before = {p: p.read_bytes() for p in (data / where).iterdir()}
    with pytest.raises(AsfdaError, match="overwrite"):
        predict_model(tiny_bundle, data, data / where, progress=False)
    assert {p: p.read_bytes() for p in (data / where).iterdir()} == before


def test_torchscript_saved_as_model_pt_is_recognised_by_content(tmp_path: Path) -> None:
    """A TorchScript archive named model.pt (as bundles ship it) is loaded as TorchScript, not taken for a state
    dict; a state dict named model.pt is not taken for TorchScript."""
    from monai.networks.nets import UNet

    from asfda.models.loading import is_torchscript

    net = UNet(**cast(dict[str, Any], {k: v for k, v in TINY_NET.items() if k != "_target_"})).eval()
    bundle = write_bundle(tmp_path / "b")
    assert not is_torchscript(bundle / "models" / "model.pt")
    cfg = json.loads((bundle / "configs" / "inference.json").read_text())
    del cfg["network_def"]
    cfg["channel_def"] = {"0": "background", "1": "liver", "2": "spleen"}
    (bundle / "configs" / "inference.json").write_text(json.dumps(cfg))
    torch.jit.save(torch.jit.script(net), str(bundle / "models" / "model.pt"))
    assert is_torchscript(bundle / "models" / "model.pt")
    loaded = load_model(bundle, allow_code=True)
    assert isinstance(loaded.network, torch.jit.ScriptModule) and loaded.class_names[1] == "liver"


def test_predict_largest_component_removes_stray_pieces(tmp_path: Path, monkeypatch) -> None:
    """--largest-component all: each class keeps only its largest piece; an unknown class name is refused."""
    import asfda.predict as P
    from asfda.errors import AsfdaError

    bundle = write_bundle(tmp_path / "b")
    ds = write_nnunet(tmp_path / "ds", n=1)

    def fake_map(*a, **k):  # liver: a big block and a stray voxel; spleen: one block
        lab = np.zeros((20, 18, 12), np.uint8)
        lab[2:8, 2:8, 2:6] = 1
        lab[15, 15, 10] = 1
        lab[10:14, 10:14, 2:6] = 2
        return lab

    monkeypatch.setattr(P, "label_map_on_native_grid", fake_map)
    P.predict_model(bundle, ds, tmp_path / "raw", progress=False)
    P.predict_model(bundle, ds, tmp_path / "lcc", progress=False, largest_component="all")
    raw, lcc = _read(tmp_path / "raw" / "case00.nii.gz")[0], _read(tmp_path / "lcc" / "case00.nii.gz")[0]
    assert (raw == 1).sum() == 145 and (lcc == 1).sum() == 144 and (lcc == 2).sum() == (raw == 2).sum()
    with pytest.raises(AsfdaError, match="kidney"):
        P.predict_model(bundle, ds, tmp_path / "bad", progress=False, largest_component="kidney")


def test_a_case_of_another_folder_with_the_same_id_is_not_up_to_date(tmp_path: Path, tiny_bundle: Path) -> None:
    """Two datasets with the same case ids into one output folder: the second one's maps are made, not skipped."""
    first, second = write_nnunet(tmp_path / "a", n=1), write_nnunet(tmp_path / "b", n=1, affine=LPS_ANISO)
    out = tmp_path / "out"
    assert predict_model(tiny_bundle, first, out, progress=False)["written"] == ["case00"]
    assert predict_model(tiny_bundle, second, out, progress=False)["written"] == ["case00"]
    assert np.allclose(_read(out / "case00.nii.gz")[1], LPS_ANISO)
    assert predict_model(tiny_bundle, second, out, progress=False)["skipped"] == ["case00"]
