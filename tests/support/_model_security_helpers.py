"""Small helpers shared by test_model_security.py and test_model_limits.py."""

from __future__ import annotations

import copy
from pathlib import Path


def _tiny_net() -> dict:
    from conftest import TINY_NET

    return copy.deepcopy(TINY_NET)


def _markers(tmp_path: Path) -> list[str]:
    return sorted(p.name for p in tmp_path.glob("pwned*"))
