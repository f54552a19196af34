"""docs/architecture.md against the tree: every module under src/asfda has a line in its "Modules" section, and its
"Layers" diagram lists the layers of tests/system/test_architecture.py, in the same order, name for name."""

from __future__ import annotations

import ast
import re
from pathlib import Path

from _repo import REPO as ROOT
from _repo import SRC

DOC = ROOT / "docs" / "architecture.md"
NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*/?")


def _section(text: str, title: str) -> str:
    """The text under the ``## title`` heading, up to the next ``## `` heading."""
    match = re.search(rf"^## {re.escape(title)}\n(.*?)(?=^## |\Z)", text, re.S | re.M)
    assert match, f"docs/architecture.md has no '## {title}' section"
    return match.group(1)


def _bullets(section: str) -> list[str]:
    """The section's top-level bullets ("- ..." and the indented lines that continue it)."""
    out: list[str] = []
    for line in section.splitlines():
        if line.startswith("- "):
            out.append(line)
        elif line.startswith("  ") and out:
            out[-1] += " " + line.strip()
    return out


def _head(bullet: str) -> list[str]:
    """The backticked names a bullet starts with, before its dash (``- `a.py`, `b.py` — ...`` -> a.py, b.py)."""
    head = bullet[2:].split(" — ", 1)[0]
    return re.findall(r"`([^`]+)`", head)


def _has_own_code(init: Path) -> bool:
    """Whether a package's ``__init__.py`` holds more than imports, its docstring and ``__all__``."""
    for node in ast.parse(init.read_text()).body:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            continue
        if isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant):
            continue
        targets = node.targets if isinstance(node, ast.Assign) else [getattr(node, "target", None)]
        if isinstance(node, (ast.Assign, ast.AugAssign)) and all(getattr(t, "id", "") == "__all__" for t in targets):
            continue
        return True
    return False


def missing_modules(doc: str, src: Path) -> list[str]:
    """Modules of ``src`` that the doc's "Modules" section does not name: a top-level module in the head of a bullet,
    a package's module (``__init__.py`` only when it holds code of its own) inside the package's bullet."""
    bullets = _bullets(_section(doc, "Modules: what each owns, and what it must not do"))
    heads = [(set(_head(b)), b) for b in bullets]
    named = set().union(*(h for h, _ in heads)) if heads else set()
    missing = []
    for path in sorted(src.rglob("*.py")):
        rel = path.relative_to(src)
        if len(rel.parts) == 1:
            if rel.name not in named:
                missing.append(str(rel))
            continue
        if rel.name == "__init__.py" and not _has_own_code(path):
            continue
        package = "/".join(rel.parts[:-1]) + "/"
        texts = [b for h, b in heads if package in h]
        if not any(f"`{rel.name}`" in b for b in texts):
            missing.append(str(rel))
    return missing


def doc_layers(doc: str) -> list[list[str]]:
    """The "Layers" diagram's layers, bottom first: on each line, the names before its " — " (what the layer is
    for: ``rounds  — one round ...`` -> rounds); a package keeps its ``/``."""
    block = re.search(r"```\n(.*?)```", _section(doc, "Layers"), re.S)
    assert block, "the Layers section has no diagram"
    layers = []
    for line in block.group(1).splitlines():
        words = line.split(" — ", 1)[0].split()
        if words and words[0] in ("top", "bottom"):
            words = words[1:]
        if words == ["│"] or not words:
            continue
        assert all(NAME.fullmatch(w) for w in words), f"not a layer of module names: {line!r}"
        layers.append(words)
    return layers[::-1]


def code_layers() -> list[list[str]]:
    """tests/system/test_architecture.py's LAYERS (low -> high), each package named with a trailing ``/``."""
    checked = next((ROOT / "tests").rglob("test_architecture.py"))  # wherever tests/ keeps it
    tree = ast.parse(checked.read_text())
    value = next(n.value for n in tree.body if isinstance(n, ast.AnnAssign) and getattr(n.target, "id", "") == "LAYERS")
    assert value is not None  # LAYERS: list[...] = [...]
    return [[f"{name}/" if (SRC / name).is_dir() else name for name in layer] for layer in ast.literal_eval(value)]


def test_every_module_has_a_line() -> None:
    missing = missing_modules(DOC.read_text(), SRC)
    assert not missing, f"docs/architecture.md names no line for {missing}: add one under 'Modules'"


def test_layers_diagram_is_the_checked_one() -> None:
    assert doc_layers(DOC.read_text()) == code_layers()


def test_a_module_without_a_line_is_found(tmp_path: Path) -> None:
    src = tmp_path / "asfda"
    (src / "pkg").mkdir(parents=True)
    for rel in ("top.py", "other.py", "pkg/__init__.py", "pkg/a.py", "pkg/b.py"):
        (src / rel).write_text('"""doc"""\n')
    (src / "pkg" / "__init__.py").write_text('"""doc"""\nfrom .a import x\n__all__ = ["x"]\n')
    doc = ("## Modules: what each owns, and what it must not do\n- `top.py` — one.\n- `pkg/` — `a.py` (a),\n"
           "  `b.py` (b).\n## Next\n- `other.py` — not in the section.\n")
    assert missing_modules(doc, src) == ["other.py"]
    (src / "pkg" / "__init__.py").write_text('"""doc"""\ndef f():\n    pass\n')
    assert missing_modules(doc, src) == ["other.py", "pkg/__init__.py"]


def test_layers_are_read_as_drawn() -> None:
    doc = ("## Layers\n```\n top    a  b/  c\n          │\n        rounds     — one round: x, y\n          │\n"
           "        pkg/       — Adapter = models + scoring\n bottom  z\n```\n## Modules\n")
    assert doc_layers(doc) == [["z"], ["pkg/"], ["rounds"], ["a", "b/", "c"]]
