"""Dice and HD95 per case and class: pure functions on label maps.

The Dice is `asfda.metrics.dice_per_class`, with the empty-label rule written there (nnU-Net's: NaN for a class in
neither map, left out of every mean; 0 for a class in one map only). HD95 is NaN when either side is empty.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from asfda.metrics import dice_per_class, largest_component, mean_ignoring_nan

__all__ = ["compute_dice", "compute_hd95", "largest_component_per_class", "mean_ignoring_nan", "per_class_scores"]


def compute_dice(pred: torch.Tensor, label: torch.Tensor, n_classes: int) -> torch.Tensor:
    """Dice of each foreground class (1..n_classes-1) between two integer maps of equal shape
    (`asfda.metrics.dice_per_class` of the maps as integers).

    Returns:
        tensor ``[n_classes - 1]`` of float64, NaN where the class is in neither map.
    """
    return torch.from_numpy(dice_per_class(pred.long(), label.long(), range(1, n_classes)))


def compute_hd95(pred: torch.Tensor, label: torch.Tensor, n_classes: int,
                 spacing_mm: tuple[float, float, float]) -> torch.Tensor:
    """95th-percentile Hausdorff distance (mm) of each foreground class; NaN when a side is empty."""
    from monai.metrics import compute_hausdorff_distance

    out = torch.full((n_classes - 1,), math.nan, dtype=torch.float64)
    for c in range(1, n_classes):
        p = (pred == c)
        g = (label == c)
        if not p.any() or not g.any():
            continue
        d = compute_hausdorff_distance(p[None, None].float(), g[None, None].float(), percentile=95,
                                       spacing=list(spacing_mm))
        out[c - 1] = float(d.reshape(-1)[0])
    return out


def per_class_scores(dice: torch.Tensor, class_names: list[str], prefix: str = "dice_") -> dict[str, float]:
    """``{"dice_liver": ..., ..., "dice_mean": ...}`` from a ``[n_classes - 1]`` tensor (names incl. background)."""
    out = {f"{prefix}{n}": float(v) for n, v in zip(class_names[1:], dice.tolist())}
    out[f"{prefix}mean"] = mean_ignoring_nan(dice)
    return out


def largest_component_per_class(label: np.ndarray, classes: list[int] | tuple[int, ...]) -> np.ndarray:
    """``label`` with every class of ``classes`` cut to its largest 26-connected component (the rest set to
    background): nnU-Net's per-class post-processing, for organs that come in one piece."""
    out = np.array(label, copy=True)
    for c in classes:
        mask = label == c
        out[mask & ~largest_component(mask)] = 0
    return out
