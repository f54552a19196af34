"""One source for each setting: every default and every range check declared once, in the settings dataclasses
(`asfda.config`: `TrainConfig`, `SemiConfig`, `StrategySettings`, `AdaptSettings`, `RunConfig`; a project's
`ProjectSettings`), shared by a simulated run and a project, read by the command line through `default_of`; one
"did you mean"; one keyword form of `build_strategy`."""

from __future__ import annotations

import ast
import dataclasses
from pathlib import Path
from typing import Any

import pytest

import asfda.query
from _repo import SRC
from asfda.config import (
    AdaptSettings,
    RunConfig,
    SemiConfig,
    StrategySettings,
    TrainConfig,
    config_to_dict,
    default_of,
    defaults,
    load_config,
)
from asfda.errors import AsfdaError
from asfda.project.state import PROJECT_STEPS, ProjectSettings, _check_settings
from asfda.selection import build_strategy, get_strategy
from asfda.selection.strategies import ASFDAStrategy

SETTINGS = (TrainConfig, SemiConfig, StrategySettings, AdaptSettings, RunConfig, ProjectSettings)
OWN_HOMES = {"config.py", "project/state.py"}  # where the settings dataclasses are declared


def _declared_in(cls: type, name: str) -> type:
    """The class of ``cls``'s MRO whose body declares field ``name``."""
    return next(c for c in cls.__mro__ if name in c.__dict__.get("__annotations__", {}))


def test_run_and_project_settings_share_one_declaration_of_each_field() -> None:
    run, project = ({f.name for f in dataclasses.fields(c)} for c in (RunConfig, ProjectSettings))
    shared = run & project
    assert {"budget", "alpha", "round0_gap", "diversity", "representativeness", "temperature0", "grow_voxels",
            "class_map", "device", "output_activation", "train", "semi"} <= shared
    for name in sorted(shared - {"train"}):
        assert _declared_in(ProjectSettings, name) is _declared_in(RunConfig, name), name
    # the one field a project declares again: its recipe, whose default differs in the steps alone
    assert _declared_in(ProjectSettings, "train") is ProjectSettings
    base, mine = config_to_dict(TrainConfig()), config_to_dict(ProjectSettings().train)
    assert {k for k in base if base[k] != mine[k]} == {"steps"} and mine["steps"] == PROJECT_STEPS


def test_no_settings_dataclass_declares_a_field_of_another() -> None:
    """Each field name has one declaring class along an inheritance line (ProjectSettings.train aside, above), and the
    recipe's fields live in TrainConfig / SemiConfig only."""
    homes: dict[str, set[type]] = {}
    for cls in SETTINGS:
        for name in cls.__dict__.get("__annotations__", {}):
            homes.setdefault(name, set()).add(cls)
    for name, classes in homes.items():
        related = [(a, b) for a in classes for b in classes if a is not b and issubclass(a, b)]
        assert related in ([], [(ProjectSettings, AdaptSettings)]) and (not related or name == "train"), (name, classes)
    recipe = {f.name for f in dataclasses.fields(TrainConfig)} | {f.name for f in dataclasses.fields(SemiConfig)}
    outer = {f.name for c in (RunConfig, ProjectSettings) for f in dataclasses.fields(c)}
    assert recipe & outer == {"seed"}  # a project's query seed, not the training seed: two settings


def test_the_defaults_users_get_are_unchanged() -> None:
    # `asfda simulate` / `asfda crossval` without --steps, and a run config file without train.steps: 100;
    # `asfda init` without --steps (README: --steps 200) and `init_project(...)` without settings: 200
    assert load_config(None).train.steps == RunConfig().train.steps == TrainConfig().steps == 100
    assert ProjectSettings().train.steps == PROJECT_STEPS == 200
    run, project = config_to_dict(RunConfig()), config_to_dict(ProjectSettings())
    for name in ("budget", "alpha", "round0_gap", "diversity", "representativeness", "temperature0", "grow_voxels",
                 "device", "semi"):
        assert run[name] == project[name], name


def test_default_of_and_defaults_read_the_dataclasses() -> None:
    assert default_of("train.steps") == TrainConfig().steps
    assert default_of("train.steps", ProjectSettings) == PROJECT_STEPS
    assert default_of("budget", ProjectSettings) == default_of("budget") == RunConfig().budget
    assert default_of("diversity") == StrategySettings().diversity
    assert default_of("strategy", ProjectSettings) == ProjectSettings().strategy
    flat = defaults(ProjectSettings)
    assert flat["semi.pseudo_from"] == SemiConfig().pseudo_from and "train" not in flat and "model" not in flat
    assert set(defaults()) >= {"model", "seeds", "train.lr", "semi.enabled"}
    with pytest.raises(AsfdaError, match=r"no setting 'train.stesp' \(did you mean 'train.steps'\?\)"):
        default_of("train.stesp")
    with pytest.raises(AsfdaError, match="no setting 'rounds'"):
        default_of("rounds", ProjectSettings)  # a project has no rounds


# -------------------------------------------------------------------------- the checks, declared once and shared
SHARED_BAD = [("budget", 0, "budget must be >= 1"), ("alpha", 2.0, "alpha must be in [0, 1]"),
              ("temperature0", 0.0, "temperature0 must be a finite number > 0"),
              ("grow_voxels", -1, "grow_voxels must be >= 0"),
              ("train.steps", 0, "train.steps must be >= 1"),
              ("train.patch_size", (0, 8, 8), "train.patch_size must be three sides >= 1"),
              ("train.patch_size", (1000, 1000, 1000), "train.patch_size must be small enough"),
              ("train.lr", 0.0, "train.lr must be a number in (0, 1]"),
              ("semi.prob_threshold", 2.0, "semi.prob_threshold must be a number in [0, 1]"),
              ("diversity", "embeding", "diversity must be one of ['anatomy', 'embedding', 'none', 'batch'], got "
                                        "'embeding' (did you mean 'embedding'?)"),
              ("output_activation", "softmx", "output_activation must be one of ['softmax', 'sigmoid', 'none'], got "
                                              "'softmx' (did you mean 'softmax'?)"),
              ("semi.pseudo_from", "warm", "semi.pseudo_from must be one of ['previous', 'warmup'], got 'warm'")]


def _with(settings: ProjectSettings, name: str, value: Any) -> ProjectSettings:
    *parents, last = name.split(".")
    if parents:
        part = getattr(settings, parents[0])
        return dataclasses.replace(settings, **{parents[0]: dataclasses.replace(part, **{last: value})})
    return dataclasses.replace(settings, **{last: value})


@pytest.mark.parametrize(("name", "value", "message"), SHARED_BAD, ids=[f"{n}={v}" for n, v, _ in SHARED_BAD])
def test_a_run_config_and_a_project_refuse_the_same_values(name: str, value: object, message: str) -> None:
    with pytest.raises(AsfdaError) as run:
        load_config(None, {name: ",".join(map(str, value)) if isinstance(value, tuple) else value})
    assert message in str(run.value)
    # a project whose strategy reads none of asfda's settings is refused all the same
    with pytest.raises(AsfdaError) as project:
        _check_settings(_with(ProjectSettings(strategy="random"), name, value))
    assert message in str(project.value) and str(project.value).count("\n") == 0


def test_asfda_strategy_takes_the_same_checks_and_defaults() -> None:
    assert ASFDAStrategy().settings() == dataclasses.asdict(StrategySettings())
    with pytest.raises(ValueError, match=r"^alpha must be in \[0, 1\], got 1.5$"):
        ASFDAStrategy(alpha=1.5)


# ---------------------------------------------------------------------------------------------- build_strategy
def test_build_strategy_takes_one_settings_object() -> None:
    project = ProjectSettings(alpha=0.3, round0_gap="norm_kl", diversity="anatomy", representativeness="density")
    by_object = build_strategy("asfda", settings=project)
    by_name = build_strategy("asfda", alpha=0.3, round0_gap="norm_kl", diversity="anatomy",
                             representativeness="density")
    assert by_object.settings() == by_name.settings() == dataclasses.asdict(StrategySettings(
        alpha=0.3, round0_gap="norm_kl", diversity="anatomy", representativeness="density"))
    with pytest.raises(TypeError):  # the settings by position, the form of five call sites before: gone
        build_strategy("asfda", 0.3, "norm_kl", "anatomy", "density")  # type: ignore[call-arg, arg-type]
    assert build_strategy("asfda", settings=RunConfig(diversity="none")).settings()["diversity"] == "none"
    # a setting given by name replaces the object's; what neither gives is the one default
    assert build_strategy("asfda", settings=project, alpha=0.9).settings()["alpha"] == 0.9
    assert build_strategy("asfda").settings() == dataclasses.asdict(StrategySettings())
    assert build_strategy("random", settings=project).name == "random"


class _Built(Exception):
    """Stops `query_dataset` once its strategy is built (before any file or model is read)."""


@pytest.mark.parametrize(("given", "expected"), [
    ({}, StrategySettings()),
    ({"settings": ProjectSettings(alpha=0.3, round0_gap="norm_kl", diversity="anatomy", representativeness="density")},
     StrategySettings(alpha=0.3, round0_gap="norm_kl", diversity="anatomy", representativeness="density")),
    ({"settings": RunConfig(alpha=0.3, diversity="anatomy"), "diversity": "none", "representativeness": "typical"},
     StrategySettings(alpha=0.3, diversity="none", representativeness="typical")),
    ({"alpha": 0.7, "round0_gap": None}, StrategySettings(alpha=0.7)),
], ids=["defaults", "settings", "settings-and-names", "names"])
def test_query_dataset_takes_the_settings_object(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                                 given: dict, expected: StrategySettings) -> None:
    """`query_dataset` reads asfda's settings from one object (the CLI still passes them by name, each replacing the
    object's); what neither gives is the dataclass's default, not a copy of it."""
    built = []

    def build(name: str, **kwargs: Any):
        built.append(build_strategy(name, **kwargs))
        raise _Built

    monkeypatch.setattr(asfda.query, "build_strategy", build)
    with pytest.raises(_Built):
        asfda.query.query_dataset(tmp_path / "model", tmp_path / "data", "asfda", 1, tmp_path / "q.json", **given)
    assert built[0].settings() == dataclasses.asdict(expected)


# ---------------------------------------------------------------------------------------------- did you mean
def test_one_did_you_mean_for_keys_strategies_and_values() -> None:
    # a transposition of a two-letter key: one edit (difflib's ratio, used before for keys, saw no match)
    with pytest.raises(AsfdaError, match=r"unknown key 'rl' in config.train \(did you mean 'lr'\?\)"):
        load_config(None, {"train.rl": 0.1})
    with pytest.raises(AsfdaError, match=r"unknown strategy 'asfd' \(did you mean 'asfda'\?\)"):
        get_strategy("asfd")  # one edit from 'asd' too: the longer shared beginning wins
    with pytest.raises(AsfdaError) as far:
        load_config(None, {"cresote": 1})  # difflib offered 'report' here
    assert "did you mean" not in str(far.value)


# ---------------------------------------------------------------------------------------------- literals elsewhere
GENERIC = {"seed", "device", "progress", "precision", "trust_model_code", "cache_dir", "out_dir", "model", "pool",
           "test", "threads", "report", "enabled"}
"""Settings names that are also every command's plumbing (a device, a seed, the inference precision, a cache
folder): a function's default for them is its own, not a copy of a setting's."""
# No module but the settings' own holds a literal copy of a setting's default: a function's default for a setting
# is `default_of(...)` (grow_voxels in rounds / adapter.scoring / scoring, semi's fractions in training.reliable), the
# settings object itself (`query_dataset(settings=...)`, `build_strategy(settings=...)`), or none where every caller
# passes the setting (`summarize`'s budget, `pseudo_volumes`' flip_average). The demo's 60 steps are the demo's own
# choice, not a copy of train.steps: `asfda.demo.DEMO_STEPS`.


def _literal(node: ast.expr | None) -> bool:
    return isinstance(node, ast.Constant) and node.value is not None


def _parameter_defaults(node: ast.FunctionDef | ast.AsyncFunctionDef) -> list[tuple[ast.arg, ast.expr | None]]:
    """(parameter, default) of ``node``'s parameters with a default, and of its keyword-only ones (None: none)."""
    a = node.args
    positional = a.posonlyargs + a.args
    return [*zip(positional[len(positional) - len(a.defaults):], a.defaults), *zip(a.kwonlyargs, a.kw_defaults)]


def _redeclared(path: Path, names: set[str]) -> set[tuple[str, str, str]]:
    """(module, function / class / ``add_argument``, setting) of every literal default for a setting name in
    ``path``: a parameter's default, a class attribute, an ``add_argument("--name", default=...)``."""
    where, out = str(path.relative_to(SRC)), set[tuple[str, str, str]]()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            out |= {(where, node.name, arg.arg) for arg, d in _parameter_defaults(node)
                    if arg.arg in names and _literal(d)}
        elif isinstance(node, ast.ClassDef):
            out |= {(where, node.name, s.target.id) for s in node.body if isinstance(s, ast.AnnAssign)
                    and isinstance(s.target, ast.Name) and s.target.id in names and _literal(s.value)}
        elif isinstance(node, ast.Call) and getattr(node.func, "attr", "") == "add_argument":
            flags = {c.value.lstrip("-").replace("-", "_") for c in node.args
                     if isinstance(c, ast.Constant) and isinstance(c.value, str)}
            if any(k.arg == "default" and _literal(k.value) for k in node.keywords):
                out |= {(where, "add_argument", n) for n in flags & names}
    return out


def _read_defaults(path: Path) -> set[tuple[str, str, str, str]]:
    """(module, function, parameter, setting) of every parameter whose default is ``default_of("setting")``."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            for arg, d in _parameter_defaults(node):
                if (isinstance(d, ast.Call) and getattr(d.func, "id", "") == "default_of" and d.args
                        and isinstance(d.args[0], ast.Constant) and isinstance(d.args[0].value, str)):
                    out.add((str(path.relative_to(SRC)), node.name, arg.arg, d.args[0].value))
    return out


def test_no_module_redeclares_a_settings_default_as_a_literal() -> None:
    names = {f.name for cls in SETTINGS for f in dataclasses.fields(cls)} - GENERIC
    assert {"alpha", "budget", "steps", "grow_voxels", "strategy", "confident_fraction"} <= names
    found = set()
    for path in sorted(SRC.rglob("*.py")):
        if str(path.relative_to(SRC)) not in OWN_HOMES:
            found |= _redeclared(path, names)
    assert not found, sorted(found)
    read = set().union(*(_read_defaults(path) for path in SRC.rglob("*.py")))
    assert {("scoring/metrics.py", "anatomical_segmentation_difficulty", "grow_voxels", "grow_voxels"),
            ("rounds.py", "select_batch", "t0", "temperature0"),
            ("training/reliable.py", "select_reliable", "close_fraction", "semi.close_fraction")} <= read
    known = set(defaults())
    for where, function, parameter, name in sorted(read):  # each names a setting, the parameter's own
        short = name.rsplit(".", 1)[-1]
        assert name in known and (short == parameter or (parameter, short) == ("t0", "temperature0")), (
            where, function, parameter, name)
    # the settings' own modules hold one literal per default: the dataclasses'
    homes = set().union(*(_redeclared(SRC / home, names) for home in OWN_HOMES))
    assert {(w, c) for w, c, _ in homes} <= {("config.py", c.__name__) for c in SETTINGS} | {
        ("project/state.py", "ProjectSettings")}
