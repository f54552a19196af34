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


def test_match_off_pairs_only_rounds_with_the_same_labels_first_folder_first() -> None:
    from semi_quality import match_off

    def rec(ids: list[str], dice: float) -> dict:
        return {**_round([dice]), "labelled_ids": ids, "trained_ids": ids[:1]}

    on = {("fold0", 0, 1): rec(["a"], 0.7), ("fold1", 0, 1): rec(["b"], 0.6), ("fold2", 0, 1): rec(["c"], 0.5)}
    old = {("fold0", 0, 1): rec(["a"], 0.1), ("fold1", 0, 1): rec(["x"], 0.2)}  # fold1: another draw
    new = {("fold0", 0, 1): rec(["a"], 0.3), ("fold1", 0, 1): rec(["b"], 0.4)}
    off, missing = match_off(on, [old, new])
    assert off[("fold0", 0, 1)]["dice_mean"] == pytest.approx(0.1)  # the first folder wins
    assert off[("fold1", 0, 1)]["dice_mean"] == pytest.approx(0.4)  # the draw that matches, not the first
    assert missing == [("fold2", 0, 1)]


def test_rounds_by_key_records_the_labels_so_far_so_a_held_back_label_still_pairs(tmp_path) -> None:
    import json

    from semi_quality import match_off, rounds_by_key

    def state(trained: list[list[str]], dice: list[float]) -> dict:
        queried = [["a"], ["b"]]
        return {"format": 2, "rounds": [{"round": i, "n_labelled": i + 1, "queried": q, "trained_ids": t,
                                          "dice_mean": d, "per_case": [{"case_id": "c", "dice_mean": d}]}
                                         for i, (q, t, d) in enumerate(zip(queried, trained, dice))]}

    for arm, trained, dice in (("off", [["a"], ["a", "b"]], [0.5, 0.6]), ("on", [["a"], ["b"]], [0.4, 0.3])):
        folder = tmp_path / arm / "fold0" / "random" / "seed0"
        folder.mkdir(parents=True)
        (folder / "state.json").write_text(json.dumps(state(trained, dice)))
    on = rounds_by_key(tmp_path / "on", "random")
    assert on[("fold0", 0, 2)]["labelled_ids"] == ["a", "b"]
    off, missing = match_off(on, [rounds_by_key(tmp_path / "off", "random")])
    assert missing == [] and off[("fold0", 0, 2)]["dice_mean"] == pytest.approx(0.6)  # on held "a" back: still paired


def test_per_round_names_the_labels_and_a_guard_discard_in_either_arm() -> None:
    from semi_quality import per_round

    off = {("fold2", 0, 1): {**_round([0.37]), "queried": ["b12"]}}
    on = {("fold2", 0, 1): {**_round([0.33]), "queried": ["b12"],
                            "guard": {"reverted": True, "dice_discarded": 0.39}}}
    (line,) = per_round(off, on)
    assert line == "- fold2 seed 0 n=1 (+b12): 0.370 -> 0.330; on: discarded by the guard (its weights 0.390)"
    on[("fold2", 0, 1)]["guard"] = {"reverted": False, "semi_discarded": {"reverted": True}, "dice_discarded": 0.39}
    (line,) = per_round(off, on)
    assert line.endswith("on: the guard kept the labelled half, discarded the pseudo-labelled one "
                         "(whose weights 0.390)")
    on[("fold2", 0, 1)]["guard"] = {"reverted": True, "labelled_half": {"reverted": True}, "dice_discarded": 0.39}
    (line,) = per_round(off, on)
    assert line.endswith("on: discarded by the guard (its weights 0.390); its labelled half failed too")
