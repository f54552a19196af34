"""benchmarks/anatomy_features.py on hand-made logits: each organ's largest component, its touching the first or
last slice, and the pool-relative columns."""

from __future__ import annotations

import pytest
import torch

from anatomy_features import pool_columns, volume_features

NAMES = ["background", "liver", "kidney"]


def _logits(label: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.one_hot(label.long(), 3).permute(3, 0, 1, 2).float() * 10.0


def test_volume_features_read_the_largest_component_of_each_organ() -> None:
    label = torch.zeros(6, 6, 8, dtype=torch.long)
    label[1:3, 1:3, 2:5] = 1  # liver, 12 voxels, inside the slices
    label[5, 5, 7] = 1  # a stray liver voxel on the last slice: not the largest component
    label[4:6, 0:2, 0:2] = 2  # kidney, 8 voxels, from the first slice
    f = volume_features(_logits(label), NAMES)
    assert f["voxels_liver"] == 12 and f["z_edge_liver"] == 0.0
    assert f["voxels_kidney"] == 8 and f["z_edge_kidney"] == 1.0
    assert f["confidence_liver"] == pytest.approx(1.0, abs=1e-3)


def test_pool_columns_are_relative_to_the_pools_median() -> None:
    raw = {v: {"voxels_liver": lv, "voxels_kidney": kv, "z_edge_liver": 0.0, "z_edge_kidney": ke,
               "confidence_liver": 0.9, "confidence_kidney": 0.7}
           for v, lv, kv, ke in (("a", 10.0, 4.0, 0.0), ("b", 20.0, 2.0, 1.0), ("c", 30.0, 1.0, 0.0))}
    cols = pool_columns(raw, NAMES)
    assert cols["a"]["ratio_liver"] == pytest.approx(0.5) and cols["a"]["ratio_kidney"] == pytest.approx(2.0)
    assert cols["a"]["min_ratio"] == pytest.approx(0.5) and cols["a"]["complete"] == pytest.approx(0.5)
    assert cols["b"]["z_edges"] == 1 and cols["b"]["no_z_edge"] == 0.0 and cols["b"]["complete"] == 0.0
    assert cols["c"]["complete"] == pytest.approx(0.5)  # kidney at half the median
    assert cols["a"]["mean_confidence"] == pytest.approx(0.8)
