"""The two networks of an adaptation (the frozen pretrained model and its adapted copy), their engines and state."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import torch
from tqdm.auto import tqdm

from asfda.distributed import DistContext
from asfda.engine import OUTPUT_EMBEDDING, InferenceEngine, select_device
from asfda.io.datasets import Case
from asfda.models import LoadedModel, PreparedVolume, build_class_map, clone_module, prepare_case

__all__ = ["SINGLE_PROCESS", "AdaptedModels"]

R = TypeVar("R")

SINGLE_PROCESS = DistContext()
"""One process: nothing sharded (`AdaptedModels.dist` outside `all_ranks` and `sharded_scoring`)."""


class AdaptedModels:
    """The pretrained model (frozen) and its adapted copy, mapped onto the target's classes, with their inference
    engines, the prepared-volume cache and the adapted weights' state. The jobs on top of them (scoring, training,
    evaluation and export) are the mixins of `asfda.adapter.Adapter`.

    Args:
        pretrained: the loaded source model.
        target_names: the dataset's class names (index = label value, 0 = background).
        class_map_override: ``{"target": "source"}`` name overrides.
        cache_dir: where prepared volumes are cached (None: no cache).
        device: compute device (``"auto"``, ``"cpu"``, ``"cuda"``).
        cold_start_ok: accept a model none of whose classes is a target class (every target class gets a new
            output channel: `cold_start`); otherwise such a model is refused (`build_class_map`).
        precision: inference precision of both engines (`InferenceEngine`): ``fp32`` or ``bf16``. Fine-tuning has
            its own (`TrainConfig.precision`).
    """

    def __init__(self, pretrained: LoadedModel, target_names: list[str], *, class_map_override: dict | None = None,
                 cache_dir: str | None = None, device: str = "auto", progress: bool = True,
                 cold_start_ok: bool = False, precision: str = "fp32") -> None:
        pretrained.check_input_channels(1)
        self.pretrained = pretrained
        self.target_names = list(target_names)
        # a sigmoid head is adapted in its single-label view: background (no channel on), then its channels
        self.class_map = build_class_map(pretrained.label_names, self.target_names, class_map_override,
                                         allow_no_match=cold_start_ok)
        self.device = select_device(device)
        self.cache_dir = cache_dir
        self.progress = progress
        self.frozen = pretrained.mapped_network(self.class_map, clone_module(pretrained.network)).to(self.device).eval()
        for p in self.frozen.parameters():
            p.requires_grad_(False)
        self.current = pretrained.mapped_network(self.class_map,
                                                 clone_module(pretrained.network)).to(self.device).eval()
        kw: dict[str, Any] = dict(sw_batch_size=pretrained.sw_batch_size, overlap=pretrained.overlap,
                                  device=self.device, mode=pretrained.sw_mode, tta_axes=pretrained.tta_axes,
                                  precision=precision)
        layer = pretrained.embedding_layer
        if layer and layer != OUTPUT_EMBEDDING:
            layer = f"network.{layer}"
        self.engine_frozen = InferenceEngine(self.frozen, pretrained.roi_size, embedding_layer=layer, **kw)
        self.engine_current = InferenceEngine(self.current, pretrained.roi_size,
                                              embedding_layer=self.engine_frozen.embedding_layer, **kw)
        self.is_adapted = False
        self._plausibility0: dict[str, float] = {}

    # -- ranks of a torchrun job ------------------------------------------------------------------
    dist: DistContext = SINGLE_PROCESS  # the ranks the jobs are sharded over (all_ranks, sharded_scoring)
    spmd: bool = False  # every rank runs the same code (all_ranks): results are gathered on every rank

    @contextlib.contextmanager
    def all_ranks(self, dist: DistContext) -> Iterator[None]:
        """Every rank of a torchrun job runs the block's code (SPMD, as `asfda simulate` does): pool scoring, the
        guard and evaluation are sharded over the ranks and gathered on every rank, fine-tuning is one
        DistributedDataParallel job; the temperature fit, the anchors and the selection run (identically) on every
        rank. A single process: nothing changes."""
        if not dist.sharded:
            yield
            return
        self.dist, self.spmd = dist, True
        try:
            yield
        finally:
            self.dist, self.spmd = SINGLE_PROCESS, False

    def map_cases(self, cases: list[Case], job: Callable[[Case], R], desc: str) -> list[R]:
        """``[job(c) for c in cases]`` (with a progress bar named ``desc``); inside `all_ranks` each rank runs its
        shard and every rank gets the whole list, in the order of ``cases``."""
        if not (self.spmd and self.dist.sharded):
            return [job(c) for c in self._bar(cases, desc)]
        mine = self.dist.shard(list(range(len(cases))))
        parts = self.dist.all_gather([(k, job(cases[k])) for k in self._bar(mine, desc)])
        out: dict[int, R] = {k: v for part in parts for k, v in part}
        return [out[k] for k in range(len(cases))]

    # -- data -------------------------------------------------------------------------------------
    def prepare(self, case: Case, with_label: bool = True) -> PreparedVolume:
        return prepare_case(case, self.pretrained.preprocessing, with_label=with_label, cache_dir=self.cache_dir,
                            n_labels=len(self.target_names))

    def _bar(self, items: list, desc: str):
        return tqdm(items, desc=desc, disable=not self.progress, leave=False, dynamic_ncols=True)

    # -- weights ----------------------------------------------------------------------------------
    def load_current_state(self, state: dict[str, torch.Tensor]) -> None:
        """Loads weights into the adapted model; it counts as adapted when they differ from the pretrained
        weights (a round the guard discarded leaves the pretrained weights, and round-0 fallbacks apply)."""
        self.current.load_state_dict(state)
        frozen = self.frozen.state_dict()
        self.is_adapted = any(k not in frozen or not torch.equal(v.to(frozen[k].device), frozen[k])
                              for k, v in state.items())

    def current_state(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().cpu().clone() for k, v in self.current.state_dict().items()}

    @property
    def cold_start(self) -> bool:
        """True while the model has no trained output for any target class (every target class got a new channel
        and nothing has been fine-tuned yet): its probabilities mean nothing, only its embeddings do."""
        new = set(self.class_map.new_classes)
        return not self.is_adapted and all(name in new for name in self.target_names[1:])
