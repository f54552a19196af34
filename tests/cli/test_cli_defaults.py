"""Issue 36: the command line declares no copy of a settings default. Its choices are `asfda.options`'s; a flag that
sets a setting reads the settings dataclass's default (a run config's at once, a project's when the help is shown
and when the command runs), so changing the one definition changes the command line's default and its help."""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path
from typing import Any

import pytest

import asfda.config
import asfda.project
from asfda import options
from asfda.cli import build_parser, main
from asfda.config import RunConfig, TrainConfig
from asfda.project import ProjectSettings

MINIMAL_ARGV = {
    "simulate": [], "crossval": ["--data", "d", "--out", "o"],
    "evaluate": ["--model", "m", "--data", "d"], "predict": ["--model", "m", "--data", "d", "--out", "o"],
    "score": ["--model", "m", "--data", "d"], "query": ["--model", "m", "--data", "d", "--budget", "1"],
    "init": ["o", "--model", "m", "--pool", "p"], "next": [], "finetune": [],
    "monailabel-app": ["o", "--model", "m"],
}
# the flags whose value is a setting of a run or a project (dest -> the settings field)
SETTING_FLAGS = {"strategy": "strategy", "strategies": "strategies", "budget": "budget", "rounds": "rounds",
                 "seeds": "seeds", "seed": "seed", "steps": "train.steps", "alpha": "alpha",
                 "round0_gap": "round0_gap", "diversity": "diversity", "representativeness": "representativeness",
                 "temperature": "temperature0", "device": "device", "precision": "train.precision",
                 "output_activation": "output_activation", "cache_dir": "cache_dir"}


def _other_train() -> TrainConfig:
    return TrainConfig(steps=123, precision="bf16")


@dataclasses.dataclass
class OtherRun(RunConfig):
    """RunConfig with other defaults for every setting a flag sets."""

    alpha: float = 0.25
    round0_gap: str = "norm_kl"
    diversity: str = "anatomy"
    representativeness: str = "density"
    temperature0: float = 2.5
    device: str = "cpu"
    budget: int = 5
    rounds: int = 6
    train: TrainConfig = dataclasses.field(default_factory=_other_train)


@dataclasses.dataclass
class OtherProject(ProjectSettings):
    """ProjectSettings with other defaults for every setting `asfda init` takes from a flag."""

    strategy: str = "random"
    budget: int = 7
    seed: int = 5
    device: str = "cpu"
    train: TrainConfig = dataclasses.field(default_factory=_other_train)


@pytest.fixture
def other_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(asfda.config, "RunConfig", OtherRun)
    monkeypatch.setattr(asfda.project, "ProjectSettings", OtherProject)


def _parsed(command: str) -> argparse.Namespace:
    return build_parser().parse_args([command, *MINIMAL_ARGV[command]])


def _settings_values() -> dict[tuple[str, str], object]:
    out = {}
    for command in MINIMAL_ARGV:
        args = vars(_parsed(command))
        given = {a.lstrip("-").replace("-", "_") for a in MINIMAL_ARGV[command] if a.startswith("--")}
        out.update({(command, dest): args[dest] for dest in SETTING_FLAGS if dest in args and dest not in given})
    return out


def test_no_flag_declares_a_copy_of_a_settings_default(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every setting flag's default is None (the config file's, the project's or the settings' default applies when
    the command runs) or is read from the settings dataclass: with other defaults there, the flag's default follows."""
    before = _settings_values()
    monkeypatch.setattr(asfda.config, "RunConfig", OtherRun)
    monkeypatch.setattr(asfda.project, "ProjectSettings", OtherProject)
    after = _settings_values()
    assert before.keys() == after.keys() and len(before) > 20
    copies = {key: value for key, value in before.items() if value is not None and after[key] == value}
    assert copies == {}, f"flags with a literal copy of a settings default: {copies}"


def test_query_defaults_are_the_run_configs(other_defaults: None) -> None:
    args = _parsed("query")
    assert (args.alpha, args.round0_gap, args.diversity, args.representativeness) == (0.25, "norm_kl", "anatomy",
                                                                                      "density")
    assert _parsed("score").temperature == 2.5 and _parsed("evaluate").device == "cpu"
    assert _parsed("predict").precision == "bf16"  # the full precision a run defaults to


def _help(command: str, capsys: pytest.CaptureFixture) -> str:
    with pytest.raises(SystemExit):
        main([command, "--help"])
    return " ".join(capsys.readouterr().out.split())


def _flag_help(text: str, flag: str) -> str:
    """The help of ``flag`` in an argparse help text (up to the next flag)."""
    rest = text[text.index(flag + " ", text.index("options:")):]
    return rest[: rest.find(" --", len(flag))]


def test_the_help_shows_the_settings_defaults(capsys: pytest.CaptureFixture) -> None:
    init = _help("init", capsys)
    project = ProjectSettings()
    assert f"(default: {project.train.steps})" in _flag_help(init, "--steps")
    assert f"(default: {project.budget})" in _flag_help(init, "--budget")
    assert f"(default: {project.strategy})" in _flag_help(init, "--strategy NAME")
    simulate = _help("simulate", capsys)
    assert f"else {RunConfig().train.steps})" in _flag_help(simulate, "--steps")


def test_the_help_follows_the_settings(other_defaults: None, capsys: pytest.CaptureFixture) -> None:
    init = _help("init", capsys)
    assert "(default: 123)" in _flag_help(init, "--steps") and "(default: 7)" in _flag_help(init, "--budget")
    assert "(default: random)" in _flag_help(init, "--strategy NAME")
    assert "(default: cpu)" in _flag_help(init, "--device") and "(default: 5)" in _flag_help(init, "--seed")
    query = _help("query", capsys)
    assert "(default: 0.25)" in _flag_help(query, "--alpha") and "(default: density)" in query
    assert "(default: 5)" in _flag_help(query, "--seed")
    assert "else 123)" in _flag_help(_help("simulate", capsys), "--steps")


def test_init_without_flags_keeps_every_project_default(other_defaults: None, tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    seen: dict[str, Any] = {}

    def fake_init(out, model, pool, settings, **kwargs):
        seen["settings"] = settings
        raise asfda.errors.AsfdaError("stop here")

    monkeypatch.setattr(asfda.project, "init_project", fake_init)
    assert main(["init", str(tmp_path / "p"), "--model", "m", "--pool", "p"]) == 2
    assert seen["settings"] == OtherProject()
    assert main(["init", str(tmp_path / "p"), "--model", "m", "--pool", "p", "--steps", "9", "--no-guard",
                 "--budget", "3", "--precision", "fp32"]) == 2
    settings = seen["settings"]
    assert (settings.train.steps, settings.train.guard, settings.train.precision) == (9, False, "fp32")
    assert settings.budget == 3 and settings.seed == 5 and settings.strategy == "random"


def test_query_without_strategy_or_seed_uses_the_project_defaults(other_defaults: None,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    import asfda.query

    seen: dict[str, Any] = {}
    monkeypatch.setattr(asfda.query, "query_dataset", lambda *a, **kw: seen.update(strategy=a[2], **kw) or 1 / 0)
    with pytest.raises(ZeroDivisionError):
        main(["query", *MINIMAL_ARGV["query"], "--debug"])
    assert seen["strategy"] == "random" and seen["seed"] == 5 and seen["alpha"] == 0.25


@pytest.mark.parametrize(("flag", "choices"), [("--precision", options.PRECISIONS),
                                                ("--output-activation", options.OUTPUT_ACTIVATIONS),
                                                ("--round0-gap", options.ROUND0_GAPS),
                                                ("--diversity", options.DIVERSITY_SPACES),
                                                ("--representativeness", options.REPRESENTATIVENESS)])
def test_choice_lists_are_the_options(flag: str, choices: tuple[str, ...]) -> None:
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    found = [a.choices for p in sub.choices.values() for a in p._actions if flag in a.option_strings]
    assert found and all(c is choices for c in found)


def test_a_project_json_written_by_init_is_unchanged_by_the_defaults_moving_to_the_settings(
        tmp_path: Path, tiny_bundle: Path, tiny_dataset: Path) -> None:
    assert main(["init", str(tmp_path / "p"), "--model", str(tiny_bundle), "--pool", str(tiny_dataset),
                 "--no-progress"]) == 0
    state = json.loads((tmp_path / "p" / "project.json").read_text())
    assert state["settings"] == json.loads(json.dumps(dataclasses.asdict(ProjectSettings())))
