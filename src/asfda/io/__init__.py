"""Reading datasets into `Case` records, and writing files atomically."""

from __future__ import annotations

from asfda.io.atomic import atomic_write, atomic_write_bytes, atomic_write_folder, atomic_write_json, atomic_write_text
from asfda.io.datasets import Case, Dataset, load_dataset, load_folder, load_nnunet_raw
from asfda.io.nifti import read_nifti

__all__ = [
    "Case",
    "atomic_write",
    "Dataset",
    "atomic_write_bytes",
    "atomic_write_folder",
    "atomic_write_json",
    "atomic_write_text",
    "load_dataset",
    "load_folder",
    "load_nnunet_raw",
    "read_nifti",
]
