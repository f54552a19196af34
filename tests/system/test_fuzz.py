"""Property tests (hypothesis) of the two parsers users write input for: an nnU-Net ``dataset.json`` and the run
config. Whatever the input, it either loads or is refused with an `AsfdaError` (one line for the CLI), never another
exception. No model is loaded; each example takes milliseconds."""

from __future__ import annotations

import functools
import json
import string
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar, cast

import numpy as np
import pytest
import yaml
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from asfda.config import RunConfig, SemiConfig, TrainConfig, config_from_dict, load_config
from asfda.errors import AsfdaError
from asfda.io.datasets import load_dataset, parse_labels
from conftest import write_nnunet

FUZZ = settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                        HealthCheck.too_slow])

# ---------------------------------------------------------------------------------------------- value strategies
scalars = (st.none() | st.booleans() | st.integers(min_value=-(2**70), max_value=2**70)
           | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=12)
           | st.sampled_from(["", "0", "1", "-1", "1e999", "nan", "true", "no", "a,b", "1,2,3", "../x", "/abs",
                              ".nii.gz", ".nii", ".png", "\x00", "background", "liver", "fp32", "asfda"]))
json_values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4)
                           | st.dictionaries(st.text(max_size=8), inner, max_size=4), max_leaves=12)


def _labels() -> st.SearchStrategy:
    valid = st.integers(min_value=1, max_value=5).map(
        lambda n: {"background": 0, **{f"organ{i}": i for i in range(1, n + 1)}})
    names = st.sampled_from(["background", "liver", "spleen", "Liver", "", " ", "../x", "a/b"]) | st.text(max_size=8)
    values = st.integers(min_value=-3, max_value=6) | json_values
    return valid | st.dictionaries(names, values, max_size=5) | json_values


PATHS = st.sampled_from(["./imagesTr/case00_0000.nii.gz", "imagesTr/case01_0000.nii.gz", "../up.nii.gz",
                         "/etc/passwd", "C:\\x.nii.gz", "a/../../b", "..", ".", "", "\x00", "imagesTr\\..\\..\\x"])
ids = st.sampled_from(["case00", "../x", "/abs", "a/b", "", ".."]) | st.text(max_size=6)
entries = {
    "labels": _labels(),
    "channel_names": st.sampled_from([{"0": "MR"}, {"0": "CT", "1": "T2"}, {}]) | json_values,
    "file_ending": st.sampled_from([".nii.gz", ".nii", ".mha", ""]) | json_values,
    "numTraining": json_values,
    "training": st.lists(st.fixed_dictionaries({}, optional={"image": PATHS | json_values,
                                                             "label": PATHS | json_values}) | json_values,
                         max_size=3) | json_values,
    "test": st.lists(PATHS | json_values, max_size=3) | json_values,
    "dataset": st.dictionaries(ids, st.fixed_dictionaries({}, optional={
        "images": st.lists(PATHS, max_size=2) | json_values, "label": PATHS | json_values}) | json_values,
        max_size=3) | json_values,
    "asfda_linked_from": st.sampled_from([None, "", ".", "..", "/", "\x00", "/nonexistent", []]) | json_values,
}
VALID_LABELS = st.sampled_from([{"background": 0, "liver": 1}, {"background": 0, "liver": 1, "spleen": 2}])
# mostly a dataset.json that gets past its labels and channels (so the later checks are reached), else anything
plausible = st.fixed_dictionaries({"labels": VALID_LABELS, "channel_names": st.just({"0": "MR"})},
                                  optional={k: v for k, v in entries.items() if k not in ("labels", "channel_names")})
dataset_json = st.one_of(plausible, plausible, plausible,
                         st.fixed_dictionaries({"labels": _labels()},
                                               optional={k: v for k, v in entries.items() if k != "labels"}),
                         st.dictionaries(st.text(max_size=10), json_values, max_size=5), json_values)


@pytest.fixture(scope="module")
def dataset_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two tiny real cases (images and labels); each example rewrites only dataset.json."""
    return write_nnunet(tmp_path_factory.mktemp("fuzz") / "ds", n=2, shape=(6, 5, 4))


T = TypeVar("T")


def _loads_or_asfda_error(call: Callable[[], T]) -> T | AsfdaError:
    try:
        return call()
    except AsfdaError as exc:
        assert exc.one_line() and "\n" not in exc.one_line()
        return exc


# ---------------------------------------------------------------------------------------------- dataset.json
@FUZZ
@given(meta=dataset_json)
def test_any_dataset_json_loads_or_is_an_asfda_error(dataset_root: Path, meta: object) -> None:
    (dataset_root / "dataset.json").write_text(json.dumps(meta, allow_nan=True), encoding="utf-8")
    for require_labels in (False, True):
        result = _loads_or_asfda_error(functools.partial(load_dataset, dataset_root, require_labels=require_labels))
        if not isinstance(result, AsfdaError):  # loaded: the labels are what parse_labels accepts
            assert isinstance(meta, dict)
            assert result.labels == parse_labels(meta["labels"], dataset_root / "dataset.json")
            assert [c.case_id for c in result.cases] == ["case00", "case01"]


@FUZZ
@given(raw=st.binary(max_size=200) | st.text(max_size=200).map(lambda t: t.encode("utf-8", "surrogatepass")))
def test_any_bytes_as_dataset_json_load_or_are_an_asfda_error(dataset_root: Path, raw: bytes) -> None:
    (dataset_root / "dataset.json").write_bytes(raw)
    _loads_or_asfda_error(lambda: load_dataset(dataset_root))


@FUZZ
@given(raw=_labels())
def test_parse_labels_accepts_or_refuses(raw: object) -> None:
    result = _loads_or_asfda_error(lambda: parse_labels(raw, Path("dataset.json")))
    if isinstance(result, dict):
        assert sorted(result.values()) == list(range(len(result))) and all(isinstance(k, str) for k in result)


@pytest.mark.parametrize("text", ["[" * 100_000 + "]" * 100_000, '{"labels": ' * 50_000 + "1" + "}" * 50_000,
                                  "\ufeff{}", "", "null", "NaN", "1e999999"])
def test_pathological_dataset_json_is_an_asfda_error(dataset_root: Path, text: str) -> None:
    (dataset_root / "dataset.json").write_text(text, encoding="utf-8")
    with pytest.raises(AsfdaError) as e:
        load_dataset(dataset_root)
    assert str(dataset_root / "dataset.json") in e.value.one_line()


# ---------------------------------------------------------------------------------------------- run config
def _fields(cls: type) -> list[str]:
    import dataclasses

    return [f.name for f in dataclasses.fields(cls)]


def _section(cls: type) -> st.SearchStrategy:
    keys = st.sampled_from(_fields(cls)) | st.text(alphabet=string.ascii_lowercase + "_.", max_size=10)
    return st.dictionaries(keys, json_values, max_size=6)


config_values = {
    "model": st.just("m") | json_values, "pool": st.just("p") | json_values,
    "budget": st.integers(-2, 5) | json_values, "rounds": st.integers(-1, 4) | json_values,
    "seeds": st.lists(st.integers(-3, 3), max_size=3) | st.sampled_from(["0,1", "a", "", "1,,2"]) | json_values,
    "strategies": st.lists(st.sampled_from(["asfda", "random", "typo"]), max_size=3) | json_values,
    "test_fraction": st.floats() | json_values, "alpha": st.floats() | json_values,
    "diversity": st.sampled_from(["anatomy", "embedding", "none", "pixels"]) | json_values,
    "round0_gap": st.sampled_from(["feature_gap", "norm_kl", "x"]) | json_values,
    "train": st.fixed_dictionaries({}, optional={
        "steps": st.integers(-1, 50) | json_values, "lr": st.floats() | json_values,
        "patch_size": st.lists(st.integers(-1, 32), min_size=2, max_size=4) | st.sampled_from(["16,16,8", "1,2"])
        | json_values, "precision": st.sampled_from(["fp32", "bf16", "fp8"]),
        "augmentation": st.sampled_from(["none", "intensity", "spatial_mr", "rotate"]),
        "guard": st.booleans() | json_values}) | _section(TrainConfig) | json_values,
    "semi": _section(SemiConfig) | json_values,
}
run_config = (st.fixed_dictionaries({}, optional=config_values) | st.fixed_dictionaries({}, optional=config_values)
              | _section(RunConfig)
              | st.dictionaries(st.text(max_size=8) | st.integers() | st.none() | st.booleans(), json_values,
                                max_size=4)
              | json_values)
overrides = st.dictionaries(st.sampled_from(["model", "pool", "budget", "train.steps", "train.guard", "seeds",
                                             "strategies", "semi.enabled", "x.y", "budget.x", "train"]),
                            json_values, max_size=3)


@FUZZ
@given(data=run_config)
def test_config_from_dict_builds_or_refuses(data: object) -> None:
    result = _loads_or_asfda_error(lambda: config_from_dict(RunConfig, cast(Any, data)))
    if isinstance(result, RunConfig):
        assert isinstance(result.train, TrainConfig) and isinstance(result.semi, SemiConfig)


@FUZZ
@given(data=run_config, over=overrides)
def test_load_config_of_any_yaml_mapping_loads_or_refuses(tmp_path: Path, data: object, over: dict) -> None:
    path = tmp_path / "run.yaml"
    try:
        path.write_text(yaml.safe_dump(data, allow_unicode=True), encoding="utf-8")
    except (yaml.YAMLError, UnicodeEncodeError):
        assume(False)
    result = _loads_or_asfda_error(lambda: load_config(path, over))
    if isinstance(result, RunConfig):  # what loaded is usable as it is: validated values of the declared types
        assert isinstance(result.budget, int) and result.budget >= 1 and result.rounds >= 1
        assert all(isinstance(s, int) for s in result.seeds) and result.seeds
        assert all(isinstance(s, str) for s in result.strategies)
        assert isinstance(result.train.steps, int) and result.train.steps >= 1
        assert result.train.patch_size is None or (len(result.train.patch_size) == 3
                                                   and all(p >= 1 for p in result.train.patch_size))
        assert np.isfinite(result.train.lr) and 0 < result.test_fraction < 1


@FUZZ
@given(text=st.text(max_size=300))
def test_load_config_of_any_text_loads_or_refuses(tmp_path: Path, text: str) -> None:
    path = tmp_path / "run.yaml"
    path.write_text(text, encoding="utf-8")
    _loads_or_asfda_error(lambda: load_config(path, {"progress": False}))


@pytest.mark.parametrize("text", ["[" * 20_000 + "]" * 20_000, "a: &a [*a]", "- !!python/object:os.system x",
                                  "\x00", "train: 3", "train:\n  patch_size: 5", "seeds: {a: 1}", "budget: 1e999",
                                  "train:\n  lr: .nan", "42: 1", "? [a]\n: 1", "2020-01-01: x", "model: 2020-01-01"])
def test_pathological_run_configs_are_asfda_errors(tmp_path: Path, text: str) -> None:
    path = tmp_path / "run.yaml"
    path.write_text(text, encoding="utf-8")
    _loads_or_asfda_error(lambda: load_config(path, {"progress": False, "train.steps": 2}))


# ---------------------------------------------------------------------------------------------- project.json
def _project_state() -> dict:
    """A project.json as `asfda init` writes it, with one label, one finished round and a pending query (no model or
    pool is read: `Project` and `project_status` read project.json alone)."""
    from asfda.config import config_to_dict
    from asfda.project import ProjectSettings

    return {"format": 1, "created": "t", "model": "/m", "model_sha256_16": "0" * 16, "pool": "/p", "pool_cases": 4,
            "labels": {"background": 0, "liver": 1}, "class_map": {}, "settings": config_to_dict(ProjectSettings()),
            "labelled": {"case00": {"file": "labels/case00.nii.gz", "sha256": "0", "ingested": "t", "query_round": 0,
                                    "edit": {"edit_dice_mean": 0.9, "fraction_changed": 0.1}}},
            "rounds": [{"round": 0, "labelled_ids": ["case00"], "new_ids": ["case00"], "weights": "weights/round0.st",
                        "guard": {"reverted": False}}],
            "query": {"round": 1, "ids": ["case01"], "folder": "annotate/round1", "strategy": "asfda",
                      "temperature": 1.0, "components": {}},
            "weights": "weights/round0.st", "events": []}


def _fields_of(state: dict, prefix: str = "") -> list[str]:
    out = []
    for key, value in state.items():
        out.append(prefix + key)
        if isinstance(value, dict) and key != "labels":
            out += _fields_of(value, f"{prefix}{key}.")
    return out


PROJECT_FIELDS = _fields_of(_project_state()) + ["rounds.0.round", "rounds.0.labelled_ids", "rounds.0.weights",
                                                 "rounds.0.guard", "settings.trust_model_code", "labelled.../x"]


def _set(state: dict, dotted: str, value: object) -> None:
    """Sets the field ``dotted`` (``rounds.0.guard``); nothing when an earlier change removed its parent."""
    node: object = state
    *parents, last = [dotted.split(".")[0], dotted.split(".", 1)[1]] if "../" in dotted else dotted.split(".")
    try:
        for part in parents:
            node = node[int(part)] if isinstance(node, list) else node[part]  # type: ignore[index]
        if isinstance(node, list):
            node[int(last)] = value
        elif isinstance(node, dict):
            node[last] = value
    except (KeyError, IndexError, TypeError, ValueError):
        pass


@FUZZ
@given(changes=st.lists(st.tuples(st.sampled_from(PROJECT_FIELDS), json_values), min_size=1, max_size=3))
def test_any_project_json_edit_loads_or_is_an_asfda_error(tmp_path_factory: pytest.TempPathFactory,
                                                          changes: list) -> None:
    """Whatever a hand edit puts in a field of project.json, `Project` and `status` load it or refuse it in one
    line; what loads has settings of the declared types and files inside the project."""
    from asfda.project import Project, project_status

    root = tmp_path_factory.mktemp("proj")
    state = _project_state()
    for field, value in changes:
        _set(state, field, value)
    (root / "project.json").write_text(json.dumps(state, allow_nan=True), encoding="utf-8")
    result = _loads_or_asfda_error(lambda: Project(root))
    if isinstance(result, Project):
        s = result.settings
        assert isinstance(s.budget, int) and s.budget >= 1 and isinstance(s.train.steps, int)
        assert not hasattr(s, "trust_model_code")
        assert all(root.resolve() in (root / r["file"]).resolve().parents for r in result.state["labelled"].values())
        _loads_or_asfda_error(lambda: project_status(root))


@pytest.mark.parametrize("text", ["", "{", '{"format": 1', "[" * 100_000 + "]" * 100_000, "null", "NaN", "\x00",
                                  "\ufeff{}", '{"format": 1}'])
def test_an_empty_truncated_or_pathological_project_json_is_an_asfda_error(tmp_path: Path, text: str) -> None:
    from asfda.project import Project

    (tmp_path / "project.json").write_text(text, encoding="utf-8")
    with pytest.raises(AsfdaError) as e:
        Project(tmp_path)
    assert str(tmp_path / "project.json") in e.value.one_line() and "\n" not in e.value.one_line()
