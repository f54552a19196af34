"""Dice + cross-entropy with a voxel mask: masked voxels contribute nothing (an ignore label)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["masked_dice_ce"]


def masked_dice_ce(logits: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None = None,
                   smooth: float = 1e-5) -> torch.Tensor:
    """Soft Dice loss (over foreground classes, batch-pooled: MONAI's `MaskedDiceLoss`) plus the masked mean
    cross-entropy.

    Args:
        logits: ``[B, C, X, Y, Z]``.
        target: ``[B, X, Y, Z]`` class indices.
        mask: ``[B, X, Y, Z]`` 1 where the voxel counts, 0 where it is ignored (None: all count).
    """
    c = logits.shape[1]
    target = target.long()
    m = torch.ones_like(target, dtype=logits.dtype) if mask is None else mask.to(logits.dtype)
    ce = F.cross_entropy(logits, target, reduction="none")
    ce = (ce * m).sum() / m.sum().clamp_min(1.0)
    if c == 1:  # one class: the softmax is 1 everywhere and so is the Dice (MONAI would skip the softmax)
        return (logits * 0).sum() + ce
    from monai.losses import MaskedDiceLoss  # here: importing asfda.training (the run config does) loads no MONAI

    dice = MaskedDiceLoss(include_background=False, to_onehot_y=True, softmax=True, batch=True,
                          smooth_nr=smooth, smooth_dr=smooth)
    return dice(logits, target[:, None], m[:, None]) + ce
