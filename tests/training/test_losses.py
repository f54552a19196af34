"""`masked_dice_ce` (MONAI's `MaskedDiceLoss` + masked cross-entropy) against the hand-written masked Dice + CE it
replaced, written out here as the reference."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from _loss_helpers import loss_case
from asfda.training import masked_dice_ce


def _reference(logits: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None = None,
               smooth: float = 1e-5) -> torch.Tensor:
    """Soft Dice loss over the foreground classes, pooled over the batch, with the masked voxels left out of every
    sum, plus the cross-entropy averaged over the unmasked voxels."""
    c = logits.shape[1]
    target = target.long()
    m = torch.ones_like(target, dtype=logits.dtype) if mask is None else mask.to(logits.dtype)
    ce = (F.cross_entropy(logits, target, reduction="none") * m).sum() / m.sum().clamp_min(1.0)
    prob = torch.softmax(logits, dim=1)
    onehot = F.one_hot(target, c).movedim(-1, 1).to(logits.dtype)
    mm = m[:, None]
    dims = (0, 2, 3, 4)
    inter = (prob * onehot * mm).sum(dims)
    denom = (prob * mm).sum(dims) + (onehot * mm).sum(dims)
    dice = (2 * inter + smooth) / (denom + smooth)
    return (1.0 - dice[1:].mean() if c > 1 else 1.0 - dice.mean()) + ce


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_monai_masked_dice_equals_the_hand_written_loss(dtype: torch.dtype) -> None:
    loss_diff, grad_diff = 0.0, 0.0
    for seed in range(36):
        logits, target, mask = loss_case(seed, dtype)
        x = logits.clone().requires_grad_()
        ours = masked_dice_ce(x, target, mask)
        (g_ours,) = torch.autograd.grad(ours, x)
        x = logits.clone().requires_grad_()
        ref = _reference(x, target, mask)
        (g_ref,) = torch.autograd.grad(ref, x)
        loss_diff = max(loss_diff, abs(ours.item() - ref.item()))
        grad_diff = max(grad_diff, float((g_ours - g_ref).abs().max()))
    # float32: the two differ by float rounding only (1 - mean(dice) vs mean(1 - dice)), ~1e-7
    assert loss_diff <= (1e-6 if dtype == torch.float32 else 1e-12)
    assert grad_diff <= (1e-8 if dtype == torch.float32 else 1e-15)


def test_fully_masked_batch_and_single_class_give_zero_loss() -> None:
    logits, target, _ = loss_case(1, torch.float32)
    x = logits.clone().requires_grad_()
    loss = masked_dice_ce(x, target, torch.zeros_like(target, dtype=torch.bool))
    assert loss.item() == 0.0 == _reference(logits, target, torch.zeros_like(target)).item()
    loss.backward()
    assert x.grad is not None and torch.all(x.grad == 0)
    one = torch.randn(2, 1, 4, 4, 4, requires_grad=True)  # one class: softmax 1 everywhere, Dice 1, CE 0
    zero = torch.zeros(2, 4, 4, 4, dtype=torch.long)
    loss = masked_dice_ce(one, zero)
    assert loss.item() == 0.0 == _reference(one, zero).item()
    loss.backward()
    assert one.grad is not None and torch.all(one.grad == 0)


def test_no_mask_is_an_all_ones_mask_and_warns_nothing(recwarn: pytest.WarningsRecorder) -> None:
    logits, target, _ = loss_case(3, torch.float32)
    assert float(masked_dice_ce(logits, target)) == float(masked_dice_ce(logits, target, torch.ones_like(target)))
    assert not [w for w in recwarn if "mask" in str(w.message).lower()]
