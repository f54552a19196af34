"""Dynamic temperature scaling: one scalar T fitted per round on the labelled target volumes."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

__all__ = ["expected_calibration_error", "fit_temperature", "sample_voxels"]


def sample_voxels(logits: torch.Tensor, label: torch.Tensor, max_voxels: int, generator: torch.Generator
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """A uniform voxel subsample: logits ``[C, ...]``, label ``[...]`` -> ``[N, C]``, ``[N]``."""
    z = logits.reshape(logits.shape[0], -1).T
    y = label.reshape(-1).long()
    if z.shape[0] > max_voxels:
        idx = torch.randperm(z.shape[0], generator=generator)[:max_voxels]
        z, y = z[idx], y[idx]
    return z.float(), y


def fit_temperature(logits: torch.Tensor, labels: torch.Tensor, t_min: float = 0.05, t_max: float = 20.0,
                    xatol: float = 1e-6) -> float:
    """The T minimising the NLL of ``softmax(logits / T)`` over ``[t_min, t_max]``: SciPy's bounded Brent search
    on log T (the NLL is convex in 1/T), to ``xatol`` in log T.

    The NLL is computed in the logits' dtype. In float32 it can be flat to rounding over a few tenths of a percent
    of T around its minimum, and any search lands somewhere on that plateau (float64 logits pin T to ``xatol``).

    Args:
        logits: ``[N, C]`` voxel logits; labels: ``[N]`` class indices.
    """
    from scipy.optimize import minimize_scalar

    if logits.ndim != 2 or labels.ndim != 1 or logits.shape[0] != labels.shape[0]:
        raise ValueError(f"expected logits [N, C] and labels [N], got {tuple(logits.shape)}, {tuple(labels.shape)}")
    if logits.shape[0] == 0:
        raise ValueError("no voxels to fit a temperature on")

    def nll(log_t: float) -> float:
        return float(F.cross_entropy(logits / math.exp(log_t), labels))

    best = minimize_scalar(nll, bounds=(math.log(t_min), math.log(t_max)), method="bounded",
                           options={"xatol": xatol})
    if not math.isfinite(best.fun):
        raise ValueError("the NLL is not finite: the logits have NaN or infinite values")
    return math.exp(best.x)


def expected_calibration_error(prob: torch.Tensor, labels: torch.Tensor, n_bins: int = 15) -> float:
    """ECE of top-1 confidence: ``prob [N, C]``, ``labels [N]``; equal-width bins."""
    if prob.ndim != 2 or labels.ndim != 1 or prob.shape[0] != labels.shape[0]:
        # a [N, 1] label tensor would otherwise broadcast against [N] predictions and give a wrong number
        raise ValueError(f"expected prob [N, C] and labels [N], got {tuple(prob.shape)}, {tuple(labels.shape)}")
    conf, pred = prob.max(1)
    correct = (pred == labels).double()
    edges = torch.linspace(0, 1, n_bins + 1, dtype=prob.dtype)
    ece = 0.0
    for lo, hi in zip(edges[:-1], edges[1:]):
        m = (conf > lo) & (conf <= hi)
        if m.any():
            ece += float(m.double().mean()) * abs(float(conf[m].double().mean()) - float(correct[m].mean()))
    return ece
