"""NIfTI reading with errors a user can act on.

The header is checked before any voxel is read (`read_header`, which reading a dataset runs on every file): one 3D
volume of at least `MIN_AXIS_VOXELS` voxels along each axis, real (not complex, not RGB) voxel values, and a grid
(affine) that is finite and invertible, with positive finite voxel sizes. Then the data size the header declares is
compared with what the file can hold, so a forged or damaged header cannot make asfda allocate gigabytes for a file
of a few bytes:

* above `max_nifti_bytes` (4 GiB by default, 1024^3 voxels as asfda holds them, in float32; the
  ``ASFDA_MAX_NIFTI_BYTES`` environment variable changes it) a volume is refused on its header alone (the same cap
  bounds the volume resampled to a model's spacing: `asfda.models.preprocessing`);
* a ``.nii`` file must be at least as large as the header's data offset plus the declared size;
* a ``.nii.gz`` cannot hold more than DEFLATE's largest ratio (1032:1) allows, and its uncompressed size must
  agree with gzip's ISIZE trailer (the uncompressed size mod 2^32, of the last gzip member); when the trailer
  disagrees (a file of several gzip members, as bgzip writes) the stream is decompressed once, without keeping
  it, to count its bytes.

The voxels are then read slab by slab into the float32 array asfda keeps, so reading holds one copy of the volume,
not the decompressed bytes and a converted copy besides.

A DICOM series folder given where a NIfTI file is read (`read_header`, `read_nifti`, `write_label_map`'s image) is
read as that series (`asfda.io.dicom`), with the same limits (`asfda.io.limits`) and a grid in the same RAS+ world.
"""

from __future__ import annotations

import contextlib
import gzip
import logging
import os
import struct
import warnings
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import cast

import nibabel as nib
import numpy as np
from nibabel.fileholders import FileHolder
from nibabel.openers import ImageOpener
from nibabel.spatialimages import SpatialImage

from asfda.errors import AsfdaError
from asfda.io.atomic import atomic_write
from asfda.io.dicom import is_series_folder, read_dicom_header, read_dicom_series
from asfda.io.limits import (
    DEFAULT_MAX_NIFTI_BYTES,
    HELD_ITEMSIZE,
    MAX_NIFTI_BYTES_ENV,
    MIN_AXIS_VOXELS,
    check_affine,
    check_cap,
    check_min_axis,
    max_nifti_bytes,
    size_text,
)

__all__ = ["DEFAULT_MAX_NIFTI_BYTES", "HELD_ITEMSIZE", "MAX_NIFTI_BYTES_ENV", "MIN_AXIS_VOXELS", "NIFTI_SUFFIXES",
           "max_nifti_bytes", "read_header", "read_nifti", "refuse_constant_image", "size_text", "strip_nifti_suffix",
           "write_label_map"]

NIFTI_SUFFIXES = (".nii.gz", ".nii")
_SLAB_BYTES = 32 * 2**20  # voxels are read in slabs of about this size
_DEFLATE_MAX_RATIO = 1032  # DEFLATE never expands more than ~1032:1


def strip_nifti_suffix(name: str) -> str:
    for suffix in NIFTI_SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def read_header(path: str | Path) -> tuple[tuple[int, ...], np.ndarray]:
    """Shape and affine of a NIfTI file without reading its voxels; refuses what asfda cannot hold as a 3D volume
    (see the module docstring) on the header alone. A DICOM series folder: `asfda.io.dicom.read_dicom_header`."""
    if is_series_folder(path):
        return read_dicom_header(path)
    return _checked_header(Path(path), _load(path))


def read_nifti(path: str | Path, *, dtype: type = np.float32) -> tuple[np.ndarray, np.ndarray]:
    """Voxels ([X, Y, Z]) and affine of a 3D NIfTI file; refuses what `read_header` refuses, a header declaring more
    data than the file holds, and non-finite values. A DICOM series folder: `asfda.io.dicom.read_dicom_series`."""
    if is_series_folder(path):
        return read_dicom_series(path, dtype=dtype)
    img = _load(path)
    shape, affine = _checked_header(Path(path), img)
    _check_declared_size(Path(path), img)
    data = _read_voxels(Path(path), type(img), shape, np.dtype(dtype))
    if np.issubdtype(data.dtype, np.floating) and not np.isfinite(data).all():
        raise AsfdaError(f"contains NaN or infinite values (or values beyond {np.dtype(dtype).name}'s range)", path,
                         "replace them (e.g. with the background value)")
    return data, affine


def _checked_header(path: Path, img: nib.Nifti1Image) -> tuple[tuple[int, ...], np.ndarray]:
    """`read_header`'s checks of a loaded header: shape, voxel type, grid, size cap."""
    shape = tuple(int(s) for s in img.shape)
    if len(shape) == 4 and shape[3] == 1:
        shape = shape[:3]
    if len(shape) != 3:
        raise AsfdaError(f"expected a 3D volume, found shape {shape}", path, "give one 3D volume per file")
    check_min_axis(path, shape, "export the whole 3D scan, or move the file out of the dataset")
    stored = np.dtype(img.header.get_data_dtype())
    if stored.kind not in "biuf":  # complex (c), RGB / structured (V)
        raise AsfdaError(f"its voxels are {stored} ({'complex' if stored.kind == 'c' else 'not plain numbers'}), "
                         "not real intensities", path, "export the magnitude (or a grey-level image) as integers or "
                         "floats")
    affine = np.asarray(img.affine, dtype=np.float64)
    _check_grid(path, img, affine)
    check_cap(path, shape, stored)
    return shape, affine


def _check_grid(path: Path, img: nib.Nifti1Image, affine: np.ndarray) -> None:
    """Refuses a grid asfda cannot resample: a voxel size (pixdim) that is zero, negative or not finite where the
    affine is built from it (nibabel would silently take 1 mm), an affine with non-finite entries, an axis of zero
    length, or axes (nearly) parallel (a singular affine)."""
    fix = "export the image again with its true voxel spacing and orientation (the header's pixdim / sform / qform)"
    header = img.header
    if int(header["sform_code"]) == 0:  # the affine comes from pixdim (with the qform's rotation, or none)
        pixdim = _raw_pixdim(path, img)
        if not (np.isfinite(pixdim).all() and (pixdim > 0).all()):
            raise AsfdaError(f"its voxel size (pixdim) is {pixdim.tolist()}: not positive and finite", path, fix)
    check_affine(path, affine, fix)


def _read_voxels(path: Path, image_class: type[nib.Nifti1Image], shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
    """The voxels as ``dtype``, read slab by slab (about `_SLAB_BYTES` each) straight into the array that is
    returned: one copy of the volume in memory, never the decompressed file besides it."""
    out = np.empty(shape, dtype=dtype, order="F")
    step = max(1, _SLAB_BYTES // max(1, shape[0] * shape[1] * max(dtype.itemsize, 8)))
    try:  # one stream: each slab continues where the last one stopped; values beyond dtype's range become inf
        with ImageOpener(str(path), "rb") as fh, _quiet_nibabel():
            holder = FileHolder(fileobj=fh.fobj)
            img = image_class.from_file_map({"header": holder, "image": holder})
            for z in range(0, shape[2], step):
                slab = np.asarray(img.dataobj[:, :, z:z + step])
                out[:, :, z:z + step] = slab.reshape(slab.shape[:3])  # a 4D file of one volume: [X, Y, k, 1]
    except Exception as exc:  # truncated gzip, wrong size ...
        raise AsfdaError(f"cannot read the voxels ({exc.__class__.__name__}: {exc})", path,
                         "the file is truncated or corrupt; export it again") from None
    return out


def refuse_constant_image(data: np.ndarray, path: str | Path) -> None:
    """Refuses an image whose voxels are all equal: it holds no anatomy (a blank export, a failed anonymisation or
    conversion). Scored, such a volume is the most atypical of its pool, so asfda would ask for it first; trained on,
    it teaches background; predicted, it gives a meaningless map. Every command that reads an image's voxels refuses
    it (label maps are not images: an empty label has its own check)."""
    if data.size and float(data.min()) == float(data.max()):
        raise AsfdaError(f"the image is constant (every voxel is {float(data.flat[0]):g}): it holds no anatomy", path,
                         "export the scan again, or move it out of the dataset")


@contextlib.contextmanager
def _quiet_nibabel() -> Iterator[None]:
    """nibabel logs the header fixes it makes (a zero pixdim taken as 1 ...) and numpy warns while a damaged affine is
    built: the checks that follow refuse what matters in one line, so neither reaches the user's screen."""
    logger = logging.getLogger("nibabel.global")
    level = logger.level
    logger.setLevel(logging.CRITICAL + 1)
    try:
        with np.errstate(all="ignore"), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        logger.setLevel(level)


def _raw_pixdim(path: Path, img: nib.Nifti1Image) -> np.ndarray:
    """The voxel sizes the file's header holds (pixdim[1:4]) before nibabel's fixes (a zero taken as 1, a negative
    size as its absolute value)."""
    try:
        with ImageOpener(str(path), "rb") as fh, _quiet_nibabel():
            raw = type(img.header).from_fileobj(fh, check=False)
        return np.asarray(raw["pixdim"][1:4], dtype=np.float64)
    except Exception:  # unreadable twice: the header nibabel read is what asfda uses
        return np.asarray(img.header["pixdim"][1:4], dtype=np.float64)


def _load(path: str | Path) -> nib.Nifti1Image:
    path = Path(path)
    if not path.is_file():  # a folder, a device or a FIFO (reading which could hang) is not read
        if path.exists():
            raise AsfdaError("is not a regular file (a folder, a device or a pipe)", path,
                             "give a .nii or .nii.gz file")
        if path.is_symlink():
            raise AsfdaError("is a link to nothing (or a loop of links)", path, "fix or remove the link")
        raise AsfdaError("file not found", path, "check the path")
    try:
        with _quiet_nibabel():
            # nib.load is annotated with the base image class; a .nii / .nii.gz loads as a Nifti1Image (or Nifti2Image)
            return cast(nib.Nifti1Image, nib.load(str(path)))
    except Exception as exc:
        raise AsfdaError(f"not a readable NIfTI file ({exc.__class__.__name__}: {exc})", path,
                         "check the file is .nii or .nii.gz and not truncated") from None


def _check_declared_size(path: Path, img: nib.Nifti1Image) -> None:
    """Refuses a file whose header declares more voxel data than the file holds (see the module docstring), before
    any of it is read (the cap: `_check_cap`)."""
    header = img.header
    shape = tuple(int(n) for n in img.shape)
    declared = int(np.prod(shape, dtype=object)) * int(np.dtype(header.get_data_dtype()).itemsize)
    what = f"its header declares {'x'.join(map(str, shape))} voxels of {header.get_data_dtype()} " \
           f"({size_text(declared)})"
    offset = max(int(header.get_data_offset()), int(header.sizeof_hdr) + 4)  # single file: data after the header
    needed = offset + declared
    damaged = "the header is damaged or forged, or the file is truncated; export it again"
    size = path.stat().st_size
    if not path.name.lower().endswith(".gz"):
        if size < needed:
            raise AsfdaError(f"{what}, but the file holds only {size_text(max(size - offset, 0))} of voxel data",
                             path, damaged)
        return
    if needed > size * _DEFLATE_MAX_RATIO + 1024:
        raise AsfdaError(f"{what}, more than a {size_text(size)} gzip file can hold", path, damaged)
    try:
        with open(path, "rb") as fh:
            fh.seek(-4, os.SEEK_END)
            isize = struct.unpack("<I", fh.read(4))[0]
    except OSError:
        isize = None
    if isize == needed % 2**32:
        return
    held = _gzip_length(path, needed)  # several gzip members, or a wrong trailer: count, without keeping
    if held < needed:
        raise AsfdaError(f"{what}, but the file decompresses to only {size_text(held)}", path, damaged)


def _gzip_length(path: Path, enough: int, chunk: int = 1 << 20) -> int:
    """How many bytes the gzip stream decompresses to, counting stops at ``enough``; a corrupt stream counts up to
    where it breaks."""
    total = 0
    try:
        with gzip.open(path, "rb") as fh:
            while total < enough:
                block = fh.read(min(chunk, enough - total))
                if not block:
                    break
                total += len(block)
    except (OSError, EOFError, zlib.error):
        pass
    return total


def write_label_map(path: Path, label: np.ndarray, image_path: Path) -> None:
    """Writes ``label`` with the input image's header (both affines, codes), as uint8 without scaling; for a DICOM
    series folder, with the series' affine (`asfda.io.dicom`) as both the sform and the qform (scanner space)."""
    if is_series_folder(image_path):
        img = nib.Nifti1Image(label.astype(np.uint8), None)
        affine = read_dicom_header(image_path)[1]
        img.set_sform(affine, code=1)
        img.set_qform(affine, code=1)
        atomic_write(path, lambda p: nib.save(img, str(p)))
        return
    src = cast(SpatialImage, nib.load(str(image_path)))  # an image: nib.load is annotated with the base class
    cls = type(src) if isinstance(src, (nib.Nifti1Image, nib.Nifti2Image)) else nib.Nifti1Image
    if cls is type(src):
        hdr = src.header.copy()
        hdr.set_data_dtype(np.uint8)
        img = cls(label.astype(np.uint8), None, hdr)
        img.header["cal_min"], img.header["cal_max"] = 0, 0
        img.header.set_slope_inter(1.0, 0.0)
    else:
        img = nib.Nifti1Image(label.astype(np.uint8), src.affine)
    atomic_write(path, lambda p: nib.save(img, str(p)))
