from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from asfda.cli import build_parser, main

SUBCOMMANDS = ["demo", "phantom", "simulate", "evaluate", "predict", "score", "query", "init", "next", "ingest",
               "finetune", "status"]


def test_help_lists_subcommands(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for name in SUBCOMMANDS:
        assert name in out


@pytest.mark.parametrize("name", SUBCOMMANDS)
def test_every_subcommand_has_help(name: str, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as e:
        main([name, "--help"])
    assert e.value.code == 0
    assert "usage:" in capsys.readouterr().out


def test_query_help_names_the_package_default_diversity(capsys: pytest.CaptureFixture) -> None:
    from asfda.selection import DEFAULT_DIVERSITY

    with pytest.raises(SystemExit):
        main(["query", "--help"])
    assert f"(default: {DEFAULT_DIVERSITY})" in " ".join(capsys.readouterr().out.split())


def test_parser_knows_every_subcommand() -> None:
    parser = build_parser()
    actions = [a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction"]
    assert set(SUBCOMMANDS) <= set(actions[0].choices)


def test_bad_input_is_one_line_exit_2_no_traceback(tmp_path: Path) -> None:
    (tmp_path / "ds" / "imagesTr").mkdir(parents=True)
    proc = subprocess.run([sys.executable, "-m", "asfda.cli", "evaluate", "--model", str(tmp_path / "nope"),
                           "--data", str(tmp_path / "ds")], capture_output=True, text=True)
    assert proc.returncode == 2
    lines = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and "Traceback" not in proc.stderr
    assert str(tmp_path / "nope") in lines[0]


def test_missing_dataset_json_via_cli(tmp_path: Path, tiny_bundle: Path) -> None:
    (tmp_path / "ds" / "imagesTr").mkdir(parents=True)
    code = main(["evaluate", "--model", str(tiny_bundle), "--data", str(tmp_path / "ds"), "--no-progress"])
    assert code == 2


def test_unknown_config_key_is_rejected(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    cfg = tmp_path / "run.yaml"
    cfg.write_text("model: m\npool: p\nbudgte: 3\n")
    assert main(["simulate", "--config", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert "budgte" in err and "budget" in err


def test_guard_settings_reach_the_run_config(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from asfda.config import load_config

    assert load_config(None, {"train.guard": False}).train.guard is False
    assert load_config(None, {}).train.guard is True  # on by default
    cfg = tmp_path / "run.yaml"
    cfg.write_text("model: m\npool: p\ntrain:\n  guard_volumes: 0\n")
    assert main(["simulate", "--config", str(cfg)]) == 2
    assert "train.guard_volumes" in capsys.readouterr().err
