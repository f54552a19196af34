"""The statistics of a cross-validation, as pure functions on numbers: the area under a learning curve (the one
definition, `asfda.results.area_under_curve`) and the seeded percentile bootstrap of a mean over test volumes, paired
when it is a difference of two strategies on the same volumes."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from asfda.results import area_under_curve

__all__ = ["BOOTSTRAP_RESAMPLES", "BOOTSTRAP_SEED", "bootstrap_mean", "curve_auc", "paired_difference"]

BOOTSTRAP_RESAMPLES = 10_000
BOOTSTRAP_SEED = 0


def _number(v: Any) -> bool:
    return v is not None and not math.isnan(float(v))


def curve_auc(dice_by_n: Mapping[Any, float | None]) -> float | None:
    """`asfda.results.area_under_curve` of a curve ``{n: Dice}`` (keys may be strings): the trapezoid area under Dice
    vs n over n = 0..N divided by N, a mean Dice level. None while any n has no value."""
    pts = sorted((int(n), float(v)) for n, v in dice_by_n.items() if v is not None and not math.isnan(v))
    if not pts or len(pts) < len(dice_by_n):
        return None
    return area_under_curve([float(n) for n, _ in pts], [v for _, v in pts])


def bootstrap_mean(values: Sequence[float | None], resamples: int = BOOTSTRAP_RESAMPLES,
                   seed: int = BOOTSTRAP_SEED) -> dict | None:
    """The mean of ``values`` (one per test volume; NaN left out) and its 95% percentile bootstrap interval:
    ``resamples`` draws of as many volumes with replacement (numpy's generator seeded by ``seed``), the 2.5th and
    97.5th percentiles of their means. ``{"mean", "ci95": [lo, hi], "n"}``; None without values."""
    x = np.array([v for v in values if v is not None and not math.isnan(v)], dtype=np.float64)
    if not len(x):
        return None
    idx = np.random.default_rng(seed).integers(0, len(x), size=(resamples, len(x)))
    lo, hi = np.percentile(x[idx].mean(axis=1), [2.5, 97.5])
    return {"mean": float(x.mean()), "ci95": [float(lo), float(hi)], "n": int(len(x))}


def paired_difference(a: Mapping[str, float | None], b: Mapping[str, float | None],
                      resamples: int = BOOTSTRAP_RESAMPLES, seed: int = BOOTSTRAP_SEED) -> dict | None:
    """``a`` minus ``b`` on the same test volumes (``{volume: value}``; a volume missing or NaN in either is left
    out), its mean over the volumes and the 95% bootstrap interval over volumes (`bootstrap_mean`)."""
    common = sorted(v for v in a if v in b and _number(a[v]) and _number(b[v]))
    return bootstrap_mean([float(a[v] or 0.0) - float(b[v] or 0.0) for v in common], resamples, seed)
