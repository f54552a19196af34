from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch

from asfda.adapter import Adapter
from asfda.config import RunConfig
from asfda.io import load_dataset
from asfda.models import load_model
from asfda.results import area_under_curve
from asfda.rounds import PoolState
from asfda.simulate import run_simulation, split_pool
from asfda.training import TrainConfig
from conftest import write_bundle, write_nnunet


def _cfg(tmp_path: Path, bundle: Path, data: Path, out: str = "run") -> RunConfig:
    return RunConfig(model=str(bundle), pool=str(data), test_fraction=0.3, strategies=["asfda", "random"],
                     budget=1, rounds=2, seeds=[0], train=TrainConfig(steps=3, batch_size=1),
                     cache_dir=str(tmp_path / "cache"), out_dir=str(tmp_path / out), progress=False)


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

    from asfda.models import load_model

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


def test_interrupted_simulation_resumes_without_redoing_rounds(tmp_path: Path, tiny_bundle: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    data = write_nnunet(tmp_path / "ds", n=7)
    reference = run_simulation(_cfg(tmp_path, tiny_bundle, data, out="ref"))

    calls = {"n": 0}
    real = Adapter.finetune

    def crash_in_round_1(self, labelled, cfg, pseudo=None, desc=""):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt("killed mid-round")
        return real(self, labelled, cfg, pseudo, desc)

    monkeypatch.setattr(Adapter, "finetune", crash_in_round_1)
    cfg = _cfg(tmp_path, tiny_bundle, data, out="resumed")
    with pytest.raises(KeyboardInterrupt):
        run_simulation(cfg)
    state = json.loads((tmp_path / "resumed" / "asfda" / "seed0" / "state.json").read_text())
    assert len(state["rounds"]) == 1
    calls["n"] = 10  # no more crashes
    resumed = run_simulation(cfg)
    assert calls["n"] == 10 + 1 + 2 + 1  # asfda's round 1 only, random's two rounds, the upper bound

    def key(rows):
        return sorted((r["strategy"], r["n_labelled"], round(r["dice_mean"], 6)) for r in rows)

    assert key(resumed.rows) == key(reference.rows)


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


def test_simulation_killed_with_sigkill_mid_round_resumes_to_the_same_results(tmp_path: Path, tiny_bundle: Path
                                                                              ) -> None:
    import signal

    import yaml

    from conftest import run_cli_killed

    data = write_nnunet(tmp_path / "ds", n=7)
    reference = run_simulation(_cfg(tmp_path, tiny_bundle, data, out="ref"))
    cfg = {"model": str(tiny_bundle), "pool": str(data), "test_fraction": 0.3, "strategies": ["asfda", "random"],
           "budget": 1, "rounds": 2, "seeds": [0], "train": {"steps": 3, "batch_size": 1},
           "cache_dir": str(tmp_path / "cache"), "out_dir": str(tmp_path / "killed")}
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    # optimiser step 5 = the 2nd of 3 steps of asfda's round 1 (steps 1-3 were round 0)
    assert run_cli_killed(5, "step", "simulate", "--config", str(tmp_path / "cfg.yaml")) == -signal.SIGKILL
    state = json.loads((tmp_path / "killed" / "asfda" / "seed0" / "state.json").read_text())
    assert [r["round"] for r in state["rounds"]] == [0]  # round 0 kept, round 1 not half-recorded
    assert (tmp_path / "killed" / "asfda" / "seed0" / state["weights"]).exists()
    resumed = run_simulation(_cfg(tmp_path, tiny_bundle, data, out="killed"))
    key = lambda rows: sorted((r["strategy"], r["n_labelled"], round(r["dice_mean"], 6)) for r in rows)  # noqa: E731
    assert key(resumed.rows) == key(reference.rows)
    again = json.loads((tmp_path / "killed" / "asfda" / "seed0" / "state.json").read_text())
    assert again["rounds"][0] == state["rounds"][0]  # the finished round was not redone


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


def test_rounds_the_guard_discards_keep_the_pretrained_model_through_a_resume(tmp_path: Path, tiny_bundle: Path,
                                                                              monkeypatch) -> None:
    """Every round discarded: each round ends with the pretrained weights and zero-shot Dice, the exported
    bundle says so, and a second run resumes (nothing retrained) to the same rows."""
    import asfda.adapter.training

    monkeypatch.setattr(asfda.adapter.training, "discards", lambda p0, p1: True)
    data = write_nnunet(tmp_path / "ds", n=7)
    cfg = _cfg(tmp_path, tiny_bundle, data)
    cfg.upper_bound = False
    res = run_simulation(cfg)
    zero = next(r["dice_mean"] for r in res.rows if r["round"] == -1)
    for name in ("asfda", "random"):
        state = json.loads((res.out_dir / name / "seed0" / "state.json").read_text())
        assert [r["guard"]["reverted"] for r in state["rounds"]] == [True, True]
        assert all(r["dice_mean"] == pytest.approx(zero) for r in state["rounds"])
        meta = json.loads((res.out_dir / name / "seed0" / "bundle" / "configs" / "metadata.json").read_text())
        assert meta["asfda"]["rounds_discarded_by_guard"] == [0, 1]
    asfda_round1 = json.loads((res.out_dir / "asfda" / "seed0" / "state.json").read_text())["rounds"][1]
    assert all("kd" not in c for c in asfda_round1["query_components"].values())  # never adapted: round-0 gap

    monkeypatch.setattr(Adapter, "finetune", lambda *a, **k: pytest.fail("a finished round was trained again"))
    again = run_simulation(cfg)
    assert again.rows == res.rows


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


def test_a_run_copied_without_its_weights_keeps_finished_rows_and_refuses_to_go_on(tmp_path: Path,
                                                                                   tiny_bundle: Path) -> None:
    """Benchmark weights are not committed: a finished run from a clean clone still reports its rows; an
    unfinished one says which file is missing instead of crashing on it."""
    from asfda.errors import AsfdaError

    data = write_nnunet(tmp_path / "ds", n=7)
    cfg = _cfg(tmp_path, tiny_bundle, data)
    cfg.upper_bound = False
    res = run_simulation(cfg)
    for w in res.out_dir.glob("*/seed0/weights_round*.safetensors"):
        w.unlink()
    assert run_simulation(cfg).rows == res.rows
    cfg.rounds = 3
    with pytest.raises(AsfdaError, match="weights of round 1 are missing"):
        run_simulation(cfg)


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


def test_a_run_moved_to_another_folder_resumes_and_other_settings_are_refused(
        tmp_path: Path, tiny_bundle: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The fingerprint names the model and data by content (weights hash, preprocessing, case ids), not by path: a
    run whose data and model moved (another machine, say) resumes without training; other settings are refused."""
    import shutil

    from asfda.errors import AsfdaError

    data = write_nnunet(tmp_path / "ds", n=7)
    cfg = _cfg(tmp_path, tiny_bundle, data)
    cfg.upper_bound = False
    first = run_simulation(cfg)
    moved_data, moved_model = shutil.move(str(data), tmp_path / "elsewhere_ds"), shutil.copytree(tiny_bundle,
                                                                                                  tmp_path / "m2")

    def no_training(*args, **kwargs):
        raise AssertionError("a finished round was trained again")

    monkeypatch.setattr(Adapter, "finetune", no_training)
    cfg.pool, cfg.model = str(moved_data), str(moved_model)
    again = run_simulation(cfg)

    def key(rows):
        return sorted((r["strategy"], r["n_labelled"], round(r["dice_mean"], 6)) for r in rows)

    assert key(again.rows) == key(first.rows)
    state_path = tmp_path / "run" / "asfda" / "seed0" / "state.json"
    state = json.loads(state_path.read_text())
    state_path.write_text(json.dumps({**state, "fingerprint": "0123456789abcdef"}))
    with pytest.raises(AsfdaError, match="other settings"):
        run_simulation(cfg)  # a made-up fingerprint
    state_path.unlink()
    cfg.strategies, cfg.train = ["random"], TrainConfig(steps=4, batch_size=1)
    with pytest.raises(AsfdaError, match="other settings"):
        run_simulation(cfg)  # other training settings are refused


@pytest.mark.parametrize("written_with", ["fingerprint", "path_fingerprint"])
def test_a_state_of_the_previous_format_is_accepted_migrated_and_resumes(
        tmp_path: Path, tiny_bundle: Path, monkeypatch: pytest.MonkeyPatch, written_with: str) -> None:
    """A ``state.json`` written before the format version (no ``format`` key; the fingerprint by content, or the
    older one with the paths in it): the run resumes with its finished round untouched, the file is migrated once
    (``format`` written, the fingerprint by content) and the rounds after it are those of an uninterrupted run."""
    from asfda.selection import build_strategy
    from asfda.simulate_state import STATE_FORMAT, RunKey

    data = write_nnunet(tmp_path / "ds", n=7)
    cfg = _cfg(tmp_path, tiny_bundle, data)
    cfg.strategies, cfg.upper_bound, cfg.report = ["asfda"], False, False
    reference = run_simulation(dataclasses.replace(cfg, out_dir=str(tmp_path / "ref")))
    cfg.rounds = 1
    run_simulation(cfg)
    pool, test = split_pool([c.case_id for c in load_dataset(data).cases], cfg.test_fraction, 0)
    strategy = build_strategy("asfda", settings=cfg)
    run_key = RunKey.of(cfg, "asfda", strategy, 0, pool, test, load_model(str(tiny_bundle)))
    state_path = tmp_path / "run" / "asfda" / "seed0" / "state.json"
    written = json.loads(state_path.read_text())
    assert written["format"] == STATE_FORMAT and written["fingerprint"] == run_key.fingerprint()
    previous = {k: v for k, v in written.items() if k != "format"} | {"fingerprint": getattr(run_key, written_with)()}
    state_path.write_text(json.dumps(previous))

    trained = {"n": 0}
    real = Adapter.finetune

    def counted(self, *args, **kwargs):
        trained["n"] += 1
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Adapter, "finetune", counted)
    run_simulation(cfg)  # nothing left to run: the file is migrated all the same
    migrated = json.loads(state_path.read_text())
    assert trained["n"] == 0
    assert migrated == {"format": STATE_FORMAT, **previous, "fingerprint": run_key.fingerprint()}
    cfg.rounds = 2
    resumed = run_simulation(cfg)
    assert trained["n"] == 1  # round 1 only
    after = json.loads(state_path.read_text())
    assert after["format"] == STATE_FORMAT and after["fingerprint"] == run_key.fingerprint()
    assert after["rounds"][0] == previous["rounds"][0] and len(after["rounds"]) == 2

    def key(rows):
        return sorted((r["strategy"], r["n_labelled"], r.get("queried"), round(r["dice_mean"], 6)) for r in rows)

    assert key(resumed.rows) == key(reference.rows)


def test_asfda_runs_from_before_the_diversity_setting_resume_only_in_the_embedding_space(
        tmp_path: Path, tiny_bundle: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Runs written before ``diversity`` existed picked in the embedding space, and their fingerprint had no such
    key: ``diversity: embedding`` (and any value, for strategies that do not read it) gives the same fingerprint,
    so they resume; the new default refuses them with a message that names the setting."""
    from asfda import simulate_state
    from asfda.errors import RunSettingsChanged
    from asfda.selection import build_strategy

    data = write_nnunet(tmp_path / "ds", n=7)
    cfg = _cfg(tmp_path, tiny_bundle, data)
    cfg.upper_bound, cfg.rounds = False, 1
    pretrained = load_model(str(tiny_bundle))
    cases = [c.case_id for c in load_dataset(data).cases]
    pool, test = cases[:5], cases[5:]

    def fingerprint(c: RunConfig, name: str) -> str:
        strategy = build_strategy(name, settings=c)
        return simulate_state.RunKey.of(c, name, strategy, 0, pool, test, pretrained).fingerprint()

    real_to_dict = simulate_state.config_to_dict

    def before_the_setting(c):
        d = real_to_dict(c)
        d.pop("diversity")
        return d

    fp = {d: {s: fingerprint(dataclasses.replace(cfg, diversity=d), s) for s in ("asfda", "random")}
          for d in ("anatomy", "embedding")}
    monkeypatch.setattr(simulate_state, "config_to_dict", before_the_setting)
    old = {s: fingerprint(cfg, s) for s in ("asfda", "random")}
    monkeypatch.undo()
    assert fp["embedding"] == old and fp["anatomy"]["random"] == old["random"]
    assert fp["anatomy"]["asfda"] != old["asfda"]

    cfg.diversity = "embedding"
    run_simulation(cfg)
    cfg.diversity = "anatomy"
    with pytest.raises(RunSettingsChanged, match="diversity: embedding"):
        run_simulation(cfg)
    cfg.diversity, cfg.rounds = "embedding", 2
    assert max(r["n_labelled"] for r in run_simulation(cfg).rows if r["strategy"] == "asfda") == 2


def test_hold_back_leaves_a_discarded_rounds_volume_out_of_the_next_rounds(tmp_path: Path, tiny_bundle: Path,
                                                                            monkeypatch) -> None:
    """train.hold_back_discarded: round 0 discarded -> round 1 trains without round 0's pick (label kept)."""
    import asfda.adapter.training

    verdicts = iter([True, False, False])
    monkeypatch.setattr(asfda.adapter.training, "discards", lambda p0, p1: next(verdicts))
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
