"""When to stop (asfda.stopping): the label-free signals and the estimate, on hand-made inputs."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from asfda import stopping
from asfda.stopping import (
    CONTINUE,
    GAIN_PER_CHANGE,
    NO_ESTIMATE,
    STOP,
    STOP_BELOW,
    ProbeOutput,
    class_fractions,
    curve_points,
    estimate_error,
    estimate_next_gain,
    estimate_rows,
    label_agreement,
    probe_ids,
    probe_output,
    probe_record,
    relative_change,
)


def test_label_agreement_by_hand() -> None:
    a = np.zeros((4, 4, 2), np.uint8)
    a[0:2, 0:2, :] = 1          # 8 voxels of class 1
    b = a.copy()
    b[0, 0, :] = 0              # 6 of them left
    b[3, 3, 0] = 2              # class 2 in b only
    assert label_agreement(a, b, 3) == pytest.approx((2 * 6 / 14 + 0.0) / 2)
    assert label_agreement(a, a, 3) == 1.0
    assert math.isnan(label_agreement(np.zeros((2, 2, 2)), np.zeros((2, 2, 2)), 3))  # no foreground in either
    assert label_agreement(torch.from_numpy(a), torch.from_numpy(a), 2) == 1.0
    with pytest.raises(ValueError, match="shape"):
        label_agreement(a, a[:2], 3)
    with pytest.raises(ValueError, match="n_classes"):
        label_agreement(a, a, 1)


def test_class_fractions_and_probe_output() -> None:
    lab = np.zeros((2, 2, 2), np.uint8)
    lab[0, 0, 0] = 1
    lab[1, 1, :] = 2
    assert class_fractions(lab, 3) == [1 / 8, 2 / 8]
    logits = torch.zeros(3, 2, 2, 2)
    logits[1, 0, 0, 0] = 10.0
    out = probe_output(logits)
    assert out.label_map.dtype == np.uint8 and out.label_map[0, 0, 0] == 1 and out.label_map.sum() == 1
    assert 0.0 < out.entropy <= 1.0  # mostly uniform voxels: high normalised entropy
    with pytest.raises(ValueError, match="logits"):
        probe_output(torch.zeros(2, 2, 2))


def test_probe_ids_are_seeded_order_free_and_replace_a_labelled_one() -> None:
    ids = [f"c{i}" for i in range(10)]
    first = probe_ids(ids, 4, 0)
    assert first == probe_ids(list(reversed(ids)), 4, 0) and len(first) == 4
    assert probe_ids(ids[:3], 4, 0) == ids[:3] and probe_ids(ids, 0, 0) == []
    later = probe_ids(ids, 4, 0, exclude=[first[0]])  # one probe volume labelled: the other three stay
    assert len(later) == 4 and set(first[1:]) <= set(later) and first[0] not in later


def test_relative_change_and_probe_record() -> None:
    assert relative_change({"a": 0.2, "b": 0.4}, {"a": 0.1, "b": 0.2, "c": 9.0}) == pytest.approx(0.5)
    assert relative_change({"a": 0.2}, {"b": 0.1}) is None
    assert relative_change({"a": 0.0}, {"a": 0.1}) is None
    m = np.zeros((2, 2, 2), np.uint8)
    m[0] = 1
    half = m.copy()
    half[0, 0] = 0  # 2 of the 4 class-1 voxels left
    before = {"x": ProbeOutput(m, 0.4), "y": ProbeOutput(m, 0.2), "z": ProbeOutput(m, 0.3)}
    after = {"x": ProbeOutput(m, 0.2), "y": ProbeOutput(half, 0.1), "z": ProbeOutput(half, 0.3)}
    rec = probe_record(before, after, 2, exclude=["z"])  # z was labelled in the round: left out
    assert rec["cases"] == ["x", "y"]
    assert rec["agreement_per_case"] == {"x": 1.0, "y": pytest.approx(2 * 2 / 6)}
    assert rec["change"] == pytest.approx(1 - (1 + 4 / 6) / 2)
    assert rec["entropy_change"] == pytest.approx(0.5)
    assert rec["fractions"]["y"] == [2 / 8]
    empty = probe_record(before, after, 2, exclude=["x", "y", "z"])
    assert empty["change"] is None and empty["cases"] == []


def test_probe_record_leaves_out_a_volume_without_foreground_in_either_model() -> None:
    """The one Dice's empty-label rule (asfda.metrics): two maps without foreground have no agreement (NaN), so such a
    volume does not count as "unchanged"; a probe of only such volumes measures no change (an estimate without it)."""
    m = np.zeros((2, 2, 2), np.uint8)
    m[0] = 1
    half = m.copy()
    half[0, 0] = 0
    blank = np.zeros_like(m)
    before = {"x": ProbeOutput(m, 0.4), "w": ProbeOutput(blank, 0.5)}
    after = {"x": ProbeOutput(half, 0.2), "w": ProbeOutput(blank, 0.5)}
    rec = probe_record(before, after, 2)
    assert rec["cases"] == ["w", "x"] and math.isnan(rec["agreement_per_case"]["w"])
    assert rec["agreement"] == pytest.approx(4 / 6) and rec["change"] == pytest.approx(1 - 4 / 6)
    only_blank = probe_record(before, after, 2, exclude=["x"])
    assert only_blank["cases"] == ["w"] and only_blank["agreement"] is None and only_blank["change"] is None
    est = stopping.estimate_from_records([{"probe": only_blank}])
    assert est.recommendation == NO_ESTIMATE and est.change is None


def test_curve_points_mean_and_standard_error() -> None:
    pts = curve_points({1: [0.7, 0.9], 0: [0.5], 2: [float("nan")]})
    assert [p["round"] for p in pts] == [0, 1]  # a round without a finite value has no point
    assert pts[1]["mean"] == pytest.approx(0.8) and pts[1]["se"] == pytest.approx(np.std([0.7, 0.9], ddof=1) / 2 ** 0.5)
    assert math.isnan(pts[0]["se"]) and pts[0]["n"] == 1


def _r(change, discarded=False):
    return {"change": change, "entropy_change": 0.1, "discarded": discarded}


def test_estimate_no_round_no_measure_and_all_discarded() -> None:
    assert estimate_next_gain([]).recommendation == NO_ESTIMATE
    est = estimate_next_gain([_r(0.3, discarded=True)])
    assert est.recommendation == NO_ESTIMATE and "discarded" in est.reason and est.after_round == 0
    assert estimate_next_gain([_r(None)]).predicted_gain is None


def test_estimate_is_a_fixed_fraction_of_the_last_change_and_says_stop_below_the_threshold() -> None:
    est = estimate_next_gain([_r(0.4)])
    assert est.predicted_gain == pytest.approx(0.4 * GAIN_PER_CHANGE) and est.recommendation == CONTINUE
    assert est.change_before is None and "40.0%" in est.reason
    est = estimate_next_gain([_r(0.4), _r(0.05)])
    assert est.predicted_gain == pytest.approx(0.05 * GAIN_PER_CHANGE) and est.change_before == pytest.approx(0.4)
    assert est.predicted_gain is not None and est.predicted_gain < STOP_BELOW
    assert est.recommendation == STOP and "consider stopping" in est.message()
    assert "round 0 40.0%" in est.reason  # the trend, beside it
    assert estimate_next_gain([_r(0.4), _r(0.05)], threshold=0.0).recommendation == CONTINUE
    assert estimate_next_gain([_r(0.4)], gain_per_change=0.5).predicted_gain == pytest.approx(0.2)
    with pytest.raises(ValueError, match="threshold"):
        estimate_next_gain([_r(0.4)], threshold=-1)
    with pytest.raises(ValueError, match="gain_per_change"):
        estimate_next_gain([_r(0.4)], gain_per_change=float("nan"))


def test_a_discarded_round_is_skipped_and_named() -> None:
    est = estimate_next_gain([_r(0.4), _r(0.2), _r(0.0, discarded=True)])
    assert est.after_round == 2 and est.change == pytest.approx(0.2) and est.change_before == pytest.approx(0.4)
    assert "round 2 was discarded" in est.reason


def test_the_curve_gain_is_shown_with_its_standard_error() -> None:
    curve = curve_points({0: [0.4, 0.5], 1: [0.7, 0.8]})
    est = estimate_next_gain([_r(0.4), _r(0.1)], curve)
    assert est.curve_gain == pytest.approx(0.3)
    assert est.curve_gain_se == pytest.approx(math.sqrt(2) * np.std([0.4, 0.5], ddof=1) / 2 ** 0.5)
    assert "+0.300 ±" in est.message()
    assert estimate_next_gain([_r(0.4)], curve[:1]).curve_gain is None


def test_estimate_rows_pair_each_estimate_with_the_true_next_gain_and_never_read_test_dice() -> None:
    recs = [{"round": 0, "n_labelled": 1, "dice_mean": 0.5, "probe": {"change": 0.4}, "guard": None,
             "queried_dice_before": {"a": 0.2}},
            {"round": 1, "n_labelled": 2, "dice_mean": 0.7, "probe": {"change": 0.1},
             "queried_dice_before": {"b": 0.6}},
            {"round": 2, "n_labelled": 3, "dice_mean": 0.72, "probe": {"change": 0.02}}]
    rows = estimate_rows(recs)
    assert [r["true_next_gain"] for r in rows] == [pytest.approx(0.2), pytest.approx(0.02), None]
    assert rows[0]["predicted_next_gain"] == pytest.approx(0.4 * GAIN_PER_CHANGE)
    assert rows[1]["curve_gain"] == pytest.approx(0.4)
    # the same estimates with other test Dice: the estimate does not read it
    other = [{**r, "dice_mean": 0.0} for r in recs]
    assert [r["predicted_next_gain"] for r in estimate_rows(other)] == [r["predicted_next_gain"] for r in rows]
    err = estimate_error(rows)
    assert err["n"] == 2 and err["mae_of_zero"] == pytest.approx((0.2 + 0.02) / 2)
    assert err["mae"] == pytest.approx((abs(0.4 * GAIN_PER_CHANGE - 0.2) + abs(0.1 * GAIN_PER_CHANGE - 0.02)) / 2)
    assert estimate_error([])["n"] == 0


def test_estimate_from_records_reads_probe_and_guard() -> None:
    recs = [{"round": 0, "probe": {"change": 0.4, "entropy_change": 0.3}, "guard": {"reverted": False}},
            {"round": 1, "probe": {"change": 0.0}, "guard": {"reverted": True}}]
    est = stopping.estimate_from_records(recs, {0: [0.3, 0.5]})
    assert est.change == pytest.approx(0.4) and est.entropy_change == pytest.approx(0.3) and est.after_round == 1


def test_status_shows_no_gain_number_while_unreliable_and_the_number_of_estimates_stored_reliable() -> None:
    """`GAIN_ESTIMATE_RELIABLE` is False (over every cross-validated round of both real pairs the fitted scale errs
    more than predicting 0 on CT -> MR): a new estimate shows the recommendation with the note and no number; one
    stored as reliable (made while it was True) shows its number; an older status dict without the field shows none."""
    import dataclasses

    from asfda.stopping import GAIN_ESTIMATE_RELIABLE, UNRELIABLE_NOTE, StopEstimate

    assert GAIN_ESTIMATE_RELIABLE is False
    est = estimate_next_gain([_r(0.5)])
    assert not est.reliable and est.predicted_gain == pytest.approx(0.5 * GAIN_PER_CHANGE)
    shown = f"{0.5 * GAIN_PER_CHANGE:+.3f} mean Dice"
    assert UNRELIABLE_NOTE in est.message() and shown not in est.message()
    assert est.recommendation in est.message()
    stored_reliable = dataclasses.replace(est, reliable=True)
    assert shown in stored_reliable.message() and UNRELIABLE_NOTE not in stored_reliable.message()
    old = {k: v for k, v in est.to_dict().items() if k != "reliable"}
    assert UNRELIABLE_NOTE in StopEstimate(**old).message()
