"""The cold start reached from `asfda query`: a model none of whose classes is a dataset label picks by diversity
alone (as the Python API does); strategies that read predictions and the other commands refuse it; one matching
class keeps the name match."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from _bad_inputs_helpers import _argv, _one_line_error, make_inputs
from asfda.cli import main
from conftest import write_bundle


@pytest.fixture
def inputs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, Path]:
    return make_inputs(tmp_path, monkeypatch)


# ---------------------------------------------------------------------------------------------- cold start
@pytest.fixture
def foreign_model(tmp_path: Path) -> Path:
    """A model none of whose classes is a label of the tiny dataset (liver, spleen)."""
    return write_bundle(tmp_path / "foreign", class_names=("background", "kidney", "lung"))


@pytest.mark.parametrize("strategy", ["asfda", "coreset", "random"])
def test_query_with_a_model_matching_no_class_is_the_cold_start(inputs: dict, foreign_model: Path, strategy: str,
                                                                capsys: pytest.CaptureFixture) -> None:
    out = inputs["root"] / "q.json"
    assert main(["query", "--model", str(foreign_model), "--data", str(inputs["data"]), "--strategy", strategy,
                 "--budget", "2", "--out", str(out), "--no-progress"]) == 0
    rec = json.loads(out.read_text())
    assert len(rec["ids"]) == 2 and rec["cold_start"] is True
    assert rec["class_map"] == {"background": "background", "liver": None, "spleen": None}
    if strategy == "asfda":
        assert all(c["cold_start"] == 1.0 and "asd" not in c for c in rec["components"].values())
    assert "cold start" in capsys.readouterr().out  # said, not silent


def test_cold_start_query_matches_the_python_api(inputs: dict, foreign_model: Path) -> None:
    """The CLI's cold-start pick is the strategy's `_cold_start` on the pretrained embeddings of the pool."""
    from asfda.adapter import Adapter
    from asfda.io import load_dataset
    from asfda.models import load_model
    from asfda.selection import get_strategy

    out = inputs["root"] / "q.json"
    assert main(["query", "--model", str(foreign_model), "--data", str(inputs["data"]), "--budget", "3",
                 "--out", str(out), "--no-progress"]) == 0
    ds = load_dataset(inputs["data"])
    adapter = Adapter(load_model(foreign_model), ds.class_names, cache_dir=None, progress=False, cold_start_ok=True)
    assert adapter.cold_start
    pool = adapter.pool_scores(list(ds.cases), [], 1.0, 0)
    assert json.loads(out.read_text())["ids"] == get_strategy("asfda").select(pool, 3, 0).ids


@pytest.mark.parametrize("strategy", ["enpy", "asd", "bald", "tta", "badge", "mc_entropy"])
def test_strategies_that_read_predictions_refuse_the_cold_start_before_scoring(
        inputs: dict, foreign_model: Path, strategy: str, capsys: pytest.CaptureFixture,
        monkeypatch: pytest.MonkeyPatch) -> None:
    from asfda.adapter import Adapter

    def boom(*args, **kwargs):
        raise AssertionError("the pool was scored before the strategy was refused")

    monkeypatch.setattr(Adapter, "score_pool", boom)
    out = inputs["root"] / "q.json"
    assert main(["query", "--model", str(foreign_model), "--data", str(inputs["data"]), "--strategy", strategy,
                 "--budget", "1", "--out", str(out), "--no-progress"]) == 2
    line = _one_line_error(capsys)
    assert strategy in line and "no output for any" in line and "asfda" in line
    assert not out.exists()


@pytest.mark.parametrize("command", ["score", "predict", "evaluate", "simulate", "init"])
def test_other_commands_refuse_a_model_matching_no_class(inputs: dict, foreign_model: Path, command: str,
                                                         capsys: pytest.CaptureFixture) -> None:
    out = inputs["root"] / "out"
    assert main(_argv(command, foreign_model, inputs["data"], out)) == 2
    line = _one_line_error(capsys)
    assert "no dataset label" in line and "--class-map" in line and "asfda query" in line
    assert not out.exists()


def test_one_matching_class_keeps_the_name_match(inputs: dict, tmp_path: Path) -> None:
    """At least one class matches: as before, the others get new output channels, and no cold start."""
    partial = write_bundle(tmp_path / "partial", class_names=("background", "liver", "lung"))
    out = inputs["root"] / "q.json"
    assert main(["query", "--model", str(partial), "--data", str(inputs["data"]), "--strategy", "enpy",
                 "--budget", "1", "--out", str(out), "--no-progress"]) == 0
    rec = json.loads(out.read_text())
    assert rec["cold_start"] is False and rec["class_map"] == {"background": "background", "liver": "liver",
                                                               "spleen": None}
