"""benchmarks/guard.py's layout columns on hand-made label maps: organ centroids, and how far a prediction's organ
offsets from the first organ stray from the labelled volume's."""

from __future__ import annotations

import numpy as np

from guard import layout_deviation, organ_centroids


def _two_organs(second_z: int) -> np.ndarray:
    m = np.zeros((10, 10, 10), dtype=np.int64)
    m[1:3, 1:3, 1:3] = 1
    m[6:8, 6:8, second_z:second_z + 2] = 2
    return m


def test_organ_centroids_are_voxel_means_with_nan_for_absent_classes() -> None:
    c = organ_centroids(_two_organs(6), 4)
    assert np.allclose(c[:2], [[1.5, 1.5, 1.5], [6.5, 6.5, 6.5]])
    assert np.isnan(c[2]).all()


def test_layout_deviation_measures_a_displaced_organ_and_ignores_a_shifted_volume() -> None:
    label = [organ_centroids(_two_organs(6), 3)]
    assert layout_deviation([organ_centroids(_two_organs(6), 3)], label) == 0.0
    assert layout_deviation([organ_centroids(_two_organs(2), 3)], label) == 4.0  # organ 2 moved 4 voxels in z
    shifted = np.roll(_two_organs(6), 1, axis=0)  # the whole body 1 voxel along x: offsets unchanged
    assert layout_deviation([organ_centroids(shifted, 3)], label) == 0.0
    missing = _two_organs(6)
    missing[missing == 2] = 0
    assert np.isnan(layout_deviation([organ_centroids(missing, 3)], label))
