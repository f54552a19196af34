"""benchmarks/guard_recall.py's tables on hand-made rounds: recall and precision of today's guard, and of the guard
with a floor on the organ volume ratio."""

from __future__ import annotations

import pytest

from guard_recall import floor_table, table


def _row(start: float, trained: float, reverted: bool, min_ratio: float | None) -> dict:
    return {"fold": "fold0", "strategy": "asfda", "seed": 0, "round": 0, "start": start, "trained": trained,
            "reverted": reverted, "guarded": True, "min_ratio": min_ratio}


ROWS = [_row(0.40, 0.37, False, 0.17),  # harmful, kept by the guard, a collapsed kidney
        _row(0.40, 0.30, True, 0.60),  # harmful, discarded
        _row(0.60, 0.70, False, 0.45),  # good round with a small organ ratio: a floor at 0.5 flags it
        _row(0.70, 0.72, False, 1.10)]


def test_table_counts_recall_and_precision_of_the_guard() -> None:
    lines = table(ROWS, 0.02)
    assert "harmful (test Dice down by more than 0.02): 2; discarded: 1" in lines[0]
    assert lines[1] == "recall: 1/2 = 0.50" and lines[2] == "precision: 1/1 = 1.00"


def test_floor_table_adds_the_rounds_below_the_floor() -> None:
    lines = floor_table(ROWS, 0.02, [0.0, 0.3, 0.5])
    assert lines[0] == "rounds with min_ratio recorded: 4, harmful: 2"
    assert lines[3:] == ["| 0 | 1 | 1/2 | 1/1 |", "| 0.3 | 2 | 2/2 | 2/2 |", "| 0.5 | 3 | 2/2 | 2/3 |"]
    assert floor_table([{**r, "min_ratio": None} for r in ROWS], 0.02, [0.5]) == [
        "no round recorded min_ratio yet"]


def test_pool_identical_judges_one_model_over_the_union_of_its_folds() -> None:
    """Two folds trained the same model (same history): fold 0's 2 test volumes saw a drop of 0.03, fold 1's 4 a
    gain of 0.006; over the 6 volumes the model changed the Dice by -0.006, not harmful. Fold 2's model differs."""
    from guard_recall import pool_identical

    h = ((("a",), False),)
    rows = [{**_row(0.70, 0.67, False, None), "history": h, "n_test": 2},
            {**_row(0.60, 0.606, False, None), "fold": "fold1", "history": h, "n_test": 4},
            {**_row(0.50, 0.40, False, None), "fold": "fold2", "history": ((("b",), False),), "n_test": 3},
            {**_row(0.50, 0.40, False, None), "fold": "fold3", "history": None, "n_test": 3}]
    pooled = sorted(pool_identical(rows), key=lambda r: r["fold"])
    assert [r["fold"] for r in pooled] == ["fold0+fold1", "fold2", "fold3"]
    assert abs(pooled[0]["start"] - (0.70 * 2 + 0.60 * 4) / 6) < 1e-12
    assert abs(pooled[0]["trained"] - pooled[0]["start"] - (-0.03 * 2 + 0.006 * 4) / 6) < 1e-12
    assert pooled[0]["n_test"] == 6
    assert "harmful (test Dice down by more than 0.02): 2;" in table(pooled, 0.02)[0]


def test_collapse_table_reads_the_collapse_level_of_each_round() -> None:
    from guard_recall import _collapse_level

    # btcv_007's round: the right kidney at 0.04 of the pretrained volume and 0.13 of the annotated one
    assert _collapse_level({"volume_ratio_pretrained": [1.48, 3.17, 0.01], "volume_ratio_adapted": [1.45, 0.13, 0.0]}) \
        == pytest.approx(0.13)  # the third organ: too small in the pretrained prediction to divide by
    # the phantom's over-segmented kidney brought down to size: shrink 0.27, and 0.53 of the annotated volume
    assert _collapse_level({"volume_ratio_pretrained": [0.55, 1.97], "volume_ratio_adapted": [1.02, 0.53]}) == \
        pytest.approx(0.53)
    assert _collapse_level({"volume_ratio_pretrained": [0.5], "volume_ratio_adapted": [float("nan")]}) is None
    assert _collapse_level({}) is None
    rows = [{**r, "collapse_level": s} for r, s in zip(ROWS, [0.04, 0.9, 0.45, 1.2], strict=True)]
    assert floor_table(rows, 0.02, [0.5], "collapse_level")[3] == "| 0.5 | 3 | 2/2 | 2/3 |"


def test_queried_dice_is_the_previous_models_dice_on_the_rounds_labels_from_round_one() -> None:
    from guard_recall import _queried_dice

    assert _queried_dice({"round": 1, "queried_dice_before": {"chaos_036": 0.47}}) == pytest.approx(0.47)
    assert _queried_dice({"round": 2, "queried_dice_before": {"a": 0.6, "b": float("nan"), "c": 0.8}}) == \
        pytest.approx(0.7)
    assert _queried_dice({"round": 0, "queried_dice_before": {"a": 0.3}}) is None  # the pretrained model's
    assert _queried_dice({"round": 1}) is None
    rows = [{**r, "queried_dice": q} for r, q in zip(ROWS, [0.45, None, 0.3, 0.8], strict=True)]
    # the harmful kept round is caught at 0.5, with the good round below it; the discarded one had no record
    assert floor_table(rows, 0.02, [0.5], "queried_dice")[0] == "rounds with queried_dice recorded: 3, harmful: 1"
    assert floor_table(rows, 0.02, [0.5], "queried_dice")[3] == "| 0.5 | 2 | 1/1 | 1/2 |"


def test_auroc_and_the_signal_table_on_hand_made_rounds() -> None:
    from guard_recall import SIGNALS, auroc, signal_table

    assert auroc([0.9, 0.8, 0.1, 0.2], [True, True, False, False]) == 1.0
    assert auroc([0.1, 0.5, 0.5, 0.9], [True, True, False, False]) == pytest.approx((0.0 + 0.25) / 2)
    assert auroc([0.3], [True]) is None
    rows = [{**r, "loss_final": loss, "temperature": None} for r, loss in zip(ROWS, (0.5, 0.4, 0.1, 0.2))]
    lines = signal_table({"a": rows[:2], "b": rows[2:]}, 0.02)
    assert lines[0] == "| signal (higher reads harmful) | a | b | all |" and len(lines) == 2 + len(SIGNALS)
    loss = next(line for line in lines if line.startswith("| `loss_final`"))
    # folder a: both rounds harmful (one class only); b: none harmful; all: the two harmful ones have the higher loss
    assert loss.endswith("| - (2/2) | - (0/2) | 1.00 (2/4) |")
    temperature = next(line for line in lines if line.startswith("| `temperature`"))
    assert temperature.endswith("| - (0/0) | - (0/0) | - (0/0) |")
