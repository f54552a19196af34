"""What the bad-input tests share (test_bad_inputs.py, test_cold_start.py, test_hostile_images.py): a tiny dataset
and bundle, the one-line error, the files a command left, and each command's arguments."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from conftest import write_bundle, write_nnunet

AFFINE = np.diag([2.0, 2.0, 3.0, 1.0])
SHAPE = (20, 18, 12)
N = 4


def make_inputs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, Path]:
    monkeypatch.chdir(tmp_path)  # the CLI's prepared-volume cache goes to ./.cache
    return {"data": write_nnunet(tmp_path / "ds", n=N), "model": write_bundle(tmp_path / "bundle"), "root": tmp_path}


def _one_line_error(capsys: pytest.CaptureFixture) -> str:
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip() and not ln.startswith("asfda: WARNING")]
    assert len(lines) == 1 and "Traceback" not in err, err
    assert "fix:" in lines[0], lines[0]
    return lines[0]


def _tree(*folders: Path) -> dict[str, bytes]:
    """Every file under ``folders`` (hidden ones included), by path: what a command wrote or left. A project's
    prepared-volume cache and its lock file (the pid of the last command) are not its state, and left out."""
    return {str(p): p.read_bytes() for f in folders if Path(f).exists() for p in sorted(Path(f).rglob("*"))
            if p.is_file() and p.name != ".asfda.lock" and "cache" not in p.relative_to(f).parts}


def _argv(command: str, model: Path, data: Path, out: Path, *extra: str) -> list[str]:
    m, d, o = str(model), str(data), str(out)
    return {
        "score": ["score", "--model", m, "--data", d, "--strategies", "asfda", "--out", str(out / "s.csv")],
        "query": ["query", "--model", m, "--data", d, "--budget", "1", "--out", str(out / "q.json")],
        "predict": ["predict", "--model", m, "--images", d, "--out", o],
        "evaluate": ["evaluate", "--model", m, "--data", d, "--out", o],
        "simulate": ["simulate", "--model", m, "--pool", d, "--out", o, "--strategies", "random", "--budget", "1",
                     "--rounds", "1", "--steps", "1", "--no-upper-bound", "--no-guard"],
        "init": ["init", o, "--model", m, "--pool", d, "--steps", "1"],
    }[command] + list(extra) + ["--no-progress"]
