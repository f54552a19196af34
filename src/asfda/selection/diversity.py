"""Batch pickers on embeddings: greedy score x diversity, k-center greedy, k-means++ seeding and rank
normalisation."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["anatomy_completeness", "greedy_diverse_pick", "k_center_greedy", "k_center_pick", "kmeans_pp_pick",
           "least_typical", "median_neighbour_distance", "rank_normalise", "typicality"]


def rank_normalise(values: np.ndarray) -> np.ndarray:
    """Percentile ranks in (0, 1]: the largest value gets 1, exact ties share their mean rank
    (``scipy.stats.rankdata(method="average") / N``). NaNs tie with each other above every number."""
    from scipy.stats import rankdata

    values = np.asarray(values, dtype=np.float64).ravel()
    if values.size == 0:
        return values
    ranks = rankdata(values, method="average", nan_policy="omit")  # NaN where the value is NaN
    nan = np.isnan(values)
    if nan.any():
        n_nan = int(nan.sum())
        ranks[nan] = values.size - (n_nan - 1) / 2.0  # the mean of the top n_nan ranks
    return ranks / values.size


def _unit_rows(x: np.ndarray | torch.Tensor) -> torch.Tensor:
    """Rows scaled to unit length once (a zero row stays zero: cosine 0 to everything, distance 1)."""
    return F.normalize(torch.as_tensor(np.asarray(x), dtype=torch.float64), dim=1)


def _distance_to(unit: torch.Tensor, i: int) -> torch.Tensor:
    """Cosine distance ``1 - cos`` of every row of ``unit`` to row ``i`` (one mat-vec)."""
    return (1.0 - unit @ unit[i]).clamp_min(0.0)


def _min_distance(unit: torch.Tensor, anchors: np.ndarray | None) -> torch.Tensor | None:
    """Min cosine distance of each row to the anchors, or None when there are no anchors."""
    if anchors is None or len(anchors) == 0:
        return None
    ua = _unit_rows(anchors)
    return (1.0 - unit @ ua.T).clamp_min(0.0).min(dim=1).values


def _distances_to_others(unit: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """``[N, M]`` cosine distances of the unit rows ``unit`` to ``ref``, whose first N rows are ``unit`` itself:
    a row's distance to itself is inf (a volume is not its own neighbour)."""
    d = (1.0 - unit @ ref.T).clamp_min(0.0)
    n = unit.shape[0]
    d[torch.arange(n), torch.arange(n)] = float("inf")
    return d


def typicality(vectors: np.ndarray, others: np.ndarray | None = None, k: int = 5) -> np.ndarray:
    """TypiClust's typicality of each row of ``vectors``: 1 / mean cosine distance to its ``k`` nearest neighbours
    among the other rows and ``others`` (e.g. the labelled volumes). High in dense regions, low for outliers.

    Args:
        vectors: ``[N, D]``; others: ``[M, D]`` or None; k: neighbours (capped at the number available).
    """
    unit = _unit_rows(vectors)
    ref = unit if others is None or len(others) == 0 else torch.cat([unit, _unit_rows(others)])
    n = unit.shape[0]
    if n == 0:
        return np.zeros(0)
    d = _distances_to_others(unit, ref)
    k = min(k, ref.shape[0] - 1)
    if k < 1:
        return np.ones(n)
    nearest = torch.topk(d, k, dim=1, largest=False).values
    return (1.0 / (nearest.mean(dim=1) + 1e-12)).numpy()


def anatomy_completeness(extent: np.ndarray) -> np.ndarray:
    """Per volume of a pool, how complete and typical its predicted anatomy is, from `organ_extent` vectors
    ``[N, C - 1, 2]`` (each organ's largest-component voxels, whether it reaches an end slice) -> ``[N]`` in [0, 1].

    0 when any organ reaches an end slice (cut by the field of view: a label of it teaches a truncated organ) or is
    predicted nowhere; otherwise the worst organ's size against the pool's median size of that organ, symmetric
    (``min over organs of min(r, 1 / r)``, r = voxels / pool median): 1 for a volume whose every organ is whole and
    of the pool's median size. Medians are over the volumes that predict the organ; an organ no volume predicts is
    left out. Label-free: it reads the pretrained model's prediction of each volume."""
    ext = np.asarray(extent, dtype=np.float64)
    if ext.ndim != 3 or ext.shape[2] != 2:
        raise ValueError(f"extent must be [N, organs, 2], got shape {ext.shape}")
    voxels, cut = ext[..., 0], ext[..., 1] > 0
    present = voxels > 0
    out = np.ones(len(ext), dtype=np.float64)
    for o in range(ext.shape[1]):
        if not present[:, o].any():
            continue
        median = float(np.median(voxels[present[:, o], o]))
        r = np.where(present[:, o], voxels[:, o] / median, 0.0)
        with np.errstate(divide="ignore"):
            sym = np.where(r > 0, np.minimum(r, 1.0 / np.where(r > 0, r, 1.0)), 0.0)
        out = np.minimum(out, sym)
    out[cut.any(axis=1)] = 0.0
    return out


def least_typical(typ: np.ndarray, fraction: float, keep: int = 1) -> np.ndarray:
    """Boolean mask of the ``floor(fraction * N)`` least typical rows of ``typ`` (ties: lower index first), never
    so many that fewer than ``keep`` rows remain."""
    typ = np.asarray(typ, dtype=np.float64).ravel()
    n_out = min(int(np.floor(max(fraction, 0.0) * typ.size + 1e-9)), max(typ.size - keep, 0))
    mask = np.zeros(typ.size, dtype=bool)
    mask[np.argsort(typ, kind="stable")[:n_out]] = True
    return mask


def median_neighbour_distance(embeddings: np.ndarray) -> float:
    """Median over rows of the cosine distance to the nearest other row: the pool's redundancy scale
    (0.0 with fewer than two rows)."""
    unit = _unit_rows(embeddings)
    n = unit.shape[0]
    if n < 2:
        return 0.0
    return float(_distances_to_others(unit, unit).min(dim=1).values.median())


def greedy_diverse_pick(scores: np.ndarray, embeddings: np.ndarray, budget: int,
                        anchors: np.ndarray | None = None,
                        distance_cap: float | None = None) -> tuple[list[int], list[float], list[float]]:
    """Repeatedly takes the index maximising ``score * min cosine distance to anchors and picks so far``.

    ``distance_cap`` saturates the distance factor (``min(distance, cap)``): a volume farther than the cap from
    everything picked is as welcome as one at the cap, so diversity avoids redundancy without seeking outliers.

    Embeddings are normalised once; each pick then costs one matrix-vector product (incremental min),
    so 20 picks from 10,000 volumes with 50 anchors take well under a second on one CPU core.

    Args:
        scores: ``[N]`` non-negative, higher = more wanted.
        embeddings: ``[N, D]``; anchors: ``[L, D]`` (the labelled volumes) or None.

    Returns:
        (picked indices, their combined values at pick time, their min distances at pick time).
        With no anchors the first pick has nothing to compare against and reports distance 1.0.
        Ties go to the lowest index (callers shuffle with their seed beforehand if they want).
    """
    unit = _unit_rows(embeddings)
    s = torch.as_tensor(np.asarray(scores), dtype=torch.float64)
    # with no anchors, 1.0 is only a neutral factor for the first pick; it must not cap later distances
    dmin = _min_distance(unit, anchors)
    have_reference = dmin is not None
    if dmin is None:
        dmin = torch.ones(len(s), dtype=torch.float64)
    neg_inf = torch.tensor(-np.inf, dtype=torch.float64)
    available = torch.ones(len(s), dtype=torch.bool)
    picked, values, dists = [], [], []
    for _ in range(min(budget, len(s))):
        factor = dmin if distance_cap is None else dmin.clamp_max(distance_cap)
        combined = torch.where(available, s * factor, neg_inf)
        i = int(torch.argmax(combined))
        picked.append(i)
        values.append(float(combined[i]))
        dists.append(float(dmin[i]))
        available[i] = False
        d_new = _distance_to(unit, i)
        dmin = torch.minimum(dmin, d_new) if have_reference else d_new
        have_reference = True
    return picked, values, dists


def k_center_greedy(embeddings: np.ndarray, budget: int, anchors: np.ndarray | None = None,
                    first: int = 0) -> list[int]:
    """Coreset (Sener & Savarese): repeatedly take the point farthest (cosine) from anchors and picks.

    With no anchors the first pick is ``first`` (callers pass a seeded index). See `k_center_pick`.
    """
    return k_center_pick(embeddings, budget, anchors, first)[0]


def k_center_pick(embeddings: np.ndarray, budget: int, anchors: np.ndarray | None = None,
                  first: int = 0) -> tuple[list[int], list[float]]:
    """`k_center_greedy` with each pick's min cosine distance to the anchors and earlier picks at pick time
    (1.0 for the first pick when there are no anchors, as in `greedy_diverse_pick`)."""
    unit = _unit_rows(embeddings)
    n = unit.shape[0]
    picked: list[int] = []
    dists: list[float] = []
    if n == 0 or budget <= 0:
        return [], []
    dmin = _min_distance(unit, anchors)
    if dmin is None:
        picked.append(first)
        dists.append(1.0)
        dmin = _distance_to(unit, first)
    while len(picked) < min(budget, n):
        d = dmin.clone()
        d[picked] = -1.0
        i = int(torch.argmax(d))
        picked.append(i)
        dists.append(float(dmin[i]))
        dmin = torch.minimum(dmin, _distance_to(unit, i))
    return picked, dists


def kmeans_pp_pick(vectors: np.ndarray, budget: int, rng: np.random.Generator) -> tuple[list[int], list[float]]:
    """k-means++ seeding as BADGE uses it (Ash et al. 2020, ``init_centers``): the first center is the
    vector with the largest Euclidean norm (lowest index on ties), each next one is drawn with
    probability proportional to its squared Euclidean distance to the nearest center so far.

    A picked vector (and any exact duplicate of one) has weight 0, so picks are distinct; when every
    remaining weight is 0 (all duplicates), the next pick is uniform over the unpicked vectors.

    Returns:
        (picked indices, their squared distance to the nearest earlier center at pick time; the
        first pick reports its squared norm).
    """
    x = torch.as_tensor(np.asarray(vectors), dtype=torch.float64)
    n = x.shape[0]
    if n == 0 or budget <= 0:
        return [], []
    if x.ndim != 2:
        raise ValueError(f"vectors must be [N, K], got shape {tuple(x.shape)}")
    sq_norm = (x * x).sum(1)
    first = int(torch.argmax(sq_norm))
    picked, d2_at_pick = [first], [float(sq_norm[first])]
    # ||x - c||^2 = ||x||^2 - 2 x.c + ||c||^2: one mat-vec per pick, no [N, K] temporary
    tiny = 1e-12 * max(float(sq_norm.max()), 1e-300)  # cancellation noise of exact duplicates -> 0

    def sq_dist(i: int) -> torch.Tensor:
        d = (sq_norm - 2.0 * (x @ x[i]) + sq_norm[i]).clamp_min(0.0)
        return torch.where(d <= tiny, torch.zeros_like(d), d)

    d2 = sq_dist(first)
    is_picked = np.zeros(n, dtype=bool)
    is_picked[first] = True
    while len(picked) < min(budget, n):
        w = d2.numpy().copy()
        w[is_picked] = 0.0
        w = np.where(np.isfinite(w) & (w > 0), w, 0.0)
        total = float(w.sum())
        if total > 0:
            cum = np.cumsum(w)
            i = int(np.searchsorted(cum, rng.random() * cum[-1], side="right"))
            i = min(i, n - 1)
            if w[i] <= 0:  # float edge at the very end of the cumulative sum
                i = int(np.flatnonzero(w > 0)[-1])
        else:
            i = int(rng.choice(np.flatnonzero(~is_picked)))
        picked.append(i)
        d2_at_pick.append(float(w[i]))
        is_picked[i] = True
        d2 = torch.minimum(d2, sq_dist(i))
    return picked, d2_at_pick
