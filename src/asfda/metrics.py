"""Overlap and shape measures of label maps, written once: pure functions on arrays and tensors (a leaf).

`dice_per_class` is the one Dice of the package: the test Dice of evaluation (`asfda.evaluation.compute_dice`),
the edit Dice of `asfda ingest` (`asfda.annotation.edit_summary`) and the prediction agreement of the when-to-stop
probe (`asfda.stopping.label_agreement`) all call it.

The empty-label rule (nnU-Net's: ``nnunetv2.evaluation.evaluate_predictions.compute_metrics`` sets Dice to NaN when
``tp + fp + fn == 0``): the Dice of a class is

- NaN when the class is in **neither** map, and left out of every mean (`mean_ignoring_nan`); a mean over classes
  that are all NaN is NaN;
- 0 when the class is in one map only (a missed organ, or an organ predicted where the reference has none);
- ``2 |P & G| / (|P| + |G|)`` otherwise.

MONAI's ``DiceMetric`` writes a different rule: with ``ignore_empty=True`` (its default) the Dice is NaN whenever the
*reference* is empty, so a class predicted where the reference has none is not counted against the prediction (here:
0); with ``ignore_empty=False`` both-empty gives 1 (here: NaN, no evidence either way).

`largest_component` and `largest_component_fractions` are the 26-connected largest component of a mask and the
fraction of each class's voxels in it (the guard's anatomical plausibility; nnU-Net's post-processing).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import numpy as np
import torch
from scipy import ndimage

__all__ = ["dice_per_class", "largest_component", "largest_component_fractions", "mean_dice", "mean_ignoring_nan"]

_STRUCTURE = np.ones((3, 3, 3), dtype=bool)


def _array(x: np.ndarray | torch.Tensor) -> np.ndarray:
    return x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)


def dice_per_class(pred: np.ndarray | torch.Tensor, ref: np.ndarray | torch.Tensor,
                   classes: Iterable[int]) -> np.ndarray:
    """Dice of each label value in ``classes`` between two label maps of equal shape, with the module's empty-label
    rule (NaN where the value is in neither map). Symmetric in ``pred`` and ``ref``.

    Returns:
        float64 array, one value per entry of ``classes`` (in its order).
    """
    p_all, g_all = _array(pred), _array(ref)
    if p_all.shape != g_all.shape:
        raise ValueError(f"label maps differ in shape: pred {tuple(p_all.shape)}, reference {tuple(g_all.shape)}")
    values = [int(c) for c in classes]
    out = np.empty(len(values), dtype=np.float64)
    for k, c in enumerate(values):
        p, g = p_all == c, g_all == c
        denom = int(np.count_nonzero(p)) + int(np.count_nonzero(g))
        out[k] = math.nan if denom == 0 else 2.0 * int(np.count_nonzero(p & g)) / denom
    return out


def mean_ignoring_nan(values: torch.Tensor | np.ndarray | Sequence[float]) -> float:
    """The mean of the values that are not NaN (NaN when none is left): how every Dice mean here is taken."""
    arr = np.asarray(values, dtype=np.float64)
    arr = arr[~np.isnan(arr)]
    return float(arr.mean()) if arr.size else math.nan


def mean_dice(pred: np.ndarray | torch.Tensor, ref: np.ndarray | torch.Tensor, n_classes: int) -> float:
    """`mean_ignoring_nan` of the `dice_per_class` of the foreground classes ``1..n_classes-1``: NaN when neither
    map has any of them."""
    if n_classes < 2:
        raise ValueError(f"n_classes must be >= 2, got {n_classes}")
    return mean_ignoring_nan(dice_per_class(pred, ref, range(1, n_classes)))


def largest_component(mask: np.ndarray) -> np.ndarray:
    """The largest 26-connected component of a boolean 3D mask (labelled inside the mask's bounding box: fewer
    voxels to label); an empty mask gives an empty one."""
    out = np.zeros(mask.shape, dtype=bool)
    if not mask.any():
        return out
    sl = ndimage.find_objects(mask.astype(np.uint8))[0]
    comp, n = ndimage.label(mask[sl], structure=_STRUCTURE)
    if n <= 1:
        out[sl] = mask[sl]
        return out
    sizes = np.bincount(comp.ravel())
    sizes[0] = 0
    out[sl] = comp == int(sizes.argmax())
    return out


def largest_component_fractions(label_map: torch.Tensor | np.ndarray, n_classes: int) -> np.ndarray:
    """For each foreground class 1..n_classes-1 of a 3D label map, the fraction of its voxels in its largest
    26-connected component; 0 where the class is absent. Returns ``[n_classes - 1]`` floats in [0, 1].

    Known blind spot: a class predicted as one tiny blob scores 1. The guard compares two models on the same
    volumes, and an organ the model stops predicting scores 0 (absence counts against the model)."""
    lab = _array(label_map)
    if lab.ndim != 3:
        raise ValueError(f"expected a 3D label map, got shape {lab.shape}")
    out = np.zeros(n_classes - 1, dtype=np.float64)
    for c in range(1, n_classes):
        mask = lab == c
        total = int(mask.sum())
        if total:
            out[c - 1] = largest_component(mask).sum() / total
    return out
