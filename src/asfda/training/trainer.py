"""Fine-tuning loop: labelled volumes (Dice+CE) plus masked pseudo-labelled ones (lambda_u, ramped up).

Runs on plain tensors in the main process (no DataLoader workers: on a 2-core machine, patch cropping
from in-memory volumes is cheaper than inter-process transfer). In a ``torchrun`` job (``dist``, several ranks) it
trains with ``DistributedDataParallel``: every rank draws the same global batch and trains on its share, with the
loss of the whole batch (see `finetune`).
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as torch_dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from asfda.config import TrainConfig
from asfda.distributed import DistContext
from asfda.options import PRECISIONS, check_option
from asfda.training.augment import AUGMENTATIONS, PatchAugmenter
from asfda.training.losses import dice_ce_from_stats, dice_ce_stats, masked_dice_ce

__all__ = ["TrainConfig", "TrainVolume", "finetune", "sample_patch"]


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
             progress: bool = True, desc: str = "fine-tune", dist: DistContext | None = None
             ) -> dict[str, list[float]]:
    """Fine-tunes ``network`` in place; returns the per-step loss history.

    With ``dist`` sharded (a ``torchrun`` job whose process group the caller has joined) every rank trains through
    a ``DistributedDataParallel`` wrapper (which starts from rank 0's weights) and ``network`` ends up trained
    alike on every rank. Each rank draws the whole global batch of ``cfg.batch_size`` patches from the same seeded
    stream as one process and keeps its share ``[rank::world_size]``; the step's pseudo-labelled patch goes to
    rank ``step % world_size``. The loss is the whole batch's (the Dice and CE sums, `dice_ce_stats`, summed over
    the ranks with a differentiable all-reduce), so the history is the same on every rank and the weights are
    those of one process up to float rounding. Not so where the model draws random numbers (dropout: each rank
    draws the masks of its own share, which one process would have drawn otherwise) or computes batch statistics
    (BatchNorm normalises each rank's share by its own statistics, and rank 0's running statistics are kept at the
    end; InstanceNorm, MONAI UNet's default, is per sample). Refused when ``cfg.batch_size < world_size``."""
    from tqdm.auto import tqdm

    if not labelled:
        raise ValueError("finetune needs at least one labelled volume")
    shard = dist if dist is not None and dist.sharded else None  # None: one process, as before
    if shard is not None and cfg.batch_size < shard.world_size:
        raise ValueError(f"batch_size {cfg.batch_size} < {shard.world_size} ranks: a rank would train on no "
                         f"labelled patch (raise train.batch_size to at least the number of ranks)")
    device = device or torch.device("cpu")
    check_option(cfg.precision, PRECISIONS, "precision", listed=f"{PRECISIONS}", error=ValueError)
    model: nn.Module = network

    def forward(x: torch.Tensor) -> torch.Tensor:
        ctx = (torch.autocast(device.type, dtype=torch.bfloat16) if cfg.precision == "bf16"
               else contextlib.nullcontext())
        with ctx:
            return model(x).float()

    check_option(cfg.augmentation, AUGMENTATIONS, "augmentation", listed=f"{AUGMENTATIONS}", error=ValueError)

    pseudo = pseudo or []
    p0, p1, p2 = cfg.patch_size or patch_size  # 3 sides (TrainConfig's patch_size, the model's roi)
    patch = (p0, p1, p2)
    augmenter = PatchAugmenter(cfg.augmentation if cfg.augment else "none", patch, cfg.seed)
    rng = np.random.default_rng(cfg.seed)

    def draw(vol: TrainVolume) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return augmenter(*sample_patch(vol, augmenter.region, rng, cfg.fg_oversample), rng)
    torch.manual_seed(cfg.seed)
    layout = _memory_format(cfg)
    network.to(memory_format=layout)  # type: ignore[call-overload]  # before the optimiser: it holds the parameters
    opt, sched = _optimiser(network, cfg)
    history: dict[str, list[float]] = {"loss": [], "loss_l": [], "loss_u": []}
    _train_modes(network)
    if shard is not None:  # after the train/eval modes are set: the wrapper keeps them
        model = _ddp(network, device)
    shown = progress and (dist is None or dist.is_main)
    bar = tqdm(range(cfg.steps), desc=desc, disable=not shown, leave=False, dynamic_ncols=True)
    for step in bar:
        drawn = [draw(labelled[int(rng.integers(len(labelled)))]) for _ in range(cfg.batch_size)]
        batch = ([d[0] for d in drawn], [d[1] for d in drawn], [d[2] for d in drawn])  # images, labels, masks
        lam = _pseudo_weight(cfg, step) if pseudo else 0.0
        if shard is not None:
            # the same draws on every rank (the streams stay in step); this rank keeps its share
            unl = draw(pseudo[int(rng.integers(len(pseudo)))]) if pseudo and lam > 0 else None
            loss, loss_l, loss_u = _sharded_loss(forward, batch, unl, lam, step, shard, device, layout)
        else:  # the pseudo-labelled patch is drawn after the labelled batch's forward, as it always was
            loss, loss_l, loss_u = _local_loss(forward, batch, lambda: draw(pseudo[int(rng.integers(len(pseudo)))]),
                                               lam, device, layout)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        _record(history, bar if step % 5 == 0 else None, loss=loss, loss_l=loss_l, loss_u=loss_u)
    if shard is not None:  # BatchNorm's running statistics moved with each rank's share: rank 0's for every rank
        for buf in network.buffers():
            torch_dist.broadcast(buf, src=0)
    network.to(memory_format=torch.contiguous_format)  # type: ignore[call-overload]  # inference: as it always ran
    network.eval()
    return history


def _ddp(network: nn.Module, device: torch.device) -> nn.Module:
    """The DistributedDataParallel wrapper (find_unused_parameters: a network may compute outputs the loss never
    reads, deep-supervision heads)."""
    ids = None if device.type != "cuda" else [device.index if device.index is not None else torch.cuda.current_device()]
    return DistributedDataParallel(network, device_ids=ids, find_unused_parameters=True)


def _local_loss(forward, batch: tuple[list, list, list], draw_pseudo, lam: float, device: torch.device,
                layout: torch.memory_format) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(loss_l + lam * loss_u, loss_l, loss_u)`` in one process: the labelled batch's masked Dice+CE, then (with
    ``lam > 0``) a patch from ``draw_pseudo()`` forwarded on its own."""
    imgs, labs, masks = batch
    x = torch.stack(imgs).to(device).contiguous(memory_format=layout)
    loss_l = masked_dice_ce(forward(x), torch.stack(labs).to(device), torch.stack(masks).to(device))
    loss_u = torch.zeros((), device=device)
    if lam > 0:
        xu, yu, mu = draw_pseudo()
        loss_u = masked_dice_ce(forward(xu[None].to(device).contiguous(memory_format=layout)),
                                yu[None].to(device), mu[None].to(device))
    return loss_l + lam * loss_u, loss_l, loss_u


def _record(history: dict[str, list[float]], bar, **losses: torch.Tensor) -> None:
    """Appends the step's losses to ``history``; shows them on the progress ``bar`` when given."""
    for key, value in losses.items():
        history[key].append(float(value.detach()))
    if bar is not None:
        bar.set_postfix(loss=f"{history['loss'][-1]:.3f}", l=f"{history['loss_l'][-1]:.3f}",
                        u=f"{history['loss_u'][-1]:.3f}")


def _optimiser(network: nn.Module, cfg: TrainConfig
               ) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    """AdamW over the trainable parameters, with a linear warm-up then a cosine decay over ``cfg.steps``."""
    params = [p for p in network.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    warm = max(1, int(cfg.warmup_fraction * cfg.steps))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warm) * 0.5 * (1 + math.cos(math.pi * min(s, cfg.steps) / cfg.steps)))
    return opt, sched


def _train_modes(network: nn.Module) -> None:
    """Training mode, except a frozen BatchNorm, which keeps its running statistics."""
    network.train()
    for mod in network.modules():
        if isinstance(mod, nn.modules.batchnorm._BatchNorm) and not any(p.requires_grad for p in mod.parameters(False)):
            mod.eval()


def _pseudo_weight(cfg: TrainConfig, step: int) -> float:
    """The unlabeled loss's weight at ``step``: ``lambda_u`` ramped up linearly over ``rampup_fraction`` of the steps
    (0 when ``lambda_u`` is 0)."""
    if cfg.lambda_u <= 0:
        return 0.0
    ramp = max(1, int(cfg.rampup_fraction * cfg.steps))
    return cfg.lambda_u * min(1.0, step / ramp)


def _sharded_loss(forward, batch: tuple[list, list, list], unl: tuple | None, lam: float, step: int,
                  shard: DistContext, device: torch.device, layout: torch.memory_format
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """This rank's share of the global batch (``batch``: images, labels, masks), forwarded once with the step's
    pseudo-labelled patch when it is this rank's (rank ``step % world_size``), and the global batch's loss
    (`_global_batch_loss`)."""
    imgs, labs, masks = batch
    k, w = shard.rank, shard.world_size
    xs = torch.stack(imgs[k::w]).to(device).contiguous(memory_format=layout)
    part = (torch.stack(labs[k::w]).to(device), torch.stack(masks[k::w]).to(device))
    upart = None
    if unl is not None and step % w == k:
        xs = torch.cat([xs, unl[0][None].to(device, xs.dtype)])  # one forward per backward
        upart = (unl[1][None].to(device), unl[2][None].to(device))
    return _global_batch_loss(forward(xs), part, upart, lam)


def _memory_format(cfg: TrainConfig) -> torch.memory_format:
    """The layout the network trains in: ``channels_last_3d`` with ``train.channels_last`` (on this 2-core CPU under
    bf16 autocast, oneDNN's backward of a convolution whose channel count is not a multiple of 8, such as a head of
    14 or 5 classes, is about 4 times slower in the contiguous layout: benchmarks/results/round_cost), else
    contiguous."""
    return torch.channels_last_3d if cfg.channels_last else torch.contiguous_format


class _AllReduceSum(torch.autograd.Function):
    """The sum over the ranks, differentiable: the backward sums the incoming gradients over the ranks too (what
    ``torch.distributed.nn.functional.all_reduce`` does, deprecated in torch 2.13)."""

    @staticmethod
    def forward(ctx: torch.autograd.function.FunctionCtx, tensor: torch.Tensor) -> torch.Tensor:
        out = tensor.clone(memory_format=torch.contiguous_format)
        torch_dist.all_reduce(out)
        return out

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, grad: torch.Tensor) -> torch.Tensor:
        out = grad.clone(memory_format=torch.contiguous_format)
        torch_dist.all_reduce(out)
        return out


def _global_batch_loss(out: torch.Tensor, part: tuple[torch.Tensor, torch.Tensor],
                      upart: tuple[torch.Tensor, torch.Tensor] | None, lam: float
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(loss_l + lam * loss_u, loss_l, loss_u)`` of the global batch, on every rank of the process group.

    ``out`` is this rank's forward: its labelled patches (``part``: targets and masks), then its pseudo-labelled
    patch when it has the step's one (``upart``). The `dice_ce_stats` of each part (zeros for a rank without the
    pseudo patch) are summed over the ranks by a differentiable all-reduce, whose backward sums the ranks'
    identical gradients of the loss: each rank's gradient is ``world_size`` times its share of the global one, and
    DDP's average over ranks is then the global batch's gradient. With ``lam == 0`` there is no pseudo part (and
    ``loss_u`` is 0)."""
    n = part[0].shape[0]
    stats = [dice_ce_stats(out[:n], *part)]
    if lam > 0:
        stats.append(dice_ce_stats(out[n:], *upart) if upart is not None else torch.zeros_like(stats[0]))
    total = _AllReduceSum.apply(torch.stack(stats))
    loss_l = dice_ce_from_stats(total[0])
    loss_u = dice_ce_from_stats(total[1]) if lam > 0 else torch.zeros((), device=out.device)
    return loss_l + lam * loss_u, loss_l, loss_u
