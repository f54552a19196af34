"""asfda's representativeness term (TypiClust typicality, weighted down as labels accrue) on hand-made pools."""

from __future__ import annotations

import numpy as np
import pytest

from asfda.errors import AsfdaError
from asfda.selection import PoolScores, build_strategy, typicality


def test_typicality_is_high_in_dense_regions_and_low_for_outliers() -> None:
    x = np.array([[1.0, 0.0], [0.99, 0.1], [0.98, 0.15], [0.0, 1.0]])
    t = typicality(x, k=2)
    assert np.argmin(t) == 3 and np.argmax(t) == 1
    # hand-computed: row 3's two nearest are rows 2 and 1, cosine distances 1 - 0.15/|r2| and 1 - 0.1/|r1|
    r1, r2 = np.linalg.norm(x[1]), np.linalg.norm(x[2])
    assert t[3] == pytest.approx(1 / np.mean([1 - 0.15 / r2, 1 - 0.1 / r1]))
    # labelled rows count as neighbours: an outlier next to a labelled volume is no longer untypical
    assert typicality(x, others=np.array([[0.01, 1.0]]), k=1)[3] > t[3]
    assert typicality(x[:1]).tolist() == [1.0]


def _pool(n_labelled: int) -> PoolScores:
    """Nine volumes in one cluster and an outlier (index 9) with the largest ASD and feature gap."""
    rng = np.random.default_rng(0)
    emb = np.vstack([np.array([1.0, 0.2, 0.1]) + rng.normal(0, 0.02, (9, 3)), [[0.1, 1.0, -0.5]]])
    asd = np.r_[np.linspace(0.2, 0.6, 9), 0.9]
    lab = emb[:n_labelled] + 0.01
    return PoolScores([f"c{i}" for i in range(10)], {"asd": asd}, emb, labelled_embeddings=lab.reshape(-1, 3),
                      round_index=int(n_labelled > 0))


def test_density_keeps_the_outlier_out_of_the_first_pick_and_fades_with_labels() -> None:
    method = build_strategy("asfda").select(_pool(0), 1, seed=0)
    dense = build_strategy("asfda", representativeness="density").select(_pool(0), 1, seed=0)
    assert method.ids == ["c9"]  # METHOD.md's rule: the most divergent, most uncertain volume first
    assert dense.ids != ["c9"]
    comps = build_strategy("asfda", representativeness="density").pool_components(_pool(0))[1]
    assert comps["rank_typicality"][9] == pytest.approx(0.1)  # the least typical of ten
    # the weight 0.5 / (1 + labelled): with 3 labelled volumes the score is 7/8 METHOD.md's rank score
    c3 = build_strategy("asfda", representativeness="density").pool_components(_pool(3))[1]
    plain = build_strategy("asfda").pool_components(_pool(3))[1]
    assert np.allclose(c3["rank_score"], 0.875 * plain["rank_score"] + 0.125 * c3["rank_typicality"])


def test_unknown_representativeness_is_refused() -> None:
    with pytest.raises(AsfdaError, match="representativeness"):
        build_strategy("asfda", representativeness="typical")
