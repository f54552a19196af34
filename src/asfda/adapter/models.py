"""The two networks of an adaptation (the frozen pretrained model and its adapted copy), their engines and state."""

from __future__ import annotations

import contextlib
import hashlib
import json
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import numpy as np
import torch
from tqdm.auto import tqdm

from asfda.distributed import DistContext
from asfda.engine import OUTPUT_EMBEDDING, InferenceEngine, select_device
from asfda.io.datasets import Case
from asfda.models import LoadedModel, PreparedVolume, build_class_map, clone_module, prepare_case, state_dict_hash

from .outputs import PASS_KINDS, ForwardStore, volume_stamp

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
        keep_outputs: keep each pass's output for the stages after it (`ForwardStore`); False for a one-shot command
            without a cache folder, where no stage reads a pass again.
        fold_uncovered: target classes the model has no channel for (a one-organ model on a four-organ dataset) are
            folded into background (`build_class_map`): never predicted, and their voxels of a label this adapter
            prepares count as background; otherwise they get new output channels.
    """

    def __init__(self, pretrained: LoadedModel, target_names: list[str], *, class_map_override: dict | None = None,
                 cache_dir: str | None = None, device: str = "auto", progress: bool = True,
                 cold_start_ok: bool = False, precision: str = "fp32", keep_outputs: bool = True,
                 fold_uncovered: bool = False) -> None:
        pretrained.check_input_channels(1)
        self.pretrained = pretrained
        self.target_names = list(target_names)
        # a sigmoid head is adapted in its single-label view: background (no channel on), then its channels
        self.class_map = build_class_map(pretrained.label_names, self.target_names, class_map_override,
                                         allow_no_match=cold_start_ok, fold_uncovered=fold_uncovered)
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
        self._is_adapted = False
        self._plausibility0: dict[str, tuple[float, np.ndarray]] = {}  # guard_measures of the pretrained
        # every forward pass once (asfda.adapter.outputs): outputs kept by weights hash, passes counted by model
        self.outputs = ForwardStore(cache_dir, keep=keep_outputs)
        self._frozen_hash = state_dict_hash(self.frozen.state_dict())
        self._current_hash: tuple[tuple, str] | None = None  # (weights signature, hash) of the adapted model
        self._sweeps_seen = {"frozen": 0, "current": 0}
        self._passes: Counter[str] = Counter({k: 0 for k in PASS_KINDS})
        self._output_key = json.dumps([self.class_map.to_dict(), pretrained.activation, pretrained.probabilities,
                                       pretrained.adds_background, list(pretrained.roi_size), pretrained.sw_batch_size,
                                       pretrained.overlap, pretrained.sw_mode, precision,
                                       pretrained.preprocessing.cache_key(), self.engine_frozen.embedding_layer,
                                       *(["fold_uncovered"] if self.class_map.fold_uncovered else [])],
                                      default=str)

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

    # -- forward passes, each once (asfda.adapter.outputs) --------------------------------------------
    def forward(self, case: Case, vol: PreparedVolume | None = None, *, pretrained: bool = False,
                refresh: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """The (logits ``[C, X, Y, Z]``, embedding ``[D]``) of the current (or the ``pretrained``) model on ``case``:
        the stored output of an earlier pass of the same weights on the same volume when there is one (the very same
        numbers), else one pass of the engine, stored for the stages after. ``vol``: the case prepared without its
        label, when the caller has it. ``refresh``: run the pass even when stored (a caller whose hooks read the
        pass) and store it again."""
        kind, weights = self._weights_of(pretrained)
        key = self._volume_key(case)
        if not refresh:
            hit = self.outputs.get(kind, weights, key)
            if hit is not None:
                return hit
        engine = self.engine_frozen if pretrained else self.engine_current
        logits, emb = engine.run((vol or self.prepare(case, with_label=False)).image)
        self.outputs.put(kind, weights, key, logits, emb)
        return logits, emb

    def _weights_of(self, pretrained: bool) -> tuple[str, str]:
        """(pass kind, weights hash) of the pretrained or the current model (the current model's hash is computed
        again only when its weights changed: a load or an optimiser step bumps their tensors' version counters)."""
        if pretrained:
            return "pretrained", self._frozen_hash
        signature = tuple((t.data_ptr(), t._version) for t in self.current.state_dict().values())
        if self._current_hash is None or self._current_hash[0] != signature:
            self._current_hash = (signature, state_dict_hash(self.current.state_dict()))
        weights = self._current_hash[1]
        return ("pretrained" if weights == self._frozen_hash else "adapted"), weights

    def _volume_key(self, case: Case) -> str:
        digest = hashlib.sha256(f"{self._output_key}|{case.case_id}|{volume_stamp(case.image_path)}".encode())
        return digest.hexdigest()[:32]

    def forward_passes(self) -> dict[str, int]:
        """Passes of the networks over a whole volume so far, by model (``pretrained``, ``adapted``): every
        sliding-window sweep of either engine, MC-dropout and flip passes included; a pass of the current engine
        counts for the pretrained model while its weights are the pretrained ones."""
        self._count_sweeps()
        return dict(self._passes)

    def _count_sweeps(self) -> None:
        for name, engine in (("frozen", self.engine_frozen), ("current", self.engine_current)):
            new = engine.sweeps - self._sweeps_seen[name]
            self._sweeps_seen[name] = engine.sweeps
            kind = "adapted" if (name == "current" and self._is_adapted) else "pretrained"
            self._passes[kind] += new

    @property
    def is_adapted(self) -> bool:
        """Whether the current weights differ from the pretrained ones (fine-tuned, or loaded so)."""
        return self._is_adapted

    @is_adapted.setter
    def is_adapted(self, value: bool) -> None:
        self._count_sweeps()  # the sweeps so far count for the weights they ran with
        self._is_adapted = bool(value)

    # -- data -------------------------------------------------------------------------------------
    def prepare(self, case: Case, with_label: bool = True) -> PreparedVolume:
        vol = prepare_case(case, self.pretrained.preprocessing, with_label=with_label, cache_dir=self.cache_dir,
                           n_labels=len(self.target_names))
        if vol.label is not None and self.class_map.fold_uncovered:  # classes the model lacks count as background
            vol.label = self.class_map.fold_uncovered_label(vol.label)
        return vol

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
