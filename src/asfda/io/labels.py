"""Checks of an annotator's label file against the image it labels, before it is used for training.

`check_label` returns the first problem found as text (None when the label is usable): a file that is
not a readable 3D NIfTI, a grid other than the image's (shape, or affine beyond a tolerance), voxel values
that are not the dataset's label values, or no foreground at all.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import numpy as np

from asfda.errors import AsfdaError
from asfda.io.datasets import Case, resolve_link
from asfda.io.nifti import NIFTI_SUFFIXES, read_header, read_nifti, strip_nifti_suffix

__all__ = ["AFFINE_TOLERANCE_MM", "check_label", "check_label_values", "label_case_id", "label_files",
           "label_values_problem"]

AFFINE_TOLERANCE_MM = 1e-3
"""Largest difference allowed between the label's and the image's affine entries (mm): exports of the same
grid by other tools differ by float rounding, never by this much."""


def label_case_id(path: Path) -> str:
    """Case id of a label file: ``CASE.nii.gz`` (or nnU-Net's ``CASE_0000.nii.gz``, tolerated) -> ``CASE``."""
    stem = strip_nifti_suffix(path.name)
    return stem[: -len("_0000")] if stem.endswith("_0000") else stem


def label_files(folder: str | Path) -> list[Path]:
    """The NIfTI files of a folder (hidden and other files are skipped), sorted by name. A NIfTI-named link to a
    file outside the folder, or to nothing, is refused (an `AsfdaError` for the whole folder, before any is read)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise AsfdaError("labels folder not found", folder, "pass the folder holding the CASE.nii.gz label files")
    inside = folder.resolve()
    for p in folder.iterdir():
        if p.is_symlink() and not p.name.startswith(".") and p.name.endswith(NIFTI_SUFFIXES):
            target = resolve_link(p)
            if not target.exists():
                raise AsfdaError(f"is a link to {target}, which does not exist", p,
                                 "save the label file itself in the folder, or remove the link")
            if inside not in target.parents:
                raise AsfdaError(f"is a link to {target}, outside the labels folder {inside}", p,
                                 "copy the label file itself into the folder (asfda ingests only files the folder "
                                 "holds)")
    return sorted(p for p in folder.iterdir()
                  if p.is_file() and not p.name.startswith(".") and p.name.endswith(NIFTI_SUFFIXES))


def check_label(path: str | Path, case: Case, allowed_values: set[int] | list[int], *,
                allow_empty: bool = False, affine_tolerance_mm: float = AFFINE_TOLERANCE_MM) -> str | None:
    """The first problem of ``path`` as the label of ``case``, or None when it can be used.

    Args:
        path: the label file.
        case: the image it labels (shape and affine from the image header).
        allowed_values: the dataset's label values (0 = background included).
        allow_empty: accept a label with no foreground voxel (off: an empty label is usually an export
            of the wrong layer or an unsaved annotation).
        affine_tolerance_mm: see `AFFINE_TOLERANCE_MM`.
    """
    path = Path(path)
    try:
        shape, affine = read_header(path)
    except AsfdaError as exc:
        return exc.problem
    if tuple(shape) != tuple(case.shape):
        return f"shape {tuple(shape)} differs from the image's {tuple(case.shape)} (not on the image's grid)"
    diff = float(np.abs(np.asarray(affine) - np.asarray(case.affine)).max())
    if diff > affine_tolerance_mm:
        return (f"affine differs from the image's by up to {diff:.4g} mm (tolerance {affine_tolerance_mm:g} mm): "
                "the label is not on the image's grid (resampled, flipped or from another series)")
    try:
        data, _ = read_nifti(path, dtype=np.float64)
    except AsfdaError as exc:
        return exc.problem
    problem = label_values_problem(data, allowed_values)
    if problem:
        return problem
    if not allow_empty and not np.any(data):
        return "is empty (background only): an unsaved annotation or the wrong layer exported"
    return None


def label_values_problem(data: np.ndarray, allowed_values: Iterable[int]) -> str | None:
    """What is wrong with a label map's voxel values (not integers, or not among ``allowed_values``), or None."""
    rounded = np.rint(data)
    if not np.array_equal(rounded, data):
        return "has non-integer voxel values (a probability map or an interpolated label, not a label map)"
    allowed = {int(v) for v in allowed_values}
    if rounded.size:
        lo, hi = int(rounded.min()), int(rounded.max())
        if hi - lo < len(allowed) and set(range(lo, hi + 1)) <= allowed:
            return None  # every value between the extremes is allowed: no need for np.unique (a sort)
    values = {int(v) for v in np.unique(rounded)}
    bad = sorted(values - allowed)
    if bad:
        return f"has values {bad[:10]} that are not label values {sorted(allowed)}"
    return None


def check_label_values(data: np.ndarray, allowed_values: Iterable[int], path: str | Path | None) -> None:
    """`label_values_problem` as an `AsfdaError` naming the label file (what `asfda ingest` refuses, refused
    where a dataset's labels are read for evaluation)."""
    problem = label_values_problem(data, allowed_values)
    if problem:
        raise AsfdaError(f"label {problem}", path, "fix the label map (integer values among dataset.json's "
                         "'labels'), or dataset.json's 'labels'")
