"""Issue 36: every test asserts something that can fail: an ``assert``, ``pytest.raises``/``warns``/``fail``, or a call
to a helper of its own module that does (a test that only runs code passes whatever the code returns)."""

from __future__ import annotations

import ast

from _repo import REPO

CHECKS = ("assert", "pytest.raises", "pytest.warns", "pytest.fail")


def _checks(node: ast.AST) -> bool:
    src = ast.unparse(node)
    return any(word in src for word in CHECKS)


def unchecked_tests(source: str) -> list[str]:
    """The test functions of a module's ``source`` that check nothing, themselves or through a helper of the module."""
    tree = ast.parse(source)
    functions = [n for n in tree.body if isinstance(n, ast.FunctionDef)]
    helpers = {n.name for n in functions if not n.name.startswith("test_") and _checks(n)}
    out = []
    for node in functions:
        if node.name.startswith("test_") and not _checks(node):
            called = {c.func.id for c in ast.walk(node) if isinstance(c, ast.Call) and isinstance(c.func, ast.Name)}
            if not called & helpers:
                out.append(node.name)
    return out


def test_every_test_function_checks_something() -> None:
    files = sorted((REPO / "tests").rglob("test_*.py"))
    assert len(files) > 60 and any(p.parent.name == "scoring" for p in files)  # the whole tree, sub-folders too
    unchecked = [f"{p.relative_to(REPO)}::{name}" for p in files for name in unchecked_tests(p.read_text("utf-8"))]
    assert not unchecked, f"tests that assert nothing: {unchecked}"


def test_the_scan_finds_a_test_that_asserts_nothing() -> None:
    source = ("def _helper(x):\n    return x\n\n\ndef test_runs_only():\n    _helper(1)\n\n\n"
              "def _check(x):\n    assert x\n\n\ndef test_through_a_helper():\n    _check(1)\n\n\n"
              "def test_raises():\n    with pytest.raises(ValueError):\n        int('x')\n")
    assert unchecked_tests(source) == ["test_runs_only"]
