"""The package's shape, checked: imports point one way through the layers docs/architecture.md draws, no import is
hidden in a function to dodge a cycle, and no module grows past what one reads in a sitting."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from _repo import SRC

# low -> high; a module may import its own layer or a lower one (docs/architecture.md, "Layers")
LAYERS: list[tuple[str, ...]] = [
    ("errors", "options", "config_files", "config", "io", "cache", "metrics", "annotation", "memory", "distributed"),
    ("models",),
    ("engine",),
    ("scoring",),
    ("selection",),
    ("training",),
    ("evaluation", "stopping"),
    ("results", "report"),
    ("adapter",),
    ("rounds",),
    ("simulate", "simulate_state", "crossval", "project", "monailabel", "query", "predict", "evaluate",
     "run_previews", "phantom", "demo", "cli", "__init__", "__main__"),
]
MAX_LINES = 420
# function-level imports of asfda modules that are not there to dodge a cycle: the CLI keeps `asfda --help` free of
# torch (each command imports what it runs)
LAZY_OK = ("cli",)


def _modules() -> list[Path]:
    return sorted(p for p in SRC.rglob("*.py"))


def _name(path: Path) -> str:
    return ".".join(path.relative_to(SRC.parent).with_suffix("").parts)


def _layer(module: str) -> int:
    top = module.split(".")[1] if module.count(".") else "__init__"
    for i, names in enumerate(LAYERS):
        if top in names:
            return i
    raise AssertionError(f"{module} is in no layer of tests/system/test_architecture.py: add it (and to "
                         "docs/architecture.md)")


def _asfda_imports(path: Path) -> list[tuple[str, bool]]:
    """(imported asfda module, at module level?) of every import in ``path``."""
    tree = ast.parse(path.read_text())
    me = _name(path)
    package = me if path.name == "__init__.py" else me.rsplit(".", 1)[0]
    top_level = {id(n) for n in tree.body} | {id(n) for node in tree.body if isinstance(node, (ast.If, ast.Try))
                                               for n in ast.walk(node)}
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                target = f"{base}.{node.module}" if node.module else base
            else:
                target = node.module or ""
            # `from asfda import stopping`, `from . import x`: the names that are submodules are what is imported
            folder = SRC.parent.joinpath(*target.split("."))
            subs = [f"{target}.{a.name}" for a in node.names
                    if (folder / f"{a.name}.py").exists() or (folder / a.name / "__init__.py").exists()]
            names = subs or [target]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        else:
            continue
        for target in names:
            if target == "asfda" or target.startswith("asfda."):
                out.append((target, id(node) in top_level))
    return out


@pytest.mark.parametrize("path", _modules(), ids=lambda p: _name(p))
def test_imports_point_down_the_layers_and_none_hides_in_a_function(path: Path) -> None:
    me = _name(path)
    mine = _layer(me)
    for target, top in _asfda_imports(path):
        if target in ("asfda", "asfda.__init__"):
            continue  # the version string
        assert _layer(target) <= mine, f"{me} imports {target}, a higher layer"
        if not top:
            assert me.split(".")[1] in LAZY_OK, f"{me} imports {target} inside a function"


@pytest.mark.parametrize("path", _modules(), ids=lambda p: _name(p))
def test_no_module_is_longer_than_one_sitting(path: Path) -> None:
    n = len(path.read_text().splitlines())
    assert n <= MAX_LINES, f"{_name(path)} has {n} lines (split it by job: at most {MAX_LINES})"
