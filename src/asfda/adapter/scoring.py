"""Scoring a pool with the adapted model: the round's temperature, the labelled anchors, the pool's metrics."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field, fields
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from asfda.cache import EngineOutputCache
from asfda.config import default_of
from asfda.distributed import DistContext
from asfda.engine import InferenceEngine
from asfda.io.datasets import Case
from asfda.io.dicom import is_series_folder, series_stamp
from asfda.models import state_dict_hash
from asfda.scoring import expected_calibration_error, fit_temperature
from asfda.scoring.metrics import anatomy_composition
from asfda.scoring.needs import ScoringNeeds
from asfda.scoring.pool import (
    Forward,
    ScoredPool,
    ScoringPlan,
    VolumeRecord,
    finish_pool,
    score_records,
    score_volumes,
    scoring_plan,
)
from asfda.scoring.temperature import sample_voxels
from asfda.selection import PoolScores

from .models import SINGLE_PROCESS, AdaptedModels

__all__ = ["NO_PASSES", "SINGLE_PROCESS", "Anchors", "RoundTemperature", "ScoringMixin"]

NO_PASSES = {"forward_passes_per_volume": 0, "mc_dropout_passes": 0, "tta_flips": []}
"""The scoring ``info`` of a strategy that reads no scores (random): no forward pass."""


@dataclass
class RoundTemperature:
    temperature: float
    ece_before: float | None
    ece_after: float | None


@dataclass
class Anchors:
    """The labelled volumes as the diversity terms see them (rows in the order of the labelled cases).

    Attributes:
        embeddings: ``[L, D]`` pooled bottleneck embeddings of the current model (``[0, 0]`` when none).
        vectors: vector name -> ``[L, K]``: ``anatomy``, the predicted foreground composition
            (`asfda.scoring.metrics.anatomy_composition`) at the round's temperature.
    """

    embeddings: np.ndarray = field(default_factory=lambda: np.zeros((0, 0)))
    vectors: dict[str, np.ndarray] = field(default_factory=dict)


def _needs_key(needs: ScoringNeeds | None) -> str:
    """``repr(needs)`` with each set's members sorted: the score cache's key must not depend on the process's string
    hash seed (a restarted job, or another rank, reads the entries back); equal to ``repr`` for sets of at most one
    member, so those keys are as they always were."""
    if needs is None:
        return repr(None)

    def text(value: object) -> str:
        if isinstance(value, frozenset):
            return "frozenset({" + ", ".join(repr(v) for v in sorted(value)) + "})" if value else "frozenset()"
        return repr(value)

    return f"{type(needs).__name__}(" + ", ".join(f"{f.name}={text(getattr(needs, f.name))}"
                                                 for f in fields(needs) if f.repr) + ")"


@dataclass(frozen=True)
class _PoolJob:
    """A pool scoring, as rank 0 sends it to the other ranks of a sharded run (`ScoringMixin.score_pool`)."""

    cases: list[Case]
    temperature: float
    grow_voxels: int
    divergence: bool
    needs: ScoringNeeds | None
    seed: int


class ScoringMixin(AdaptedModels):
    """Scoring jobs of `asfda.adapter.Adapter` (they read the networks of `AdaptedModels`)."""

    # -------------------------------------------------------------------------------------
    def fit_temperature(self, labelled: list[Case], t0: float, seed: int, max_voxels: int = 100_000
                        ) -> tuple[RoundTemperature, Anchors]:
        """Fits T on the labelled volumes (T0 when there are none); returns it with their `Anchors`, from the
        same pass: the embeddings, and the anatomy composition at the fitted T estimated on each volume's
        uniform sample of ``max_voxels`` voxels (exact when the volume has no more voxels than that)."""
        if not labelled:
            return RoundTemperature(t0, None, None), Anchors()
        gen = torch.Generator().manual_seed(seed)
        zs, ys, embs = [], [], []
        for case in self._bar(labelled, "labelled"):
            vol = self.prepare(case)
            assert vol.label is not None  # a labelled case: prepared with its label
            logits, emb = self.forward(case, vol)
            z, y = sample_voxels(logits, vol.label, max_voxels, gen)
            zs.append(z)
            ys.append(y)
            embs.append(emb.numpy())
        z, y = torch.cat(zs), torch.cat(ys)
        t = fit_temperature(z, y)
        before = expected_calibration_error(torch.softmax(z, 1), y)
        after = expected_calibration_error(torch.softmax(z / t, 1), y)
        anatomy = np.stack([anatomy_composition(torch.softmax(zi / t, 1).T).numpy() for zi in zs])
        return RoundTemperature(t, before, after), Anchors(np.stack(embs), {"anatomy": anatomy})

    def anchors(self, cases: list[Case], temperature: float) -> Anchors:
        """`Anchors` of ``cases`` without their labels (one forward pass each; the composition is exact)."""
        if not cases:
            return Anchors()
        embs, anatomy = [], []
        for case in self._bar(cases, "labelled"):
            logits, emb = self.forward(case)
            embs.append(emb.numpy())
            anatomy.append(anatomy_composition(torch.softmax(logits / temperature, 0)).numpy())
            del logits
        return Anchors(np.stack(embs), {"anatomy": np.stack(anatomy)})

    def score_pool(self, cases: list[Case], temperature: float, *, grow_voxels: int = default_of("grow_voxels"),
                   divergence: bool = True, needs: ScoringNeeds | None = None, seed: int = 0) -> ScoredPool:
        """Streams the unlabeled pool through `asfda.scoring.pool.score_volumes` (see there); ``needs``
        (a strategy's ``needs``, or `asfda.selection.needs_of` of several) decides the extra passes. Inside
        `sharded_scoring` (rank 0 of a torchrun job) every rank scores its shard and rank 0 gets the whole pool;
        inside `all_ranks` (every rank calls this) every rank gets it. Rows in the order of ``cases``, with the same
        numbers as one process computes."""
        if self.dist.sharded:
            job = _PoolJob(list(cases), temperature, grow_voxels, divergence, needs, seed)
            if not self.spmd:
                self.dist.broadcast_from_main(job)  # the other ranks wait for it in serve_pool_shards
            plan, mine = self._shard_records(self.dist, job)
            parts = self.dist.all_gather(mine) if self.spmd else self.dist.gather_to_main(mine)
            assert parts is not None  # rank 0, or every rank inside all_ranks
            by_id = {r.case_id: r for part in parts for r in part}
            if len(by_id) != len(cases) or any(c.case_id not in by_id for c in cases):
                raise RuntimeError(f"the shards gave {len(by_id)} distinct volumes for a pool of {len(cases)}")
            return finish_pool([by_id[c.case_id] for c in cases], plan, temperature)
        frozen, cache, key_fn = self._pool_cache(cases, temperature, grow_voxels, divergence, needs, seed)
        return score_volumes((self.prepare(c, with_label=False) for c in cases), self.engine_current, temperature,
                             frozen=frozen, grow_voxels=grow_voxels, needs=needs, seed=seed, cache=cache,
                             cache_key=key_fn, progress=self._pool_bar(len(cases)), forward=self._forward_of(cases))

    def _forward_of(self, cases: list[Case]) -> Forward:
        """`asfda.scoring.pool.Forward` over ``cases``' prepared volumes: `forward`, through the stored passes."""
        by_id = {c.case_id: c for c in cases}
        return lambda vol, pretrained, refresh: self.forward(by_id[vol.case_id], vol, pretrained=pretrained,
                                                             refresh=refresh)

    def _pool_bar(self, total: int) -> Callable[[Iterable], Iterable]:
        return lambda it: tqdm(it, total=total, desc="score pool", disable=not self.progress, leave=False,
                               dynamic_ncols=True)

    def _pool_cache(self, cases: list[Case], temperature: float, grow_voxels: int, divergence: bool,
                    needs: ScoringNeeds | None, seed: int
                    ) -> tuple[InferenceEngine | None, EngineOutputCache | None, Callable[[str], str] | None]:
        """The frozen engine when the pool is scored against it, and the per-volume score cache with its key."""
        wants_kd = needs is None or getattr(needs, "divergence", False)
        frozen = self.engine_frozen if (divergence and wants_kd and self.is_adapted) else None
        cache = key_fn = None
        if self.cache_dir is not None:
            cache = EngineOutputCache(Path(self.cache_dir) / "scores")
            current_hash = state_dict_hash(self.current.state_dict())
            extra = json.dumps([frozen is not None and self.pretrained.weights_hash, float(temperature),
                                _needs_key(needs), grow_voxels, seed])
            if self.pretrained.output_activation != "softmax" or self.pretrained.adds_background:
                # the same weights read another way give other numbers (softmax logits: the key as it always was)
                extra += f"|{self.pretrained.output_activation}:{self.pretrained.activation}"
            prep_key = self.pretrained.preprocessing.cache_key()
            stamps = {c.case_id: series_stamp(c.image_path) if is_series_folder(c.image_path)  # a slice rewritten
                      else f"{c.image_path}:{c.image_path.stat().st_mtime_ns}" for c in cases}  # in place: another
            key_fn = lambda cid: cache.key(cid, current_hash, prep_key, False, extra + stamps.get(cid, ""))  # noqa: E731
        return frozen, cache, key_fn

    def _shard_records(self, dist: DistContext, job: _PoolJob) -> tuple[ScoringPlan, list[VolumeRecord]]:
        """This rank's shard of the job's cases scored (`asfda.scoring.pool.score_records`, through the score
        cache: a restarted job reads back what it scored before, whatever the number of ranks)."""
        mine = dist.shard(job.cases)
        frozen, cache, key_fn = self._pool_cache(mine, job.temperature, job.grow_voxels, job.divergence, job.needs,
                                                 job.seed)
        plan = scoring_plan(self.engine_current, job.needs, frozen is not None)
        return plan, score_records((self.prepare(c, with_label=False) for c in mine), plan, self.engine_current,
                                   job.temperature, frozen=frozen, grow_voxels=job.grow_voxels, seed=job.seed,
                                   cache=cache, cache_key=key_fn, progress=self._pool_bar(len(mine)),
                                   forward=self._forward_of(mine))

    @contextlib.contextmanager
    def sharded_scoring(self, dist: DistContext) -> Iterator[None]:
        """Rank 0 of a torchrun job: every `score_pool` in the block is sharded over the ranks, which score in
        `serve_pool_shards` until the block ends (the temperature fit, the anchors and the selection stay on rank 0).
        A single process (``dist.world_size == 1``): nothing changes."""
        if not dist.sharded:
            yield
            return
        if not dist.is_main:
            raise ValueError("sharded_scoring is rank 0's; the other ranks call serve_pool_shards")
        if self.spmd:
            raise ValueError("sharded_scoring inside all_ranks: every rank scores its shard there already")
        self.dist = dist
        try:
            yield
            dist.broadcast_from_main(None)  # done: the other ranks leave serve_pool_shards
        finally:
            self.dist = SINGLE_PROCESS

    def serve_pool_shards(self, dist: DistContext) -> int:
        """The ranks other than 0: score this rank's shard of every pool rank 0 scores in `sharded_scoring`, send the
        records to rank 0, until rank 0 leaves that block. Returns how many pools were scored."""
        if dist.is_main:
            raise ValueError("serve_pool_shards is for the ranks other than 0; rank 0 uses sharded_scoring")
        pools = 0
        while (job := dist.broadcast_from_main(None)) is not None:
            _, records = self._shard_records(dist, job)
            dist.gather_to_main(records)
            pools += 1
        return pools

    def pool_scores(self, cases: list[Case], labelled: list[Case], temperature: float, round_index: int,
                    anchors: Anchors | None = None, grow_voxels: int = default_of("grow_voxels"), *,
                    needs: ScoringNeeds | None = None, seed: int = 0) -> PoolScores:
        """`PoolScores` of the unlabeled ``cases``; pass ``needs=strategy.needs`` so that strategies reading
        MC-dropout, TTA, BADGE or anatomy numbers get them (the default computes only the one-pass metrics).
        ``anchors``: the labelled volumes' (from `fit_temperature` or `anchors`; None when nothing is labelled)."""
        if anchors is None:
            anchors = Anchors()
        elif not isinstance(anchors, Anchors):
            raise TypeError("anchors must be the Anchors of fit_temperature() or anchors(), "
                            f"got {type(anchors).__name__}")
        scored = self.score_pool(cases, temperature, grow_voxels=grow_voxels, needs=needs, seed=seed)
        return PoolScores([c.case_id for c in cases], scored.metrics, scored.embeddings, anchors.embeddings,
                          scored.embeddings0, round_index, scored.vectors, dict(anchors.vectors), self.cold_start)

    def round_scores(self, strategy, labelled: list[Case], unlabelled: list[Case], t0: float, round_index: int,
                     seed: int, grow_voxels: int = default_of("grow_voxels"), *, always: bool = False,
                     temperature: float | None = None) -> tuple[RoundTemperature, PoolScores, dict]:
        """A round's temperature, pool scores for ``strategy`` and what the scoring ran (``info``): T fitted on
        ``labelled`` (``t0`` when none), the labelled anchors and the unlabeled pool scored with its needs. No fit
        with a given ``temperature``, with labelled volumes that have no label files, or in a cold start (the
        probabilities mean nothing: the pool is scored for its embeddings alone). A strategy that reads no scores
        (random) gets the pool's ids alone and no forward pass, unless ``always`` (semi-supervision reads them)."""
        ids = [c.case_id for c in unlabelled]
        if not (strategy.reads_pool or always):
            t = t0 if temperature is None else temperature
            return RoundTemperature(t, None, None), PoolScores.ids_only(ids, round_index), dict(NO_PASSES)
        if self.cold_start or temperature is not None or any(c.label_path is None for c in labelled):
            temp = RoundTemperature(t0 if temperature is None else temperature, None, None)
            anchors = self.anchors(labelled, temp.temperature)
        else:
            temp, anchors = self.fit_temperature(labelled, t0, seed)
        needs = ScoringNeeds() if self.cold_start else strategy.needs
        scored = self.score_pool(unlabelled, temp.temperature, grow_voxels=grow_voxels, needs=needs, seed=seed)
        return temp, PoolScores(ids, scored.metrics, scored.embeddings, anchors.embeddings, scored.embeddings0,
                                round_index, scored.vectors, dict(anchors.vectors), self.cold_start), scored.info
