"""The benchmarks' shape, checked: no function longer than one screen of reading, no module longer than one sitting,
and no `sys.path` edit in benchmarks/ or tests/ (pytest finds benchmarks/ through `pythonpath` in pyproject.toml; a
script run as `python benchmarks/x.py` has its own folder on the path), nor a benchmark that needs tests/ to run."""

from __future__ import annotations

import ast
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from _repo import REPO as ROOT

BENCHMARKS = ROOT / "benchmarks"
MAX_FUNCTION_LINES = 80
MAX_MODULE_LINES = 420
# sys.path.insert / append / extend / remove, sys.path = ..., sys.path[...] = ..., sys.path += ..., pytest's
# monkeypatch.syspath_prepend and site.addsitedir
PATH_EDIT = re.compile(r"sys\.path\s*(\.\s*(insert|append|extend|remove)\b|\[[^\]]*\]\s*=|\+?=[^=])"
                       r"|syspath_prepend|addsitedir")


def _scripts() -> list[Path]:
    return sorted(BENCHMARKS.glob("*.py"))


def _rel(path: Path) -> str:
    return str(path.relative_to(ROOT))


def long_functions(path: Path, limit: int = MAX_FUNCTION_LINES) -> list[str]:
    """``name (n lines)`` of every function or method in ``path`` longer than ``limit`` lines (def to last line)."""
    tree = ast.parse(path.read_text())
    return [f"{node.name} ({(node.end_lineno or node.lineno) - node.lineno + 1} lines)" for node in ast.walk(tree)
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
            and (node.end_lineno or node.lineno) - node.lineno + 1 > limit]


def path_edits(path: Path) -> list[str]:
    """The lines of ``path`` that edit the module search path."""
    return [f"{i}: {line.strip()}" for i, line in enumerate(path.read_text().splitlines(), 1) if PATH_EDIT.search(line)]


def imports_of(path: Path) -> set[str]:
    """The top-level names of every module ``path`` imports (absolute imports only)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
            names.add(node.module.split(".")[0])
    return names


@pytest.mark.parametrize("path", _scripts(), ids=_rel)
def test_no_benchmark_function_is_longer_than_a_screen(path: Path) -> None:
    assert not long_functions(path), (f"{_rel(path)}: {', '.join(long_functions(path))}: split it into named steps "
                                      f"(at most {MAX_FUNCTION_LINES} lines a function)")


@pytest.mark.parametrize("path", _scripts() + sorted((ROOT / "tests").rglob("*.py")), ids=_rel)
def test_no_benchmark_or_test_module_is_longer_than_one_sitting(path: Path) -> None:
    """Issue 36: no module over 420 lines in benchmarks/ and tests/ (src/: tests/system/test_architecture.py)."""
    n = len(path.read_text().splitlines())
    assert n <= MAX_MODULE_LINES, f"{_rel(path)} has {n} lines (split it by job: at most {MAX_MODULE_LINES})"


@pytest.mark.parametrize("path", sorted((ROOT / "src" / "asfda").rglob("*.py")), ids=_rel)
def test_no_src_function_is_longer_than_a_screen(path: Path) -> None:
    """Issue 36: no function over 80 lines in src/ either."""
    assert not long_functions(path), f"{_rel(path)}: {', '.join(long_functions(path))} (at most {MAX_FUNCTION_LINES})"


# this file spells the edits it looks for, in its pattern and its own check of it
@pytest.mark.parametrize("path", _scripts() + sorted(set((ROOT / "tests").rglob("*.py")) - {Path(__file__).resolve()}),
                         ids=_rel)
def test_nothing_edits_the_module_search_path(path: Path) -> None:
    assert not path_edits(path), (f"{_rel(path)} edits sys.path ({'; '.join(path_edits(path))}): import benchmark "
                                  "modules by name (pytest's pythonpath and a script's own folder put them on it)")


@pytest.mark.parametrize("path", _scripts(), ids=_rel)
def test_a_benchmark_imports_nothing_from_tests(path: Path) -> None:
    tests_modules = {p.stem for p in (ROOT / "tests").glob("*.py")}
    from_tests = sorted(imports_of(path) & tests_modules)
    assert not from_tests, (f"{_rel(path)} imports {', '.join(from_tests)} from tests/: move what it needs to a "
                            "module of benchmarks/ (benchmarks/_data.py writes the tiny datasets and bundles)")


def test_the_checks_find_what_they_look_for(tmp_path: Path) -> None:
    """Each check flags a file that breaks its rule, so that the tests above cannot pass by finding nothing."""
    bad = tmp_path / "bad.py"
    body = "\n".join(f"    x = {i}" for i in range(MAX_FUNCTION_LINES))
    bad.write_text(f"import sys\nimport conftest\nfrom _data import write_bundle\n\n\ndef long():\n{body}\n\n\n"
                   "def short():\n    return 1\n\n\nsys.path.insert(0, 'x')\nsys.path[:0] = ['y']\nsys.path += ['z']\n"
                   "monkeypatch.syspath_prepend('w')\nok = sys.path == []\nprint(sys.path)\n")
    assert long_functions(bad) == [f"long ({MAX_FUNCTION_LINES + 1} lines)"]
    assert [line.split(": ", 1)[1] for line in path_edits(bad)] == [
        "sys.path.insert(0, 'x')", "sys.path[:0] = ['y']", "sys.path += ['z']", "monkeypatch.syspath_prepend('w')"]
    assert imports_of(bad) == {"sys", "conftest", "_data"}


@pytest.mark.slow
@pytest.mark.parametrize("path", [p for p in _scripts() if not p.name.startswith("_")], ids=_rel)
def test_every_script_runs_as_a_script(path: Path) -> None:
    """`python benchmarks/x.py --help` from the repository root, with nothing added to the path, exits 0."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = subprocess.run([sys.executable, _rel(path), "--help"], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, f"{_rel(path)} --help failed:\n{done.stderr[-2000:]}"
    assert "usage:" in done.stdout
