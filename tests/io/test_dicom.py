"""DICOM series pools (asfda.io.dicom): read like the NIfTI of the same array, refused in one line naming the folder
when broken, pre-segmentations written on the series' grid, and score/query/predict end to end on a DICOM pool.

The series are written here with pydicom (CT slices with ImagePositionPatient, ImageOrientationPatient,
PixelSpacing, SliceThickness, RescaleIntercept), in files named and numbered out of order."""

from __future__ import annotations

import csv
import sys
from pathlib import Path

import numpy as np
import pytest

pydicom = pytest.importorskip("pydicom")

from pydicom.uid import generate_uid  # noqa: E402

from _dicom_helpers import ct_volume, oblique_affine, write_series  # noqa: E402
from asfda.errors import AsfdaError  # noqa: E402
from asfda.io import load_dataset, read_nifti  # noqa: E402
from asfda.io.dicom import scan_series, series_stamp, write_dicom_seg, written_seg  # noqa: E402
from asfda.io.nifti import read_header, write_label_map  # noqa: E402
from conftest import load_nifti, make_volume, write_bundle, write_nifti  # noqa: E402


def test_series_reads_like_the_nifti_of_the_same_array(tmp_path: Path) -> None:
    raw, affine = ct_volume(0), oblique_affine()
    folder = write_series(tmp_path / "pool" / "ct", raw, affine, intercept=-1024.0)
    nifti = write_nifti(tmp_path / "ct.nii.gz", raw.astype(np.float32) - 1024.0, affine)
    data, aff = read_nifti(folder)
    ref, ref_aff = read_nifti(nifti)
    assert data.dtype == np.float32 and data.shape == raw.shape
    np.testing.assert_array_equal(data, ref)
    np.testing.assert_allclose(aff, ref_aff, atol=1e-4)
    shape, header_aff = read_header(folder)
    assert shape == raw.shape and np.allclose(header_aff, ref_aff, atol=1e-4)
    case = load_dataset(tmp_path / "pool").cases[0]
    np.testing.assert_allclose(case.spacing_mm, (0.7, 0.9, 2.5), atol=1e-5)


@pytest.mark.filterwarnings("ignore:NvImgCodecPydicomReader")  # LoadImage builds every reader MONAI has
def test_monai_folder_reader_agrees_on_an_ordered_series(tmp_path: Path) -> None:
    """Where MONAI's own folder mode stacks correctly (InstanceNumber ascending with the position), it gives the same
    voxels and affine: asfda's slice order and RAS convention are MONAI's."""
    from monai.data import PydicomReader
    from monai.transforms import LoadImage

    raw, affine = ct_volume(1), oblique_affine(angles=(-20.0, 5.0, 40.0))
    folder = write_series(tmp_path / "s", raw, affine, reverse_numbers=False)
    reader = PydicomReader(fname_regex=None)  # type: ignore[arg-type]  # None: every file of the folder
    monai = LoadImage(reader=reader, image_only=True)(str(folder))
    data, aff = read_nifti(folder)
    np.testing.assert_array_equal(data, np.asarray(monai))
    np.testing.assert_allclose(aff, np.asarray(monai.affine), atol=1e-4)


def test_descending_slices_give_the_same_image_in_the_world(tmp_path: Path) -> None:
    """Slices stacked against the normal (an affine of negative determinant) are read ascending: the array flips
    along z and the affine with it, so every voxel keeps its value at its world position."""
    raw = ct_volume(2)
    affine = oblique_affine() @ np.diag([1.0, 1.0, -1.0, 1.0])
    folder = write_series(tmp_path / "s", raw, affine)
    data, aff = read_nifti(folder)
    np.testing.assert_array_equal(data, raw[:, :, ::-1].astype(np.float32))
    flip = np.eye(4)
    flip[2, 2], flip[2, 3] = -1.0, raw.shape[2] - 1
    np.testing.assert_allclose(aff, affine @ flip, atol=1e-4)


def _broken(kind: str, folder: Path) -> None:
    raw, affine = ct_volume(3), oblique_affine()
    if kind == "missing slice":
        write_series(folder, raw, affine, skip=(4,))
    elif kind == "mixed series":
        write_series(folder, raw, affine)
        write_series(folder, raw, affine @ np.diag([1, 1, 1.0, 1]), names="B{:04d}")  # same grid, other series UID
    elif kind == "same position":
        uid = generate_uid()
        write_series(folder, raw, affine, series_uid=uid)
        write_series(folder, raw, affine, series_uid=uid, names="ECHO2_{:04d}")
    elif kind == "no pixel data":
        write_series(folder, raw, affine)
        ds = pydicom.dcmread(next(folder.iterdir()))
        del ds.PixelData
        ds.save_as(folder / "report.dcm", enforce_file_format=True)
    elif kind == "uneven":
        write_series(folder, raw, affine, z=[*range(raw.shape[2] - 1), raw.shape[2] - 0.6])
    elif kind == "not DICOM":
        write_series(folder, raw, affine)
        (folder / "broken.dcm").write_bytes(b"not a dicom file at all")
    elif kind == "too thin":
        write_series(folder, raw[:, :, :3], affine)
    elif kind == "too large":
        write_series(folder, raw, affine)


@pytest.mark.parametrize("kind, message", [
    ("missing slice", "missing slices"), ("mixed series", "holds 2 series"), ("same position", "same position"),
    ("no pixel data", "has no pixel data"), ("uneven", "unevenly spaced"), ("not DICOM", "not a readable DICOM"),
    ("too thin", "fewer than 4 voxels"), ("too large", "more than asfda reads")])
def test_a_broken_series_is_refused_in_one_line_naming_its_folder(tmp_path: Path, kind: str, message: str,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    folder = tmp_path / "pool" / "PAT1" / "CT"
    _broken(kind, folder)
    if kind == "too large":
        monkeypatch.setenv("ASFDA_MAX_NIFTI_BYTES", str(10_000))
    with pytest.raises(AsfdaError, match=message) as info:
        load_dataset(tmp_path / "pool")
    text = str(info.value)
    assert info.value.path == str(folder) and "\n" not in text and info.value.fix


def test_a_truncated_slice_is_refused_when_its_voxels_are_read(tmp_path: Path) -> None:
    folder = write_series(tmp_path / "pool" / "CT", ct_volume(4), oblique_affine())
    victim = sorted(folder.iterdir())[3]
    victim.write_bytes(victim.read_bytes()[:-200])
    case = load_dataset(tmp_path / "pool").cases[0]  # headers only: the pixel data is not read yet
    with pytest.raises(AsfdaError, match=f"cannot decode the pixels of slice {victim.name}") as info:
        read_nifti(case.image_path)
    assert info.value.path == str(folder)


def test_pool_of_series_at_any_depth_with_labels(tmp_path: Path) -> None:
    pool, labels = tmp_path / "pool", tmp_path / "labels"
    affine = oblique_affine(spacing=(1.0, 1.2, 3.0))
    write_series(pool / "PAT2" / "study" / "CT", ct_volume(5), affine)
    write_series(pool / "PAT1", ct_volume(6, (20, 16, 8)), np.diag([1.5, 1.5, 4.0, 1.0]))
    (pool / "notes.txt").write_text("not an image")
    write_nifti(labels / "PAT2_study_CT.nii.gz", np.zeros((24, 20, 10), np.uint8), affine)
    ds = load_dataset(pool, labels_dir=labels)
    assert [c.case_id for c in ds.cases] == ["PAT1", "PAT2_study_CT"]
    assert ds.cases[0].shape == (20, 16, 8) and ds.cases[0].label_path is None
    assert ds.cases[1].label_path == labels / "PAT2_study_CT.nii.gz"
    np.testing.assert_allclose(ds.cases[0].spacing_mm, (1.5, 1.5, 4.0))
    write_nifti(labels / "PAT1.nii.gz", np.zeros((20, 16, 8), np.uint8), np.diag([1.5, 1.5, 4.5, 1.0]))
    with pytest.raises(AsfdaError, match="label affine differs"):
        load_dataset(pool, labels_dir=labels)


def test_series_stamp_changes_when_a_slice_is_rewritten_in_place(tmp_path: Path) -> None:
    """A folder's own mtime does not change when a file in it is rewritten; the series' stamp does."""
    import os

    folder = write_series(tmp_path / "CT", ct_volume(10), oblique_affine())
    before, slice_file = series_stamp(folder), sorted(folder.iterdir())[0]
    folder_mtime = folder.stat().st_mtime_ns
    ds = pydicom.dcmread(slice_file)
    ds.RescaleIntercept = "-1000"
    ds.save_as(slice_file, enforce_file_format=True)
    os.utime(folder, ns=(folder_mtime, folder_mtime))
    assert folder.stat().st_mtime_ns == folder_mtime and series_stamp(folder) != before


def test_without_pydicom_a_dicom_pool_is_one_line_naming_the_extra(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    write_series(tmp_path / "pool" / "CT", ct_volume(7), oblique_affine())
    monkeypatch.setitem(sys.modules, "pydicom", None)  # import pydicom now raises ImportError
    with pytest.raises(AsfdaError, match=r"pydicom is not installed.*asfda\[dicom\]"):
        load_dataset(tmp_path / "pool")


def test_presegmentation_nifti_is_written_on_the_series_grid(tmp_path: Path) -> None:
    raw, affine = ct_volume(8), oblique_affine()
    folder = write_series(tmp_path / "pool" / "CT", raw, affine)
    label = (raw > 1000).astype(np.uint8)
    out = tmp_path / "pred" / "CT.nii.gz"
    out.parent.mkdir()
    write_label_map(out, label, folder)
    img = load_nifti(str(out))
    np.testing.assert_array_equal(np.asarray(img.dataobj), label)
    np.testing.assert_allclose(img.affine, affine, atol=1e-4)
    assert int(img.header["sform_code"]) == 1 and int(img.header["qform_code"]) == 1
    ds = load_dataset(tmp_path / "pool", labels_dir=out.parent)  # accepted as the series' label
    assert ds.cases[0].label_path == out


def test_presegmentation_as_dicom_seg_references_the_series(tmp_path: Path) -> None:
    hd = pytest.importorskip("highdicom")
    raw, affine = ct_volume(9), oblique_affine()
    folder = write_series(tmp_path / "CT", raw, affine)
    label = np.zeros(raw.shape, np.uint8)
    label[3:10, 4:12, 2:6], label[14:20, 6:15, 5:9] = 1, 2
    out = write_dicom_seg(tmp_path / "seg" / "pred.dcm", label, folder, ["background", "liver", "spleen"])
    seg = hd.seg.segread(out)
    assert [s.SegmentLabel for s in seg.SegmentSequence] == ["liver", "spleen"]
    geo = scan_series(folder)
    uids = [pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID for f in geo.files]
    back = seg.get_pixels_by_source_instance(source_sop_instance_uids=uids, combine_segments=True)
    np.testing.assert_array_equal(back, np.transpose(label, (2, 1, 0)))
    assert written_seg(out) and not written_seg(geo.files[0]) and not written_seg(tmp_path / "missing.dcm")
    with pytest.raises(AsfdaError, match="not the series' grid"):
        write_dicom_seg(tmp_path / "seg" / "bad.dcm", label[:, :, :4], folder, ["background", "liver", "spleen"])


# ---------------------------------------------------------------------------------------------- end to end
def _pools(root: Path) -> tuple[Path, Path]:
    """The same three volumes as a DICOM pool (series at two depths) and as a plain NIfTI folder."""
    affine = oblique_affine(spacing=(2.0, 2.0, 3.0), angles=(0.0, 0.0, 12.0), origin=(10.0, -4.0, 30.0))
    names = ["A_CT", "B", "C"]
    for i, cid in enumerate(names):
        image, _ = make_volume(i)
        raw = np.round(image * 1000).astype(np.int16)
        write_series(root / "dicom" / cid.replace("_", "/"), raw, affine)
        write_nifti(root / "nifti" / f"{cid}.nii.gz", raw.astype(np.float32), affine)
    return root / "dicom", root / "nifti"


def test_score_query_and_predict_on_a_dicom_pool_match_the_nifti_pool(tmp_path: Path) -> None:
    from asfda.predict import predict_model
    from asfda.query import query_dataset, score_dataset

    dicom, nifti = _pools(tmp_path)
    bundle = write_bundle(tmp_path / "bundle")
    rows = {}
    for name, pool in (("dicom", dicom), ("nifti", nifti)):
        score_dataset(bundle, pool, tmp_path / f"{name}.csv", strategies=["asfda", "enpy"], cache_dir=None,
                      progress=False)
        with open(tmp_path / f"{name}.csv", newline="") as f:
            rows[name] = list(csv.DictReader(f))
    assert [r["case_id"] for r in rows["dicom"]] == ["A_CT", "B", "C"]
    for a, b in zip(rows["dicom"], rows["nifti"]):
        assert a.keys() == b.keys()
        for key in a:
            if key != "case_id":
                assert float(a[key]) == pytest.approx(float(b[key]), rel=1e-4, abs=1e-6), key
    runs = [query_dataset(bundle, pool, "asfda", 2, tmp_path / f"q_{n}.json", seed=1, temperature=1.0,
                          cache_dir=None, progress=False) for n, pool in (("d", dicom), ("n", nifti))]
    picks = [run.ids if run is not None else None for run in runs]
    assert picks[0] is not None and picks[0] == picks[1] and len(picks[0]) == 2
    predict_model(bundle, dicom, tmp_path / "pred", progress=False)
    ref = tmp_path / "pred_nifti"
    predict_model(bundle, nifti, ref, progress=False)
    for cid in ("A_CT", "B", "C"):
        got, want = load_nifti(str(tmp_path / "pred" / f"{cid}.nii.gz")), load_nifti(str(ref / f"{cid}.nii.gz"))
        np.testing.assert_array_equal(np.asarray(got.dataobj), np.asarray(want.dataobj))
        np.testing.assert_allclose(got.affine, want.affine, atol=1e-4)


def test_the_caches_see_a_slice_rewritten_in_place(tmp_path: Path) -> None:
    """The forward-output store keys a series folder by its slices (`volume_file_stamp`), not by the folder's mtime;
    a NIfTI file keeps its stamp format (path, size, mtime), so existing caches stay valid."""
    import os

    from asfda.adapter.outputs import volume_stamp
    from asfda.io.dicom import volume_file_stamp

    folder = write_series(tmp_path / "CT", ct_volume(10), oblique_affine())
    before, slice_file, folder_mtime = volume_stamp(folder), sorted(folder.iterdir())[0], folder.stat().st_mtime_ns
    ds = pydicom.dcmread(slice_file)
    ds.RescaleIntercept = "-1000"
    ds.save_as(slice_file, enforce_file_format=True)
    os.utime(folder, ns=(folder_mtime, folder_mtime))
    assert volume_stamp(folder) != before
    nii = tmp_path / "x.nii.gz"
    write_nifti(nii, np.zeros((4, 4, 4), np.uint8), np.eye(4))
    st = nii.stat()
    assert volume_file_stamp(nii) == f"{nii.resolve()}:{st.st_size}:{st.st_mtime_ns}"
