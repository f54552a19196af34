from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from asfda.errors import AsfdaError
from asfda.io import atomic_write_json, load_dataset, load_folder, read_nifti
from conftest import make_volume, write_nifti, write_nnunet


def test_nnunet_raw_reads_cases(tiny_dataset: Path) -> None:
    ds = load_dataset(tiny_dataset, require_labels=True)
    assert [c.case_id for c in ds.cases] == ["case00", "case01", "case02"]
    assert ds.class_names == ["background", "liver", "spleen"]
    c = ds.cases[0]
    assert c.shape == (20, 18, 12)
    assert c.spacing_mm == pytest.approx((2.0, 2.0, 3.0))
    assert c.label_path is not None and c.label_path.name == "case00.nii.gz"


def test_plain_folder_matches_labels_by_case_id(tmp_path: Path) -> None:
    image, label = make_volume(0)
    write_nifti(tmp_path / "img" / "a_0000.nii.gz", image)
    write_nifti(tmp_path / "img" / "b.nii.gz", image)
    write_nifti(tmp_path / "lab" / "a.nii.gz", label)
    ds = load_folder(tmp_path / "img", tmp_path / "lab")
    cases = ds.by_id()
    assert set(cases) == {"a", "b"}
    assert cases["a"].has_label and not cases["b"].has_label


def _one_line(exc: AsfdaError) -> str:
    line = exc.one_line()
    assert "\n" not in line
    return line


@pytest.mark.parametrize("breakage, expected", [
    ("no_dataset_json", "missing dataset.json"),
    ("bad_json", "invalid JSON"),
    ("labels_not_int", "has value"),
    ("duplicate_values", "more than one name"),
    ("missing_label", "has no label"),
    ("corrupt_nifti", "not a readable NIfTI"),
    ("shape_mismatch", "differs from image shape"),
    ("no_channel_suffix", "_0000 channel suffix"),
])
def test_bad_datasets_get_one_line_errors_naming_the_file(tmp_path: Path, breakage: str, expected: str) -> None:
    root = write_nnunet(tmp_path / "ds")
    meta = json.loads((root / "dataset.json").read_text())
    culprit = root / "dataset.json"
    if breakage == "no_dataset_json":
        culprit.unlink()
    elif breakage == "bad_json":
        culprit.write_text("{not json")
    elif breakage == "labels_not_int":
        meta["labels"]["liver"] = [1, 2]
        culprit.write_text(json.dumps(meta))
    elif breakage == "duplicate_values":
        meta["labels"]["spleen"] = 1
        culprit.write_text(json.dumps(meta))
    elif breakage == "missing_label":
        culprit = root / "imagesTr" / "case01_0000.nii.gz"
        (root / "labelsTr" / "case01.nii.gz").unlink()
    elif breakage == "corrupt_nifti":
        culprit = root / "imagesTr" / "case01_0000.nii.gz"
        culprit.write_bytes(b"this is not a nifti file")
    elif breakage == "shape_mismatch":
        culprit = root / "labelsTr" / "case02.nii.gz"
        write_nifti(culprit, np.zeros((5, 5, 5), np.uint8), np.diag([2.0, 2.0, 3.0, 1.0]))
    elif breakage == "no_channel_suffix":
        culprit = root / "imagesTr" / "case03.nii.gz"
        write_nifti(culprit, np.zeros((5, 5, 5), np.float32))
    with pytest.raises(AsfdaError) as info:
        load_dataset(root, require_labels=True)
    line = _one_line(info.value)
    assert expected in line
    assert str(culprit) in line


def test_read_nifti_refuses_nan_and_4d(tmp_path: Path) -> None:
    data = np.zeros((4, 4, 4), np.float32)
    data[1, 1, 1] = np.nan
    with pytest.raises(AsfdaError, match="NaN"):
        read_nifti(write_nifti(tmp_path / "nan.nii.gz", data))
    with pytest.raises(AsfdaError, match="3D"):
        read_nifti(write_nifti(tmp_path / "4d.nii.gz", np.zeros((4, 4, 4, 2), np.float32)))
    arr, aff = read_nifti(write_nifti(tmp_path / "ok.nii.gz", np.ones((4, 4, 4, 1), np.float32)))
    assert arr.shape == (4, 4, 4) and aff.shape == (4, 4)


def test_atomic_write_leaves_no_partial_file(tmp_path: Path) -> None:
    target = tmp_path / "state.json"
    atomic_write_json(target, {"a": 1})

    class Boom:
        pass

    with pytest.raises(TypeError):
        atomic_write_json(target, {"a": Boom()})
    assert json.loads(target.read_text()) == {"a": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["state.json"]
