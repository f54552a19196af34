"""Dice + cross-entropy with a voxel mask: masked voxels contribute nothing (an ignore label). Also the loss as sums
that add up over the parts of a batch (`dice_ce_stats`, `dice_ce_from_stats`: a batch split over DDP ranks)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["dice_ce_from_stats", "dice_ce_stats", "masked_dice_ce"]


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


def dice_ce_stats(logits: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """The sums `masked_dice_ce` is made of, for one (local) batch: they add up over batches (and ranks), and
    `dice_ce_from_stats` of the sum is the loss of the pooled batch.

    A 1-D tensor ``[inter (c-1), ground truth (c-1), prediction (c-1), ce_sum, mask_sum]`` per foreground class
    ``1..c-1``, as MONAI's `MaskedDiceLoss` sums them (softmax, then input and target times the mask, background
    dropped): ``inter = sum(p_k m [t == k])``, ``ground truth = sum(m [t == k])``, ``prediction = sum(p_k m)``;
    ``ce_sum`` is the masked cross-entropy summed over voxels and ``mask_sum`` the mask summed. With one class
    there is no Dice term (as in `masked_dice_ce`): just ``[ce_sum, mask_sum]``. Arguments as `masked_dice_ce`."""
    c = logits.shape[1]
    target = target.long()
    m = torch.ones_like(target, dtype=logits.dtype) if mask is None else mask.to(logits.dtype)
    ce_sum = (F.cross_entropy(logits, target, reduction="none") * m).sum()
    tail = torch.stack([ce_sum, m.sum()])
    if c == 1:
        return tail
    mm = m[:, None]
    prob = torch.softmax(logits, 1)[:, 1:] * mm
    onehot = F.one_hot(target, c).movedim(-1, 1)[:, 1:].to(logits.dtype) * mm
    dims = [0, *range(2, logits.dim())]
    inter = (prob * onehot).sum(dims)
    return torch.cat([inter, onehot.sum(dims), prob.sum(dims), tail])


def dice_ce_from_stats(stats: torch.Tensor, smooth: float = 1e-5) -> torch.Tensor:
    """`masked_dice_ce` from `dice_ce_stats` (summed over the parts of a batch): the mean over the foreground
    classes of ``1 - (2 inter + smooth) / (ground truth + prediction + smooth)`` (written as MONAI's `DiceLoss`
    does) plus ``ce_sum / max(mask_sum, 1)``."""
    k = (stats.shape[-1] - 2) // 3
    ce = stats[3 * k] / stats[3 * k + 1].clamp_min(1.0)
    if k == 0:
        return ce
    tp, gt, pred = stats[:k], stats[k:2 * k], stats[2 * k:3 * k]
    fp, fn = pred - tp, gt - tp
    dice = 1 - (2 * tp + smooth) / (2 * (tp + 0.5 * fp + 0.5 * fn) + smooth)
    return dice.mean() + ce
