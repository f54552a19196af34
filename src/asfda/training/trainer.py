"""Fine-tuning loop: labelled volumes (Dice+CE) plus masked pseudo-labelled ones (lambda_u, ramped up).

Runs on plain tensors in the main process (no DataLoader workers: on a 2-core machine, patch cropping
from in-memory volumes is cheaper than inter-process transfer).
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from asfda.training.augment import AUGMENTATIONS, PatchAugmenter
from asfda.training.losses import masked_dice_ce

__all__ = ["TrainConfig", "TrainVolume", "finetune", "sample_patch"]


@dataclass
class TrainConfig:
    """The training recipe of one round (every field is configurable from the run config)."""

    steps: int = 100
    batch_size: int = 2
    patch_size: tuple[int, int, int] | None = None  # None: the model's sliding-window roi
    lr: float = 1e-3
    weight_decay: float = 1e-5
    warmup_fraction: float = 0.05
    fg_oversample: float = 0.67
    lambda_u: float = 1.0
    rampup_fraction: float = 0.3
    augment: bool = True  # false: no augmentation at all, whatever `augmentation` says
    # "intensity": light global intensity changes (the original recipe); "spatial_mr": MONAI's RandAffined
    # (rotation, scaling) and MR-typical intensity transforms (bias field, gamma, noise): asfda.training.augment
    augmentation: str = "intensity"
    freeze_encoder: bool = False  # train only what runs after the bottleneck (decoder + head)
    # "bf16": forward and loss under torch.autocast(bfloat16) (weights, gradients, optimiser stay fp32);
    # faster on CPUs with bf16 instructions (benchmarks/train_step.py --variants fp32,bf16)
    precision: str = "fp32"
    # keep a round's weights only if the adapted model's organs on up to guard_volumes unlabeled volumes are
    # at least as connected as the pretrained model's (asfda.training.guard); otherwise revert the round
    guard: bool = True
    guard_volumes: int = 8
    seed: int = 0


PRECISIONS = ("fp32", "bf16")

@dataclass
class TrainVolume:
    """A training volume on the model grid: image ``[1, X, Y, Z]``, label ``[X, Y, Z]``, optional mask."""

    image: torch.Tensor
    label: torch.Tensor
    mask: torch.Tensor | None = None


def sample_patch(vol: TrainVolume, patch: tuple[int, int, int], rng: np.random.Generator, fg_oversample: float
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A random patch (zero-padded when the volume is smaller), centred on a foreground voxel with
    probability ``fg_oversample``."""
    shape = vol.label.shape
    pad = [max(0, p - s) for p, s in zip(patch, shape)]
    image, label = vol.image, vol.label
    mask = vol.mask if vol.mask is not None else torch.ones(shape, dtype=torch.bool)
    if any(pad):
        spec = []
        for p in reversed(pad):
            spec += [p // 2, p - p // 2]
        image = torch.nn.functional.pad(image, spec)
        label = torch.nn.functional.pad(label, spec)
        mask = torch.nn.functional.pad(mask, spec)
        shape = label.shape
    fg = None
    if rng.random() < fg_oversample:
        fg_idx = torch.nonzero((label > 0) & mask.bool(), as_tuple=False)
        if len(fg_idx):
            fg = fg_idx[int(rng.integers(len(fg_idx)))].tolist()
    starts = []
    for d in range(3):
        hi = shape[d] - patch[d]
        if fg is None:
            s = int(rng.integers(hi + 1))
        else:
            s = int(np.clip(fg[d] - patch[d] // 2 + int(rng.integers(-patch[d] // 4, patch[d] // 4 + 1)), 0, hi))
        starts.append(s)
    sl = tuple(slice(s, s + p) for s, p in zip(starts, patch))
    return image[(slice(None), *sl)], label[sl], mask[sl]


def finetune(network: nn.Module, labelled: list[TrainVolume], cfg: TrainConfig, *, patch_size: tuple[int, int, int],
             pseudo: list[TrainVolume] | None = None, device: torch.device | None = None,
             progress: bool = True, desc: str = "fine-tune") -> dict[str, list[float]]:
    """Fine-tunes ``network`` in place; returns the per-step loss history."""
    from tqdm.auto import tqdm

    if not labelled:
        raise ValueError("finetune needs at least one labelled volume")
    device = device or torch.device("cpu")
    if cfg.precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {cfg.precision!r}")

    def forward(x: torch.Tensor) -> torch.Tensor:
        ctx = (torch.autocast(device.type, dtype=torch.bfloat16) if cfg.precision == "bf16"
               else contextlib.nullcontext())
        with ctx:
            return network(x).float()

    if cfg.augmentation not in AUGMENTATIONS:
        raise ValueError(f"augmentation must be one of {AUGMENTATIONS}, got {cfg.augmentation!r}")

    pseudo = pseudo or []
    patch = tuple(cfg.patch_size or patch_size)
    augmenter = PatchAugmenter(cfg.augmentation if cfg.augment else "none", patch, cfg.seed)
    rng = np.random.default_rng(cfg.seed)

    def draw(vol: TrainVolume) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return augmenter(*sample_patch(vol, augmenter.region, rng, cfg.fg_oversample), rng)
    torch.manual_seed(cfg.seed)
    params = [p for p in network.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    warm = max(1, int(cfg.warmup_fraction * cfg.steps))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warm) * 0.5 * (1 + math.cos(math.pi * min(s, cfg.steps) / cfg.steps)))
    history: dict[str, list[float]] = {"loss": [], "loss_l": [], "loss_u": []}
    network.train()
    for m in network.modules():  # a frozen BatchNorm keeps its running statistics too
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and not any(p.requires_grad for p in m.parameters(False)):
            m.eval()
    bar = tqdm(range(cfg.steps), desc=desc, disable=not progress, leave=False, dynamic_ncols=True)
    for step in bar:
        imgs, labs, masks = [], [], []
        for _ in range(cfg.batch_size):
            x, y, m = draw(labelled[int(rng.integers(len(labelled)))])
            imgs.append(x)
            labs.append(y)
            masks.append(m)
        x = torch.stack(imgs).to(device)
        loss_l = masked_dice_ce(forward(x), torch.stack(labs).to(device), torch.stack(masks).to(device))
        loss_u = torch.zeros((), device=device)
        lam = 0.0
        if pseudo and cfg.lambda_u > 0:
            ramp = max(1, int(cfg.rampup_fraction * cfg.steps))
            lam = cfg.lambda_u * min(1.0, step / ramp)
            if lam > 0:
                xu, yu, mu = draw(pseudo[int(rng.integers(len(pseudo)))])
                loss_u = masked_dice_ce(forward(xu[None].to(device)), yu[None].to(device), mu[None].to(device))
        loss = loss_l + lam * loss_u
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        history["loss"].append(float(loss.detach()))
        history["loss_l"].append(float(loss_l.detach()))
        history["loss_u"].append(float(loss_u.detach()))
        if step % 5 == 0:
            bar.set_postfix(loss=f"{history['loss'][-1]:.3f}", l=f"{history['loss_l'][-1]:.3f}",
                            u=f"{history['loss_u'][-1]:.3f}")
    network.eval()
    return history
