"""benchmarks/first_picks.py: rules parsed, picks rated against a utility table, and a two-fold run on the tiny
dataset whose picks are those of `asfda query` on each fold's pool."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from asfda.query import query_dataset
from conftest import write_nnunet
from first_picks import annotate, main, parse_rule, table


def test_rules_are_name_strategy_and_settings() -> None:
    assert parse_rule("d=asfda:representativeness=density,alpha=0.3") == (
        "d", "asfda", {"representativeness": "density", "alpha": 0.3})
    assert parse_rule("enpy=enpy") == ("enpy", "enpy", {})
    with pytest.raises(SystemExit):
        parse_rule("asfda")


def test_a_pick_is_rated_by_its_utility_rank_and_the_pools_median() -> None:
    util = {"a": 0.4, "b": -0.1, "c": 0.2}
    assert annotate("b", ["a", "b", "c", "x"], util) == {"pick": "b", "utility": -0.1, "rank": 3, "of": 3,
                                                         "pool_median": 0.2}
    assert annotate("x", ["a", "x"], util) == {"pick": "x"}  # not in the table: no rating
    assert annotate("c", ["a", "b"], util) == {"pick": "c"}  # not in this pool: no rating
    rows = {"r": [annotate("b", ["a", "b", "c"], util), annotate("a", ["a", "b", "c"], util)]}
    assert table(rows)[2] == "| r | b, a | 1/2 | 1/2 | 2.0 |"


def test_two_folds_on_the_tiny_dataset(tmp_path: Path, tiny_bundle: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    data = write_nnunet(tmp_path / "ds", n=4)
    utility = tmp_path / "utility.json"
    utility.write_text(json.dumps({"utility": {"case00": 0.3, "case01": -0.1, "case02": 0.2, "case03": 0.1}}))
    out = tmp_path / "picks.json"
    monkeypatch.setattr(sys, "argv", ["first_picks.py", "--model", str(tiny_bundle), "--data", str(data),
                                      "--folds", "2", "--rules", "enpy=enpy", "--utility", str(utility),
                                      "--out", str(out), "--cache-dir", str(tmp_path / "cache"), "--device", "cpu"])
    main()
    rec = json.loads(out.read_text())
    picks = rec["rules"]["enpy"]
    assert [p["fold"] for p in picks] == [0, 1] and all(p["pick"] not in rec["folds"][p["fold"]] for p in picks)
    pool0 = tmp_path / "cache" / "cv" / "ds" / "2folds_seed0" / "fold0" / "pool"
    direct = query_dataset(str(tiny_bundle), pool0, "enpy", 1, tmp_path / "q.json", cache_dir=str(tmp_path / "c2"),
                           device="cpu", progress=False)
    assert direct is not None and picks[0]["pick"] == direct.ids[0]
    assert out.with_suffix(".md").read_text().count("| enpy |") == 1


def test_rerate_rates_earlier_picks_against_a_grown_table(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from asfda.crossval.folds import fold_assignment

    data = write_nnunet(tmp_path / "ds", n=4)
    ids = ["case00", "case01", "case02", "case03"]
    pools = [[c for c in ids if c not in test] for test in fold_assignment(ids, 2, 0)]
    earlier = tmp_path / "earlier.json"
    picks = [{"fold": 0, "pick": pools[0][0]}, {"fold": 1, "pick": pools[1][1]}]
    earlier.write_text(json.dumps({"rules": {"r": picks}}))
    utility = tmp_path / "utility.json"
    utility.write_text(json.dumps({"utility": {"case00": 0.3, "case01": -0.1, "case02": 0.2, "case03": 0.1}}))
    out = tmp_path / "rerated.json"
    monkeypatch.setattr(sys, "argv", ["first_picks.py", "--model", "unused", "--data", str(data), "--folds", "2",
                                      "--rerate", str(earlier), "--utility", str(utility), "--out", str(out)])
    main()  # no model is loaded: the picks are read, not made
    rec = json.loads(out.read_text())
    util = json.loads(utility.read_text())["utility"]
    assert rec["rules"]["r"] == [{"fold": k, **annotate(pools[k][k], pools[k], util)} for k in (0, 1)]
    assert all("rank" in p for p in rec["rules"]["r"])  # rated, not just listed
