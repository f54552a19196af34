"""Evaluation on hand-made label maps with hand-computed values."""

from __future__ import annotations

import numpy as np

from asfda.evaluation import largest_component_per_class


def test_largest_component_keeps_each_class_biggest_piece() -> None:
    label = np.zeros((10, 10, 4), np.uint8)
    label[0:4, 0:4, 0:2] = 1   # 32 voxels
    label[7:9, 7:9, 0:1] = 1   # 4 voxels, apart: removed
    label[0:2, 7:9, 2:4] = 2   # 8 voxels
    label[5, 5, 3] = 2         # 1 voxel: removed
    label[9, 0, 0] = 3         # a single piece stays
    out = largest_component_per_class(label, (1, 2, 3))
    assert (out == 1).sum() == 32 and (out == 2).sum() == 8 and (out == 3).sum() == 1
    assert out[8, 8, 0] == 0 and out[5, 5, 3] == 0
    # a class left out of ``classes`` keeps every piece; diagonal neighbours are one piece (26-connectivity)
    assert (largest_component_per_class(label, (2,)) == 1).sum() == 36
    diag = np.zeros((3, 3, 3), np.uint8)
    diag[0, 0, 0] = diag[1, 1, 1] = 1
    assert (largest_component_per_class(diag, (1,)) == 1).sum() == 2
