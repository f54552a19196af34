"""benchmarks/semi_quality.py on hand-made rounds: semi on against off with the same picks, paired per test volume,
and the quality of the pseudo-labels the on arm trained on."""

from __future__ import annotations

import pytest

from semi_quality import compare, table


def _round(dice: list[float], reliable: dict | None = None) -> dict:
    return {"n_labelled": 1, "dice_mean": sum(dice) / len(dice), "reliable": reliable or {},
            "per_case": [{"case_id": f"c{i}", "dice_mean": d} for i, d in enumerate(dice)]}


def test_compare_pairs_the_arms_per_test_volume_and_averages_the_pseudo_label_quality() -> None:
    off = {("fold0", 0, 1): _round([0.6, 0.7]), ("fold1", 0, 1): _round([0.5, 0.5])}
    on = {("fold0", 0, 1): _round([0.7, 0.7], {"a": {"pseudo_dice": 0.8, "pseudo_dice:liver": 0.9,
                                                      "kept_fraction": 0.5, "confidence": 1.0},
                                                "b": {"pseudo_dice": 0.6, "pseudo_dice:liver": 0.7,
                                                      "kept_fraction": 0.7, "confidence": 1.0}}),
          ("fold1", 0, 1): _round([0.4, 0.5]), ("fold2", 0, 1): _round([0.9, 0.9])}  # fold2: no off arm, left out
    (row,) = compare(off, on)
    assert row["pairs"] == 2
    assert row["diff"] == pytest.approx((0.1 + 0.0 - 0.1 + 0.0) / 4)
    assert row["off"] == pytest.approx(0.575) and row["on"] == pytest.approx(0.575)
    assert row["reliable"] == pytest.approx(1.0)  # 2 volumes in fold0, none in fold1
    assert row["pseudo_dice"] == pytest.approx(0.7) and row["pseudo_dice:liver"] == pytest.approx(0.8)
    lines = table([row])
    assert lines[0].endswith("| liver |") and lines[2].startswith("| 1 | 2 | 0.5750 | 0.5750 | +0.0000 [")


def test_match_off_pairs_only_rounds_that_trained_the_same_volumes_first_folder_first() -> None:
    from semi_quality import match_off

    def rec(ids: list[str], dice: float) -> dict:
        return {**_round([dice]), "trained_ids": ids}

    on = {("fold0", 0, 1): rec(["a"], 0.7), ("fold1", 0, 1): rec(["b"], 0.6), ("fold2", 0, 1): rec(["c"], 0.5)}
    old = {("fold0", 0, 1): rec(["a"], 0.1), ("fold1", 0, 1): rec(["x"], 0.2)}  # fold1: another draw
    new = {("fold0", 0, 1): rec(["a"], 0.3), ("fold1", 0, 1): rec(["b"], 0.4)}
    off, missing = match_off(on, [old, new])
    assert off[("fold0", 0, 1)]["dice_mean"] == pytest.approx(0.1)  # the first folder wins
    assert off[("fold1", 0, 1)]["dice_mean"] == pytest.approx(0.4)  # the draw that matches, not the first
    assert missing == [("fold2", 0, 1)]
