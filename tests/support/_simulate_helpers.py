"""The small simulation the simulate tests run (test_simulate.py, test_simulate_resume.py)."""

from __future__ import annotations

from pathlib import Path

from asfda.config import RunConfig
from asfda.training import TrainConfig


def _cfg(tmp_path: Path, bundle: Path, data: Path, out: str = "run") -> RunConfig:
    return RunConfig(model=str(bundle), pool=str(data), test_fraction=0.3, strategies=["asfda", "random"],
                     budget=1, rounds=2, seeds=[0], train=TrainConfig(steps=3, batch_size=1),
                     cache_dir=str(tmp_path / "cache"), out_dir=str(tmp_path / out), progress=False)
