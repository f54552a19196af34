"""The scoring stage: stream the unlabeled pool through the engines, keep a few numbers per volume.

What runs per volume is driven by the `ScoringNeeds` of the requested strategies:

- always one forward pass of the current model (``asd``, ``enpy``, ``confidence``, the embedding; the
  BADGE head-gradient vector when asked for; when the round-0 feature-statistics gap is asked for and
  the model has not been adapted yet, hooks on the same pass read the channel statistics at the
  normalisation layers: ``bn_kl`` against stored BatchNorm running statistics, otherwise ``norm_kl``
  against the pool's own statistics for InstanceNorm / GroupNorm networks, computed once the pool has
  been streamed from the per-volume ``norm_stats`` vectors);
- one pass of the frozen pretrained model once the current model has been adapted (``kd``);
- exactly ``needs.mc_dropout`` stochastic dropout passes for ``mc_entropy`` / ``bald``;
- one pass per non-identity flip of ``needs.tta_flips`` for ``tta_variance`` (model-grid axes 1 and 2
  only; logits are flipped back before they are compared).

Logits never outlive their volume: the MC and TTA passes are folded into running moments.

`score_volumes` is `score_records` (per volume, what one rank of a sharded run does on its shard: raw numbers and
vectors, cached per volume) then `finish_pool` (the `ScoredPool` of every record, with the pool-referenced
``norm_kl``: what rank 0 does once it has gathered every shard's records).
"""

from __future__ import annotations

import contextlib
import zlib
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from asfda.cache import EngineOutputCache
from asfda.config import default_of
from asfda.engine import InferenceEngine
from asfda.memory import release_freed_memory
from asfda.scoring.metrics import (
    anatomical_segmentation_difficulty,
    anatomy_composition,
    badge_embedding,
    foreground_confidence,
    foreground_kl_divergence,
    mc_scores_from_moments,
    mean_entropy,
    normalisation_stat_divergence,
    organ_extent,
    pool_normalisation_divergence,
    voxel_entropy,
)
from asfda.scoring.needs import ScoringNeeds

__all__ = ["Forward", "ScoredPool", "ScoringPlan", "VolumeRecord", "batchnorm_layers", "finish_pool",
           "instance_norm_layers", "norm_kl_from_stats", "score_records", "score_volumes", "scoring_plan"]


@dataclass
class ScoredPool:
    """What the scoring stage returns (rows in the order the volumes came).

    Attributes:
        ids: case ids (``vol.case_id``; the stream index as text when a volume has none).
        metrics: metric name -> ``[N]``.
        embeddings: ``[N, D]`` pooled bottleneck embeddings of the current model.
        embeddings0: ``[N, D]`` of the frozen model, or None when it was not run.
        vectors: vector name -> ``[N, K]`` (``badge``).
        info: how the numbers were made: temperature, passes, which divergence was available.
    """

    ids: list[str]
    metrics: dict[str, np.ndarray]
    embeddings: np.ndarray
    embeddings0: np.ndarray | None
    vectors: dict[str, np.ndarray] = field(default_factory=dict)
    info: dict = field(default_factory=dict)


def batchnorm_layers(network: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    """BatchNorm layers that store source running statistics (InstanceNorm and stat-less BN excluded)."""
    return [m for m in network.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
            and m.track_running_stats and m.running_mean is not None and m.running_var is not None]


def instance_norm_layers(network: nn.Module) -> list[nn.modules.instancenorm._InstanceNorm | nn.GroupNorm]:
    """Normalisation layers without stored source statistics (InstanceNorm without running statistics,
    GroupNorm), in module order: their inputs' channel statistics describe the volume's "style"."""
    out: list[nn.modules.instancenorm._InstanceNorm | nn.GroupNorm] = []
    for m in network.modules():
        if isinstance(m, nn.modules.instancenorm._InstanceNorm) and m.running_mean is None:
            out.append(m)
        elif isinstance(m, nn.GroupNorm):
            out.append(m)
    return out


def norm_kl_from_stats(stats: np.ndarray, channels: list[int]) -> np.ndarray:
    """``norm_kl`` of every volume from the ``norm_stats`` vectors ``[N, 2 * sum(channels)]`` (per layer, the
    channel means then the channel variances), see `asfda.scoring.metrics.pool_normalisation_divergence`."""
    table = torch.as_tensor(np.asarray(stats), dtype=torch.float64)
    means: list[torch.Tensor] = []
    variances: list[torch.Tensor] = []
    at = 0
    for c in channels:
        means.append(table[:, at:at + c])
        variances.append(table[:, at + c:at + 2 * c])
        at += 2 * c
    if at != table.shape[1]:
        raise ValueError(f"norm_stats has {table.shape[1]} columns, the layers {channels} need {at}")
    return pool_normalisation_divergence(means, variances).numpy()


class _ChannelStats:
    """Accumulates per-channel sum / sum of squares / count of each BN layer's *input* over one pass."""

    def __init__(self, layers: Sequence[nn.Module]) -> None:
        self.layers = layers
        self.sums: list[torch.Tensor | None] = [None] * len(layers)
        self.sqs: list[torch.Tensor | None] = [None] * len(layers)
        self.counts = [0] * len(layers)

    @contextlib.contextmanager
    def capturing(self) -> Iterator[None]:
        handles = [layer.register_forward_pre_hook(self._hook(i)) for i, layer in enumerate(self.layers)]
        try:
            yield
        finally:
            for h in handles:
                h.remove()

    def _hook(self, i: int) -> Callable:
        def hook(module: nn.Module, inputs: tuple) -> None:
            x = inputs[0].detach()
            dims = (0, *range(2, x.ndim))
            n = x.numel() // x.shape[1]
            var, mean = torch.var_mean(x.float(), dim=dims, correction=0)  # one pass, no copy of the window
            mean = mean.double()
            s, q = mean * n, (var.double() + mean * mean) * n
            self.sums[i] = s if self.sums[i] is None else self.sums[i] + s
            self.sqs[i] = q if self.sqs[i] is None else self.sqs[i] + q
            self.counts[i] += n

        return hook

    def moments(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per layer: the input's per-channel (mean, variance) over the pass (float64, CPU)."""
        out = []
        for s, q, n in zip(self.sums, self.sqs, self.counts):
            if s is None or q is None or n == 0:  # (q is set with s)
                raise RuntimeError("a normalisation layer saw no input during the pass")
            mean = (s / n).cpu()
            out.append((mean, (q.cpu() / n - mean * mean).clamp_min(0.0)))
        return out

    def vector(self) -> np.ndarray:
        """The ``norm_stats`` vector: per layer, the channel means then the channel variances (float32)."""
        return torch.cat([torch.cat([m, v]) for m, v in self.moments()]).float().numpy()

    def divergence(self) -> float:
        stats = []
        for layer, s, q, n in zip(self.layers, self.sums, self.sqs, self.counts):
            if s is None or q is None or n == 0:  # (q is set with s)
                continue
            # asked of batchnorm_layers only, which keep the layers with stored statistics
            assert isinstance(layer, nn.modules.batchnorm._BatchNorm)
            assert layer.running_mean is not None and layer.running_var is not None
            mean = (s / n).cpu()
            var = (q.cpu() / n - mean * mean).clamp_min(0.0)
            eps = float(layer.eps)  # as the layer itself normalises: var + eps
            stats.append((mean, var + eps, layer.running_mean.detach().double().cpu(),
                          layer.running_var.detach().double().cpu() + eps))
        return normalisation_stat_divergence(stats) if stats else 0.0


def _volume_seed(seed: int, case_id: str, k: int) -> int:
    """Seed of stochastic pass k of one volume: independent of the pool's order."""
    seq = np.random.SeedSequence([seed & 0xFFFFFFFF, zlib.crc32(case_id.encode()), k])
    return int(seq.generate_state(1, dtype=np.uint64)[0] & 0x7FFFFFFFFFFFFFFF)


@contextlib.contextmanager
def _seeded(seed: int, device: torch.device) -> Iterator[None]:
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


def _mc_scores(engine: InferenceEngine, image: torch.Tensor, temperature: float, passes: int, seed: int,
               case_id: str) -> tuple[float, float]:
    prob_sum: torch.Tensor | None = None
    ent_sum: torch.Tensor | None = None
    for k in range(passes):
        with _seeded(_volume_seed(seed, case_id, k), engine.device):
            logits, _ = engine.run(image, mc_dropout=True)
        p = torch.softmax(logits / temperature, 0)
        h = voxel_entropy(p)
        prob_sum = p if prob_sum is None else prob_sum + p
        ent_sum = h if ent_sum is None else ent_sum + h
        del logits
    assert prob_sum is not None and ent_sum is not None  # passes >= 1 (mc_dropout is asked for)
    return mc_scores_from_moments(prob_sum / passes, ent_sum / passes)


def _tta_variance(engine: InferenceEngine, image: torch.Tensor, prob: torch.Tensor, temperature: float,
                  flips: tuple[tuple[int, ...], ...]) -> float:
    """Welford over the flips of the foreground-class probabilities; identity reuses ``prob``."""
    mean: torch.Tensor | None = None
    m2: torch.Tensor | None = None
    for k, flip in enumerate(flips):
        if flip:
            x = image.as_tensor() if hasattr(image, "as_tensor") else image
            dims = [a + 1 for a in flip]  # image [1, X, Y, Z] and logits [C, X, Y, Z]: axis a -> dim a + 1
            logits, _ = engine.run(torch.flip(x, dims))
            p = torch.softmax(torch.flip(logits, dims) / temperature, 0)[1:]
            del logits
        else:
            p = prob[1:]
        if mean is None or m2 is None:  # (set together)
            mean, m2 = p.clone(), torch.zeros_like(p)
        else:
            delta = p - mean
            mean += delta / (k + 1)
            m2 += delta * (p - mean)
    assert m2 is not None  # flips is not empty (>= 2 of them)
    return float((m2 / len(flips)).double().mean())


@dataclass(frozen=True)
class ScoringPlan:
    """What runs on each volume and which numbers come out, decided once from the needs and the networks (so the
    same on every rank of a sharded run; see `scoring_plan`)."""

    names: tuple[str, ...]  # per-volume metrics, in column order
    mc_passes: int
    flips: tuple[tuple[int, ...], ...]  # TTA flips (identity included); () when no TTA pass runs
    bn: tuple[nn.modules.batchnorm._BatchNorm, ...]  # BatchNorm layers read for bn_kl
    inorm: tuple[nn.modules.instancenorm._InstanceNorm | nn.GroupNorm, ...]  # read for norm_stats -> norm_kl
    frozen: bool
    head_gradient: bool
    anatomy: bool
    extent: bool = False

    def complete(self, values: Mapping[str, object]) -> bool:
        """Whether a cached entry holds every per-volume value of this plan."""
        return all(f"m_{n}" in values for n in self.names) and (not self.inorm or "norm_stats" in values) \
            and (not self.anatomy or "anatomy" in values) and (not self.extent or "extent" in values)

    def info(self, temperature: float) -> dict:
        divergence = "kd" if self.frozen else ("bn_kl" if self.bn else ("norm_kl" if self.inorm else "feature_gap"))
        flips = self.flips
        return {"temperature": float(temperature), "mc_dropout_passes": self.mc_passes,
                "tta_flips": [list(f) for f in flips] if len(flips) > 1 else [], "batchnorm_layers": len(self.bn),
                "instance_norm_layers": len(self.inorm),
                "divergence_available": divergence, "forward_passes_per_volume":
                    1 + self.frozen + self.mc_passes + sum(1 for f in flips if f) * (len(flips) > 1)}


def scoring_plan(current: InferenceEngine, needs: ScoringNeeds | None = None, frozen: bool = False) -> ScoringPlan:
    """The `ScoringPlan` of ``needs`` on the current engine's network (``frozen``: the pretrained engine runs too)."""
    needs = needs or ScoringNeeds()
    mc_passes = needs.mc_dropout  # >= 2 whenever mc_entropy / bald are asked for (ScoringNeeds checks)
    flips = needs.tta_flips if ("tta_variance" in needs.metrics or len(needs.tta_flips) > 1) else ()
    bn = batchnorm_layers(current.network) if (needs.feature_stats and not frozen) else []
    inorm = instance_norm_layers(current.network) if (needs.norm_stats and not frozen and not bn) else []
    names = ["asd", "enpy", "confidence"] + (["kd"] if frozen else [])
    names += (["mc_entropy", "bald"] if mc_passes else []) + (["tta_variance"] if len(flips) > 1 else [])
    names += ["bn_kl"] if bn else []
    return ScoringPlan(tuple(names), mc_passes, tuple(flips), tuple(bn), tuple(inorm), bool(frozen),
                       needs.head_gradient, "anatomy" in needs.vectors, "extent" in needs.vectors)


@dataclass
class VolumeRecord:
    """One volume's raw numbers: ``values`` as the score cache stores them (``m_<metric>`` float64 scalars,
    ``emb``, and when the plan asks ``emb0``, ``badge``, ``anatomy``, ``norm_stats``); picklable, so that a
    sharded run can gather them."""

    case_id: str
    values: Mapping[str, np.ndarray | np.float64]


Forward = Callable[[Any, bool, bool], tuple[torch.Tensor, torch.Tensor]]
"""``forward(vol, pretrained, refresh)`` -> (logits, embedding) of the current (or pretrained) model on a prepared
volume: `asfda.adapter.Adapter.forward`, which reads back a pass already made with the same weights (``refresh``: run
it anyway, for the hooks that read it)."""


def _engine_forward(current: InferenceEngine, frozen: InferenceEngine | None) -> Forward:
    """A `Forward` that runs the engines every time (no store)."""
    def forward(vol, pretrained: bool, refresh: bool) -> tuple[torch.Tensor, torch.Tensor]:
        engine = frozen if pretrained else current
        assert engine is not None  # the pretrained pass is asked only when the frozen engine is given
        return engine.run(vol.image)

    return forward


def _score_one(vol, case_id: str, plan: ScoringPlan, current: InferenceEngine, forward: Forward,
               temperature: float, grow_voxels: int, seed: int) -> dict[str, np.ndarray | np.float64]:
    """Every pass of ``plan`` on one volume; its numbers and vectors (the logits are dropped here)."""
    out: dict[str, np.ndarray | np.float64] = {}
    stats = _ChannelStats(plan.bn or plan.inorm)
    with stats.capturing():  # a pass the hooks read is run even when stored
        logits, emb = forward(vol, False, bool(plan.bn or plan.inorm))
    prob = torch.softmax(logits / temperature, 0)
    del logits
    ent, pred = voxel_entropy(prob), prob.argmax(0)  # shared by the metrics below
    out["m_asd"] = np.float64(anatomical_segmentation_difficulty(prob, grow_voxels, entropy=ent, argmax=pred))
    out["m_enpy"] = np.float64(mean_entropy(prob, entropy=ent))
    out["m_confidence"] = np.float64(foreground_confidence(prob))
    if plan.anatomy:
        out["anatomy"] = anatomy_composition(prob).numpy()
    if plan.extent:
        out["extent"] = organ_extent(pred, prob.shape[0])
    del ent
    out["emb"] = emb.numpy()
    if plan.bn:
        out["m_bn_kl"] = np.float64(stats.divergence())
    if plan.inorm:
        out["norm_stats"] = stats.vector()
    if plan.head_gradient:
        out["badge"] = badge_embedding(prob, emb).numpy()
    if plan.frozen:
        logits0, emb0 = forward(vol, True, False)
        prob0 = torch.softmax(logits0 / temperature, 0)
        out["m_kd"] = np.float64(foreground_kl_divergence(prob, prob0, argmax_t=pred))
        del prob0
        out["emb0"] = emb0.numpy()
        del logits0
    if plan.mc_passes:
        mc_ent, mi = _mc_scores(current, vol.image, temperature, plan.mc_passes, seed, case_id)
        out["m_mc_entropy"], out["m_bald"] = np.float64(mc_ent), np.float64(mi)
    if len(plan.flips) > 1:
        out["m_tta_variance"] = np.float64(_tta_variance(current, vol.image, prob, temperature, plan.flips))
    del prob, pred
    order = [f"m_{n}" for n in plan.names] + ["emb", "emb0", "badge", "anatomy", "norm_stats", "extent"]
    return {k: out[k] for k in order if k in out}  # the cache entry's order as it always was


def score_records(volumes: Iterable, plan: ScoringPlan, current: InferenceEngine, temperature: float, *,
                  frozen: InferenceEngine | None = None, grow_voxels: int = default_of("grow_voxels"), seed: int = 0,
                  progress: Callable[[Iterable], Iterable] = lambda x: x,
                  cache: EngineOutputCache | None = None, cache_key: Callable[[str], str] | None = None,
                  forward: Forward | None = None) -> list[VolumeRecord]:
    """The per-volume half of `score_volumes` (see there for the arguments): one `VolumeRecord` per volume, in the
    order they came; nothing that needs the whole pool. A sharded run calls it on its shard."""
    if plan.frozen != (frozen is not None):
        raise ValueError("the plan and the frozen engine disagree (scoring_plan(..., frozen=frozen is not None))")
    forward = forward or _engine_forward(current, frozen)
    records: list[VolumeRecord] = []
    for index, vol in enumerate(progress(volumes)):
        case_id = str(getattr(vol, "case_id", index))
        key = cache_key(case_id) if (cache is not None and cache_key is not None) else None
        hit = cache.get(key) if (cache is not None and key is not None) else None  # (key implies cache)
        if hit is not None and plan.complete(hit):
            records.append(VolumeRecord(case_id, hit))
            continue
        values = _score_one(vol, case_id, plan, current, forward, temperature, grow_voxels, seed)
        records.append(VolumeRecord(case_id, values))
        release_freed_memory()  # the pool is streamed: keep the resident set flat (see asfda.memory)
        if cache is not None and key is not None:  # (key implies cache)
            cache.put(key, values)
    return records


def finish_pool(records: Sequence[VolumeRecord], plan: ScoringPlan, temperature: float) -> ScoredPool:
    """The `ScoredPool` of ``records`` (rows in their order), with what is referenced to the whole pool (``norm_kl``
    from every volume's ``norm_stats``): a sharded run calls it once, on the gathered records of every shard."""
    values = [r.values for r in records]
    arrays = {n: np.asarray([float(v[f"m_{n}"]) for v in values], dtype=np.float64) for n in plan.names}
    vectors = {"badge": np.stack([v["badge"] for v in values]) if values else np.zeros((0, 0))} \
        if plan.head_gradient else {}
    if plan.anatomy:
        vectors["anatomy"] = np.stack([v["anatomy"] for v in values]) if values else np.zeros((0, 0))
    if plan.extent:
        vectors["extent"] = np.stack([v["extent"] for v in values]) if values else np.zeros((0, 0, 2))
    if plan.inorm and values:
        # pool-referenced: needs every volume's statistics (a sharded run computes it after gathering)
        vectors["norm_stats"] = np.stack([v["norm_stats"] for v in values])
        arrays["norm_kl"] = norm_kl_from_stats(vectors["norm_stats"], [int(
            m.num_channels if isinstance(m, nn.GroupNorm) else m.num_features) for m in plan.inorm])
    return ScoredPool([r.case_id for r in records], arrays,
                      np.stack([v["emb"] for v in values]) if values else np.zeros((0, 0)),
                      np.stack([v["emb0"] for v in values]) if (values and plan.frozen) else None,
                      vectors, plan.info(temperature))


def score_volumes(volumes: Iterable, current: InferenceEngine, temperature: float, *,
                  frozen: InferenceEngine | None = None, grow_voxels: int = default_of("grow_voxels"),
                  needs: ScoringNeeds | None = None, seed: int = 0,
                  progress: Callable[[Iterable], Iterable] = lambda x: x, cache: EngineOutputCache | None = None,
                  cache_key: Callable[[str], str] | None = None, forward: Forward | None = None) -> ScoredPool:
    """Per-volume metrics for prepared volumes (objects with ``image`` and ideally ``case_id``): `score_records`
    then `finish_pool`.

    Args:
        volumes: prepared volumes, consumed one at a time.
        current: engine of the model being adapted.
        temperature: T of this round; probabilities are ``softmax(z / T)`` in every pass.
        frozen: engine of the pretrained model; when given, ``kd`` = KL(p_t || p_0) and the pretrained
            embeddings are returned too.
        needs: what the requested strategies read (None: only the base metrics of the one pass).
        seed: seeds the stochastic (MC dropout) passes, per volume and pass; the global RNG is untouched.
        cache, cache_key: when given, each volume's numbers and embeddings are stored under
            ``cache_key(case_id)`` and read back on a re-run instead of recomputed (the key must cover
            everything they depend on: weights of both models, preprocessing, T, needs, seed).
        forward: how the deterministic pass of each model is had (`Forward`; default: the engines run it).

    Raises:
        AsfdaError: MC dropout was asked for and the network has no dropout layer.
    """
    plan = scoring_plan(current, needs, frozen is not None)
    records = score_records(volumes, plan, current, temperature, frozen=frozen, grow_voxels=grow_voxels, seed=seed,
                            progress=progress, cache=cache, cache_key=cache_key, forward=forward)
    return finish_pool(records, plan, temperature)
