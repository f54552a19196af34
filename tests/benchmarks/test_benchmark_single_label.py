"""benchmarks/single_label_utility.py: every volume fine-tuned on alone and tested on the others, resumable, and the
round-0 scores set against the utility (hand-made numbers for the correlation)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import single_label_utility as slu
from conftest import write_nnunet


def test_utility_is_the_mean_gain_over_zero_shot() -> None:
    r = {"adapted": {"a": 0.8, "b": 0.6, "c": float("nan")}, "zero_shot": {"a": 0.5, "b": 0.5, "c": 0.1}}
    assert slu.utility(r) == pytest.approx((0.3 + 0.1) / 2)


def test_correlations_rank_each_score_column_against_the_utility() -> None:
    util = {"a": 0.3, "b": 0.1, "c": -0.2, "d": 0.0}
    table = {"good": {"a": 4.0, "b": 3.0, "c": 1.0, "d": 2.0},  # the utility's order: rho 1, picks the best
             "bad": {"a": 1.0, "b": 2.0, "c": 4.0, "d": 3.0},  # reversed: rho -1, picks the worst
             "flat": {"a": 1.0, "b": 1.0, "c": 1.0, "d": 1.0}}  # no ranking: left out
    corr = slu.correlations(util, table)
    assert set(corr) == {"good", "bad"}
    assert corr["good"] == pytest.approx({"spearman": 1.0, "first_pick": "a", "first_pick_utility": 0.3,
                                          "first_pick_rank": 1})
    assert corr["bad"]["spearman"] == pytest.approx(-1.0) and corr["bad"]["first_pick"] == "c"
    assert corr["bad"]["first_pick_rank"] == 4


def test_every_volume_fine_tuned_alone_and_summarised(tmp_path: Path, tiny_bundle: Path) -> None:
    data = write_nnunet(tmp_path / "ds", n=4)
    out = tmp_path / "out"
    args = ["--model", str(tiny_bundle), "--data", str(data), "--out", str(out), "--steps", "2", "--threads", "1",
            "--precision", "fp32", "--device", "cpu", "--cache-dir", str(tmp_path / "cache")]
    summary = slu.main([*args, "--only", "case00,case01"])
    assert sorted(summary["utility"]) == ["case00", "case01"] and summary["of"] == 4
    run = json.loads((out / "runs" / "case00" / "upper_bound" / "seed0.json").read_text())
    assert sorted(r["case_id"] for r in run["per_case"]) == ["case01", "case02", "case03"]  # tested on the others
    assert run["key"]["pool"] == ["case00"]
    summary = slu.main(args)  # the rest; the first two are read back
    assert sorted(summary["utility"]) == ["case00", "case01", "case02", "case03"]
    assert summary["correlations"] and all(-1.0 <= c["spearman"] <= 1.0 for c in summary["correlations"].values())
    assert (out / "round0_scores.csv").is_file() and "| volume | utility |" in (out / "README.md").read_text()
