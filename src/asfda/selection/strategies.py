"""Query strategies behind one interface, selectable by name.

A strategy reads `PoolScores` (per-volume numbers and embeddings computed by the scoring stage),
never a model or a file, and returns a `Query`: the chosen ids, their scores (higher = picked first)
and the components that explain each pick.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from asfda.errors import AsfdaError
from asfda.selection.diversity import greedy_diverse_pick, k_center_greedy, rank_normalise

__all__ = ["STRATEGIES", "PoolScores", "Query", "Strategy", "get_strategy"]


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
    """

    ids: list[str]
    metrics: dict[str, np.ndarray]
    embeddings: np.ndarray
    labelled_embeddings: np.ndarray = field(default_factory=lambda: np.zeros((0, 0)))
    embeddings0: np.ndarray | None = None
    round_index: int = 0


@dataclass
class Query:
    """Chosen ids (in pick order), their scores, and per-id score components."""

    strategy: str
    ids: list[str]
    scores: list[float]
    components: dict[str, dict[str, float]]


class Strategy:
    """Base: subclasses set ``name``, ``needs`` (metric names) and implement `_select`."""

    name = "base"
    needs: frozenset[str] = frozenset()

    def select(self, pool: PoolScores, budget: int, seed: int) -> Query:
        if not isinstance(budget, int) or budget <= 0:
            raise AsfdaError(f"budget must be a positive integer, got {budget!r}", fix="pass --budget 1 or more")
        if budget > len(pool.ids):
            raise AsfdaError(f"budget {budget} is larger than the unlabeled pool ({len(pool.ids)} volumes)",
                             fix="lower the budget or add volumes to the pool")
        missing = [m for m in self.needs if m not in pool.metrics]
        if missing:
            raise ValueError(f"strategy {self.name!r} needs metrics {missing}, pool has {sorted(pool.metrics)}")
        # canonical order: results do not depend on the order the pool was listed in
        order = np.argsort(np.asarray(pool.ids, dtype=object).astype(str), kind="stable")
        canon = PoolScores([pool.ids[i] for i in order], {k: np.asarray(v)[order] for k, v in pool.metrics.items()},
                           np.asarray(pool.embeddings)[order], pool.labelled_embeddings,
                           None if pool.embeddings0 is None else np.asarray(pool.embeddings0)[order], pool.round_index)
        return self._select(canon, budget, np.random.default_rng(seed))

    def _select(self, pool: PoolScores, budget: int, rng: np.random.Generator) -> Query:
        raise NotImplementedError


class RandomStrategy(Strategy):
    name = "random"

    def _select(self, pool: PoolScores, budget: int, rng: np.random.Generator) -> Query:
        idx = rng.permutation(len(pool.ids))[:budget]
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
    name, metric, needs = "enpy", "enpy", frozenset({"enpy"})


class ASDStrategy(TopKStrategy):
    name, metric, needs = "asd", "asd", frozenset({"asd"})


class CoresetStrategy(Strategy):
    name = "coreset"

    def _select(self, pool: PoolScores, budget: int, rng: np.random.Generator) -> Query:
        first = int(rng.integers(len(pool.ids)))
        idx = k_center_greedy(pool.embeddings, budget, pool.labelled_embeddings, first=first)
        return Query(self.name, [pool.ids[i] for i in idx], [0.0] * len(idx), {pool.ids[i]: {} for i in idx})


class ASFDAStrategy(Strategy):
    """The method: rank-combined knowledge divergence (DKD) and ASD, then the greedy diverse pick.

    ``kd`` (KL of the adapted vs the pretrained model) is used when the scoring stage provides it;
    in round 0 (adapted = pretrained) it falls back to the cosine distance of the pretrained
    embedding to the mean pool embedding (atypical, source-dissimilar volumes first).
    """

    name = "asfda"
    needs = frozenset({"asd"})

    def __init__(self, alpha: float = 0.5) -> None:
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"alpha must be in [0, 1], got {alpha}")
        self.alpha = alpha

    def _select(self, pool: PoolScores, budget: int, rng: np.random.Generator) -> Query:
        asd = np.asarray(pool.metrics["asd"], dtype=np.float64)
        if "kd" in pool.metrics:
            kd, kd_name = np.asarray(pool.metrics["kd"], dtype=np.float64), "kd"
        else:
            emb0 = np.asarray(pool.embeddings0 if pool.embeddings0 is not None else pool.embeddings, dtype=np.float64)
            kd, kd_name = _cosine_to_mean(emb0), "feature_gap"
        combined = self.alpha * rank_normalise(kd) + (1 - self.alpha) * rank_normalise(asd)
        # seeded jitter far below one rank step breaks exact ties reproducibly
        combined = combined + rng.random(len(combined)) * 1e-9
        idx, values, dists = greedy_diverse_pick(combined, pool.embeddings, budget, pool.labelled_embeddings)
        comps = {pool.ids[i]: {"asd": float(asd[i]), kd_name: float(kd[i]), "rank_score": float(combined[i]),
                               "min_distance": d} for i, d in zip(idx, dists)}
        return Query(self.name, [pool.ids[i] for i in idx], values, comps)


def _cosine_to_mean(emb: np.ndarray) -> np.ndarray:
    from asfda.scoring.metrics import cosine_distance
    import torch

    e = torch.as_tensor(emb, dtype=torch.float64)
    return cosine_distance(e, e.mean(0, keepdim=True))[:, 0].numpy()


STRATEGIES: dict[str, type[Strategy]] = {
    s.name: s for s in (RandomStrategy, EntropyStrategy, ASDStrategy, CoresetStrategy, ASFDAStrategy)
}


def get_strategy(name: str, **kwargs: object) -> Strategy:
    """Builds a strategy by name; unknown names get an error listing the valid ones."""
    key = name.strip().lower()
    if key not in STRATEGIES:
        import difflib

        close = difflib.get_close_matches(key, STRATEGIES, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise AsfdaError(f"unknown strategy {name!r}{hint}; choose from {sorted(STRATEGIES)}")
    cls = STRATEGIES[key]
    return cls(**kwargs) if kwargs else cls()
