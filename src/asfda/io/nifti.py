"""NIfTI reading with errors a user can act on.

Before any voxel is read, the data size the header declares (shape x bytes per voxel) is compared with what the
file can hold, so a forged or damaged header cannot make asfda allocate gigabytes for a file of a few bytes:

* above `max_nifti_bytes` (4 GiB by default; the ``ASFDA_MAX_NIFTI_BYTES`` environment variable changes it) a
  volume is refused on its header alone;
* a ``.nii`` file must be at least as large as the header's data offset plus the declared size;
* a ``.nii.gz`` cannot hold more than DEFLATE's largest ratio (1032:1) allows, and its uncompressed size must
  agree with gzip's ISIZE trailer (the uncompressed size mod 2^32, of the last gzip member); when the trailer
  disagrees (a file of several gzip members, as bgzip writes) the stream is decompressed once, without keeping
  it, to count its bytes.
"""

from __future__ import annotations

import gzip
import os
import struct
import zlib
from pathlib import Path
from typing import cast

import nibabel as nib
import numpy as np
from nibabel.spatialimages import SpatialImage

from asfda.errors import AsfdaError
from asfda.io.atomic import atomic_write

__all__ = ["DEFAULT_MAX_NIFTI_BYTES", "NIFTI_SUFFIXES", "max_nifti_bytes", "read_header", "read_nifti",
           "write_label_map", "refuse_constant_image", "strip_nifti_suffix"]

NIFTI_SUFFIXES = (".nii.gz", ".nii")
DEFAULT_MAX_NIFTI_BYTES = 4 * 2**30
"""Largest voxel data (bytes, as stored) asfda reads from one file: 4 GiB, e.g. 1024^3 float32 voxels."""
MAX_NIFTI_BYTES_ENV = "ASFDA_MAX_NIFTI_BYTES"
_DEFLATE_MAX_RATIO = 1032  # DEFLATE never expands more than ~1032:1


def max_nifti_bytes() -> int:
    """The cap on one file's declared voxel data: ``ASFDA_MAX_NIFTI_BYTES`` when set, else 4 GiB."""
    raw = os.environ.get(MAX_NIFTI_BYTES_ENV, "").strip()
    if not raw:
        return DEFAULT_MAX_NIFTI_BYTES
    try:
        value = int(float(raw))
    except ValueError:
        raise AsfdaError(f"{MAX_NIFTI_BYTES_ENV}={raw!r} is not a number of bytes",
                         fix=f"set it to e.g. {8 * 2**30} (8 GiB), or unset it") from None
    if value <= 0:
        raise AsfdaError(f"{MAX_NIFTI_BYTES_ENV}={raw!r} must be positive", fix="unset it or give a byte count")
    return value


def _size_text(n: int) -> str:
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:.3g} {unit}"
    return f"{n} bytes"


def strip_nifti_suffix(name: str) -> str:
    for suffix in NIFTI_SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def read_header(path: str | Path) -> tuple[tuple[int, ...], np.ndarray]:
    """Shape and affine of a NIfTI file without reading its voxels."""
    img = _load(path)
    shape = tuple(int(s) for s in img.shape)
    if len(shape) == 4 and shape[3] == 1:
        shape = shape[:3]
    if len(shape) != 3:
        raise AsfdaError(f"expected a 3D volume, found shape {shape}", path, "give one 3D volume per file")
    return shape, np.asarray(img.affine, dtype=np.float64)


def read_nifti(path: str | Path, *, dtype: type = np.float32) -> tuple[np.ndarray, np.ndarray]:
    """Voxels ([X, Y, Z]) and affine of a 3D NIfTI file; refuses 4D data and non-finite values."""
    img = _load(path)
    read_header(path)  # shape check with the same message
    _check_declared_size(Path(path), img)
    try:
        data: np.ndarray = np.asarray(img.dataobj, dtype=dtype)
    except Exception as exc:  # truncated gzip, wrong size ...
        raise AsfdaError(f"cannot read the voxels ({exc.__class__.__name__}: {exc})", path,
                         "the file is truncated or corrupt; export it again") from None
    if data.ndim == 4:
        data = data[..., 0]
    if np.issubdtype(data.dtype, np.floating) and not np.isfinite(data).all():
        raise AsfdaError("contains NaN or infinite values", path, "replace them (e.g. with the background value)")
    return data, np.asarray(img.affine, dtype=np.float64)


def refuse_constant_image(data: np.ndarray, path: str | Path) -> None:
    """Refuses an image whose voxels are all equal: it holds no anatomy (a blank export, a failed anonymisation or
    conversion). Scored, such a volume is the most atypical of its pool, so asfda would ask for it first; trained on,
    it teaches background; predicted, it gives a meaningless map. Every command that reads an image's voxels refuses
    it (label maps are not images: an empty label has its own check)."""
    if data.size and float(data.min()) == float(data.max()):
        raise AsfdaError(f"the image is constant (every voxel is {float(data.flat[0]):g}): it holds no anatomy", path,
                         "export the scan again, or move it out of the dataset")


def _load(path: str | Path) -> nib.Nifti1Image:
    path = Path(path)
    if not path.is_file():
        raise AsfdaError("file not found", path, "check the path")
    try:
        # nib.load is annotated with the base image class; a .nii / .nii.gz loads as a Nifti1Image (or Nifti2Image)
        return cast(nib.Nifti1Image, nib.load(str(path)))
    except Exception as exc:
        raise AsfdaError(f"not a readable NIfTI file ({exc.__class__.__name__}: {exc})", path,
                         "check the file is .nii or .nii.gz and not truncated") from None


def _check_declared_size(path: Path, img: nib.Nifti1Image) -> None:
    """Refuses a file whose header declares more voxel data than the cap, or than the file holds (see the module
    docstring), before any of it is read."""
    header = img.header
    shape = tuple(int(n) for n in img.shape)
    itemsize = int(np.dtype(header.get_data_dtype()).itemsize)
    declared = int(np.prod(shape, dtype=object)) * itemsize
    what = f"its header declares {'x'.join(map(str, shape))} voxels of {header.get_data_dtype()} " \
           f"({_size_text(declared)})"
    cap = max_nifti_bytes()
    if declared > cap:
        raise AsfdaError(f"{what}, more than asfda reads from one file ({_size_text(cap)})", path,
                         f"crop or resample the volume; if it is genuine, raise the cap with {MAX_NIFTI_BYTES_ENV}"
                         f"=BYTES")
    offset = max(int(header.get_data_offset()), int(header.sizeof_hdr) + 4)  # single file: data after the header
    needed = offset + declared
    damaged = "the header is damaged or forged, or the file is truncated; export it again"
    size = path.stat().st_size
    if not path.name.lower().endswith(".gz"):
        if size < needed:
            raise AsfdaError(f"{what}, but the file holds only {_size_text(max(size - offset, 0))} of voxel data",
                             path, damaged)
        return
    if needed > size * _DEFLATE_MAX_RATIO + 1024:
        raise AsfdaError(f"{what}, more than a {_size_text(size)} gzip file can hold", path, damaged)
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
        raise AsfdaError(f"{what}, but the file decompresses to only {_size_text(held)}", path, damaged)


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
    """Writes ``label`` with the input image's header (both affines, codes), as uint8 without scaling."""
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
