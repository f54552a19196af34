"""benchmarks/pair_utility.py: the 2-label oracle (what a second volume adds after a given first one), on
hand-made numbers and on a tiny dataset end to end (resumable per second volume)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

import pair_utility as pu
from conftest import write_nnunet


def test_pair_utility_is_the_mean_gain_over_the_first_model_on_shared_volumes() -> None:
    first = {"a": 0.5, "b": 0.6, "c": 0.7}
    assert pu.pair_utility(first, {"a": 0.7, "b": 0.5, "x": 0.9}) == pytest.approx((0.2 - 0.1) / 2)
    assert math.isnan(pu.pair_utility(first, {"c": float("nan")}))  # nothing to compare


def test_summary_names_the_best_second_volume_and_the_random_expectation() -> None:
    first = {"a": 0.5, "b": 0.5, "c": 0.5, "d": 0.5}
    pairs = {"b": {"a": 0.6, "c": 0.6, "d": 0.6}, "c": {"a": 0.4, "b": 0.5, "d": 0.6},
             "d": {"a": 0.9, "b": 0.7, "c": 0.8}}
    s = pu.summarize("a", first, pairs)
    assert s["best"] == {"id": "d", "utility": pytest.approx(0.3)}
    assert s["expected_random"] == pytest.approx((0.1 + 0.0 + 0.3) / 3)
    assert s["rank"] == {"d": 1, "b": 2, "c": 3}


def test_first_model_then_each_pair_tested_on_the_rest(tmp_path: Path, tiny_bundle: Path) -> None:
    data = write_nnunet(tmp_path / "ds", n=4)
    out = tmp_path / "out"
    args = ["--model", str(tiny_bundle), "--data", str(data), "--first", "case00", "--out", str(out), "--steps", "2",
            "--threads", "1", "--precision", "fp32", "--device", "cpu", "--cache-dir", str(tmp_path / "cache")]
    s = pu.main([*args, "--only", "case01"])
    assert s["measured"] == 1 and s["of"] == 3 and set(s["utility"]) == {"case01"}
    first = json.loads((out / "first.json").read_text())
    assert sorted(r["case_id"] for r in first["per_case"]) == ["case01", "case02", "case03"]
    pair = json.loads((out / "pairs" / "case01.json").read_text())
    assert sorted(r["case_id"] for r in pair["per_case"]) == ["case02", "case03"]  # neither label tested on
    before = (out / "first.safetensors").stat().st_mtime_ns
    s = pu.main(args)  # the rest; the first model and case01 are read back, not trained again
    assert (out / "first.safetensors").stat().st_mtime_ns == before
    assert set(s["utility"]) == {"case01", "case02", "case03"} and not any(math.isnan(u) for u in s["utility"].values())
    assert "| second volume | pair utility | rank |" in (out / "README.md").read_text()
    s = pu.main([*args, "--summarize-only", "--rules", "random=random", "enpy=enpy"])  # second picks, rated
    assert set(s["second_picks"]) == {"random", "enpy"}
    for r in s["second_picks"].values():
        assert r["pick"] in {"case01", "case02", "case03"} and r["rank"] == s["rank"][r["pick"]]
    assert "| rule | second pick |" in (out / "README.md").read_text()


def test_rate_picks_reads_the_table() -> None:
    s = {"utility": {"b": 0.1, "c": -0.2}, "rank": {"b": 1, "c": 2}}
    assert pu.rate_picks({"x": "c", "y": "z"}, s) == {"x": {"pick": "c", "utility": -0.2, "rank": 2},
                                                      "y": {"pick": "z", "utility": None, "rank": None}}
