"""The process group of a ``torchrun`` job, read from its environment, or a single process when there is none.

``torchrun`` starts one process per rank with ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and
``MASTER_PORT`` set. `rank_context` joins those processes in a ``torch.distributed`` process group (gloo on CPU,
nccl on CUDA) when ``WORLD_SIZE > 1``; otherwise it is a no-op single-process context and nothing of
``torch.distributed`` runs. The collectives are torch's own (`torch.distributed.gather_object`,
`torch.distributed.broadcast_object_list`, `torch.distributed.barrier`). A leaf: no asfda logic here.

    with rank_context("auto") as ctx:
        mine = ctx.shard(items)                     # this rank's share, deterministic
        parts = ctx.gather_to_main(work(mine))      # rank 0: every rank's result, in rank order; others: None
        every = ctx.all_gather(work(mine))          # the same on every rank (all ranks run the same code)
"""

from __future__ import annotations

import contextlib
import datetime
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
import torch.distributed as torch_dist

from asfda.errors import AsfdaError

__all__ = ["DistContext", "rank_context"]

T = TypeVar("T")

TIMEOUT = datetime.timedelta(minutes=60)
"""How long a rank waits in a collective: the other ranks wait at the end while rank 0 alone writes a run's results
and report (minutes), longer than torch's default for nccl (10 min)."""


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError:
        raise AsfdaError(f"environment variable {name}={value!r} is not an integer",
                         fix="launch with torchrun, which sets RANK, WORLD_SIZE and LOCAL_RANK") from None


@dataclass(frozen=True)
class DistContext:
    """Where this process stands in the job: ``rank`` of ``world_size`` (``local_rank`` on its machine).

    The default is the single process: `shard` is the identity, `gather_to_main` the one-element list,
    `broadcast_from_main` and `barrier` do nothing."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        """Rank 0: the process that gathers, decides and writes files."""
        return self.rank == 0

    @property
    def sharded(self) -> bool:
        return self.world_size > 1

    def shard(self, items: Sequence[T]) -> list[T]:
        """This rank's share of ``items``: every ``world_size``-th from position ``rank`` (the same on every run)."""
        return list(items)[self.rank::self.world_size]

    def gather_to_main(self, obj: Any) -> list[Any] | None:
        """Every rank's ``obj`` (picklable), in rank order, on rank 0; None on the other ranks."""
        if not self.sharded:
            return [obj]
        out: list[Any] | None = [None] * self.world_size if self.is_main else None
        torch_dist.gather_object(obj, out, dst=0)
        return out

    def all_gather(self, obj: Any) -> list[Any]:
        """Every rank's ``obj`` (picklable), in rank order, on every rank (the job's ranks run the same code: SPMD)."""
        if not self.sharded:
            return [obj]
        out: list[Any] = [None] * self.world_size
        torch_dist.all_gather_object(out, obj)
        return out

    def broadcast_from_main(self, obj: Any = None) -> Any:
        """Rank 0's ``obj`` (picklable) on every rank (the other ranks' argument is ignored)."""
        if not self.sharded:
            return obj
        box: list[Any] = [obj if self.is_main else None]
        torch_dist.broadcast_object_list(box, src=0)
        return box[0]

    def barrier(self) -> None:
        if self.sharded:
            torch_dist.barrier()

    def check_batch(self, batch_size: int, where: str | os.PathLike[str] | None = None) -> None:
        """Refuses, before any work, a fine-tuning batch smaller than the number of ranks (each rank trains on its
        share of the global batch: one would have none)."""
        if self.sharded and batch_size < self.world_size:
            raise AsfdaError(f"train.batch_size {batch_size} is smaller than the {self.world_size} processes of this "
                             "torchrun job (each trains on its share of the batch)", where,
                             f"set train.batch_size to at least {self.world_size}, or start fewer processes")

    def device(self, requested: str) -> str:
        """The device this rank computes on: ``cuda:LOCAL_RANK`` for ``auto`` or ``cuda`` when CUDA is available and
        the job has several ranks; otherwise ``requested`` as given (an explicit ``cuda:N`` too)."""
        if self.sharded and requested in ("auto", "cuda") and torch.cuda.is_available():
            return f"cuda:{self.local_rank}"
        return requested


def _backend(device: str) -> str:
    return "nccl" if device.startswith("cuda") and torch.cuda.is_available() else "gloo"


@contextlib.contextmanager
def rank_context(requested_device: str = "auto") -> Iterator[DistContext]:
    """The job's `DistContext`, from torchrun's environment (a single process when ``WORLD_SIZE`` is unset or 1).

    With several ranks it joins the process group (``init_process_group`` from the environment: gloo, or nccl
    when this rank computes on CUDA, see `DistContext.device`) unless one is already joined, and on a normal exit
    waits for every rank (a barrier) and leaves the group it joined. After an exception it leaves without the
    barrier (torchrun ends the other ranks when one fails)."""
    world = _env_int("WORLD_SIZE", 1)
    if world <= 1:
        yield DistContext()
        return
    ctx = DistContext(_env_int("RANK", 0), world, _env_int("LOCAL_RANK", 0))
    if not 0 <= ctx.rank < world:
        raise AsfdaError(f"RANK={ctx.rank} is not in 0..{world - 1}", fix="launch with torchrun")
    joined = False
    if not torch_dist.is_initialized():
        device = ctx.device(requested_device)
        backend = _backend(device)
        if backend == "nccl":
            torch.cuda.set_device(torch.device(device))
        torch_dist.init_process_group(backend=backend, init_method="env://", rank=ctx.rank, world_size=world,
                                      timeout=TIMEOUT)
        joined = True
    elif torch_dist.get_world_size() != world or torch_dist.get_rank() != ctx.rank:
        raise AsfdaError(f"the process group already joined (rank {torch_dist.get_rank()} of "
                         f"{torch_dist.get_world_size()}) is not RANK={ctx.rank} of WORLD_SIZE={world}")
    try:
        yield ctx
    except BaseException:
        if joined:
            torch_dist.destroy_process_group()
        raise
    ctx.barrier()
    if joined:
        torch_dist.destroy_process_group()
