"""asfda.simulate: the seeded split, the results a run writes (rows, curves, report, previews), semi-supervised
rounds, the guard, hold-back, the when-to-stop estimate in each round, and the checks before any round. (Resuming
a run: test_simulate_resume.py; state.json itself: test_simulate_state.py.)"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from _simulate_helpers import _cfg
from asfda.adapter import Adapter
from asfda.io import load_dataset
from asfda.models import load_model
from asfda.results import area_under_curve
from asfda.rounds import PoolState
from asfda.simulate import run_simulation, split_pool
from conftest import write_bundle, write_nnunet


def test_split_is_seeded_and_disjoint() -> None:
    ids = [f"c{i}" for i in range(10)]
    pool, test = split_pool(ids, 0.3, seed=1)
    assert set(pool) | set(test) == set(ids) and not set(pool) & set(test)
    assert (pool, test) == split_pool(list(reversed(ids)), 0.3, seed=1)
    assert len(test) == 3


def test_area_under_curve_is_mean_level() -> None:
    assert area_under_curve([0, 2, 4], [0.5, 0.5, 0.5]) == pytest.approx(0.5)
    assert area_under_curve([0, 1, 2], [0.0, 0.5, 1.0]) == pytest.approx(0.5)


def test_pool_state_round_trip_and_no_double_labelling() -> None:
    s = PoolState()
    s.add(["b", "a"], 0)
    t = PoolState()
    t.load_state_dict(json.loads(json.dumps(s.state_dict())))
    assert t.labelled_ids() == ["a", "b"]
    assert t.unlabelled(["a", "b", "c"]) == ["c"]
    with pytest.raises(ValueError):
        t.add(["a"], 1)


def test_simulation_end_to_end_writes_results(tmp_path: Path, tiny_bundle: Path) -> None:
    data = write_nnunet(tmp_path / "ds", n=7)
    res = run_simulation(_cfg(tmp_path, tiny_bundle, data))
    for name in ("results.csv", "results.json", "results.md", "learning_curve.png", "run.json", "report.html",
                 "per_case.csv"):
        assert (res.out_dir / name).exists(), name
    import csv

    with open(res.out_dir / "per_case.csv", newline="") as f:
        per_case = list(csv.DictReader(f))
    # 2 test cases x (zero-shot + 2 strategies x 2 rounds + upper bound)
    assert len(per_case) == 2 * (1 + 2 * 2 + 1)
    assert {r["strategy"] for r in per_case} == {"zero_shot", "asfda", "random", "upper_bound"}
    assert all(r["case_id"] and 0.0 <= float(r["dice_mean"]) <= 1.0 for r in per_case)
    counts = sorted({(r["strategy"], r["n_labelled"]) for r in res.rows})
    assert counts == [("asfda", 0), ("asfda", 1), ("asfda", 2), ("random", 0), ("random", 1), ("random", 2),
                      ("upper_bound", 5)]  # 7 cases, 2 in the test split: the upper bound labels all 5 of the pool
    ub = next(r for r in res.rows if r["strategy"] == "upper_bound")
    assert ub["steps"] == 3 * 2 and 0.0 <= ub["dice_mean"] <= 1.0
    assert res.summary["upper_bound"]["dice"] == pytest.approx(ub["dice_mean"])
    of = res.summary["asfda"]["of_upper"][2]
    last = next(r for r in res.rows if r["strategy"] == "asfda" and r["n_labelled"] == 2)
    assert of == pytest.approx(last["dice_mean"] / ub["dice_mean"])
    table = (res.out_dir / "results.md").read_text()
    assert "% of upper bound" in table and "Upper bound (fine-tuned on all 5 pool volumes" in table
    run = json.loads((res.out_dir / "run.json").read_text())
    assert run["model_weights_sha256_16"] and run["versions"]["torch"] and run["config"]["budget"] == 1
    state = json.loads((res.out_dir / "asfda" / "seed0" / "state.json").read_text())
    queried = [i for r in state["rounds"] for i in r["queried"]]
    assert len(queried) == len(set(queried)) == 2
    assert all("asd" in c for r in state["rounds"] for c in r["query_components"].values())
    assert all(r["device"] == f"cpu ({torch.get_num_threads()} threads)" for r in state["rounds"])  # what ran it
    # the adapted model is a bundle that asfda (and MONAI) load as is, with the last round's weights
    from safetensors.torch import load_file


    bundle = load_model(res.out_dir / "asfda" / "seed0" / "bundle")
    last = load_file(str(res.out_dir / "asfda" / "seed0" / state["weights"]))
    own = bundle.network.state_dict()
    assert all(torch.equal(own[k], last[f"network.{k}"]) for k in own)
    meta = json.loads((res.out_dir / "asfda" / "seed0" / "bundle" / "configs" / "metadata.json").read_text())
    assert meta["asfda"]["rounds"] == 2 and len(meta["asfda"]["labelled"]) == 2
    # the HTML report: self-contained (images inlined), every section, previews of the queried volumes
    page = (res.out_dir / "report.html").read_text()
    for words in ("Learning curves", "Results", "Rounds", "What was queried and why", "before (zero-shot)",
                  "Upper bound"):
        assert words in page, words
    assert page.count("data:image/png;base64,") == 1 + 4  # the curve, 2 queried volumes x 2 strategies
    assert "src=\"http" not in page and "<link" not in page
    assert all(i in page for i in queried)
    assert len(list((res.out_dir / "previews").rglob("*.png"))) == 4


@pytest.mark.parametrize("pseudo_from", ["previous", "warmup"])
def test_semi_supervised_rounds_record_reliable_volumes(tmp_path: Path, tiny_bundle: Path, pseudo_from: str) -> None:
    from asfda.config import SemiConfig

    data = write_nnunet(tmp_path / "ds", n=8)
    cfg = _cfg(tmp_path, tiny_bundle, data)
    cfg.strategies = ["asfda"]
    cfg.semi = SemiConfig(enabled=True, confident_fraction=1.0, close_fraction=1.0, prob_threshold=0.0,
                          pseudo_from=pseudo_from)
    run_simulation(cfg)
    state = json.loads((tmp_path / "run" / "asfda" / "seed0" / "state.json").read_text())
    for rec in state["rounds"]:
        labelled_so_far = {i for r in state["rounds"][: rec["round"] + 1] for i in r["queried"]}
        assert rec["reliable"], "every unlabeled volume is reliable at fraction 1.0"
        assert not set(rec["reliable"]) & labelled_so_far


def test_cli_simulate_overrides_upper_bound(tmp_path: Path, tiny_bundle: Path, capsys: pytest.CaptureFixture) -> None:
    from asfda.cli import main

    data = write_nnunet(tmp_path / "ds", n=6)
    args = ["simulate", "--model", str(tiny_bundle), "--pool", str(data), "--strategies", "random", "--budget", "1",
            "--rounds", "1", "--steps", "2", "--no-progress"]
    assert main([*args, "--out", str(tmp_path / "a"), "--no-upper-bound"]) == 0
    assert "Upper bound" not in capsys.readouterr().out and not (tmp_path / "a" / "upper_bound").exists()
    assert main([*args, "--out", str(tmp_path / "b"), "--upper-bound-steps", "3"]) == 0
    assert "Upper bound (fine-tuned on all" in capsys.readouterr().out
    assert json.loads((tmp_path / "b" / "upper_bound" / "seed0.json").read_text())["steps"] == 3


def test_simulate_no_guard_flag_turns_the_guard_off(tmp_path: Path, monkeypatch) -> None:
    import asfda.simulate
    from asfda.cli import main

    class Stop(Exception):
        pass

    seen = {}

    def fake_run(cfg):
        seen["cfg"] = cfg
        raise Stop

    monkeypatch.setattr(asfda.simulate, "run_simulation", fake_run)
    with pytest.raises(Stop):
        main(["simulate", "--model", "m", "--pool", "p", "--no-guard", "--out", str(tmp_path / "o")])
    assert seen["cfg"].train.guard is False


def test_random_without_semi_supervision_runs_no_scoring_pass(tmp_path: Path, tiny_bundle: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """Random reads only the pool's ids: no pass over the pool or the labelled volumes, and the picks are those of
    the strategy on the sorted unlabeled ids with the round's seed."""
    import numpy as np

    from asfda.config import SemiConfig
    from asfda.selection import PoolScores, build_strategy

    data = write_nnunet(tmp_path / "ds", n=7)
    cfg = _cfg(tmp_path, tiny_bundle, data)
    cfg.strategies, cfg.upper_bound = ["random"], False

    def no_pass(*args, **kwargs):
        raise AssertionError("random scored the pool")

    with monkeypatch.context() as m:
        m.setattr(Adapter, "score_pool", no_pass)
        m.setattr(Adapter, "fit_temperature", no_pass)
        res = run_simulation(cfg)
    state = json.loads((res.out_dir / "random" / "seed0" / "state.json").read_text())
    from asfda.io import load_dataset

    pool, _ = split_pool(list(load_dataset(data).by_id()), cfg.test_fraction, 0)
    labelled: list[str] = []
    for rec in state["rounds"]:
        left = sorted(i for i in pool if i not in labelled)
        expect = build_strategy("random").select(PoolScores(left, {}, np.zeros((len(left), 0))), 1, rec["round"])
        assert rec["queried"] == expect.ids
        labelled += rec["queried"]
        assert rec["temperature"] == cfg.temperature0 and rec["ece_before"] is None
    # with selective semi-supervision the round needs the pool's scores, so it scores
    calls = {"n": 0}
    real = Adapter.round_scores

    def counted(self, *args, **kwargs):
        temp, scores, info = real(self, *args, **kwargs)
        calls["n"] += bool(scores.metrics) and info["forward_passes_per_volume"] > 0
        return temp, scores, info

    monkeypatch.setattr(Adapter, "round_scores", counted)
    cfg.semi, cfg.out_dir = SemiConfig(enabled=True), str(tmp_path / "semi")
    run_simulation(cfg)
    assert calls["n"] == cfg.rounds


def test_hold_back_leaves_a_discarded_rounds_volume_out_of_the_next_rounds(tmp_path: Path, tiny_bundle: Path,
                                                                            monkeypatch) -> None:
    """train.hold_back_discarded: round 0 discarded -> round 1 trains without round 0's pick (label kept)."""
    import asfda.adapter.training

    verdicts = iter([True, False, False])
    monkeypatch.setattr(asfda.adapter.training, "discards", lambda p0, p1, *collapse: next(verdicts))
    trained_on: list[list[str]] = []
    real = Adapter.finetune

    def spy(self, labelled, cfg, *a, **k):
        trained_on.append(sorted(c.case_id for c in labelled))
        return real(self, labelled, cfg, *a, **k)

    monkeypatch.setattr(Adapter, "finetune", spy)
    data = write_nnunet(tmp_path / "ds", n=7)
    cfg = _cfg(tmp_path, tiny_bundle, data)
    cfg.strategies, cfg.upper_bound, cfg.rounds = ["random"], False, 3
    cfg.train.hold_back_discarded = True
    res = run_simulation(cfg)
    rounds = json.loads((res.out_dir / "random" / "seed0" / "state.json").read_text())["rounds"]
    first = rounds[0]["queried"][0]
    assert [r["held_back"] for r in rounds] == [[], [first], [first]]
    assert trained_on[1] == sorted(rounds[1]["trained_ids"]) and first not in trained_on[1]
    assert rounds[2]["n_labelled"] == 3 and first not in rounds[2]["trained_ids"]


def test_each_round_records_the_when_to_stop_estimate_beside_the_true_next_gain(tmp_path: Path,
                                                                                 tiny_bundle: Path) -> None:
    """A round records its probe (prediction change on unlabeled pool volumes, never the test set), the Dice of the
    query's model on the queried volumes (pool labels) and the estimate; stopping.csv and the report set each estimate
    beside the true next-round gain."""
    import csv

    from asfda.stopping import PROBE_VOLUMES

    data = write_nnunet(tmp_path / "ds", n=8)
    cfg = _cfg(tmp_path, tiny_bundle, data)
    cfg.strategies, cfg.upper_bound, cfg.train.guard = ["random"], False, False
    res = run_simulation(cfg)
    pool, test = split_pool(list(load_dataset(data).by_id()), cfg.test_fraction, 0)
    rounds = json.loads((res.out_dir / "random" / "seed0" / "state.json").read_text())["rounds"]
    labelled: set[str] = set()
    for rec in rounds:
        labelled |= set(rec["queried"])
        probe = rec["probe"]
        assert 0 < len(probe["cases"]) <= PROBE_VOLUMES and set(probe["cases"]) <= set(pool) - labelled
        assert 0.0 <= probe["change"] <= 1.0 and set(rec["queried_dice_before"]) == set(rec["queried"])
        assert rec["stopping"]["after_round"] == rec["round"] and rec["stopping"]["change"] == probe["change"]
    with open(res.out_dir / "stopping.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["round"]) for r in rows] == [0, 1]
    assert float(rows[0]["true_next_gain"]) == pytest.approx(rounds[1]["dice_mean"] - rounds[0]["dice_mean"])
    assert rows[1]["true_next_gain"] == "" and float(rows[0]["predicted_next_gain"]) == pytest.approx(
        rounds[0]["stopping"]["predicted_gain"])
    assert "When to stop" in (res.out_dir / "report.html").read_text()


def test_a_dataset_class_the_model_lacks_is_refused_before_any_round(tmp_path: Path) -> None:
    """Such a class would train a new output channel that the adapted bundle (the source network's) cannot hold:
    refused up front with the fix, not after a round's work at the export."""
    from asfda.errors import AsfdaError

    bundle = write_bundle(tmp_path / "b", class_names=("background", "liver"))
    data = write_nnunet(tmp_path / "ds", n=5, labels={"background": 0, "liver": 1, "spleen": 2})
    cfg = _cfg(tmp_path, bundle, data)
    with pytest.raises(AsfdaError, match=r"dataset classes \['spleen'\] are not classes of the model \['liver'\]"):
        run_simulation(cfg)
    assert not list((tmp_path / "run").rglob("state.json"))
