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


def _huge_header(path: Path, shape=(1024, 1024, 512), payload: bytes = b"\0" * 4) -> Path:
    """A NIfTI header declaring ``shape`` float32 voxels (2 GiB by default) and almost no data."""
    import gzip

    import nibabel as nib

    hdr = nib.Nifti1Header()
    hdr.set_data_shape(shape)
    hdr.set_data_dtype(np.float32)
    hdr.set_qform(np.eye(4), 1)
    blob = hdr.binaryblock + b"\0\0\0\0" + payload
    path.write_bytes(gzip.compress(blob) if path.name.endswith(".gz") else blob)
    return path


@pytest.mark.parametrize("name", ["huge.nii", "huge.nii.gz"])
def test_a_header_declaring_more_data_than_the_file_holds_is_refused_before_reading(tmp_path: Path,
                                                                                     name: str) -> None:
    import tracemalloc

    path = _huge_header(tmp_path / name)
    assert path.stat().st_size < 500
    tracemalloc.start()
    try:
        with pytest.raises(AsfdaError) as e:
            read_nifti(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 50 * 2**20, f"{peak / 2**20:.0f} MiB allocated before refusing"
    msg = str(e.value)
    assert str(path) in msg and "declares" in msg and "2 GiB" in msg and "\n" not in msg


def test_a_gzip_whose_size_trailer_disagrees_is_refused(tmp_path: Path) -> None:
    import gzip

    import nibabel as nib

    small = write_nifti(tmp_path / "small.nii.gz", np.ones((8, 8, 8), np.float32))
    raw = gzip.decompress(small.read_bytes())
    hdr = nib.Nifti1Header.from_fileobj(__import__("io").BytesIO(raw))
    hdr.set_data_shape((64, 64, 64))  # 1 MiB declared; the stream holds 2 KiB
    forged = hdr.binaryblock + raw[348:]
    (tmp_path / "forged.nii.gz").write_bytes(gzip.compress(forged))
    with pytest.raises(AsfdaError, match="declares"):
        read_nifti(tmp_path / "forged.nii.gz")
    # a multi-member gzip (bgzip-style) of a complete file still reads: its last ISIZE is only the last member's
    full = gzip.decompress(write_nifti(tmp_path / "full.nii.gz", np.ones((16, 16, 16), np.float32)).read_bytes())
    cut = len(full) // 2
    (tmp_path / "multi.nii.gz").write_bytes(gzip.compress(full[:cut]) + gzip.compress(full[cut:]))
    arr, _ = read_nifti(tmp_path / "multi.nii.gz")
    assert arr.shape == (16, 16, 16) and float(arr.sum()) == 16**3


def test_a_declared_size_above_the_cap_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import asfda.io.nifti as nifti

    ok = write_nifti(tmp_path / "ok.nii.gz", np.ones((16, 16, 16), np.float32))  # 16 KiB
    monkeypatch.setenv("ASFDA_MAX_NIFTI_BYTES", str(8 * 1024))
    with pytest.raises(AsfdaError, match="ASFDA_MAX_NIFTI_BYTES"):
        read_nifti(ok)
    monkeypatch.delenv("ASFDA_MAX_NIFTI_BYTES")
    assert nifti.max_nifti_bytes() >= 2**32
    assert read_nifti(ok)[0].shape == (16, 16, 16)
    # a header declaring more than the default cap: refused on the header alone
    with pytest.raises(AsfdaError, match="more than asfda reads"):
        read_nifti(_huge_header(tmp_path / "cap.nii", shape=(4096, 4096, 1024)))
