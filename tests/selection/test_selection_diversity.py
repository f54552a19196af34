"""The batch pickers of asfda.selection.diversity: rank normalisation, k-center greedy, greedy diverse pick and
k-means++.

Cosine distances between unit vectors at angles a, b are ``1 - cos(a - b)``:
1-cos 20 = 0.060307, 1-cos 70 = 0.657980, 1-cos 80 = 0.826352, 1-cos 89 = 0.982548,
1-cos 90 = 1, 1-cos 160 = 1.939693, 1-cos 179 = 1.999848, 1-cos 180 = 2."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from asfda.selection import greedy_diverse_pick, k_center_greedy, kmeans_pp_pick, rank_normalise


def _circle(*degrees: float) -> np.ndarray:
    """Unit vectors in 2-D at the given angles, ``[N, 2]``."""
    r = np.radians(np.asarray(degrees, dtype=np.float64))
    return np.stack([np.cos(r), np.sin(r)], axis=1)


# ---------------------------------------------------------------------------------------------- rank_normalise
@pytest.mark.parametrize(
    ("values", "expected"),
    [
        ([3.0, 1.0, 2.0], [1.0, 1 / 3, 2 / 3]),  # ranks 3,1,2 over n=3
        ([1.0, 2.0, 2.0, 5.0], [0.25, 0.625, 0.625, 1.0]),  # tie of ranks 2,3 -> 2.5; /4
        ([7.0, 7.0, 7.0], [2 / 3, 2 / 3, 2 / 3]),  # all tied: mean rank 2, /3
        ([0.0, 0.0, 1.0, 1.0], [0.375, 0.375, 0.875, 0.875]),  # ranks (1+2)/2 = 1.5, (3+4)/2 = 3.5; /4
        ([-1.0], [1.0]),  # single value: the largest -> 1
        ([], []),
    ],
)
def test_rank_normalise_hand_values(values: list[float], expected: list[float]) -> None:
    out = rank_normalise(np.asarray(values))
    assert out.shape == (len(values),)
    np.testing.assert_allclose(out, expected, atol=1e-12)


@settings(max_examples=100, deadline=None)
@given(st.lists(st.sampled_from([-2.0, -0.5, 0.0, 0.25, 1.0, 3.0]) | st.floats(-1e6, 1e6), min_size=1, max_size=40))
def test_rank_normalise_equals_scipy_average_ranks(values: list[float]) -> None:
    from scipy.stats import rankdata

    v = np.asarray(values)
    np.testing.assert_allclose(rank_normalise(v), rankdata(v, method="average") / v.size, atol=1e-12)


# -------------------------------------------- rank_normalise: exact values on exact ties and near-ties, where a
# difference in the last bit decides which volume asfda picks (SciPy's rankdata(method="average") / N)
def _unique_ranks(values: np.ndarray) -> np.ndarray:
    """The mean-rank formula asfda used before SciPy: ranks from ``np.unique``'s groups of equal values."""
    values = np.asarray(values, dtype=np.float64).ravel()
    if values.size == 0:
        return values
    _, inverse, counts = np.unique(values, return_inverse=True, return_counts=True)
    return (np.cumsum(counts) - (counts - 1) / 2.0)[inverse] / values.size


UP = np.nextafter(1.0, 2.0)  # the next float above 1.0: a near-tie, not a tie
DOWN = np.nextafter(1.0, 0.0)


@pytest.mark.parametrize(
    ("values", "expected"),
    [
        # exact ties share the mean of their ranks; the near-tie above them gets its own rank
        ([1.0, UP, 1.0, 0.5], [2.5 / 4, 4 / 4, 2.5 / 4, 1 / 4]),
        ([DOWN, 1.0, UP], [1 / 3, 2 / 3, 3 / 3]),
        ([0.3, 0.1 + 0.2, 0.3], [1.5 / 3, 3 / 3, 1.5 / 3]),  # 0.1 + 0.2 is one float above 0.3
        ([2.0, 2.0, 2.0, 2.0, 1.0], [3.5 / 5, 3.5 / 5, 3.5 / 5, 3.5 / 5, 1 / 5]),
        ([0.0, -0.0, 1.0], [1.5 / 3, 1.5 / 3, 3 / 3]),  # -0.0 == 0.0: a tie
        ([np.inf, 1.0, -np.inf], [3 / 3, 2 / 3, 1 / 3]),
        ([np.nan, 1.0, np.nan, np.inf], [3.5 / 4, 1 / 4, 3.5 / 4, 2 / 4]),  # NaNs tie above everything
        ([5.0], [1.0]),
    ],
)
def test_hand_values_are_exact(values: list[float], expected: list[float]) -> None:
    out = rank_normalise(np.asarray(values))
    assert out.dtype == np.float64
    assert out.tolist() == expected  # exact: no tolerance
    assert np.array_equal(out, _unique_ranks(np.asarray(values)))


def test_equals_the_previous_formula_bit_for_bit_on_ties_and_near_ties() -> None:
    rng = np.random.default_rng(0)
    for trial in range(400):
        n = int(rng.integers(1, 50))
        v = rng.normal(size=n)
        if trial % 4 == 1:
            v = rng.integers(0, 4, n).astype(np.float64)  # many exact ties
        elif trial % 4 == 2:
            k = rng.integers(0, n, max(1, n // 2))
            v = np.concatenate([v, np.nextafter(v[k], np.inf), v[k]])  # exact ties and one-ulp near-ties
        elif trial % 4 == 3:
            v = rng.choice([0.0, -0.0, 1.0, UP, DOWN, np.inf, -np.inf, np.nan, 5e-324], n)
        assert np.array_equal(rank_normalise(v), _unique_ranks(v)), v


def test_a_near_tie_decides_the_order_and_an_exact_tie_does_not() -> None:
    near = rank_normalise(np.array([0.7, np.nextafter(0.7, 1.0)]))
    assert near[1] > near[0]
    exact = rank_normalise(np.array([0.7, 0.7]))
    assert exact[0] == exact[1] == 0.75


def test_shapes() -> None:
    assert rank_normalise(np.zeros(0)).shape == (0,)
    assert rank_normalise(np.array([[3.0, 1.0], [2.0, 2.0]])).tolist() == [1.0, 0.25, 0.625, 0.625]


# ---------------------------------------------------------------------------------------------- k-center greedy
def test_k_center_greedy_unit_circle_order() -> None:
    # points at 0, 20, 90, 180, 250 degrees; first pick = index 0 (0 deg)
    # dmin from 0: [-, 0.060, 1, 2, 1.342] -> 180 (idx 3)
    # after 180: 20 -> min(0.060, 1.940) = 0.060; 90 -> 1; 250 -> min(1.342, 0.658) = 0.658 -> 90 (idx 2)
    # after 90: 20 -> 0.060; 250 -> min(0.658, 1-cos160 = 1.940) = 0.658 -> 250 (idx 4), then 20 (idx 1)
    emb = _circle(0, 20, 90, 180, 250)
    assert k_center_greedy(emb, 5, first=0) == [0, 3, 2, 4, 1]
    assert k_center_greedy(emb, 3, first=0) == [0, 3, 2]
    # scale does not matter (cosine)
    assert k_center_greedy(emb * np.array([[1.0], [5.0], [0.1], [3.0], [2.0]]), 5, first=0) == [0, 3, 2, 4, 1]


def test_k_center_greedy_with_anchors_farthest_first() -> None:
    # anchor at 0 deg; pool at 20, 90, 180, 250: dmin [0.060, 1, 2, 1.342] -> 180 (idx 2) first,
    # then 90 (idx 1, dmin 1 vs 250's 0.658), then 250 (idx 3), then 20 (idx 0). `first` is ignored.
    emb = _circle(20, 90, 180, 250)
    anchors = _circle(0)
    assert k_center_greedy(emb, 4, anchors=anchors, first=0) == [2, 1, 3, 0]
    assert k_center_greedy(emb, 1, anchors=anchors, first=3) == [2]


@pytest.mark.parametrize("budget", [0, -1])
def test_k_center_greedy_nonpositive_budget(budget: int) -> None:
    assert k_center_greedy(_circle(0, 90), budget) == []
    assert k_center_greedy(_circle(0, 90), budget, anchors=_circle(45)) == []


def test_k_center_greedy_budget_above_pool_returns_all_unique() -> None:
    picked = k_center_greedy(_circle(0, 90, 180), 10, first=1)
    assert sorted(picked) == [0, 1, 2]


# ---------------------------------------------------------------------------------------------- greedy diverse
def test_greedy_diverse_pick_equal_scores_spreads_over_clusters() -> None:
    # clusters: {0, 5, 10 deg} (idx 0-2), {80, 90 deg} (idx 3-4), {180 deg} (idx 5); all scores 1, no anchors
    # pick 1: nothing to compare against -> factor 1 everywhere -> tie -> lowest index 0 (0 deg), value 1
    # pick 2: distance to 0 deg: 5 -> 0.003805, 10 -> 0.015192, 80 -> 0.826352, 90 -> 1, 180 -> 2 -> idx 5, value 2
    # pick 3: 80 -> min(0.826352, 1-cos 100 = 1.173648) = 0.826352; 90 -> min(1, 1) = 1;
    #         5 -> min(0.003805, 1-cos 175 = 1.996195) = 0.003805 -> idx 4 (90 deg), value 1
    emb = _circle(0, 5, 10, 80, 90, 180)
    picked, values, dists = greedy_diverse_pick(np.ones(6), emb, 3)
    assert picked == [0, 5, 4]
    np.testing.assert_allclose(dists, [1.0, 2.0, 1.0], atol=1e-9)
    np.testing.assert_allclose(values, dists, atol=1e-12)  # score 1 -> value = distance
    clusters = {0: "a", 1: "a", 2: "a", 3: "b", 4: "b", 5: "c"}
    assert {clusters[i] for i in picked} == {"a", "b", "c"}


def test_greedy_diverse_pick_avoids_near_duplicate_of_anchor() -> None:
    # pool: idx0 at 1 deg (score 1.0), idx1 at 90 deg (0.9), idx2 at 180 deg (0.5); anchor at 0 deg
    # with anchor: dmin [0.000152, 1, 2] -> values [0.000152, 0.9, 1.0] -> idx2 (1.0);
    #   then idx1: dmin min(1, 1-cos 90 = 1) = 1 -> 0.9 beats idx0 0.000152 -> [2, 1], dists [2, 1]
    # no anchor: all dmin 1 -> idx0 (1.0); then idx1 0.9*0.982548 = 0.884293, idx2 0.5*1.999848 = 0.999924 -> [0, 2]
    emb = _circle(1, 90, 180)
    scores = np.array([1.0, 0.9, 0.5])
    picked, values, dists = greedy_diverse_pick(scores, emb, 2, anchors=_circle(0))
    assert picked == [2, 1]
    np.testing.assert_allclose(dists, [2.0, 1.0], atol=1e-9)
    np.testing.assert_allclose(values, [1.0, 0.9], atol=1e-9)

    picked, values, dists = greedy_diverse_pick(scores, emb, 2)
    assert picked == [0, 2]
    np.testing.assert_allclose(dists, [1.0, 1.999848], atol=1e-6)
    np.testing.assert_allclose(values, [1.0, 0.999924], atol=1e-6)


@pytest.mark.parametrize("n_anchors", [0, 1, 3])
@pytest.mark.parametrize("seed", [0, 1])
def test_greedy_diverse_pick_min_distances_match_brute_force(n_anchors: int, seed: int) -> None:
    # reference: distance to the nearest of (anchors + earlier picks), recomputed from scratch; with no
    # anchors the first pick has no reference and reports 1.0. Distances above 1 (cos < 0) must survive.
    rng = np.random.default_rng(seed)
    emb = rng.normal(size=(12, 5))
    anchors = rng.normal(size=(n_anchors, 5)) if n_anchors else None
    scores = rng.random(12)
    picked, values, dists = greedy_diverse_pick(scores, emb, 6, anchors=anchors)
    unit = emb / np.linalg.norm(emb, axis=1, keepdims=True)
    unit_a = anchors / np.linalg.norm(anchors, axis=1, keepdims=True) if anchors is not None else np.zeros((0, 5))
    for k, i in enumerate(picked):
        ref = np.vstack([unit_a, unit[picked[:k]]])
        expected = float(np.min(1.0 - ref @ unit[i])) if len(ref) else 1.0
        # the pick maximises score * distance among the points not yet picked
        others = [j for j in range(12) if j not in picked[:k]]
        best = max(scores[j] * (float(np.min(1.0 - ref @ unit[j])) if len(ref) else 1.0) for j in others)
        assert values[k] == pytest.approx(best, abs=1e-9)
        assert dists[k] == pytest.approx(expected, abs=1e-9)
        assert values[k] == pytest.approx(scores[i] * expected, abs=1e-9)
    assert len(set(picked)) == 6


def test_greedy_diverse_pick_budget_above_pool() -> None:
    picked, _, _ = greedy_diverse_pick(np.ones(3), _circle(0, 90, 180), 10)
    assert sorted(picked) == [0, 1, 2]


# ---------------------------------------------------------------------------------------------- k-means++ (BADGE)
def test_kmeans_pp_first_is_largest_norm_then_d2_sampling() -> None:
    # points on a line at 1, 2, 5: first = idx2 (|5| largest, reports 5^2 = 25);
    # squared distances to it: idx0 (1-5)^2 = 16, idx1 (2-5)^2 = 9 -> P(idx0) = 16/25 = 0.64, P(idx1) = 0.36;
    # after idx0: idx1's d2 = min(9, (2-1)^2 = 1) = 1 -> the third pick is idx1 with weight 1;
    # after idx1: idx0's d2 = min(16, 1) = 1 -> the third pick is idx0 with weight 1.
    x = np.array([[1.0, 0.0], [2.0, 0.0], [5.0, 0.0]])
    second = []
    for seed in range(2000):
        picked, d2 = kmeans_pp_pick(x, 3, np.random.default_rng(seed))
        assert picked[0] == 2 and d2[0] == pytest.approx(25.0)
        assert sorted(picked) == [0, 1, 2]
        assert d2[1] == pytest.approx({0: 16.0, 1: 9.0}[picked[1]])
        assert d2[2] == pytest.approx(1.0)
        second.append(picked[1])
    # binomial(2000, 0.64): sd = sqrt(0.64 * 0.36 / 2000) = 0.0107; allow ~4 sd
    assert np.mean(np.asarray(second) == 0) == pytest.approx(0.64, abs=0.045)


def test_kmeans_pp_seeded_distinct_and_budget() -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(50, 6))
    a = kmeans_pp_pick(x, 7, np.random.default_rng(3))
    b = kmeans_pp_pick(x, 7, np.random.default_rng(3))
    assert a == b  # same seed, same picks
    assert len(a[0]) == 7 and len(set(a[0])) == 7
    assert kmeans_pp_pick(x, 0, np.random.default_rng(0)) == ([], [])
    assert sorted(kmeans_pp_pick(x[:4], 10, np.random.default_rng(0))[0]) == [0, 1, 2, 3]


def test_kmeans_pp_duplicates_and_zero_vectors_stay_distinct() -> None:
    # idx0 and idx2 are identical, idx1 and idx3 are zero: after idx0 (largest norm, lowest index on the tie
    # with idx2) every squared distance but idx1's / idx3's is 0 -> idx1 or idx3 (equal weight 1);
    # then only zeros remain -> uniform over the unpicked, never a repeat
    x = np.array([[1.0, 0.0], [0.0, 0.0], [1.0, 0.0], [0.0, 0.0]])
    for seed in range(20):
        picked, d2 = kmeans_pp_pick(x, 4, np.random.default_rng(seed))
        assert picked[0] == 0 and picked[1] in (1, 3)
        assert d2[:2] == [1.0, 1.0] and d2[2:] == [0.0, 0.0]
        assert sorted(picked) == [0, 1, 2, 3]
    picked, _ = kmeans_pp_pick(np.zeros((5, 3)), 5, np.random.default_rng(1))
    assert sorted(picked) == [0, 1, 2, 3, 4]
