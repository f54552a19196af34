"""A simulation resumes: after an exception or kill -9 mid-round without redoing finished rounds, with the guard's
discarded rounds, copied without its weights, moved to another folder, from a state.json of the previous format,
and from before the diversity setting; other settings are refused."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from _simulate_helpers import _cfg
from asfda.adapter import Adapter
from asfda.config import RunConfig
from asfda.io import load_dataset
from asfda.models import load_model
from asfda.simulate import run_simulation, split_pool
from asfda.training import TrainConfig
from conftest import write_nnunet


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


def test_rounds_the_guard_discards_keep_the_pretrained_model_through_a_resume(tmp_path: Path, tiny_bundle: Path,
                                                                              monkeypatch) -> None:
    """Every round discarded: each round ends with the pretrained weights and zero-shot Dice, the exported
    bundle says so, and a second run resumes (nothing retrained) to the same rows."""
    import asfda.adapter.training

    monkeypatch.setattr(asfda.adapter.training, "discards", lambda p0, p1, *collapse: True)
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
