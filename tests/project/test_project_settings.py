"""A project's life after init: `asfda set`, the rest of the pool when it is smaller than the budget, the round the
guard discards (which volume, why, a replacement query, the label kept), the when-to-stop line of `status`, and
the settings project.json holds (a bad guard or diversity setting refused, random runs no scoring pass, a project
from before the diversity setting)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from _project_helpers import N_POOL, _answer, _settings, make_pool
from asfda.cli import main
from asfda.errors import AsfdaError
from asfda.project import (
    Project,
    ProjectSettings,
    finetune_project,
    ingest_labels,
    init_project,
    next_query,
    project_status,
    update_settings,
)
from asfda.training import TrainConfig


@pytest.fixture
def pool(tmp_path: Path) -> dict[str, Path]:
    return make_pool(tmp_path)


def _project(pool: dict, tmp_path: Path, **kw) -> Path:
    proj = tmp_path / "proj"
    init_project(proj, str(pool["model"]), str(pool["pool"]), _settings(**kw))
    return proj


def test_set_changes_settings_with_the_checks_of_init(pool: dict, tmp_path: Path,
                                                      capsys: pytest.CaptureFixture) -> None:
    proj = _project(pool, tmp_path)
    capsys.readouterr()
    assert main(["set", str(proj), "budget=3", "steps=7", "strategy=random", "train.guard=false"]) == 0
    out = capsys.readouterr().out
    assert "budget: 2 -> 3" in out and "train.steps: 4 -> 7" in out and "strategy: asfda -> random" in out
    assert "train.guard: True -> False" in out
    s = Project(proj).settings
    assert (s.budget, s.train.steps, s.strategy, s.train.guard) == (3, 7, "random", False)
    assert "settings: budget 2 -> 3" in Project(proj).state["events"][-1]["event"]
    assert json.loads((proj / "project.json.bak").read_text())["settings"]["budget"] == 3
    # the same value again: nothing written, and it says so
    assert main(["set", str(proj), "budget=3"]) == 0
    assert "nothing changed: budget is already 3" in capsys.readouterr().out
    assert update_settings(proj, {"budget": "3"}) == []


@pytest.mark.parametrize("item, match", [
    ("budjet=3", "unknown setting 'budjet' (did you mean 'budget'?)"),
    ("train.stesp=3", "did you mean 'train.steps'"),
    ("budget=0", "budget must be >= 1"),
    (f"budget={N_POOL + 1}", f"budget {N_POOL + 1} is larger than the pool ({N_POOL} cases)"),
    ("budget=two", "must be an integer"),
    ("steps=0", "train.steps must be >= 1"),
    ("precision=fp8", "train.precision must be one of ['fp32', 'bf16'], got 'fp8' (did you mean 'fp32'?)"),
    ("strategy=best", "strategy"),
    ("alpha=2", "alpha must be in [0, 1]"),
    ("class_map=liver=spleen", "class_map cannot be changed"),
    ("budget", "is not KEY=VALUE"),
])
def test_set_refuses_what_init_refuses_in_one_line(pool: dict, tmp_path: Path, item: str, match: str,
                                                    capsys: pytest.CaptureFixture) -> None:
    proj = _project(pool, tmp_path)
    before = (proj / "project.json").read_text()
    capsys.readouterr()
    assert main(["set", str(proj), item]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and match in err, err
    assert (proj / "project.json").read_text() == before


def test_next_offers_the_rest_of_the_pool_when_it_is_smaller_than_the_budget(pool: dict, tmp_path: Path,
                                                                             capsys: pytest.CaptureFixture) -> None:
    proj = _project(pool, tmp_path)
    update_settings(proj, {"budget": "4", "guard": "false"})
    q = next_query(proj, progress=False)
    assert len(q["ids"]) == 4
    ingest_labels(proj, _answer(pool["truth"], q["ids"], tmp_path / "a0"))
    finetune_project(proj, progress=False)
    capsys.readouterr()
    assert main(["next", str(proj), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "only 2 unlabeled cases are left, fewer than the budget 4: this round asks for all of them" in out
    assert "annotate these 2 cases" in out
    q1 = Project(proj).state["query"]
    assert len(q1["ids"]) == 2 and q1["unlabelled_left"] == 2
    # asked again before the labels are in: the same query, and it says so
    assert main(["next", str(proj), "--no-progress"]) == 0
    assert "still waiting for labels (shown again" in capsys.readouterr().out


def test_a_discarded_round_names_the_harmful_volume_and_next_replaces_it(pool: dict, tmp_path: Path,
                                                                         monkeypatch: pytest.MonkeyPatch,
                                                                         capsys: pytest.CaptureFixture) -> None:
    import asfda.adapter.training

    proj = tmp_path / "proj"
    init_project(proj, str(pool["model"]), str(pool["pool"]),
                 ProjectSettings(budget=1, device="cpu", train=TrainConfig(steps=2, batch_size=1, guard_volumes=2,
                                                                           hold_back_discarded=True)))
    q0 = next_query(proj, progress=False)
    ingest_labels(proj, _answer(pool["truth"], q0["ids"], tmp_path / "a0"))
    with monkeypatch.context() as m:  # the guard finds the round's model worse than the pretrained one
        m.setattr(asfda.adapter.training, "discards", lambda pretrained, adapted, *collapse: True)
        rec = finetune_project(proj, progress=False)
    assert rec["guard"]["reverted"] and rec["probe"]["change"] == 0.0  # the weights are those it started from
    st = project_status(proj)
    d = st["discarded_rounds"][0]
    assert d["harmful"] == q0["ids"] and d["round"] == 0 and len(d["cases"]) == 2
    assert st["last_round_discarded"] and "replacement" in st["next"]
    assert st["when_to_stop"]["recommendation"] == "no estimate yet"  # every round so far discarded
    capsys.readouterr()
    assert main(["status", str(proj)]) == 0
    out = capsys.readouterr().out
    assert f"round 0 was discarded by the guard: trained with {q0['ids'][0]} (its first round" in out
    assert f"plausibility {d['plausibility_adapted']:.3f} < {d['plausibility_pretrained']:.3f}" in out
    assert "its label is kept" in out and "trained on again" not in out  # held back: the setting is on
    assert "when to stop: no estimate yet" in out
    # next: a replacement query in its place; the harmful volume's label stays
    assert main(["next", str(proj), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert f"round 0's fine-tuning was discarded by the guard; this query replaces {q0['ids'][0]}" in out
    q1 = Project(proj).state["query"]
    assert q1["replaces"] == {"round": 0, "ids": q0["ids"]} and q0["ids"][0] not in q1["ids"]
    assert f"replaces {q0['ids'][0]}" in (proj / q1["folder"] / "README.txt").read_text()
    assert q0["ids"][0] in Project(proj).state["labelled"]
    assert (proj / Project(proj).state["labelled"][q0["ids"][0]]["file"]).is_file()
    # the next round trains without it (train.hold_back_discarded) and is kept: the estimate appears
    ingest_labels(proj, _answer(pool["truth"], q1["ids"], tmp_path / "a1"))
    with monkeypatch.context() as m:
        m.setattr(asfda.adapter.training, "discards", lambda pretrained, adapted, *collapse: False)
        rec1 = finetune_project(proj, progress=False)
    assert rec1["held_back"] == q0["ids"] and q0["ids"][0] not in rec1["trained_ids"]
    st = project_status(proj)
    assert st["held_back"] == q0["ids"] and not st["last_round_discarded"] and "replacement" not in st["next"]
    est = st["when_to_stop"]
    assert est["after_round"] == 1 and est["change"] == pytest.approx(rec1["probe"]["change"])
    assert est["recommendation"] in ("continue", "diminishing returns: consider stopping")


def test_status_shows_the_when_to_stop_estimate_after_a_round(pool: dict, tmp_path: Path,
                                                              capsys: pytest.CaptureFixture) -> None:
    from asfda.stopping import CONTINUE, PROBE_VOLUMES, STOP

    proj = _project(pool, tmp_path, strategy="random")
    update_settings(proj, {"guard": "false"})  # the tiny test model's rounds would be discarded
    assert project_status(proj)["when_to_stop"]["recommendation"] == "no estimate yet"
    q = next_query(proj, progress=False)
    ingest_labels(proj, _answer(pool["truth"], q["ids"], tmp_path / "a0"))
    capsys.readouterr()
    assert main(["finetune", str(proj), "--no-progress", "--device", "cpu", "--precision", "fp32"]) == 0
    out = capsys.readouterr().out
    assert "when to stop: " in out
    rec = Project(proj).state["rounds"][0]
    probe = rec["probe"]
    assert probe["cases"] and len(probe["cases"]) <= PROBE_VOLUMES and not set(probe["cases"]) & set(q["ids"])
    assert 0.0 <= probe["change"] <= 1.0 and rec["precision"] == "fp32"
    est = project_status(proj)["when_to_stop"]
    assert est["after_round"] == 0 and est["predicted_gain"] is not None
    assert main(["status", str(proj)]) == 0
    assert f"when to stop: {est['recommendation']}" in capsys.readouterr().out
    # the user's threshold decides the recommendation: a gain of at most 0.1 is below 0.2, and never below 0
    assert main(["set", str(proj), "stop_gain=0.2"]) == 0
    est = project_status(proj)["when_to_stop"]
    assert est["threshold"] == 0.2 and est["recommendation"] == STOP
    update_settings(proj, {"stop_gain": "0"})
    assert project_status(proj)["when_to_stop"]["recommendation"] == CONTINUE
    with pytest.raises(AsfdaError, match="stop_gain must be a number in"):
        update_settings(proj, {"stop_gain": "1.5"})
    with pytest.raises(AsfdaError, match="train.precision must be one of"):
        finetune_project(proj, progress=False, force=True, precision="fp8")


def test_ingest_of_labels_already_in_says_so(pool: dict, tmp_path: Path,
                                             capsys: pytest.CaptureFixture) -> None:
    proj = _project(pool, tmp_path)
    q = next_query(proj, progress=False)
    answers = _answer(pool["truth"], q["ids"], tmp_path / "a0")
    assert main(["ingest", str(answers), str(proj), "--no-progress"]) == 0
    capsys.readouterr()
    assert main(["ingest", str(answers), str(proj), "--no-progress"]) == 0
    assert "nothing new: 2 labels in" in capsys.readouterr().out


def test_set_refuses_a_device_name_that_is_not_one(tmp_path) -> None:
    from asfda.project.state import ProjectSettings, _check_settings

    _check_settings(ProjectSettings(device="cuda:1"))
    with pytest.raises(AsfdaError, match="device must be one of"):
        _check_settings(ProjectSettings(device="evil"))


# ---------------------------------------------------------------------------------------------- project.json settings
def test_project_json_with_a_bad_guard_setting_is_refused(pool: dict, tmp_path: Path) -> None:
    proj = tmp_path / "proj"
    init_project(proj, str(pool["model"]), str(pool["pool"]), _settings())
    state = json.loads((proj / "project.json").read_text())
    state["settings"]["train"]["guard_volumes"] = 0
    (proj / "project.json").write_text(json.dumps(state))
    with pytest.raises(AsfdaError, match="guard_volumes"):
        Project(proj)


def test_project_json_with_a_bad_diversity_setting_is_refused(pool: dict, tmp_path: Path) -> None:
    proj = tmp_path / "proj"
    init_project(proj, str(pool["model"]), str(pool["pool"]), _settings())
    state = json.loads((proj / "project.json").read_text())
    assert state["settings"]["diversity"] == "embedding"
    state["settings"]["diversity"] = "pixels"
    (proj / "project.json").write_text(json.dumps(state))
    with pytest.raises(AsfdaError, match="diversity"):
        Project(proj)


def test_next_with_random_runs_no_scoring_pass(pool: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from asfda.adapter import Adapter

    def boom(*args, **kwargs):
        raise AssertionError("random scored the pool")

    proj = tmp_path / "proj"
    init_project(proj, str(pool["model"]), str(pool["pool"]), _settings(strategy="random"))
    monkeypatch.setattr(Adapter, "score_pool", boom)
    monkeypatch.setattr(Adapter, "fit_temperature", boom)
    record = next_query(proj, progress=False)
    assert len(record["ids"]) == 2 and record["strategy"] == "random"


def test_a_project_from_before_a_setting_keeps_the_default_of_its_day(pool: dict, tmp_path: Path) -> None:
    proj = tmp_path / "proj"
    init_project(proj, str(pool["model"]), str(pool["pool"]), _settings())
    state = json.loads((proj / "project.json").read_text())
    del state["settings"]["diversity"], state["settings"]["representativeness"]
    del state["settings"]["train"]["hold_back_discarded"]
    (proj / "project.json").write_text(json.dumps(state))
    assert Project(proj).settings.diversity == "embedding"
    assert not Project(proj).settings.train.hold_back_discarded  # the defaults of its day, not today's
    record = next_query(proj, progress=False)
    assert record["strategy_settings"] == {"alpha": 0.5, "round0_gap": "feature_gap", "diversity": "embedding",
                                           "representativeness": "none"}
