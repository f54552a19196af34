"""benchmarks/ct_to_mr_analysis.py on a hand-made results folder: the targets are read off the numbers right."""

from __future__ import annotations

import json
from pathlib import Path

from ct_to_mr_analysis import analyse


def _case(cid: str, d: float) -> dict:
    return {"case_id": cid, "dice_liver": d, "dice_spleen": d, "dice_mean": d}


def _write(out: Path, seed: int, zero: float, ub: float | None, runs: dict[str, list[float]]) -> None:
    (out / f"zero_shot_seed{seed}.json").write_text(json.dumps({"key": {}, "per_case": [_case("t1", zero)]}))
    if ub is not None:
        (out / "upper_bound").mkdir(exist_ok=True)
        (out / "upper_bound" / f"seed{seed}.json").write_text(json.dumps({"per_case": [_case("t1", ub)]}))
    for name, dice in runs.items():
        rounds = [{"round": r, "queried": [f"v{name}{r}"], "dice_mean": d, "per_case": [_case("t1", d)],
                   "query_components": {f"v{name}{r}": {"asd": 0.1, "rank_score": 0.5, "min_distance": 1.0}},
                   "guard": {"reverted": r == 1 and name == "random"}, "seconds_score": 2.0, "seconds_train": 10.0}
                  for r, d in enumerate(dice)]
        (out / name / f"seed{seed}").mkdir(parents=True)
        (out / name / f"seed{seed}" / "state.json").write_text(json.dumps({"rounds": rounds}))


def test_targets_read_off_hand_made_curves(tmp_path: Path) -> None:
    # n = 0, 1, 2; AUC = (z / 2 + d1 + d2 / 2) / 2
    _write(tmp_path, 0, 0.4, 0.9, {"asfda": [0.8, 0.88], "random": [0.6, 0.8], "coreset": [0.8, 0.91]})
    _write(tmp_path, 1, 0.4, 0.9, {"asfda": [0.8, 0.88], "random": [0.7, 0.8], "coreset": [0.7, 0.8]})
    text = analyse(tmp_path)
    auc_a = (0.2 + 0.8 + 0.44) / 2  # 0.72 on both seeds
    auc_r0, auc_r1 = (0.2 + 0.6 + 0.4) / 2, (0.2 + 0.7 + 0.4) / 2  # 0.60, 0.65
    gain = 100 * (auc_a - (auc_r0 + auc_r1) / 2)
    assert f"AUC asfda - random: {gain:+.1f} Dice points" in text and "+12.0, +7.0" in text
    assert "(>= +3)" in text and "**met** (>= +3)" in text
    # coreset: 0.7275 and 0.65, mean 0.689 < 0.72, so asfda beats it
    assert "beats 1 of 1 other baselines: **met**" in text
    # asfda's best with <= 4 labels is 0.88 at n=2; 0.88 / 0.9 = 98%
    assert "reaches 0.880 (n=2) = 98% of the upper bound 0.900" in text and "**met** (>= 95%)" in text
    assert "| random | 0.600 | 0.650 | 0.625 |" in text
    assert "0.800 (random1 discarded)" in text.replace("vrandom", "random")  # the guard's decision is shown
    # the envelope: seed 0 takes max(0.8, 0.6, 0.8), max(0.88, 0.8, 0.91); seed 1 0.8, 0.88
    env = ((0.2 + 0.8 + 0.455) / 2 + (0.2 + 0.8 + 0.44) / 2) / 2
    assert f"mean AUC of {env:.3f}; random's is {(auc_r0 + auc_r1) / 2:.3f}" in text
    assert "| zero-shot | 0 | 0.400 | 0.400 |" in text


def test_a_missed_target_says_missed(tmp_path: Path) -> None:
    _write(tmp_path, 0, 0.4, 0.9, {"asfda": [0.6, 0.7], "random": [0.6, 0.7], "badge": [0.8, 0.85]})
    text = analyse(tmp_path)
    assert "AUC asfda - random: +0.0 Dice points" in text and "**missed** (>= +3)" in text
    assert "(not: badge): **missed**" in text
    assert "= 78% of the upper bound" in text and "**missed** (>= 95%)" in text
    assert "**met**" not in text


def test_compare_runs_reads_two_folders_per_seed(tmp_path: Path) -> None:
    from compare_runs import compare

    a, b = tmp_path / "a", tmp_path / "b"
    for folder, dice in ((a, [0.6, 0.8]), (b, [0.5, 0.7])):
        folder.mkdir()
        _write(folder, 0, 0.4, None, {"asfda": dice})
    _write(a, 1, 0.4, None, {"asfda": [0.9]})  # seed 1 only in one folder: left out
    text = compare(a, b, ("emb", "anat"), "asfda")
    # AUC over n = 0, 1, 2: (0.4 + 2 * 0.6 + 0.8) / 4 = 0.6 and (0.4 + 1.0 + 0.7) / 4 = 0.525
    assert "| 0 | emb | 0.400; vasfda0 0.600, vasfda1 0.800 | 0.600 |" in text
    assert "| 0 | anat | 0.400; vasfda0 0.500, vasfda1 0.700 | 0.525 |" in text
    assert "| 1 |" not in text and "difference -0.075" in text
