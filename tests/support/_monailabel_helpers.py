"""MONAI Label studies folders of phantom images and the app's test settings (the app tests and the server test)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from asfda.project import ProjectSettings
from asfda.training import TrainConfig
from conftest import make_volume, write_nifti

N_STUDIES = 5
AFFINE = np.diag([2.0, 2.0, 3.0, 1.0])


def write_studies(root: Path, n: int = N_STUDIES) -> tuple[Path, Path]:
    """A MONAI Label studies folder of phantom images (``caseNN.nii.gz``) and, apart, their true labels."""
    studies, truth = root / "studies", root / "truth"
    for i in range(n):
        image, label = make_volume(i)
        write_nifti(studies / f"case{i:02d}.nii.gz", image, AFFINE)
        write_nifti(truth / f"case{i:02d}.nii.gz", label, AFFINE)
    return studies, truth


def app_settings() -> ProjectSettings:
    return ProjectSettings(budget=1, device="cpu", train=TrainConfig(steps=4, batch_size=1))
