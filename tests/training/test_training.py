from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from asfda.training import TrainConfig, TrainVolume, finetune, masked_dice_ce
from asfda.training.trainer import sample_patch


def test_masked_voxels_contribute_zero_gradient() -> None:
    torch.manual_seed(0)
    logits = torch.randn(1, 3, 4, 4, 4, requires_grad=True)
    target = torch.randint(0, 3, (1, 4, 4, 4))
    mask = torch.zeros(1, 4, 4, 4)
    mask[..., :2] = 1
    masked_dice_ce(logits, target, mask).backward()
    grad = logits.grad
    assert grad is not None
    assert torch.all(grad[..., 2:] == 0)
    assert grad[..., :2].abs().sum() > 0


def test_masked_loss_ignores_what_is_masked() -> None:
    torch.manual_seed(0)
    logits = torch.randn(1, 3, 4, 4, 4)
    target = torch.randint(0, 3, (1, 4, 4, 4))
    mask = torch.zeros(1, 4, 4, 4)
    mask[..., :2] = 1
    other = target.clone()
    other[..., 2:] = (other[..., 2:] + 1) % 3  # changing masked labels changes nothing
    assert torch.allclose(masked_dice_ce(logits, target, mask), masked_dice_ce(logits, other, mask))


def test_perfect_prediction_has_low_loss() -> None:
    target = torch.randint(0, 3, (2, 4, 4, 4))
    logits = torch.nn.functional.one_hot(target, 3).movedim(-1, 1).float() * 50
    assert float(masked_dice_ce(logits, target)) < 1e-3


def test_patch_sampling_pads_small_volumes_and_prefers_foreground() -> None:
    import numpy as np

    label = torch.zeros(10, 10, 6, dtype=torch.long)
    label[8, 8, 4] = 1
    vol = TrainVolume(torch.zeros(1, 10, 10, 6), label)
    rng = np.random.default_rng(0)
    x, y, m = sample_patch(vol, (8, 8, 8), rng, fg_oversample=1.0)
    assert x.shape == (1, 8, 8, 8) and y.shape == (8, 8, 8) and m.shape == (8, 8, 8)
    assert int(y.sum()) == 1  # the single foreground voxel is inside the patch


def _tiny_net() -> torch.nn.Module:
    from monai.networks.nets import UNet

    torch.manual_seed(0)
    return UNet(3, 1, 3, (4, 8), (2,), num_res_units=0)


def _vols() -> list[TrainVolume]:
    g = torch.Generator().manual_seed(1)
    label = torch.zeros(12, 12, 8, dtype=torch.long)
    label[2:6, 2:6, 2:5] = 1
    label[7:11, 6:10, 3:7] = 2
    image = (label.float() * 0.5 + torch.randn(12, 12, 8, generator=g) * 0.05)[None]
    return [TrainVolume(image, label)]


def test_same_seed_gives_same_weights_and_training_reduces_loss() -> None:
    cfg = TrainConfig(steps=15, batch_size=2, lr=1e-2, seed=7)
    a, b = _tiny_net(), _tiny_net()
    ha = finetune(a, _vols(), cfg, patch_size=(8, 8, 8), progress=False)
    finetune(b, _vols(), cfg, patch_size=(8, 8, 8), progress=False)
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert ka == kb and torch.equal(va, vb), ka
    assert sum(ha["loss"][-3:]) < sum(ha["loss"][:3])


def test_pseudo_labels_enter_after_rampup() -> None:
    vols = _vols()
    pseudo = [TrainVolume(vols[0].image, vols[0].label, torch.ones_like(vols[0].label, dtype=torch.bool))]
    cfg = TrainConfig(steps=6, batch_size=1, seed=0, rampup_fraction=0.5, lambda_u=1.0)
    h = finetune(_tiny_net(), vols, cfg, patch_size=(8, 8, 8), pseudo=pseudo, progress=False)
    assert h["loss_u"][0] == 0.0 and h["loss_u"][-1] > 0.0


def test_bf16_precision_trains_deterministically_and_fp32_weights_stay_fp32() -> None:
    cfg = TrainConfig(steps=15, batch_size=2, lr=1e-2, seed=7, precision="bf16")
    a, b = _tiny_net(), _tiny_net()
    ha = finetune(a, _vols(), cfg, patch_size=(8, 8, 8), progress=False)
    finetune(b, _vols(), cfg, patch_size=(8, 8, 8), progress=False)
    assert all(torch.equal(va, vb) for va, vb in zip(a.state_dict().values(), b.state_dict().values()))
    assert all(v.dtype == torch.float32 for v in a.state_dict().values() if v.is_floating_point())
    assert all(math.isfinite(x) for x in ha["loss"]) and sum(ha["loss"][-3:]) < sum(ha["loss"][:3])
    # and it differs from fp32 (the autocast is really on)
    c = _tiny_net()
    finetune(c, _vols(), dataclasses.replace(cfg, precision="fp32"), patch_size=(8, 8, 8), progress=False)
    assert not all(torch.equal(va, vc) for va, vc in zip(a.state_dict().values(), c.state_dict().values()))
    with pytest.raises(ValueError, match="precision"):
        finetune(_tiny_net(), _vols(), dataclasses.replace(cfg, precision="fp16"), patch_size=(8, 8, 8),
                 progress=False)


def test_channels_last_trains_the_same_model_and_gives_back_the_contiguous_layout() -> None:
    """train.channels_last changes the memory layout only: the same patches and the same first loss (before any
    update: the same function) as the contiguous run, a loss that falls, and the network's 5-D weights contiguous
    again afterwards (inference runs on the layout it always had). Later steps differ by float rounding, which
    AdamW's normalised updates carry on, so weights are not compared."""
    cfg = TrainConfig(steps=15, batch_size=2, lr=1e-2, seed=7)
    ha = finetune(_tiny_net(), _vols(), cfg, patch_size=(8, 8, 8), progress=False)
    b = _tiny_net()
    hb = finetune(b, _vols(), dataclasses.replace(cfg, channels_last=True), patch_size=(8, 8, 8), progress=False)
    assert hb["loss"][0] == pytest.approx(ha["loss"][0], rel=1e-5)
    assert all(math.isfinite(x) for x in hb["loss"]) and sum(hb["loss"][-3:]) < sum(hb["loss"][:3])
    assert all(v.is_contiguous() for v in b.state_dict().values())


def test_restart_trains_each_round_from_the_pretrained_weights(tmp_path, tiny_bundle) -> None:
    """train.restart: a round's model is the pretrained one fine-tuned on all labels, whatever came before; with
    restart off, a round continues from the previous weights (METHOD.md)."""
    import dataclasses

    import torch

    from asfda.adapter import Adapter
    from asfda.config import SemiConfig
    from asfda.io import load_dataset
    from asfda.models import load_model
    from asfda.training import TrainConfig
    from conftest import write_nnunet

    ds = load_dataset(write_nnunet(tmp_path / "d", n=3))
    adapter = Adapter(load_model(tiny_bundle), ds.class_names, progress=False)
    cfg = TrainConfig(steps=2, guard=False, restart=True)
    first = adapter.train_round(list(ds.cases[:1]), [], cfg, SemiConfig(), 1.0)
    after_one = adapter.current_state()
    adapter.train_round(list(ds.cases[:1]), [], cfg, SemiConfig(), 1.0)
    again = adapter.current_state()
    assert first.history["loss"] and all(torch.equal(after_one[k], again[k]) for k in after_one)  # same start, seed
    adapter.train_round(list(ds.cases[:1]), [], dataclasses.replace(cfg, restart=False), SemiConfig(), 1.0)
    continued = adapter.current_state()
    assert any(not torch.equal(after_one[k], continued[k]) for k in after_one)
