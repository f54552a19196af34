"""Scoring a pool with the adapted model: the round's temperature, the labelled anchors, the pool's metrics."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from asfda.cache import EngineOutputCache
from asfda.io.datasets import Case
from asfda.models import state_dict_hash
from asfda.scoring import expected_calibration_error, fit_temperature
from asfda.scoring.metrics import anatomy_composition
from asfda.scoring.needs import ScoringNeeds
from asfda.scoring.pool import ScoredPool, score_volumes
from asfda.scoring.temperature import sample_voxels
from asfda.selection import PoolScores

from .models import AdaptedModels

__all__ = ["NO_PASSES", "Anchors", "RoundTemperature", "ScoringMixin"]

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
            logits, emb = self.engine_current.run(vol.image)
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
            logits, emb = self.engine_current.run(self.prepare(case, with_label=False).image)
            embs.append(emb.numpy())
            anatomy.append(anatomy_composition(torch.softmax(logits / temperature, 0)).numpy())
            del logits
        return Anchors(np.stack(embs), {"anatomy": np.stack(anatomy)})

    def score_pool(self, cases: list[Case], temperature: float, *, grow_voxels: int = 2, divergence: bool = True,
                   needs: ScoringNeeds | None = None, seed: int = 0) -> ScoredPool:
        """Streams the unlabeled pool through `asfda.scoring.pool.score_volumes` (see there); ``needs``
        (a strategy's ``needs``, or `asfda.selection.needs_of` of several) decides the extra passes."""
        volumes = (self.prepare(c, with_label=False) for c in cases)
        wants_kd = needs is None or getattr(needs, "divergence", False)
        frozen = self.engine_frozen if (divergence and wants_kd and self.is_adapted) else None
        cache = key_fn = None
        if self.cache_dir is not None:
            cache = EngineOutputCache(Path(self.cache_dir) / "scores")
            current_hash = state_dict_hash(self.current.state_dict())
            extra = json.dumps([frozen is not None and self.pretrained.weights_hash, float(temperature),
                                repr(needs), grow_voxels, seed])
            if self.pretrained.output_activation != "softmax" or self.pretrained.adds_background:
                # the same weights read another way give other numbers (softmax logits: the key as it always was)
                extra += f"|{self.pretrained.output_activation}:{self.pretrained.activation}"
            prep_key = self.pretrained.preprocessing.cache_key()
            stamps = {c.case_id: f"{c.image_path}:{c.image_path.stat().st_mtime_ns}" for c in cases}
            key_fn = lambda cid: cache.key(cid, current_hash, prep_key, False, extra + stamps.get(cid, ""))  # noqa: E731
        return score_volumes(volumes, self.engine_current, temperature, frozen=frozen, grow_voxels=grow_voxels,
                             needs=needs, seed=seed, cache=cache, cache_key=key_fn,
                             progress=lambda it: tqdm(it, total=len(cases), desc="score pool",
                                                      disable=not self.progress, leave=False, dynamic_ncols=True))

    def pool_scores(self, cases: list[Case], labelled: list[Case], temperature: float, round_index: int,
                    anchors: Anchors | None = None, grow_voxels: int = 2, *, needs: ScoringNeeds | None = None,
                    seed: int = 0) -> PoolScores:
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
                     seed: int, grow_voxels: int = 2, *, always: bool = False, temperature: float | None = None
                     ) -> tuple[RoundTemperature, PoolScores, dict]:
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
