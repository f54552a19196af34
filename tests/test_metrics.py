"""The one Dice (asfda.metrics) and its empty-label rule; the callers that use it; the largest component."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from asfda.annotation import edit_summary
from asfda.evaluation import compute_dice
from asfda.metrics import dice_per_class, largest_component_fractions, mean_dice, mean_ignoring_nan
from asfda.stopping import label_agreement


def test_dice_per_class_by_hand_with_the_empty_label_rule() -> None:
    ref = np.zeros((4, 4, 2), np.int64)
    pred = np.zeros((4, 4, 2), np.int64)
    ref[0:2, 0:2, :] = 6       # 8 voxels of value 6 (label values need not be contiguous)
    pred[0:2, 0:2, 0] = 6      # 4 of them predicted: 2 * 4 / 12
    ref[3, 3, :] = 2           # value 2 in the reference only: 0
    pred[3, 0, 0] = 3          # value 3 predicted only: 0
    d = dice_per_class(pred, ref, [6, 2, 3, 4])  # value 4 in neither: NaN
    assert d.dtype == np.float64 and d[:3].tolist() == [2 * 4 / 12, 0.0, 0.0] and math.isnan(d[3])
    assert np.array_equal(d, dice_per_class(ref, pred, [6, 2, 3, 4]), equal_nan=True)  # symmetric
    assert np.array_equal(d, dice_per_class(torch.from_numpy(pred), torch.from_numpy(ref), [6, 2, 3, 4]),
                          equal_nan=True)
    assert mean_ignoring_nan(d) == pytest.approx(2 * 4 / 12 / 3)  # NaN left out, zeros kept
    assert math.isnan(mean_ignoring_nan([math.nan])) and math.isnan(mean_ignoring_nan([]))
    with pytest.raises(ValueError, match="shape"):
        dice_per_class(pred, ref[:2], [1])


def test_mean_dice_is_nan_without_foreground_in_either_map() -> None:
    blank = np.zeros((3, 3, 3), np.uint8)
    one = blank.copy()
    one[1, 1, 1] = 1
    assert math.isnan(mean_dice(blank, blank, 3))   # no evidence either way
    assert mean_dice(one, blank, 3) == 0.0          # an organ in one map only counts against the pair
    assert mean_dice(one, one, 3) == 1.0
    with pytest.raises(ValueError, match="n_classes"):
        mean_dice(one, one, 1)


def test_the_rule_against_monai_dice_metric() -> None:
    """MONAI's DiceMetric as the independent reference: equal wherever the reference has the class; where it lacks
    it, ours is 0 for a predicted class (MONAI ignore_empty=False; its default ignore_empty=True says NaN) and NaN
    when neither has it (ignore_empty=False says 1)."""
    from monai.metrics import compute_dice as monai_dice
    from monai.networks.utils import one_hot

    rng = np.random.default_rng(0)
    pred = rng.integers(0, 4, (12, 10, 8))
    ref = rng.integers(0, 3, (12, 10, 8))      # class 3 predicted only
    ref[ref == 2] = 1
    pred[pred == 2] = 1                        # class 2 in neither
    ours = dice_per_class(pred, ref, range(1, 4))

    def monai(ignore_empty: bool) -> np.ndarray:
        p, g = (one_hot(torch.from_numpy(x)[None, None], 4) for x in (pred, ref))
        return monai_dice(p, g, include_background=False, ignore_empty=ignore_empty)[0].double().numpy()

    assert ours[0] == pytest.approx(monai(True)[0], rel=1e-6) and 0 < ours[0] < 1
    assert math.isnan(ours[1]) and math.isnan(monai(True)[1]) and monai(False)[1] == 1.0
    assert ours[2] == 0.0 and monai(False)[2] == 0.0 and math.isnan(monai(True)[2])


def test_evaluation_ingest_and_stop_probe_use_the_one_dice() -> None:
    """The three places that measure overlap give the one Dice's numbers, empty classes included."""
    rng = np.random.default_rng(1)
    a = rng.integers(0, 3, (8, 8, 4))
    b = np.where(rng.random(a.shape) < 0.3, rng.integers(0, 3, a.shape), a)  # value 3 in neither
    per_class = dice_per_class(a, b, range(1, 4))
    assert math.isnan(per_class[2]) and not np.isnan(per_class[:2]).any()
    assert np.array_equal(compute_dice(torch.from_numpy(a), torch.from_numpy(b), 4).numpy(), per_class,
                          equal_nan=True)
    edit = edit_summary(a, b, {"background": 0, "liver": 1, "spleen": 2, "kidney": 3})
    assert [edit[f"edit_dice_{n}"] for n in ("liver", "spleen")] == per_class[:2].tolist()
    assert math.isnan(edit["edit_dice_kidney"]) and edit["edit_dice_mean"] == mean_ignoring_nan(per_class)
    assert label_agreement(a, b, 4) == mean_ignoring_nan(per_class)
    blank = np.zeros_like(a)
    assert math.isnan(edit_summary(blank, blank, {"background": 0, "liver": 1})["edit_dice_mean"])
    assert math.isnan(label_agreement(blank, blank, 4))  # the same rule in the stop probe (it said 1.0 before)


def test_largest_component_fractions_by_hand() -> None:
    lab = np.zeros((10, 10, 10), dtype=np.int64)
    lab[0:2, 0:2, 0:2] = 1  # 8 voxels
    lab[6:8, 6:7, 6:7] = 1  # 2 voxels, apart: class 1 is 8 / 10 in its largest component
    lab[4, 4, 4] = 2
    lab[5, 5, 5] = 2  # touches (4,4,4) only by a corner: one 26-connected component
    # class 3 absent -> 0
    assert largest_component_fractions(lab, 4) == pytest.approx([0.8, 1.0, 0.0])
    assert largest_component_fractions(torch.from_numpy(lab), 4) == pytest.approx([0.8, 1.0, 0.0])
    with pytest.raises(ValueError, match="3D"):
        largest_component_fractions(np.zeros((4, 4)), 3)
