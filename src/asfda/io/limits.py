"""What asfda holds as one volume, whatever file it came from (NIfTI: `asfda.io.nifti`, a DICOM series:
`asfda.io.dicom`): the size cap, the thinnest axis, and a grid (affine) it can resample. Each check raises an
`AsfdaError` naming the file or series folder."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from asfda.errors import AsfdaError

__all__ = ["DEFAULT_MAX_NIFTI_BYTES", "HELD_ITEMSIZE", "MAX_NIFTI_BYTES_ENV", "MIN_AXIS_VOXELS", "check_affine",
           "check_cap", "check_min_axis", "max_nifti_bytes", "size_text"]

DEFAULT_MAX_NIFTI_BYTES = 4 * 2**30
"""Largest volume asfda holds (bytes as stored, or as float32 when that is more): 4 GiB, i.e. 1024^3 voxels, far above
a CT or MR volume (512 x 512 x 1000 voxels: 1 GiB)."""
MIN_AXIS_VOXELS = 4
"""Fewest voxels along any axis of a volume (as read, and on a model's grid): fewer is a slice, a localiser or a
handful of voxels, not a 3D scan a 3D model can segment."""
HELD_ITEMSIZE = 4  # asfda holds voxels as float32
MAX_NIFTI_BYTES_ENV = "ASFDA_MAX_NIFTI_BYTES"
_MIN_GRID_DET = 1e-3  # |det| of the affine with unit columns: below it the axes are (nearly) parallel


def max_nifti_bytes() -> int:
    """The cap on one volume's voxel data: ``ASFDA_MAX_NIFTI_BYTES`` when set, else 4 GiB."""
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


def size_text(n: int) -> str:
    """A byte count as people read it: ``4 GiB``, ``512 MiB``."""
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:.3g} {unit}"
    return f"{n} bytes"


def check_min_axis(path: Path, shape: tuple[int, ...], fix: str) -> None:
    """Refuses a volume with fewer than `MIN_AXIS_VOXELS` voxels along an axis."""
    if min(shape) < MIN_AXIS_VOXELS:
        raise AsfdaError(f"its shape {'x'.join(map(str, shape))} has fewer than {MIN_AXIS_VOXELS} voxels along an "
                         "axis: a slice or a handful of voxels, not a 3D volume", path, fix)


def check_cap(path: Path, shape: tuple[int, ...], stored: np.dtype, *, source: str = "header declares") -> None:
    """Refuses a volume larger than `max_nifti_bytes` as asfda holds it (float32, or the stored type when wider);
    ``source`` says what declared the size (a NIfTI header, a DICOM series' slice headers)."""
    voxels = int(np.prod(shape, dtype=object))
    declared, held = voxels * stored.itemsize, voxels * max(stored.itemsize, HELD_ITEMSIZE)
    cap = max_nifti_bytes()
    if held > cap:
        as_held = "" if held == declared else f", {size_text(held)} as float32"
        raise AsfdaError(f"its {source} {'x'.join(map(str, shape))} voxels of {stored} ({size_text(declared)}"
                         f"{as_held}), more than asfda reads from one file ({size_text(cap)})", path,
                         f"crop or resample the volume; if it is genuine, raise the cap with {MAX_NIFTI_BYTES_ENV}"
                         "=BYTES")


def check_affine(path: Path, affine: np.ndarray, fix: str) -> None:
    """Refuses an affine with non-finite entries, an axis of zero length, or axes (nearly) parallel (singular)."""
    if not np.isfinite(affine).all():
        raise AsfdaError(f"its affine has non-finite entries ({affine[:3].tolist()})", path, fix)
    sizes = np.linalg.norm(affine[:3, :3], axis=0)
    if (sizes <= 0).any():
        raise AsfdaError(f"its affine gives voxel sizes {sizes.round(6).tolist()} mm: an axis of zero length", path,
                         fix)
    if abs(float(np.linalg.det(affine[:3, :3] / sizes))) < _MIN_GRID_DET:
        raise AsfdaError("its affine is singular (two voxel axes point the same way): not a 3D grid", path, fix)
