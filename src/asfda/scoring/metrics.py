"""Metrics: pure functions from probabilities ``[C, X, Y, Z]`` (softmax over classes, channel 0 =
background) or embeddings to a voxel map or one number per volume. No I/O, no model calls.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

__all__ = [
    "anatomical_segmentation_difficulty",
    "cosine_distance",
    "foreground_confidence",
    "foreground_kl_divergence",
    "grow_mask",
    "mean_entropy",
    "voxel_entropy",
]

_EPS = 1e-12


def voxel_entropy(prob: torch.Tensor) -> torch.Tensor:
    """Normalised predictive entropy ``-sum_c p log p / log C`` per voxel, in [0, 1]; ``[C, ...] -> [...]``."""
    c = prob.shape[0]
    if c < 2:
        raise ValueError(f"prob must have >= 2 classes along dim 0, got shape {tuple(prob.shape)}")
    return -(prob * torch.log(prob.clamp_min(_EPS))).sum(0) / math.log(c)


def mean_entropy(prob: torch.Tensor) -> float:
    """ENPY: whole-volume mean of the normalised voxel entropy (a baseline, not ASD)."""
    return float(voxel_entropy(prob).mean())


def grow_mask(mask: torch.Tensor, voxels: int) -> torch.Tensor:
    """Grows a boolean mask ``[X, Y, Z]`` by ``voxels`` in every direction (cubic structuring element)."""
    if voxels <= 0:
        return mask.bool()
    k = 2 * voxels + 1
    grown = F.max_pool3d(mask[None, None].float(), kernel_size=k, stride=1, padding=voxels)
    return grown[0, 0] > 0


def anatomical_segmentation_difficulty(prob: torch.Tensor, grow_voxels: int = 2, fallback_fraction: float = 0.01
                                       ) -> float:
    """ASD: entropy inside the predicted anatomy, each predicted foreground class counting equally.

    For each foreground class predicted somewhere (argmax), take the mean normalised entropy over its
    region grown by ``grow_voxels``; ASD is the mean over those classes. When nothing is predicted as
    foreground, fall back to the mean entropy of the ``fallback_fraction`` most foreground-probable voxels.

    Args:
        prob: ``[C, X, Y, Z]`` class probabilities.
    """
    ent = voxel_entropy(prob)
    pred = prob.argmax(0)
    values = []
    for c in range(1, prob.shape[0]):
        region = pred == c
        if region.any():
            values.append(ent[grow_mask(region, grow_voxels)].mean())
    if values:
        return float(torch.stack(values).mean())
    fg = (1.0 - prob[0]).reshape(-1)
    k = max(1, int(round(fallback_fraction * fg.numel())))
    top = torch.topk(fg, k).indices
    return float(ent.reshape(-1)[top].mean())


def foreground_kl_divergence(prob_t: torch.Tensor, prob_0: torch.Tensor) -> float:
    """Knowledge divergence ``KL(p_t || p_0)`` averaged over voxels in the union of both models' foreground.

    Returns 0 when neither model predicts any foreground.
    """
    if prob_t.shape != prob_0.shape:
        raise ValueError(f"prob_t {tuple(prob_t.shape)} and prob_0 {tuple(prob_0.shape)} differ in shape")
    union = (prob_t.argmax(0) > 0) | (prob_0.argmax(0) > 0)
    if not union.any():
        return 0.0
    kl = (prob_t * (torch.log(prob_t.clamp_min(_EPS)) - torch.log(prob_0.clamp_min(_EPS)))).sum(0)
    return float(kl[union].mean())


def foreground_confidence(prob: torch.Tensor) -> float:
    """Mean over predicted-foreground voxels of the max class probability (0 if no foreground)."""
    fg = prob.argmax(0) > 0
    if not fg.any():
        return 0.0
    return float(prob.max(0).values[fg].mean())


def cosine_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Pairwise cosine distance ``1 - cos`` between rows of ``a [N, D]`` and ``b [M, D]`` -> ``[N, M]``."""
    a = F.normalize(a.double(), dim=1)
    b = F.normalize(b.double(), dim=1)
    return (1.0 - a @ b.T).clamp_min(0.0)
