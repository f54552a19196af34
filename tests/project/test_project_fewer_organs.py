"""Issue 35: a model with fewer organs than the dataset (a liver-only model on a liver + spleen pool) starts a
project; the classes it has no channel for are folded into background in training and said so."""

from __future__ import annotations

from pathlib import Path

import pytest

from _project_helpers import _answer, _settings, make_pool
from asfda.cli import main
from asfda.project import finetune_project, ingest_labels, init_project, next_query
from conftest import write_bundle


def test_a_one_organ_model_starts_a_project_on_a_two_organ_pool_and_adapts(tmp_path: Path,
                                                                        capsys: pytest.CaptureFixture) -> None:
    w = make_pool(tmp_path)
    liver_only = write_bundle(tmp_path / "liver_bundle", class_names=("background", "liver"))
    root = tmp_path / "proj"
    assert main(["init", "--model", str(liver_only), "--pool", str(w["pool"]), "--budget", "2", "--steps", "3",
                 "--device", "cpu", str(root)]) == 0
    out = capsys.readouterr().out
    assert "dataset classes ['spleen'] are not classes of the model: folded into background" in out
    q = next_query(root, progress=False)
    ingest_labels(root, _answer(w["truth"], q["ids"], tmp_path / "answers"))
    rec = finetune_project(root, progress=False)
    assert rec["round"] == 0 and (root / "model" / "configs" / "metadata.json").is_file()  # exported as its source


def test_a_model_covering_every_class_records_no_folded_class(tmp_path: Path) -> None:
    w = make_pool(tmp_path)
    p = init_project(tmp_path / "proj", str(w["model"]), str(w["pool"]), _settings())
    assert p.uncovered_classes() == []
