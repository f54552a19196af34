"""NIfTI reading with errors a user can act on."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np

from asfda.errors import AsfdaError

__all__ = ["NIFTI_SUFFIXES", "read_header", "read_nifti", "strip_nifti_suffix"]

NIFTI_SUFFIXES = (".nii.gz", ".nii")


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
    try:
        data = np.asarray(img.dataobj, dtype=dtype)
    except Exception as exc:  # truncated gzip, wrong size ...
        raise AsfdaError(f"cannot read the voxels ({exc.__class__.__name__}: {exc})", path,
                         "the file is truncated or corrupt; export it again") from None
    if data.ndim == 4:
        data = data[..., 0]
    if np.issubdtype(data.dtype, np.floating) and not np.isfinite(data).all():
        raise AsfdaError("contains NaN or infinite values", path, "replace them (e.g. with the background value)")
    return data, np.asarray(img.affine, dtype=np.float64)


def _load(path: str | Path) -> nib.Nifti1Image:
    path = Path(path)
    if not path.is_file():
        raise AsfdaError("file not found", path, "check the path")
    try:
        return nib.load(str(path))
    except Exception as exc:
        raise AsfdaError(f"not a readable NIfTI file ({exc.__class__.__name__}: {exc})", path,
                         "check the file is .nii or .nii.gz and not truncated") from None
