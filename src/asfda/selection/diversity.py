"""Batch pickers on embeddings: greedy score x diversity, k-center greedy, and rank normalisation."""

from __future__ import annotations

import numpy as np
import torch

from asfda.scoring.metrics import cosine_distance

__all__ = ["greedy_diverse_pick", "k_center_greedy", "rank_normalise"]


def rank_normalise(values: np.ndarray) -> np.ndarray:
    """Percentile ranks in (0, 1]: the largest value gets 1, ties share their mean rank."""
    from scipy.stats import rankdata

    values = np.asarray(values, dtype=np.float64)
    if values.size == 0:
        return values
    return rankdata(values, method="average") / values.size


def _min_distance(emb: torch.Tensor, anchors: torch.Tensor | None) -> torch.Tensor:
    if anchors is None or anchors.shape[0] == 0:
        return torch.ones(emb.shape[0], dtype=torch.float64)
    return cosine_distance(emb, anchors).min(dim=1).values


def greedy_diverse_pick(scores: np.ndarray, embeddings: np.ndarray, budget: int,
                        anchors: np.ndarray | None = None) -> tuple[list[int], list[float], list[float]]:
    """Repeatedly takes the index maximising ``score * min cosine distance to anchors and picks so far``.

    Args:
        scores: ``[N]`` non-negative, higher = more wanted.
        embeddings: ``[N, D]``; anchors: ``[L, D]`` (the labelled volumes) or None.

    Returns:
        (picked indices, their combined values at pick time, their min distances at pick time).
        With no anchors the first pick has nothing to compare against and reports distance 1.0.
        Ties go to the lowest index (callers shuffle with their seed beforehand if they want).
    """
    emb = torch.as_tensor(np.asarray(embeddings), dtype=torch.float64)
    s = torch.as_tensor(np.asarray(scores), dtype=torch.float64)
    anchor_t = None if anchors is None or len(anchors) == 0 else torch.as_tensor(np.asarray(anchors), dtype=torch.float64)
    # with no anchors, 1.0 is only a neutral factor for the first pick; it must not cap later distances
    dmin = _min_distance(emb, anchor_t)
    have_reference = anchor_t is not None
    available = torch.ones(len(s), dtype=torch.bool)
    picked, values, dists = [], [], []
    for _ in range(min(budget, len(s))):
        combined = torch.where(available, s * dmin, torch.tensor(-np.inf, dtype=torch.float64))
        i = int(torch.argmax(combined))
        picked.append(i)
        values.append(float(combined[i]))
        dists.append(float(dmin[i]))
        available[i] = False
        d_new = cosine_distance(emb, emb[i : i + 1])[:, 0]
        dmin = torch.minimum(dmin, d_new) if have_reference else d_new
        have_reference = True
    return picked, values, dists


def k_center_greedy(embeddings: np.ndarray, budget: int, anchors: np.ndarray | None = None,
                    first: int = 0) -> list[int]:
    """Coreset (Sener & Savarese): repeatedly take the point farthest (cosine) from anchors and picks.

    With no anchors the first pick is ``first`` (callers pass a seeded index).
    """
    emb = torch.as_tensor(np.asarray(embeddings), dtype=torch.float64)
    n = emb.shape[0]
    picked: list[int] = []
    if anchors is None or len(anchors) == 0:
        if n == 0 or budget <= 0:
            return []
        picked.append(first)
        dmin = cosine_distance(emb, emb[first : first + 1])[:, 0]
    else:
        dmin = _min_distance(emb, torch.as_tensor(np.asarray(anchors), dtype=torch.float64))
    while len(picked) < min(budget, n):
        d = dmin.clone()
        d[picked] = -1.0
        i = int(torch.argmax(d))
        picked.append(i)
        dmin = torch.minimum(dmin, cosine_distance(emb, emb[i : i + 1])[:, 0])
    return picked
