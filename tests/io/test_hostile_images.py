"""Hostile images and dataset folders (issue 30): a grid asfda cannot resample, voxels that are not real numbers, a
slice or a handful of voxels, two files of one case, a volume or a model grid beyond the cap, a small gzip that
declares gigabytes, a loop of links. Each is refused in one line naming the file, before any voxel is read where the
header tells; the CLI exits 2 and writes nothing."""

from __future__ import annotations

import gzip
import struct
import tracemalloc
import zlib
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pytest

from _bad_inputs_helpers import AFFINE, SHAPE, _argv, _one_line_error, make_inputs
from asfda.cli import main
from asfda.errors import AsfdaError
from asfda.io import load_dataset, load_folder, read_nifti
from asfda.io.nifti import read_header
from asfda.models.preprocessing import Preprocessing, prepare_case
from conftest import write_nifti, write_nnunet


@pytest.fixture
def inputs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, Path]:
    return make_inputs(tmp_path, monkeypatch)


def _patch_header(path: Path, *, pixdim: tuple[float, float, float] | None = None, sform: np.ndarray | None = None,
                  datatype: int | None = None) -> Path:
    """Rewrites fields of a NIfTI-1 header in place, below nibabel (which would fix or refuse them on writing): the
    voxel sizes with the sform off (the affine is then built from them), the sform, or the datatype code."""
    raw = bytearray(gzip.decompress(path.read_bytes()) if path.name.endswith(".gz") else path.read_bytes())
    if pixdim is not None:
        raw[80:92] = struct.pack("<3f", *pixdim)
        raw[252:256] = struct.pack("<hh", 1, 0)  # qform_code 1, sform_code 0
    if sform is not None:
        raw[280:328] = struct.pack("<12f", *np.asarray(sform, dtype=np.float32)[:3].ravel())
        raw[252:256] = struct.pack("<hh", 0, 1)
    if datatype is not None:
        raw[70:72] = struct.pack("<h", datatype)
    path.write_bytes(gzip.compress(bytes(raw)) if path.name.endswith(".gz") else bytes(raw))
    return path


def _both(data: Path, **patch) -> Path:
    """Patches case00's image and label alike (so the label-grid check does not speak first); returns the image."""
    _patch_header(data / "labelsTr" / "case00.nii.gz", **patch)
    return _patch_header(data / "imagesTr" / "case00_0000.nii.gz", **patch)


PARALLEL_AXES = np.array([[2.0, 2.0, 0, 0], [2.0, 2.0, 0, 0], [0, 0, 3.0, 0], [0, 0, 0, 1]])
GRIDS: dict[str, tuple[dict[str, Any], str]] = {
    "zero pixdim": ({"pixdim": (2.0, 0.0, 3.0)}, "not positive and finite"),
    "negative pixdim": ({"pixdim": (2.0, -2.0, 3.0)}, "not positive and finite"),
    "infinite pixdim": ({"pixdim": (2.0, np.inf, 3.0)}, "not positive and finite"),
    "zero axis": ({"sform": np.diag([2.0, 0.0, 3.0, 1.0])}, "an axis of zero length"),
    "parallel axes": ({"sform": PARALLEL_AXES}, "singular"),
    "NaN affine": ({"sform": np.diag([2.0, np.nan, 3.0, 1.0])}, "non-finite"),
}


@pytest.mark.parametrize("kind", list(GRIDS))
def test_a_grid_that_cannot_be_resampled_is_refused_on_the_header(tmp_path: Path, kind: str) -> None:
    """Before: a zero pixdim was silently taken as 1 mm (nibabel's fix), a singular affine crashed in the
    orientation transform with a traceback."""
    patch, words = GRIDS[kind]
    data = write_nnunet(tmp_path / "ds", n=2)
    image = _both(data, **patch)
    with pytest.raises(AsfdaError, match=words) as e:
        load_dataset(data)
    assert str(e.value.path) == str(image) and "voxel spacing" in (e.value.fix or "")


def test_a_singular_affine_is_one_line_through_the_cli(inputs: dict,
                                                       capsys: pytest.CaptureFixture) -> None:
    image = _both(inputs["data"], sform=PARALLEL_AXES)
    out = inputs["root"] / "out"
    assert main(_argv("score", inputs["model"], inputs["data"], out)) == 2
    line = _one_line_error(capsys)
    assert str(image) in line and "singular" in line and not out.exists()


@pytest.mark.parametrize("dtype, words", [(np.complex64, "complex"), (np.complex128, "complex"),
                                          ("rgb", "not plain numbers")])
def test_voxels_that_are_not_real_numbers_are_refused(tmp_path: Path, dtype: Any, words: str) -> None:
    """Before: complex voxels were read as their real part without a word."""
    path = tmp_path / "x.nii.gz"
    if dtype == "rgb":
        write_nifti(path, np.ones((8, 8, 8), np.uint8))
        _patch_header(path, datatype=128)  # RGB24 (the data is now too short: the type is refused first)
    else:
        write_nifti(path, (np.ones((8, 8, 8)) + 1j).astype(dtype))
    for read in (read_header, read_nifti):
        with pytest.raises(AsfdaError, match=words):
            read(path)


@pytest.mark.parametrize("shape", [(2, 2, 2), (80, 65, 1), (80, 65, 3), (1, 40, 40)])
def test_a_slice_or_a_handful_of_voxels_is_refused(tmp_path: Path, shape: tuple[int, int, int]) -> None:
    """Before: a 2x2x2 volume and an 80x65x1 slice were scored as volumes."""
    data = write_nnunet(tmp_path / "ds", n=2)
    image = write_nifti(data / "imagesTr" / "case01_0000.nii.gz", np.random.default_rng(0).random(shape), AFFINE)
    (data / "labelsTr" / "case01.nii.gz").unlink()
    with pytest.raises(AsfdaError, match="fewer than 4 voxels along an axis") as e:
        load_dataset(data)
    assert str(e.value.path) == str(image)


def test_four_voxels_along_each_axis_are_enough(tmp_path: Path) -> None:
    path = write_nifti(tmp_path / "x.nii.gz", np.random.default_rng(0).random((4, 4, 4)).astype(np.float32))
    assert read_nifti(path)[0].shape == (4, 4, 4)


@pytest.mark.parametrize("names", [("case00.nii", "case00.nii.gz"), ("case00.nii.gz", "case00_0000.nii.gz")])
def test_two_image_files_of_one_case_are_refused_naming_both(tmp_path: Path, names: tuple[str, str]) -> None:
    """Before: both were read as two cases of the same id (the second shadowing the first in by_id)."""
    rng = np.random.default_rng(0)
    for name in (*names, "case01.nii.gz"):
        write_nifti(tmp_path / "imgs" / name, rng.random(SHAPE).astype(np.float32), AFFINE)
    with pytest.raises(AsfdaError, match="two image files give case id 'case00'") as e:
        load_folder(tmp_path / "imgs")
    assert names[0] in e.value.problem and names[1] in e.value.problem


def test_two_label_files_of_one_case_are_refused_naming_both(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    write_nifti(tmp_path / "imgs" / "case00.nii.gz", rng.random(SHAPE).astype(np.float32), AFFINE)
    for name in ("case00.nii", "case00.nii.gz"):
        write_nifti(tmp_path / "labs" / name, np.zeros(SHAPE, np.uint8), AFFINE)
    with pytest.raises(AsfdaError, match="two label files give case id 'case00': case00.nii.gz and case00.nii"):
        load_folder(tmp_path / "imgs", tmp_path / "labs")


def test_a_second_input_channel_is_named_as_such(tmp_path: Path) -> None:
    data = write_nnunet(tmp_path / "ds", n=2)
    write_nifti(data / "imagesTr" / "case00_0001.nii.gz", np.random.default_rng(0).random(SHAPE), AFFINE)
    with pytest.raises(AsfdaError, match="input channel 0001 of case 'case00'"):
        load_dataset(data)


def test_a_loop_of_links_in_a_plain_folder_is_one_line(tmp_path: Path) -> None:
    folder = tmp_path / "imgs"
    write_nifti(folder / "case00.nii.gz", np.random.default_rng(0).random(SHAPE).astype(np.float32), AFFINE)
    (folder / "loop.nii.gz").symlink_to(folder / "loop.nii.gz")
    with pytest.raises(AsfdaError, match="a link to nothing \\(or a loop of links\\)"):
        load_folder(folder)


# ---------------------------------------------------------------------------------------------- sizes
@pytest.mark.parametrize("spacing, pixdim", [((1e6, 2.0, 3.0), (2.0, 2.0, 3.0)), ((400.0,) * 3, (2.0, 2.0, 3.0)),
                                             ((2.0, 2.0, 3.0), (0.01, 0.01, 0.01)), ((2.0, 2.0, 3.0), (0.01,))])
def test_a_model_grid_beyond_the_cap_is_refused_before_any_voxel_is_read(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, spacing: tuple, pixdim: tuple) -> None:
    """Before: a 1e6 mm (or 400 mm) voxel spacing, or a model spacing of 0.01 mm, made the resampling allocate
    terabytes (a traceback at best)."""
    data = write_nnunet(tmp_path / "ds", n=1, affine=np.diag([*spacing, 1.0]))
    case = load_dataset(data).cases[0]

    def no_read(*args, **kwargs):
        raise AssertionError("voxels read")

    monkeypatch.setattr("asfda.models.preprocessing.read_nifti", no_read)
    with pytest.raises(AsfdaError, match="more than asfda holds for one volume \\(4 GiB\\)") as e:
        prepare_case(case, Preprocessing("RAS", pixdim))
    assert str(e.value.path) == str(case.image_path) and "ASFDA_MAX_NIFTI_BYTES" in (e.value.fix or "")


def test_the_model_grid_is_the_one_preprocessing_makes(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    affine = np.array([[0, 0, -3.0, 10], [1.5, 0.2, 0, -4], [0, 2.5, 0, 7], [0, 0, 0, 1]])
    image = rng.random((13, 11, 9)).astype(np.float32)
    prep = Preprocessing("RAS", (2.0, 1.0, 2.5))
    assert prep.model_grid_shape(image.shape, affine) == tuple(prep(image, affine)[0].shape[1:])


def test_a_model_grid_too_thin_to_segment_is_refused(tmp_path: Path) -> None:
    data = write_nnunet(tmp_path / "ds", n=1)
    case = load_dataset(data).cases[0]
    with pytest.raises(AsfdaError, match="fewer than 4 along an axis"):
        prepare_case(case, Preprocessing("RAS", (50.0, 50.0, 50.0)))


def _gzip_of_zeros(path: Path, shape: tuple[int, int, int], dtype: type) -> Path:
    """A valid .nii.gz of zeros written stream-wise: a few KiB on disk, the declared size when decompressed."""
    hdr = nib.Nifti1Header()
    hdr.set_data_shape(shape)
    hdr.set_data_dtype(dtype)
    hdr.set_qform(np.eye(4), 1)
    comp = zlib.compressobj(9, zlib.DEFLATED, 31)  # gzip framing
    size = int(np.prod(shape)) * np.dtype(dtype).itemsize
    chunk = bytes(1 << 20)
    with open(path, "wb") as fh:
        fh.write(comp.compress(hdr.binaryblock + b"\0" * 4))
        for start in range(0, size, len(chunk)):
            fh.write(comp.compress(chunk[: min(len(chunk), size - start)]))
        fh.write(comp.flush())
    return path


def test_a_small_gzip_declaring_more_than_the_cap_as_float32_is_refused_on_its_header(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The cap counts the volume as asfda holds it (float32), not as stored: before, a 2 MB gzip declaring 1.9 GiB of
    uint8 passed the 4 GiB cap and grew to 4.5 GB of memory. Here at scale: a 64 MiB cap, 32 MiB of uint8 declared."""
    monkeypatch.setenv("ASFDA_MAX_NIFTI_BYTES", str(64 * 2**20))
    path = _gzip_of_zeros(tmp_path / "bomb.nii.gz", (512, 256, 256), np.uint8)
    assert path.stat().st_size < 200_000
    for read in (read_header, read_nifti):
        with pytest.raises(AsfdaError, match="128 MiB as float32\\), more than asfda reads from one file"):
            read(path)


def test_voxels_are_read_into_one_copy(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Slab by slab into the float32 array kept: before, the decompressed bytes and the array were held together.
    (Slabs of 1 MiB here, so that a small volume is many slabs.)"""
    monkeypatch.setattr("asfda.io.nifti._SLAB_BYTES", 2**20)
    rng = np.random.default_rng(0)
    data = rng.standard_normal((128, 128, 256)).astype(np.float32)  # 16 MiB
    path = write_nifti(tmp_path / "x.nii.gz", data)
    tracemalloc.start()
    try:
        arr, _ = read_nifti(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert np.array_equal(arr, data)
    assert peak < 1.5 * data.nbytes, f"{peak / 2**20:.0f} MiB for a {data.nbytes / 2**20:.0f} MiB volume"
