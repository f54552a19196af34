"""`rank_normalise` (SciPy's ``rankdata(method="average") / N``): exact values on exact ties and near-ties, where a
difference in the last bit decides which volume asfda picks."""

from __future__ import annotations

import numpy as np
import pytest

from asfda.selection import rank_normalise


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
