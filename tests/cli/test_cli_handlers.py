"""The command line's shape (issue 36): one handler per sub-command, no function over 80 lines in the CLI, and
``asfda.__main__`` starts nothing when imported."""

from __future__ import annotations

import argparse
import ast
import subprocess
import sys
from pathlib import Path

import pytest

from _repo import SRC
from asfda.cli import build_parser, commands, project_commands

MINIMAL_ARGV = {
    "demo": [], "phantom": ["o"], "simulate": [], "crossval": ["--data", "d", "--out", "o"],
    "evaluate": ["--model", "m", "--data", "d"], "predict": ["--model", "m", "--data", "d", "--out", "o"],
    "score": ["--model", "m", "--data", "d"], "query": ["--model", "m", "--data", "d", "--budget", "1"],
    "init": ["o", "--model", "m", "--pool", "p"], "next": [], "ingest": ["labels"], "finetune": [], "status": [],
    "set": ["p", "budget=3"], "monailabel-app": ["o", "--model", "m"],
}
HANDLERS = {"demo": commands.demo_command, "phantom": commands.phantom_command,
            "simulate": commands.simulate_command, "crossval": commands.crossval_command,
            "evaluate": commands.evaluate_command, "predict": commands.predict_command,
            "score": commands.score_command, "query": commands.query_command,
            "init": project_commands.init_command, "next": project_commands.next_command,
            "ingest": project_commands.ingest_command, "finetune": project_commands.finetune_command,
            "status": project_commands.status_command, "set": project_commands.set_command,
            "monailabel-app": project_commands.monailabel_app_command}


def _subcommands() -> dict[str, argparse.ArgumentParser]:
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return dict(sub.choices)


def test_every_subcommand_names_its_own_handler() -> None:
    assert set(_subcommands()) == set(MINIMAL_ARGV) == set(HANDLERS)
    parser = build_parser()
    for name, argv in MINIMAL_ARGV.items():
        args = parser.parse_args([name, *argv])
        assert args.func is HANDLERS[name], name


def test_dispatch_runs_the_handler_the_parser_named(monkeypatch: pytest.MonkeyPatch) -> None:
    from asfda.cli import main

    seen: list[str] = []

    def phantom_command(args) -> int:
        seen.append(args.out)
        return 7

    monkeypatch.setattr(commands, "phantom_command", phantom_command)
    # the parser binds the handler when it is built: build it after the patch
    assert main(["phantom", "somewhere"]) == 7 and seen == ["somewhere"]


def _long_functions(path: Path, limit: int = 80) -> list[str]:
    tree = ast.parse(path.read_text())
    return [f"{path.name}:{node.name} ({(node.end_lineno or node.lineno) - node.lineno + 1} lines)"
            for node in ast.walk(tree) if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
            and (node.end_lineno or node.lineno) - node.lineno + 1 > limit]


@pytest.mark.parametrize("path", [*sorted((SRC / "cli").glob("*.py")), SRC / "evaluate.py", SRC / "predict.py",
                                  SRC / "query.py", SRC / "__main__.py"], ids=lambda p: p.name)
def test_no_command_line_function_is_over_80_lines(path: Path) -> None:
    assert _long_functions(path) == []


def _python(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=300)


def test_importing_the_main_modules_starts_nothing() -> None:
    """pkgutil walks and documentation builders import every module: ``asfda.__main__`` and ``asfda.cli.__main__``
    must not run the command line then (it would print an error and exit 2)."""
    proc = _python("-c", "import asfda.__main__, asfda.cli.__main__; print('imported')")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "imported\n" and "name a command" not in proc.stderr


@pytest.mark.parametrize("module", ["asfda", "asfda.cli"])
def test_python_dash_m_still_runs_the_command_line(module: str) -> None:
    proc = _python("-m", module, "--help")
    assert proc.returncode == 0 and "usage: asfda" in proc.stdout
    proc = _python("-m", module)
    assert proc.returncode == 2 and "name a command" in proc.stderr


def test_asfda_help_imports_no_torch() -> None:
    code = ("import contextlib, io, sys\nfrom asfda.cli import main\nwith contextlib.redirect_stdout(io.StringIO()):\n"
            "    try:\n        main(['--help'])\n    except SystemExit:\n        pass\nprint('torch' in sys.modules)")
    proc = _python("-c", code)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "False"
