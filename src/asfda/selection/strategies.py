"""Query strategies behind one interface, selectable by name.

A strategy reads `PoolScores` (per-volume numbers and embeddings computed by the scoring stage),
never a model or a file, and returns a `Query`: the chosen ids, their scores (higher = picked first)
and the components that explain each pick.
"""

from __future__ import annotations

import zlib
from dataclasses import asdict, dataclass, field, fields, replace

import numpy as np
import torch

from asfda.config import StrategySettings
from asfda.errors import AsfdaError
from asfda.options import DEFAULT_DIVERSITY, DIVERSITY_SPACES, REPRESENTATIVENESS, ROUND0_GAPS, did_you_mean
from asfda.scoring.metrics import cosine_distance
from asfda.scoring.needs import DEFAULT_MC_PASSES, DEFAULT_TTA_FLIPS, ScoringNeeds
from asfda.selection.diversity import (
    anatomy_completeness,
    greedy_diverse_pick,
    k_center_greedy,
    k_center_pick,
    kmeans_pp_pick,
    least_typical,
    median_neighbour_distance,
    rank_normalise,
    typicality,
)

__all__ = ["DEFAULT_DIVERSITY", "DIVERSITY_SPACES", "REPRESENTATIVENESS", "ROUND0_GAPS", "STRATEGIES", "PoolScores",
           "Query", "ScoringNeeds", "Strategy", "StrategySettings", "build_strategy", "get_strategy", "needs_of"]


@dataclass
class PoolScores:
    """What the scoring stage computed for the unlabeled pool.

    Attributes:
        ids: unlabeled case ids, ``[N]``.
        metrics: metric name -> ``[N]`` array (e.g. ``asd``, ``enpy``, ``kd``).
        embeddings: ``[N, D]`` from the current model.
        labelled_embeddings: ``[L, D]`` of the labelled volumes, current model.
        embeddings0: ``[N, D]`` from the frozen pretrained model (None when identical to ``embeddings``).
        round_index: 0 for the first query.
        vectors: vector name -> ``[N, K]`` per-volume vectors (``badge``: head-gradient embeddings;
            ``anatomy``: predicted foreground composition).
        labelled_vectors: vector name -> ``[L, K]``, the same vectors for the labelled volumes (``anatomy``).
        cold_start: the model has no segmentation head for the target classes yet (an encoder-only model before
            its first fine-tuning), so its probabilities mean nothing: only the embeddings are read.
    """

    ids: list[str]
    metrics: dict[str, np.ndarray]
    embeddings: np.ndarray
    labelled_embeddings: np.ndarray = field(default_factory=lambda: np.zeros((0, 0)))
    embeddings0: np.ndarray | None = None
    round_index: int = 0
    vectors: dict[str, np.ndarray] = field(default_factory=dict)
    labelled_vectors: dict[str, np.ndarray] = field(default_factory=dict)
    cold_start: bool = False

    @classmethod
    def ids_only(cls, ids: list[str], round_index: int = 0) -> PoolScores:
        """The pool as a strategy that reads no scores sees it (``reads_pool = False``: random): no forward pass."""
        return cls(list(ids), {}, np.zeros((len(ids), 0)), round_index=round_index)


@dataclass
class Query:
    """Chosen ids (in pick order), their scores, and per-id score components."""

    strategy: str
    ids: list[str]
    scores: list[float]
    components: dict[str, dict[str, float]]


class Strategy:
    """Base: subclasses set ``name``, ``needs`` (a `ScoringNeeds`: the metrics / vectors they read and the
    extra passes behind them, which drive the scoring stage) and implement `_select`."""

    name = "base"
    needs: ScoringNeeds = ScoringNeeds()
    reads_pool = True
    """False for a strategy that looks at the pool's ids alone (random): callers may skip the scoring pass."""
    cold_start_ok = False
    """True for a strategy with a rule for a `PoolScores.cold_start` pool (no head: embeddings only)."""

    def settings(self) -> dict:
        """The options a pick depended on besides the pool's numbers (for run records); none by default."""
        return {}

    @property
    def reads_predictions(self) -> bool:
        """Whether the strategy reads numbers made from the model's class probabilities (metrics or vectors)."""
        return bool(self.needs.metrics or self.needs.vectors)

    def check_cold_start(self) -> None:
        """Refuses a cold-start pool (`PoolScores.cold_start`: no trained output for any target class) for a strategy
        that reads the model's predictions and has no rule for it; callers may call it before scoring the pool."""
        if self.reads_predictions and not self.cold_start_ok:
            raise AsfdaError(f"strategy {self.name!r} reads the model's predictions, and the model has no segmentation "
                             "head for these classes yet (no output for any of them: the cold start)",
                             fix="use --strategy asfda (its cold start picks on the embeddings alone), coreset or "
                             "random for the first query, or --class-map target=source,... to match classes by hand")

    def select(self, pool: PoolScores, budget: int, seed: int) -> Query:
        if not isinstance(budget, int) or budget <= 0:
            raise AsfdaError(f"budget must be a positive integer, got {budget!r}", fix="pass --budget 1 or more")
        if budget > len(pool.ids):
            raise AsfdaError(f"budget {budget} is larger than the unlabeled pool ({len(pool.ids)} volumes)",
                             fix="lower the budget or add volumes to the pool")
        if pool.cold_start:
            self.check_cold_start()
        missing = [] if pool.cold_start else sorted(m for m in self.needs.metrics if m not in pool.metrics)
        missing += [] if pool.cold_start else sorted(f"vector {v}" for v in self.needs.vectors if v not in pool.vectors)
        if missing:
            raise ValueError(f"strategy {self.name!r} needs {missing}, pool has metrics {sorted(pool.metrics)} and "
                             f"vectors {sorted(pool.vectors)}; score the pool with needs=strategy.needs")
        # canonical order: results do not depend on the order the pool was listed in
        order = np.argsort(np.asarray(pool.ids, dtype=object).astype(str), kind="stable")
        canon = PoolScores([pool.ids[i] for i in order], {k: np.asarray(v)[order] for k, v in pool.metrics.items()},
                           np.asarray(pool.embeddings)[order], pool.labelled_embeddings,
                           None if pool.embeddings0 is None else np.asarray(pool.embeddings0)[order], pool.round_index,
                           {k: np.asarray(v)[order] for k, v in pool.vectors.items()}, pool.labelled_vectors,
                           pool.cold_start)
        return self._select(canon, budget, np.random.default_rng(seed))

    def _select(self, pool: PoolScores, budget: int, rng: np.random.Generator) -> Query:
        raise NotImplementedError


class RandomStrategy(Strategy):
    name = "random"
    reads_pool = False

    def _select(self, pool: PoolScores, budget: int, rng: np.random.Generator) -> Query:
        # the draw depends on the pool as well as the seed: the folds of a cross-validation share most of their pool,
        # and a draw from the seed alone takes the same index into nearly the same sorted list in every fold (the same
        # volume first in fold after fold), so random's mean over folds would rest on one draw per seed
        salt = zlib.crc32("\n".join(pool.ids).encode("utf-8"))
        idx = np.random.default_rng([int(rng.integers(2**32)), salt]).permutation(len(pool.ids))[:budget]
        return Query(self.name, [pool.ids[i] for i in idx], [0.0] * budget, {pool.ids[i]: {} for i in idx})


class TopKStrategy(Strategy):
    """Top-k by one metric (higher = picked first), ties broken by the seeded generator."""

    metric = ""

    def _select(self, pool: PoolScores, budget: int, rng: np.random.Generator) -> Query:
        values = np.asarray(pool.metrics[self.metric], dtype=np.float64)
        tiebreak = rng.random(len(values))
        idx = np.lexsort((tiebreak, -values))[:budget]
        return Query(self.name, [pool.ids[i] for i in idx], [float(values[i]) for i in idx],
                     {pool.ids[i]: {self.metric: float(values[i])} for i in idx})


class EntropyStrategy(TopKStrategy):
    """ENPY: whole-volume mean entropy, top-k."""

    name, metric, needs = "enpy", "enpy", ScoringNeeds(metrics=frozenset({"enpy"}))


class ASDStrategy(TopKStrategy):
    """ASD alone (entropy inside the predicted anatomy), top-k; an ablation of asfda."""

    name, metric, needs = "asd", "asd", ScoringNeeds(metrics=frozenset({"asd"}))


class MCEntropyStrategy(TopKStrategy):
    """MC-dropout epistemic entropy (MONAI Label's default): whole-volume mean entropy of the mean of
    5 stochastic dropout passes, top-k. Networks without dropout raise an error naming ``tta``."""

    name, metric = "mc_entropy", "mc_entropy"
    needs = ScoringNeeds(metrics=frozenset({"mc_entropy"}), mc_dropout=DEFAULT_MC_PASSES)


class BALDStrategy(TopKStrategy):
    """BALD: whole-volume mean mutual information (entropy of the mean minus mean entropy) over 5
    stochastic dropout passes, top-k."""

    name, metric = "bald", "bald"
    needs = ScoringNeeds(metrics=frozenset({"bald"}), mc_dropout=DEFAULT_MC_PASSES)


class TTAStrategy(TopKStrategy):
    """TTA variance: whole-volume mean variance of the foreground-class probabilities over the identity
    and the flips of model-grid axes 1 and 2 (never left-right), top-k. Works without dropout."""

    name, metric = "tta", "tta_variance"
    needs = ScoringNeeds(metrics=frozenset({"tta_variance"}), tta_flips=DEFAULT_TTA_FLIPS)


class BADGEStrategy(Strategy):
    """BADGE-style: k-means++ seeding (seeded) on per-volume head-gradient embeddings computed with the
    model's own argmax as pseudo-label (see `asfda.scoring.metrics.badge_embedding` for the
    approximation). Only the unlabeled pool is clustered, as in BADGE."""

    name = "badge"
    needs = ScoringNeeds(vectors=frozenset({"badge"}))

    def _select(self, pool: PoolScores, budget: int, rng: np.random.Generator) -> Query:
        g = np.asarray(pool.vectors["badge"], dtype=np.float64)
        idx, d2 = kmeans_pp_pick(g, budget, rng)
        norms = np.linalg.norm(g, axis=1) if g.size else np.zeros(len(pool.ids))
        comps = {pool.ids[i]: {"gradient_norm": float(norms[i]), "sq_distance_at_pick": float(d)}
                 for i, d in zip(idx, d2)}
        return Query(self.name, [pool.ids[i] for i in idx], [float(d) for d in d2], comps)


class CoresetStrategy(Strategy):
    name = "coreset"

    def _select(self, pool: PoolScores, budget: int, rng: np.random.Generator) -> Query:
        first = int(rng.integers(len(pool.ids)))
        idx = k_center_greedy(pool.embeddings, budget, pool.labelled_embeddings, first=first)
        return Query(self.name, [pool.ids[i] for i in idx], [0.0] * len(idx), {pool.ids[i]: {} for i in idx})


TYPICALITY_WEIGHT0 = 0.5
OUTLIER_FRACTION0 = 0.2
COMPLETENESS_TIE_WEIGHT = 1e-6
"""``representativeness="complete"``'s first query: the weight of METHOD.md's rank score added to the completeness
rank, below any step between distinct ranks of a pool under a million volumes (it orders the tied volumes only)."""
_COMPLETE_FIRST = ("complete", "coverage", "trimmed")  # the settings whose first query is `complete`'s
_DEFAULTS = StrategySettings()  # asfda's settings at their one default (`asfda.config.StrategySettings`)


class ASFDAStrategy(Strategy):
    """The method: rank-combined knowledge divergence (DKD) and ASD, then the greedy diverse pick.

    The knowledge divergence (named so in the query components) is, in order of preference: ``kd`` (KL of the adapted
    vs the pretrained model, once adapted); at round 0 ``bn_kl`` (Gaussian KL of the volume's channel statistics at
    the BatchNorm layers vs their stored source running statistics, when the model has them); otherwise, as METHOD.md
    specifies, ``feature_gap`` (cosine distance of the pretrained embedding to the mean pool embedding).

    ``round0_gap="norm_kl"`` replaces that last fallback by ``norm_kl`` (the BatchNorm gap's KL at InstanceNorm /
    GroupNorm layers, against the pool's own statistics). Not the default: on the phantom pools it covered fewer
    sub-populations (benchmarks/results/phantom_coverage.md); on CT -> MR (seed 0) it first took the best-segmented.

    ``diversity`` is the space of the greedy pick's cosine distance: ``"embedding"`` (default) METHOD.md's pooled
    bottleneck embedding, ``"anatomy"`` the predicted foreground composition (`asfda.scoring.metrics.
    anatomy_composition`; the embedding instead with a single foreground class), ``"none"`` no diversity term at all
    (the top-k of the combined rank score: an ablation), ``"batch"`` the embedding space within the batch only (the
    labelled volumes are no anchors of the pick; they still count as neighbours in the typicality).
    InstanceNorm nearly flattens the pooled embedding; the anatomy space covers more phantom sub-populations, but on
    CT -> MR led asfda to the one atypical volume (README; results/phantom_coverage*.md, ct_to_mr_full/ANALYSIS.md).
    """

    name = "asfda"
    needs = ScoringNeeds(metrics=frozenset({"asd"}), feature_stats=True, divergence=True)
    cold_start_ok = True

    def __init__(self, alpha: float = _DEFAULTS.alpha, round0_gap: str = _DEFAULTS.round0_gap,
                 diversity: str = _DEFAULTS.diversity, representativeness: str = _DEFAULTS.representativeness) -> None:
        chosen = StrategySettings(alpha=alpha, round0_gap=round0_gap, diversity=diversity,
                                  representativeness=representativeness)
        chosen.check()  # `asfda.config.SettingError` (a ValueError) naming the first value out of range
        self.alpha = alpha
        self.round0_gap = round0_gap
        self.diversity = diversity
        self.representativeness = representativeness
        needs = ASFDAStrategy.needs
        if round0_gap == "norm_kl":  # the statistics hooks run only when they are read
            needs = replace(needs, norm_stats=True)
        if diversity == "anatomy":
            needs = replace(needs, vectors=needs.vectors | {"anatomy"})
        if representativeness in _COMPLETE_FIRST:  # each organ's extent (trimmed: its composition too)
            extra = {"extent", "anatomy"} if representativeness == "trimmed" else {"extent"}
            needs = replace(needs, vectors=needs.vectors | extra)
        self.needs = needs

    def settings(self) -> dict:
        return asdict(StrategySettings(alpha=self.alpha, round0_gap=self.round0_gap, diversity=self.diversity,
                                       representativeness=self.representativeness))

    def diversity_vectors(self, pool: PoolScores) -> tuple[np.ndarray, np.ndarray | None]:
        """The pool's ``[N, K]`` vectors and the labelled anchors' ``[L, K]`` in the diversity space.

        With a single foreground class the composition has one entry, and every pair of volumes is at cosine
        distance 0 in it: the embedding space is used instead."""
        anatomy = np.asarray(pool.vectors["anatomy"]) if self.diversity == "anatomy" else None
        if anatomy is None or (anatomy.ndim == 2 and anatomy.shape[1] < 2):
            return np.asarray(pool.embeddings), pool.labelled_embeddings
        anchors = pool.labelled_vectors.get("anatomy")
        if anchors is None and np.asarray(pool.labelled_embeddings).size:
            raise ValueError("asfda's anatomy diversity needs the labelled volumes' anatomy vectors "
                             "(PoolScores.labelled_vectors['anatomy']) when labelled volumes exist")
        return anatomy, anchors

    def pool_components(self, pool: PoolScores) -> tuple[str, dict[str, np.ndarray]]:
        """For every pool volume (in the pool's order): the divergence used and its value, ASD, their
        percentile ranks and the combined score before the diversity factor.

        Returns:
            (name of the divergence used: ``kd``, ``bn_kl``, ``norm_kl`` or ``feature_gap``; column name -> ``[N]``).
        """
        asd = np.asarray(pool.metrics["asd"], dtype=np.float64)
        if "kd" in pool.metrics:
            kd, kd_name = np.asarray(pool.metrics["kd"], dtype=np.float64), "kd"
        elif "bn_kl" in pool.metrics:
            kd, kd_name = np.asarray(pool.metrics["bn_kl"], dtype=np.float64), "bn_kl"
        elif self.round0_gap == "norm_kl" and "norm_kl" in pool.metrics:
            kd, kd_name = np.asarray(pool.metrics["norm_kl"], dtype=np.float64), "norm_kl"
        else:
            emb0 = np.asarray(pool.embeddings0 if pool.embeddings0 is not None else pool.embeddings, dtype=np.float64)
            kd, kd_name = _cosine_to_mean(emb0), "feature_gap"
        r_kd, r_asd = rank_normalise(kd), rank_normalise(asd)
        cols = {kd_name: kd, "asd": asd, f"rank_{kd_name}": r_kd, "rank_asd": r_asd,
                "rank_score": self.alpha * r_kd + (1 - self.alpha) * r_asd}
        first_query = not np.asarray(pool.labelled_embeddings).size
        if self.representativeness in _COMPLETE_FIRST and first_query and "extent" in pool.vectors:
            # nothing labelled: the most complete predicted anatomy first (the rank score breaks its ties only)
            comp = anatomy_completeness(pool.vectors["extent"])
            cols.update({"completeness": comp, "rank_completeness": rank_normalise(comp),
                         "rank_score": rank_normalise(comp) + COMPLETENESS_TIE_WEIGHT * cols["rank_score"]})
        elif self.representativeness in ("density", "typical", "complete", "trimmed") and len(pool.ids) > 1:
            space, anchors = self.diversity_vectors(pool)
            typ = typicality(space, anchors)
            n_labelled = 0 if anchors is None else len(np.asarray(anchors))
            w = TYPICALITY_WEIGHT0 / (1 + n_labelled)
            cols.update({"typicality": typ, "rank_typicality": rank_normalise(typ),
                         "rank_score": (1 - w) * cols["rank_score"] + w * rank_normalise(typ)})
            if self.representativeness == "typical":
                cols["outlier"] = least_typical(typ, OUTLIER_FRACTION0 / (1 + n_labelled), keep=1).astype(np.float64)
            elif self.representativeness == "trimmed":  # the share does not shrink; the space is the organ composition
                cols["anatomy_typicality"] = typicality(pool.vectors["anatomy"], pool.labelled_vectors.get("anatomy"))
                cols["outlier"] = least_typical(cols["anatomy_typicality"], OUTLIER_FRACTION0, keep=1).astype(float)
        return kd_name, cols

    def _cold_start(self, pool: PoolScores, budget: int) -> Query:
        """METHOD.md's cold start for a model without a head (no ASD): the diversity pick on the pretrained
        embeddings alone. The first pick is the volume farthest from the pool's mean embedding (the feature gap)
        unless labelled volumes anchor the pick; then each next one is the farthest from the anchors and the picks
        so far (k-center greedy, cosine)."""
        emb0 = np.asarray(pool.embeddings0 if pool.embeddings0 is not None else pool.embeddings, dtype=np.float64)
        gap = _cosine_to_mean(emb0)
        anchors = pool.labelled_embeddings if np.asarray(pool.labelled_embeddings).size else None
        idx, dists = k_center_pick(emb0, budget, anchors, first=int(np.argmax(gap)))
        comps = {pool.ids[i]: {"feature_gap": float(gap[i]), "min_distance": d, "cold_start": 1.0}
                 for i, d in zip(idx, dists)}
        return Query(self.name, [pool.ids[i] for i in idx], dists, comps)

    def _select(self, pool: PoolScores, budget: int, rng: np.random.Generator) -> Query:
        if pool.cold_start:
            return self._cold_start(pool, budget)
        kd_name, cols = self.pool_components(pool)
        # seeded jitter far below one rank step breaks exact ties reproducibly
        combined = cols["rank_score"] + rng.random(len(pool.ids)) * 1e-9
        covering = self.representativeness == "coverage" and bool(np.asarray(pool.labelled_embeddings).size)
        if covering and self.diversity != "none":  # k-center greedy; the rank score only orders exact ties
            space, anchors = self.diversity_vectors(pool)
            idx, values, dists = greedy_diverse_pick(1.0 + COMPLETENESS_TIE_WEIGHT * combined, space, budget, anchors)
        elif self.diversity == "none":  # the ablation: top-k of the combined rank score
            if "outlier" in cols:  # the least typical volumes are no candidates
                combined = np.where(cols["outlier"] > 0, -1.0, combined)
            idx = [int(i) for i in np.argsort(-combined, kind="stable")[:budget]]
            values, dists = [float(combined[i]) for i in idx], [1.0] * len(idx)
        else:
            space, anchors = self.diversity_vectors(pool)
            cap = None
            if self.representativeness == "typical":
                # the distance factor saturates at the pool's median nearest-neighbour distance (diversity avoids
                # redundancy without seeking outliers), and the least typical volumes are no candidates while labels
                # are few
                cap = median_neighbour_distance(space)
            if "outlier" in cols:
                combined = np.where(cols["outlier"] > 0, 0.0, combined)
            if self.diversity == "batch":  # the labelled volumes are no anchors: diverse within the batch only
                anchors = None
            idx, values, dists = greedy_diverse_pick(combined, space, budget, anchors, distance_cap=cap)
        comps = {pool.ids[i]: {"asd": float(cols["asd"][i]), kd_name: float(cols[kd_name][i]),
                               "rank_score": float(combined[i]), "min_distance": d} for i, d in zip(idx, dists)}
        return Query(self.name, [pool.ids[i] for i in idx], values, comps)


def _cosine_to_mean(emb: np.ndarray) -> np.ndarray:
    e = torch.as_tensor(emb, dtype=torch.float64)
    return cosine_distance(e, e.mean(0, keepdim=True))[:, 0].numpy()


STRATEGIES: dict[str, type[Strategy]] = {
    s.name: s for s in (RandomStrategy, EntropyStrategy, ASDStrategy, CoresetStrategy, ASFDAStrategy,
                        MCEntropyStrategy, BALDStrategy, TTAStrategy, BADGEStrategy)
}


def needs_of(names: list[str] | tuple[str, ...]) -> ScoringNeeds:
    """The union of what the named strategies need from the scoring stage (unknown names raise)."""
    return ScoringNeeds.union([get_strategy(n).needs for n in names])


def build_strategy(name: str, *, settings: StrategySettings | None = None, alpha: float | None = None,
                   round0_gap: str | None = None, diversity: str | None = None,
                   representativeness: str | None = None) -> Strategy:
    """`get_strategy` with the settings that only asfda reads: ``build_strategy(name, settings=cfg)``, where ``cfg``
    is a `StrategySettings` (a `RunConfig` or a project's ``ProjectSettings`` is one); a setting given by name
    (``diversity="anatomy"``) replaces the one in ``settings`` (None: not given), and what neither gives is its
    default. Everything after ``name`` is by keyword."""
    base = {f.name: getattr(settings if settings is not None else _DEFAULTS, f.name) for f in fields(StrategySettings)}
    given = {"alpha": alpha, "round0_gap": round0_gap, "diversity": diversity, "representativeness": representativeness}
    chosen = {**base, **{k: v for k, v in given.items() if v is not None}}
    if name.strip().lower() == ASFDAStrategy.name:
        return get_strategy(name, **chosen)
    return get_strategy(name)


def get_strategy(name: str, **kwargs: object) -> Strategy:
    """Builds a strategy by name; unknown names get an error listing the valid ones."""
    key = name.strip().lower()
    if key not in STRATEGIES:
        raise AsfdaError(f"unknown strategy {name!r}{did_you_mean(key, list(STRATEGIES))}; choose from "
                         f"{sorted(STRATEGIES)}")
    cls = STRATEGIES[key]
    return cls(**kwargs) if kwargs else cls()
