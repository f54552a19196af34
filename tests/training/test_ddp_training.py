"""Fine-tuning in a ``torchrun`` job (`finetune(..., dist=...)`, DistributedDataParallel): two local CPU ranks (gloo on
loopback, one torch thread each) train the same weights, with the same loss history, as one process; and the
batch-pooled Dice + CE of `masked_dice_ce` is rebuilt exactly from sums that add up over the parts of a batch."""

from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import Any, cast

import pytest
import torch
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel

from _loss_helpers import loss_case
from asfda.distributed import DistContext, rank_context
from asfda.training import TrainConfig, TrainVolume, finetune, masked_dice_ce
from asfda.training.losses import dice_ce_from_stats, dice_ce_stats
from asfda.training.trainer import _global_batch_loss

PATCH = (8, 8, 8)
CASES = {  # name -> (TrainConfig, with a pseudo-labelled volume?)
    "labelled": (TrainConfig(steps=3, batch_size=2, lr=1e-3, seed=5, precision="fp32", augmentation="intensity"),
                 False),
    # batch 3: shares of 2 and 1 patches; the pseudo patch on rank 1, 0, 1 (lambda ramped up after step 0)
    "pseudo": (TrainConfig(steps=4, batch_size=3, lr=1e-3, seed=6, precision="fp32", augmentation="intensity",
                           lambda_u=0.8, rampup_fraction=0.01), True),
    # the forward under bf16 autocast (the loss sums in fp32): a share's forward rounds a little differently from
    # the whole batch's (bf16 keeps 8 bits), hence the wider tolerance below (measured: 3e-5 on weights, 1e-5 on loss)
    "bf16": (TrainConfig(steps=3, batch_size=2, lr=1e-3, seed=5, precision="bf16", augmentation="intensity",
                         lambda_u=0.8, rampup_fraction=0.01), True),
}
FROZEN = {"pseudo": "model.0."}  # name -> parameters frozen (requires_grad False) in that case
TOLERANCE = {"bf16": (2e-4, 1e-4)}  # name -> (weights' atol, history's atol); otherwise 1e-5 (rtol 1e-4 on weights)
LAM = 0.7  # the gradient check's lambda_u
_TORCHRUN_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _net() -> torch.nn.Module:
    """Without biases: a conv bias right before an InstanceNorm has a gradient of 0 up to float rounding, which
    AdamW's first steps (``m / sqrt(v)``) blow up to +-lr in either setup: weights that do nothing, of any value."""
    from monai.networks.nets import UNet

    torch.manual_seed(0)
    return UNet(spatial_dims=3, in_channels=1, out_channels=3, channels=(4, 8), strides=(2,), num_res_units=0,
                bias=False)


def _case_net(name: str) -> torch.nn.Module:
    net = _net()
    for key, param in net.named_parameters():
        param.requires_grad_(not (name in FROZEN and key.startswith(FROZEN[name])))
    return net


def _volumes() -> tuple[list[TrainVolume], list[TrainVolume]]:
    g = torch.Generator().manual_seed(11)
    label = torch.randint(0, 3, (16, 16, 16), generator=g)
    image = (label.float() * 0.4 + torch.randn(16, 16, 16, generator=g) * 0.2)[None]
    other = torch.randint(0, 3, (16, 16, 16), generator=g)
    pseudo = TrainVolume(image * 0.9, other, torch.rand(16, 16, 16, generator=g) > 0.4)
    return [TrainVolume(image, label)], [pseudo]


def _batch() -> dict[str, torch.Tensor]:
    """A batch of 3 labelled patches and one pseudo-labelled patch, for the gradient check."""
    g = torch.Generator().manual_seed(3)
    return {"x": torch.randn(3, 1, *PATCH, generator=g), "y": torch.randint(0, 3, (3, *PATCH), generator=g),
            "m": torch.rand(3, *PATCH, generator=g) > 0.2, "xu": torch.randn(1, 1, *PATCH, generator=g),
            "yu": torch.randint(0, 3, (1, *PATCH), generator=g), "mu": torch.rand(1, *PATCH, generator=g) > 0.5}


def _rank_main(rank: int, world: int, port: int, out: str) -> None:
    """One rank, as torchrun would start it: its environment, the process group joined by `rank_context`."""
    torch.set_num_threads(1)
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    labelled, pseudo = _volumes()
    with rank_context("cpu") as ctx:
        result: dict[str, Any] = {}
        for name, (cfg, with_pseudo) in CASES.items():
            net = _case_net(name)
            history = finetune(net, labelled, cfg, patch_size=PATCH, pseudo=pseudo if with_pseudo else None,
                               progress=False, dist=ctx)
            result[name] = {"state": net.state_dict(), "history": history}
        # one step's gradient through DDP: the labelled patches shared [rank::2], the pseudo patch on rank 1
        b, net = _batch(), _net()
        ddp = DistributedDataParallel(net)
        x, part = b["x"][rank::world], (b["y"][rank::world], b["m"][rank::world])
        upart = (b["yu"], b["mu"]) if rank == 1 else None
        loss, loss_l, loss_u = _global_batch_loss(ddp(torch.cat([x, b["xu"]]) if rank == 1 else x), part, upart, LAM)
        loss.backward()
        result["grad"] = {"loss": [float(v.detach()) for v in (loss, loss_l, loss_u)],
                          "grads": {n: cast(torch.Tensor, p.grad).clone() for n, p in net.named_parameters()}}
        torch.save(result, Path(out) / f"rank{rank}.pt")


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """One process's fine-tuning and one 2-rank job (torch.multiprocessing.spawn) doing the same."""
    root = tmp_path_factory.mktemp("ddp")
    labelled, pseudo = _volumes()
    single = {}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for name, (cfg, with_pseudo) in CASES.items():
            net = _case_net(name)
            history = finetune(net, labelled, cfg, patch_size=PATCH, pseudo=pseudo if with_pseudo else None,
                               progress=False)
            single[name] = {"state": net.state_dict(), "history": history}
    finally:
        torch.set_num_threads(threads)
    env = {k: os.environ.pop(k) for k in _TORCHRUN_ENV if k in os.environ}
    omp = os.environ.get("OMP_NUM_THREADS")
    os.environ["OMP_NUM_THREADS"] = omp or "1"
    try:
        mp.spawn(_rank_main, args=(2, _free_port(), str(root)), nprocs=2, join=True)
    finally:
        os.environ.update(env)
        if omp is None:
            del os.environ["OMP_NUM_THREADS"]
    ranks = [torch.load(root / f"rank{r}.pt", weights_only=False) for r in range(2)]
    return {"single": single, "ranks": ranks}


@pytest.mark.parametrize("name", list(CASES))
def test_two_ranks_train_the_weights_and_history_of_one_process(runs: dict, name: str) -> None:
    one, with_pseudo = runs["single"][name], CASES[name][1]
    rank0, rank1 = (r[name] for r in runs["ranks"])
    start = _net().state_dict()
    assert any(not torch.equal(value, start[key]) for key, value in one["state"].items())  # it trained
    atol, history_atol = TOLERANCE.get(name, (1e-5, 1e-5))
    for key, value in one["state"].items():
        torch.testing.assert_close(rank0["state"][key], value, atol=atol, rtol=1e-4, msg=key)
        assert torch.equal(rank0["state"][key], rank1["state"][key]), f"{key}: the ranks differ"
    assert rank0["history"] == rank1["history"]  # the global batch's loss on every rank
    for key in ("loss", "loss_l", "loss_u"):
        torch.testing.assert_close(torch.tensor(rank0["history"][key]), torch.tensor(one["history"][key]),
                                   atol=history_atol, rtol=0)
    frozen = [key for key, param in _case_net(name).named_parameters() if not param.requires_grad]
    assert bool(frozen) == (name in FROZEN)
    for key in frozen:  # DDP leaves them out; they stay as they were
        assert torch.equal(rank0["state"][key], start[key]) and torch.equal(one["state"][key], start[key]), key
    if with_pseudo:
        assert rank0["history"]["loss_u"][0] == 0.0 and min(rank0["history"]["loss_u"][1:]) > 0.0


def test_ddp_gradient_is_the_global_batch_gradient(runs: dict) -> None:
    """The all-reduce's backward sums the ranks' gradients (world_size times each share) and DDP averages them:
    the one-process gradient of ``loss_l + lam * loss_u``, not a multiple of it (which AdamW's scale-free step
    would hide in the weights)."""
    b, net = _batch(), _net()
    loss_l = masked_dice_ce(net(b["x"]), b["y"], b["m"])
    loss_u = masked_dice_ce(net(b["xu"]), b["yu"], b["mu"])
    (loss_l + LAM * loss_u).backward()
    for r in runs["ranks"]:
        torch.testing.assert_close(torch.tensor(r["grad"]["loss"]),
                                   torch.tensor([float(v.detach()) for v in (loss_l + LAM * loss_u, loss_l, loss_u)]),
                                   atol=1e-6, rtol=0)
        for n, p in net.named_parameters():
            torch.testing.assert_close(r["grad"]["grads"][n], p.grad, atol=1e-6, rtol=1e-4, msg=n)


def test_a_batch_smaller_than_the_ranks_is_refused() -> None:
    labelled, _ = _volumes()
    cfg = TrainConfig(steps=1, batch_size=1)
    with pytest.raises(ValueError, match="batch_size 1 < 2 ranks"):
        finetune(_net(), labelled, cfg, patch_size=PATCH, progress=False, dist=DistContext(0, 2, 0))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_the_loss_from_the_sums_is_masked_dice_ce(dtype: torch.dtype) -> None:
    loss_diff, grad_diff = 0.0, 0.0
    for seed in range(36):
        logits, target, mask = loss_case(seed, dtype)
        x = logits.clone().requires_grad_()
        ref = masked_dice_ce(x, target, mask)
        (g_ref,) = torch.autograd.grad(ref, x)
        x = logits.clone().requires_grad_()
        ours = dice_ce_from_stats(dice_ce_stats(x, target, mask))
        (g_ours,) = torch.autograd.grad(ours, x)
        loss_diff = max(loss_diff, abs(ours.item() - ref.item()))
        grad_diff = max(grad_diff, float((g_ours - g_ref).abs().max()))
    assert loss_diff <= (1e-6 if dtype == torch.float32 else 1e-12)
    assert grad_diff <= (1e-8 if dtype == torch.float32 else 1e-15)


def test_the_sums_of_two_halves_give_the_loss_of_the_whole_batch() -> None:
    checked = 0
    for seed in range(36):
        logits, target, mask = loss_case(seed, torch.float32)
        if logits.shape[0] < 2:
            continue
        h = logits.shape[0] // 2
        halves = [dice_ce_stats(logits[s], target[s], None if mask is None else mask[s])
                  for s in (slice(None, h), slice(h, None))]
        whole = masked_dice_ce(logits, target, mask)
        assert abs(float(dice_ce_from_stats(halves[0] + halves[1])) - float(whole)) <= 1e-6, seed
        checked += 1
    assert checked >= 20


def test_one_class_has_no_dice_term() -> None:
    logits = torch.randn(2, 1, 4, 4, 4, requires_grad=True)
    target = torch.zeros(2, 4, 4, 4, dtype=torch.long)
    stats = dice_ce_stats(logits, target)
    assert stats.shape == (2,) and float(stats[1].detach()) == 128.0
    loss = dice_ce_from_stats(stats)
    assert float(loss.detach()) == float(masked_dice_ce(logits, target).detach()) == 0.0
    loss.backward()  # the graph reaches the logits, as masked_dice_ce's does
    assert logits.grad is not None and float(logits.grad.abs().max()) == 0.0
