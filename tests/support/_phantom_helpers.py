"""What the phantom tests share (test_phantom.py, test_phantom_folder.py)."""

from __future__ import annotations

import json
from pathlib import Path


def _meta(folder: Path) -> dict[str, dict]:
    return json.loads((folder / "phantom_meta.json").read_text())
