"""Dice and HD95 per case and class: pure functions on label maps.

The empty-label rule, written down once (nnU-Net's): for a class absent from both the reference and
the prediction, Dice is NaN and left out of every mean; for a class absent from the reference but
predicted, Dice is 0. HD95 is NaN when either side is empty.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from asfda.training.guard import largest_component

__all__ = ["compute_dice", "compute_hd95", "largest_component_per_class", "mean_ignoring_nan", "per_class_scores"]


def compute_dice(pred: torch.Tensor, label: torch.Tensor, n_classes: int) -> torch.Tensor:
    """Dice of each foreground class (1..n_classes-1) between two integer maps of equal shape.

    Returns:
        tensor ``[n_classes - 1]`` of float64, NaN where the class is in neither map.
    """
    if pred.shape != label.shape:
        raise ValueError(f"pred shape {tuple(pred.shape)} != label shape {tuple(label.shape)}")
    pred = pred.reshape(-1).long()
    label = label.reshape(-1).long()
    out = torch.empty(n_classes - 1, dtype=torch.float64)
    for c in range(1, n_classes):
        p = pred == c
        g = label == c
        denom = int(p.sum()) + int(g.sum())
        out[c - 1] = math.nan if denom == 0 else 2.0 * int((p & g).sum()) / denom
    return out


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


def mean_ignoring_nan(values: torch.Tensor | np.ndarray | list[float]) -> float:
    arr = np.asarray(values, dtype=np.float64)
    arr = arr[~np.isnan(arr)]
    return float(arr.mean()) if arr.size else math.nan


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
