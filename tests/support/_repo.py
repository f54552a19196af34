"""The repository's root (the folder holding pyproject.toml), wherever under tests/ a test file lives."""

from __future__ import annotations

from pathlib import Path

REPO = next(p for p in Path(__file__).resolve().parents if (p / "pyproject.toml").exists())
SRC = REPO / "src" / "asfda"
