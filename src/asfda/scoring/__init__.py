"""Per-volume uncertainty and divergence numbers (pure tensor functions) and temperature scaling."""

from __future__ import annotations

from asfda.scoring.metrics import (
    anatomical_segmentation_difficulty,
    cosine_distance,
    foreground_confidence,
    foreground_kl_divergence,
    grow_mask,
    mean_entropy,
    voxel_entropy,
)
from asfda.scoring.temperature import expected_calibration_error, fit_temperature

__all__ = [
    "anatomical_segmentation_difficulty",
    "cosine_distance",
    "expected_calibration_error",
    "fit_temperature",
    "foreground_confidence",
    "foreground_kl_divergence",
    "grow_mask",
    "mean_entropy",
    "voxel_entropy",
]
