"""What the output-ownership and full-disk tests share (test_output_ownership.py, test_full_disk.py): file snapshots,
the one-line error, each command's arguments, and a check that no model is loaded before the output is checked.
Their fixtures (``world``, ``cwd_apart``) are in conftest.py."""

from __future__ import annotations

from pathlib import Path

import pytest


def _files(folder: Path) -> dict[Path, bytes]:
    return {p: p.read_bytes() for p in sorted(Path(folder).rglob("*")) if p.is_file()}


def _paths(folder: Path) -> set[Path]:
    return set(Path(folder).rglob("*"))


def _one_line_error(capsys: pytest.CaptureFixture) -> str:
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def _argv(command: str, w: dict, out: Path | str, *extra: str) -> list[str]:
    m, d, o = str(w["model"]), str(w["data"]), str(out)
    return {
        "query": ["query", "--model", m, "--data", d, "--budget", "1", "--strategy", "random", "--out", o],
        "score": ["score", "--model", m, "--data", d, "--strategies", "enpy", "--out", o],
        "predict": ["predict", "--model", m, "--images", d, "--out", o],
        "evaluate": ["evaluate", "--model", m, "--data", d, "--out", o],
        "simulate": ["simulate", "--model", m, "--pool", d, "--out", o, "--strategies", "random", "--budget", "1",
                     "--rounds", "1", "--steps", "1", "--no-upper-bound", "--no-guard"],
        "init": ["init", o, "--model", m, "--pool", d, "--steps", "1"],
        "phantom": ["phantom", o, "--n-source", "1", "--n-target", "1"],
    }[command] + ["--no-progress", *(["--device", "cpu"] if command != "phantom" else []), *extra]


def _no_model_loading(monkeypatch: pytest.MonkeyPatch) -> None:
    def boom(*args, **kwargs):
        raise AssertionError("the model was loaded before the output was checked")

    for where in ("asfda.predict.load_model", "asfda.query.load_model", "asfda.simulate.load_model",
                  "asfda.evaluate.load_model", "asfda.project.setup.load_model", "asfda.models.load_model"):
        monkeypatch.setattr(where, boom)
