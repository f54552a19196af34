"""asfda's representativeness term (TypiClust typicality, weighted down as labels accrue) on hand-made pools."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from asfda.errors import AsfdaError
from asfda.selection import PoolScores, build_strategy, typicality
from asfda.selection.diversity import greedy_diverse_pick, least_typical, median_neighbour_distance
from asfda.selection.strategies import ASFDAStrategy


def _asfda(**settings: Any) -> ASFDAStrategy:
    strategy = build_strategy("asfda", **settings)
    assert isinstance(strategy, ASFDAStrategy)
    return strategy


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
    method = build_strategy("asfda", representativeness="none").select(_pool(0), 1, seed=0)
    dense = build_strategy("asfda", representativeness="density").select(_pool(0), 1, seed=0)
    assert method.ids == ["c9"]  # METHOD.md's rule: the most divergent, most uncertain volume first
    assert dense.ids != ["c9"]
    comps = _asfda(representativeness="density").pool_components(_pool(0))[1]
    assert comps["rank_typicality"][9] == pytest.approx(0.1)  # the least typical of ten
    # the weight 0.5 / (1 + labelled): with 3 labelled volumes the score is 7/8 METHOD.md's rank score
    c3 = _asfda(representativeness="density").pool_components(_pool(3))[1]
    plain = _asfda(representativeness="none").pool_components(_pool(3))[1]
    assert np.allclose(c3["rank_score"], 0.875 * plain["rank_score"] + 0.125 * c3["rank_typicality"])


def test_unknown_representativeness_is_refused() -> None:
    with pytest.raises(AsfdaError, match="representativeness"):
        build_strategy("asfda", representativeness="typicality")


def test_least_typical_counts_and_keeps_at_least_one() -> None:
    typ = np.array([5.0, 1.0, 3.0, 0.5, 4.0])
    assert least_typical(typ, 0.4).tolist() == [False, True, False, True, False]  # floor(0.4 * 5) = 2
    assert least_typical(typ, 0.1).sum() == 0  # floor(0.5) = 0
    assert least_typical(typ, 1.0, keep=1).sum() == 4
    assert least_typical(np.zeros(0), 0.5).size == 0


def test_median_neighbour_distance_by_hand() -> None:
    x = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [-1.0, 0.0]])
    # nearest others: row 0 -> row 2 (1 - 1/sqrt 2), row 1 -> row 2 (same), row 2 -> rows 0/1 (same), row 3 -> row 1 (1)
    assert median_neighbour_distance(x) == pytest.approx(1 - 1 / np.sqrt(2))
    assert median_neighbour_distance(x[:1]) == 0.0


def test_distance_cap_stops_the_pick_seeking_an_outlier() -> None:
    emb = np.array([[1.0, 0.0], [0.8, 0.6], [0.6, 0.8], [-1.0, 0.05]])
    scores = np.array([1.0, 0.9, 0.9, 0.5])
    # uncapped: after c0 the outlier's distance (about 2) beats the nearer, better-scored volumes
    assert greedy_diverse_pick(scores, emb, 2)[0] == [0, 3]
    # capped at 0.3: distances to c0 are c1 0.2, c2 0.4 -> 0.3, outlier 2 -> 0.3;
    # 0.9 x 0.3 beats 0.9 x 0.2 and 0.5 x 0.3
    assert greedy_diverse_pick(scores, emb, 2, distance_cap=0.3)[0] == [0, 2]


def _pool_with_outlier_group(n_labelled: int = 0) -> PoolScores:
    """Twelve volumes in one cluster and a small, distant group of two (indices 12, 13) with the largest ASD."""
    rng = np.random.default_rng(1)
    emb = np.vstack([np.array([1.0, 0.2, 0.1]) + rng.normal(0, 0.05, (12, 3)),
                     np.array([0.1, 1.0, -0.5]) + rng.normal(0, 0.02, (2, 3))])
    asd = np.r_[np.linspace(0.2, 0.6, 12), 0.95, 0.9]
    lab = emb[:n_labelled] + 0.01
    return PoolScores([f"c{i}" for i in range(14)], {"asd": asd}, emb, labelled_embeddings=lab.reshape(-1, 3),
                      round_index=int(n_labelled > 0))


def test_typical_keeps_an_atypical_group_out_of_the_first_batch() -> None:
    group = {"c12", "c13"}
    for budget in (1, 2, 4):
        method = build_strategy("asfda", representativeness="none").select(_pool_with_outlier_group(), budget, seed=0)
        typical = build_strategy("asfda", representativeness="typical").select(_pool_with_outlier_group(), budget, 0)
        assert group & set(method.ids)  # METHOD.md's rule takes the group (first, by its scores and distance)
        assert not group & set(typical.ids), budget
        assert len(typical.ids) == budget
    # the left-out share shrinks as labels accrue: 0.2 of 14 -> 2 volumes at round 0, floor(1.4) = 1 with one label
    comps0 = _asfda(representativeness="typical").pool_components(_pool_with_outlier_group())[1]
    comps1 = _asfda(representativeness="typical").pool_components(_pool_with_outlier_group(1))[1]
    assert comps0["outlier"].sum() == 2 and comps1["outlier"].sum() == 1
    assert set(np.flatnonzero(comps0["outlier"])) == {12, 13}


# ------------------------------------------------------------------------------------------- complete anatomy
def test_anatomy_completeness_hand_values() -> None:
    from asfda.selection.diversity import anatomy_completeness

    # [N, organs, (voxels, cut)]: pool medians 100 and 10
    ext = np.array([[[100, 0], [10, 0]],    # every organ whole and of median size: 1
                    [[200, 0], [10, 0]],    # organ 1 twice the median: 0.5
                    [[100, 0], [5, 0]],     # organ 2 half the median: 0.5
                    [[100, 1], [10, 0]],    # organ 1 reaches an end slice: 0
                    [[100, 0], [0, 0]],     # organ 2 predicted nowhere: 0
                    [[50, 0], [40, 0]]],    # the worse organ counts: min(0.5, 0.25)
                   dtype=np.float64)
    assert anatomy_completeness(ext).tolist() == pytest.approx([1.0, 0.5, 0.5, 0.0, 0.0, 0.25])
    with pytest.raises(ValueError, match="organs, 2"):
        anatomy_completeness(ext[..., 0])


def _pool_with_extent(n_labelled: int) -> PoolScores:
    """`_pool` (the outlier c9 is METHOD.md's first pick) with organ extents: organ 1 at 100 voxels in c4 and c9 (the
    pool's median), 80 or 125 elsewhere; organ 2 at 10 everywhere, cut by the field of view in c9. So c4 is the one
    whole, median-sized anatomy (completeness 1), c9 the cut one (0)."""
    pool = _pool(n_labelled)
    ext = np.array([[[80.0 if i % 2 else 125.0, 0], [10, 0]] for i in range(10)], dtype=np.float64)
    ext[4, 0, 0] = ext[9, 0, 0] = 100.0
    ext[9, 1, 1] = 1.0
    pool.vectors = {"extent": ext}
    return pool


def test_complete_first_pick_is_the_most_complete_anatomy_then_density() -> None:
    strategy = _asfda(representativeness="complete")
    assert "extent" in strategy.needs.vectors and "extent" not in _asfda(representativeness="density").needs.vectors
    pool = _pool_with_extent(0)
    comps = strategy.pool_components(pool)[1]
    assert comps["completeness"][4] == 1.0 and comps["completeness"][9] == 0.0
    assert strategy.select(pool, 1, seed=0).ids == ["c4"]
    # METHOD.md's rule: the cut outlier
    assert build_strategy("asfda", representativeness="none").select(pool, 1, seed=0).ids == ["c9"]
    # once labels exist it is `density`: the same scores and picks
    later = _pool_with_extent(3)
    dense = _asfda(representativeness="density")
    assert np.allclose(strategy.pool_components(later)[1]["rank_score"], dense.pool_components(later)[1]["rank_score"])
    assert strategy.select(later, 2, seed=1).ids == dense.select(later, 2, seed=1).ids


def test_coverage_first_pick_is_complete_then_the_k_center_pick() -> None:
    from asfda.selection.diversity import k_center_pick

    strategy = _asfda(representativeness="coverage")
    assert "extent" in strategy.needs.vectors
    first = _pool_with_extent(0)
    assert strategy.select(first, 1, seed=0).ids == _asfda(representativeness="complete").select(first, 1, seed=0).ids
    # with labels: each pick the volume farthest from the labelled ones and the picks so far, whatever its ASD
    later = _pool_with_extent(3)
    expected, _ = k_center_pick(np.asarray(later.embeddings), 3, later.labelled_embeddings)
    query = strategy.select(later, 3, seed=4)
    assert query.ids == [later.ids[i] for i in expected]
    assert query.ids[0] == "c9"  # the outlier is farthest from the three labelled cluster volumes
    # the picks read the diversity space only: reversing the ASD changes `complete`'s picks, not coverage's
    flipped = _pool_with_extent(3)
    flipped.metrics = {"asd": np.asarray(later.metrics["asd"])[::-1].copy()}
    assert strategy.select(flipped, 3, seed=4).ids == query.ids
    complete = _asfda(representativeness="complete")
    assert complete.select(flipped, 3, seed=4).ids != complete.select(later, 3, seed=4).ids


def test_batch_diversity_ignores_the_labelled_anchors_and_keeps_the_batch_diverse() -> None:
    """``diversity: batch``: with a budget of 1 the pick is the top of the rank score, as with ``none`` (the labelled
    volumes do not pull the pick to the outlier, as the embedding's distance factor does); in a batch of 2 the second
    pick is not a near-duplicate of the first, as it is with ``none``."""
    later = _pool(3)
    ids = later.ids
    batch, none, embedding = (_asfda(diversity=d, representativeness="density") for d in ("batch", "none", "embedding"))
    assert batch.select(later, 1, seed=2).ids == none.select(later, 1, seed=2).ids
    assert embedding.select(later, 1, seed=2).ids == ["c9"]  # farthest from the three labelled cluster volumes
    # the rank scores are the same whatever the anchors of the pick: the typicality still counts the labelled volumes
    assert np.allclose(batch.pool_components(later)[1]["rank_score"], none.pool_components(later)[1]["rank_score"])
    # two near-identical top volumes: none takes both, batch the top one and a volume farther away
    dup = _pool(3)
    emb = np.asarray(dup.embeddings).copy()
    top = int(np.argmax(none.pool_components(dup)[1]["rank_score"]))
    second = int(np.argsort(-none.pool_components(dup)[1]["rank_score"])[1])
    emb[second] = emb[top] * (1 + 1e-9)
    dup.embeddings = emb
    assert none.select(dup, 2, seed=0).ids == [ids[top], ids[second]]
    picked = batch.select(dup, 2, seed=0).ids
    assert picked[0] == ids[top] and picked[1] != ids[second]


def _pool_with_composition(n_labelled: int) -> PoolScores:
    """`_pool_with_extent` with an organ composition in which c2 and c6 (ordinary in the embedding space) are the odd
    ones: most of the pool is organ-1 heavy, c2 and c6 organ-2 heavy; the labelled volumes are organ-1 heavy too."""
    pool = _pool_with_extent(n_labelled)
    comp = np.array([[0.8 + 0.01 * i, 0.2] for i in range(10)])
    comp[2] = comp[6] = [0.1, 0.9]
    pool.vectors["anatomy"] = comp
    pool.labelled_vectors = {"anatomy": np.tile([0.85, 0.2], (n_labelled, 1))} if n_labelled else {}
    return pool


def test_trimmed_first_pick_is_complete_then_the_rank_score_off_the_atypical_anatomy() -> None:
    """``trimmed``: ``complete``'s first query; once labels exist ``complete``'s rank score, with the 20% of the pool
    least typical in its predicted organ composition no candidates at every query (``typical``'s share, in the
    diversity space, shrinks as labels come: 1/(1 + labelled))."""
    strategy = _asfda(representativeness="trimmed", diversity="batch")
    assert {"extent", "anatomy"} <= strategy.needs.vectors
    assert "anatomy" not in _asfda(representativeness="complete").needs.vectors
    first = _pool_with_composition(0)
    assert strategy.select(first, 1, seed=0).ids == _asfda(representativeness="complete").select(first, 1, seed=0).ids
    later = _pool_with_composition(3)
    comps = strategy.pool_components(later)[1]
    complete = _asfda(representativeness="complete", diversity="batch")
    assert np.allclose(comps["rank_score"], complete.pool_components(later)[1]["rank_score"])
    # floor(0.2 * 10) = 2 volumes, whatever the labels: the two organ-2 heavy ones
    assert np.flatnonzero(comps["outlier"]).tolist() == [2, 6]
    assert comps["anatomy_typicality"][[2, 6]].max() < np.delete(comps["anatomy_typicality"], [2, 6]).min()
    assert _asfda(representativeness="typical").pool_components(later)[1]["outlier"].sum() == 0  # floor(0.05 * 10)
    # c2 and c6 given the top rank scores: complete takes them, trimmed the top of the others, in the same order
    top = np.isin(np.arange(10), [2, 6])
    later.metrics = {"asd": np.where(top, 5.0, np.asarray(later.metrics["asd"])), "kd": np.where(top, 9.0, 1.0)}
    comps = strategy.pool_components(later)[1]
    assert complete.select(later, 1, seed=0).ids[0] in {"c2", "c6"}
    assert set(_asfda(representativeness="complete", diversity="none").select(later, 2, seed=0).ids) == {"c2", "c6"}
    order = [i for i in np.argsort(-comps["rank_score"], kind="stable") if i not in (2, 6)]
    assert strategy.select(later, 1, seed=0).ids == [later.ids[order[0]]]
    none = _asfda(representativeness="trimmed", diversity="none").select(later, 3, seed=0)
    assert none.ids == [later.ids[i] for i in order[:3]]
    # nor does the greedy embedding pick take them
    assert not {"c2", "c6"} & set(_asfda(representativeness="trimmed").select(later, 3, seed=0).ids)
    # a pool scored without the composition (not with the strategy's needs) is refused by name, not a KeyError
    bare = _pool_with_extent(3)
    with pytest.raises(ValueError, match=r"needs \['vector anatomy'\].*score the pool with needs=strategy.needs"):
        strategy.select(bare, 1, seed=0)
