"""Dice + cross-entropy with a voxel mask: masked voxels contribute nothing (an ignore label)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["masked_dice_ce"]


def masked_dice_ce(logits: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None = None,
                   smooth: float = 1e-5) -> torch.Tensor:
    """Mean of soft Dice loss (over foreground classes, batch-pooled) and cross-entropy.

    Args:
        logits: ``[B, C, X, Y, Z]``.
        target: ``[B, X, Y, Z]`` class indices.
        mask: ``[B, X, Y, Z]`` 1 where the voxel counts, 0 where it is ignored (None: all count).
    """
    b, c = logits.shape[:2]
    target = target.long()
    m = torch.ones_like(target, dtype=logits.dtype) if mask is None else mask.to(logits.dtype)
    ce = F.cross_entropy(logits, target, reduction="none")
    ce = (ce * m).sum() / m.sum().clamp_min(1.0)
    prob = torch.softmax(logits, dim=1)
    onehot = F.one_hot(target, c).movedim(-1, 1).to(logits.dtype)
    mm = m[:, None]
    dims = (0, 2, 3, 4)
    inter = (prob * onehot * mm).sum(dims)
    denom = (prob * mm).sum(dims) + (onehot * mm).sum(dims)
    dice = (2 * inter + smooth) / (denom + smooth)
    dice_loss = 1.0 - dice[1:].mean() if c > 1 else 1.0 - dice.mean()
    return dice_loss + ce
