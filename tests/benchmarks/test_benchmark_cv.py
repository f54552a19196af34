"""benchmarks/cv.py, the thin caller of `asfda.crossval` kept for its flags and the runs made with them: the flags
become every fold's recipe, --summarize-only reads what is on disk and refuses a folder of other folds. The
cross-validation itself is tested in tests/crossval/test_crossval.py."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

import cv
from asfda.crossval.folds import FOLDS_FILE, fold_assignment
from conftest import write_nnunet


def test_flags_become_the_recipe_of_every_fold(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import asfda.crossval.run as run

    calls: list[Any] = []
    monkeypatch.setattr(run, "run_simulation", calls.append)
    data = write_nnunet(tmp_path / "ds", n=4)
    out, cache = tmp_path / "out", tmp_path / "cache"
    summary = cv.main(["--model", "m", "--data", str(data), "--folds", "2", "--strategies", "asfda,random",
                       "--seeds", "0,1", "--rounds", "3", "--steps", "7", "--precision", "fp32", "--augmentation",
                       "spatial_mr", "--restart", "--hold-back", "--representativeness", "density", "--threads", "1",
                       "--upper-bound-steps", "9", "--no-report", "--only-folds", "1", "--out", str(out),
                       "--cache-dir", str(cache)])
    (cfg,) = calls  # one call: both strategies share the seeds, the upper bound runs with them
    fold = cache / "cv" / "ds" / "2folds_seed0" / "fold1"
    assert (cfg.pool, cfg.test, cfg.out_dir) == (str(fold / "pool"), str(fold / "test"), str(out / "fold1"))
    assert (cfg.model, cfg.strategies, cfg.seeds, cfg.budget, cfg.rounds) == ("m", ["asfda", "random"], [0, 1], 1, 3)
    assert (cfg.upper_bound, cfg.upper_bound_steps, cfg.report, cfg.threads) == (True, 9, False, 1)
    assert (cfg.representativeness, cfg.evaluate_tta) == ("density", False)
    t = cfg.train
    assert (t.steps, t.batch_size, t.precision, t.augmentation, t.restart, t.hold_back_discarded) == \
        (7, 2, "fp32", "spatial_mr", True, True)
    assert summary["seeds"] == {"asfda": [0, 1], "random": [0, 1]} and summary["upper_bound_seeds"] == [0, 1]
    assert json.loads((out / FOLDS_FILE).read_text())["assignment"] == fold_assignment(
        [f"case{i:02d}" for i in range(4)], 2, 0)


def test_main_summarize_only_reads_disk_and_refuses_other_folds(tmp_path: Path) -> None:
    data = write_nnunet(tmp_path / "ds", n=4)
    out = tmp_path / "out"
    args = ["--data", str(data), "--folds", "2", "--strategies", "random", "--seeds", "0", "--rounds", "1",
            "--no-upper-bound", "--out", str(out)]
    # nothing on disk yet: a partial summary, everything missing
    summary = cv.main([*args, "--summarize-only"])
    assert summary["complete"] is False and len(summary["missing"]) == 4 and len(summary["per_volume"]) == 4
    assert summary["strategies"]["random"]["auc"] is None
    (out / FOLDS_FILE).write_text(json.dumps({"folds": 2, "fold_seed": 5, "assignment": [["case00"], ["x"]]}))
    with pytest.raises(SystemExit):
        cv.main([*args, "--summarize-only"])
