"""Per-volume uncertainty and divergence numbers (pure tensor functions) and temperature scaling."""

from __future__ import annotations

from asfda.scoring.metrics import (
    anatomical_segmentation_difficulty,
    anatomy_composition,
    badge_embedding,
    bald,
    cosine_distance,
    foreground_confidence,
    foreground_kl_divergence,
    gaussian_kl,
    grow_mask,
    mc_entropy,
    mc_scores_from_moments,
    mean_entropy,
    normalisation_stat_divergence,
    organ_extent,
    pool_normalisation_divergence,
    tta_variance,
    voxel_entropy,
)
from asfda.scoring.needs import ScoringNeeds
from asfda.scoring.temperature import expected_calibration_error, fit_temperature

__all__ = [
    "ScoringNeeds",
    "anatomical_segmentation_difficulty",
    "anatomy_composition",
    "badge_embedding",
    "bald",
    "cosine_distance",
    "expected_calibration_error",
    "fit_temperature",
    "foreground_confidence",
    "foreground_kl_divergence",
    "gaussian_kl",
    "grow_mask",
    "mc_entropy",
    "mc_scores_from_moments",
    "mean_entropy",
    "normalisation_stat_divergence",
    "organ_extent",
    "pool_normalisation_divergence",
    "tta_variance",
    "voxel_entropy",
]
