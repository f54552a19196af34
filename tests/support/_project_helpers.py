"""What the project tests share (test_project.py, test_project_settings.py, test_project_hostile.py): a pool whose
labels are the annotators' answers, the project settings they use, and answering a query."""

from __future__ import annotations

import shutil
from pathlib import Path

from asfda.project import ProjectSettings
from asfda.training import TrainConfig
from conftest import write_bundle, write_nnunet

N_POOL = 6


def make_pool(tmp_path: Path) -> dict[str, Path]:
    """A pool without labels (moved to 'truth/', the annotators' answers) and a tiny bundle."""
    ds = write_nnunet(tmp_path / "pool", n=N_POOL)
    truth = tmp_path / "truth"
    shutil.move(ds / "labelsTr", truth)
    return {"pool": ds, "truth": truth, "model": write_bundle(tmp_path / "bundle"), "root": tmp_path}


def _settings(**kw) -> ProjectSettings:
    return ProjectSettings(budget=2, device="cpu", train=TrainConfig(steps=4, batch_size=1), **kw)


def _answer(truth: Path, ids: list[str], out: Path) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    for cid in ids:
        shutil.copyfile(truth / f"{cid}.nii.gz", out / f"{cid}.nii.gz")
    return out
