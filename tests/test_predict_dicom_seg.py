"""``asfda predict --dicom-seg`` (issue 35, DICOM in): a DICOM series' pre-segmentation also as a DICOM SEG
(``OUT/CASE.seg.dcm``) referencing the series' slices, holding the label map written beside it; a foreign file of
that name refused before any case; a case that is not a DICOM series gets a note, not an error."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

pydicom = pytest.importorskip("pydicom")
hd = pytest.importorskip("highdicom")

from _dicom_helpers import oblique_affine, write_series  # noqa: E402
from asfda.cli import main  # noqa: E402
from asfda.io.dicom import scan_series  # noqa: E402
from conftest import load_nifti, make_volume, write_bundle, write_nifti  # noqa: E402

CASES = ("A_CT", "B")


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A pool of two DICOM series (at two depths), the same volumes as NIfTI, and the tiny bundle."""
    root = tmp_path_factory.mktemp("dicom_seg")
    affine = oblique_affine(spacing=(2.0, 2.0, 3.0), angles=(0.0, 0.0, 12.0), origin=(10.0, -4.0, 30.0))
    for i, cid in enumerate(CASES):
        raw = np.round(make_volume(i)[0] * 1000).astype(np.int16)
        write_series(root / "dicom" / cid.replace("_", "/"), raw, affine)
        write_nifti(root / "nifti" / f"{cid}.nii.gz", raw.astype(np.float32), affine)
    return {"dicom": root / "dicom", "nifti": root / "nifti", "model": write_bundle(root / "bundle"), "root": root}


def _predict(capsys: pytest.CaptureFixture, world: dict, pool: str, out: Path, *extra: str) -> tuple[int, list, list]:
    capsys.readouterr()
    code = main(["predict", "--model", str(world["model"]), "--data", str(world[pool]), "--out", str(out),
                 "--no-progress", *extra])
    captured = capsys.readouterr()
    return code, captured.out.splitlines(), [ln for ln in captured.err.splitlines() if ln.strip()]


def test_dicom_seg_holds_the_label_map_on_the_series_slices(world: dict, tmp_path: Path,
                                                            capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "pred"
    code, printed, _ = _predict(capsys, world, "dicom", out, "--dicom-seg")
    assert code == 0 and "DICOM SEG of 2 series" in printed[0] and len(printed) == 1
    for cid in CASES:
        label = np.asarray(load_nifti(str(out / f"{cid}.nii.gz")).dataobj)
        assert 0 < np.count_nonzero(label) < label.size  # something to compare
        seg = hd.seg.segread(out / f"{cid}.seg.dcm")
        geo = scan_series(world["dicom"] / cid.replace("_", "/"))
        uids = [pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID for f in geo.files]
        back = seg.get_pixels_by_source_instance(source_sop_instance_uids=uids, combine_segments=True)
        np.testing.assert_array_equal(back, np.transpose(label, (2, 1, 0)))
        assert {s.SegmentLabel for s in seg.SegmentSequence} <= {"liver", "spleen"}
    # up to date: skipped, the SEG kept; a missing SEG makes its case run again
    before = (out / "B.seg.dcm").stat().st_mtime_ns
    code, printed, _ = _predict(capsys, world, "dicom", out, "--dicom-seg")
    assert code == 0 and "0 cases segmented, 2 skipped" in printed[0]
    assert (out / "B.seg.dcm").stat().st_mtime_ns == before
    (out / "A_CT.seg.dcm").unlink()
    code, printed, _ = _predict(capsys, world, "dicom", out, "--dicom-seg")
    assert code == 0 and "1 case segmented, 1 skipped" in printed[0] and (out / "A_CT.seg.dcm").is_file()


def test_without_the_flag_no_seg_is_written(world: dict, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "pred"
    code, printed, _ = _predict(capsys, world, "dicom", out)
    assert code == 0 and "DICOM SEG" not in printed[0] and not list(out.glob("*.seg.dcm"))


def test_a_foreign_seg_file_is_refused_before_any_case(world: dict, tmp_path: Path,
                                                       capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "pred"
    out.mkdir()
    (out / "B.seg.dcm").write_bytes(b"someone else's file")
    code, _, err = _predict(capsys, world, "dicom", out, "--dicom-seg")
    assert code == 2 and len(err) == 1 and "B.seg.dcm exists and was not written by asfda predict" in err[0]
    assert sorted(p.name for p in out.iterdir()) == ["B.seg.dcm"]
    # without --dicom-seg the file is not one predict writes: left alone, no refusal
    code, _, _ = _predict(capsys, world, "dicom", out)
    assert code == 0 and (out / "B.seg.dcm").read_bytes() == b"someone else's file"


def test_a_nifti_case_gets_a_note_not_an_error(world: dict, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "pred"
    code, printed, err = _predict(capsys, world, "nifti", out, "--dicom-seg")
    assert code == 0 and err == [] and not list(out.glob("*.seg.dcm"))
    assert printed[1:] == ["note: --dicom-seg writes a DICOM SEG for DICOM series only: 2 cases (A_CT, B) got the "
                           "NIfTI label map only"]
    assert all((out / f"{cid}.nii.gz").is_file() for cid in CASES)


def test_without_highdicom_the_flag_is_refused_before_any_case(world: dict, tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch,
                                                               capsys: pytest.CaptureFixture) -> None:
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "highdicom" else real(name, *a))
    out = tmp_path / "pred"
    code, _, err = _predict(capsys, world, "dicom", out, "--dicom-seg")
    assert code == 2 and len(err) == 1 and "needs highdicom" in err[0] and "asfda[dicom]" in err[0]
    assert not out.exists() or not list(out.iterdir())
