"""Tiny synthetic fixtures written to temporary folders: NIfTI datasets and MONAI bundles (the writers of a NIfTI file
and of a bundle live in benchmarks/_data.py, which the load benchmark uses too)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import cast

import nibabel as nib
import numpy as np
import pytest
import torch

# benchmarks/_data.py, on the path through pytest's pythonpath (pyproject.toml); the tests import these from here
from _data import TINY_NET as TINY_NET
from _data import write_bundle, write_nifti

TINY_LABELS = {"background": 0, "liver": 1, "spleen": 2}


def make_volume(seed: int, shape=(20, 18, 12)) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    label = np.zeros(shape, np.uint8)
    label[3:9, 4:10, 3:8] = 1
    label[12:17, 8:14, 4:9] = 2
    image = (rng.normal(0, 0.05, shape) + label * 0.4).astype(np.float32)
    return image, label


def write_nnunet(root: Path, n: int = 3, labels: dict | None = None, affine: np.ndarray | None = None,
                 shape=(20, 18, 12)) -> Path:
    (root / "imagesTr").mkdir(parents=True, exist_ok=True)
    (root / "labelsTr").mkdir(parents=True, exist_ok=True)
    aff = np.diag([2.0, 2.0, 3.0, 1.0]) if affine is None else affine
    for i in range(n):
        image, label = make_volume(i, shape)
        write_nifti(root / "imagesTr" / f"case{i:02d}_0000.nii.gz", image, aff)
        write_nifti(root / "labelsTr" / f"case{i:02d}.nii.gz", label, aff)
    (root / "dataset.json").write_text(json.dumps({
        "channel_names": {"0": "MR"}, "labels": labels or TINY_LABELS, "numTraining": n, "file_ending": ".nii.gz"}))
    return root


def load_nifti(path: str | Path) -> nib.Nifti1Image:
    """``nib.load`` typed as what it returns for a .nii / .nii.gz (nibabel annotates the base image class)."""
    return cast(nib.Nifti1Image, nib.load(str(path)))


@pytest.fixture
def tiny_dataset(tmp_path: Path) -> Path:
    return write_nnunet(tmp_path / "ds")


@pytest.fixture
def tiny_bundle(tmp_path: Path) -> Path:
    return write_bundle(tmp_path / "bundle")


@pytest.fixture
def world(tmp_path: Path) -> dict[str, Path]:
    """The command's inputs, and what the user owns beside them: another dataset, a project, another model
    (test_output_ownership.py, test_full_disk.py)."""
    project = tmp_path / "project"
    (project / "labels").mkdir(parents=True)
    (project / "annotate" / "round0").mkdir(parents=True)
    (project / "project.json").write_text(json.dumps({"format": 1, "pool": "somewhere", "labelled": {"case00": 0}}))
    (project / "labels" / "case00.nii.gz").write_bytes(b"an accepted label")
    return {"data": write_nnunet(tmp_path / "ds", n=2), "model": write_bundle(tmp_path / "bundle"),
            "other": write_nnunet(tmp_path / "other", n=1), "other_model": write_bundle(tmp_path / "other_model"),
            "project": project, "root": tmp_path}


@pytest.fixture
def cwd_apart(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The CLI's prepared-volume cache (./.cache) goes to a folder of its own, outside what the tests compare."""
    (tmp_path / "cwd").mkdir()
    monkeypatch.chdir(tmp_path / "cwd")


@pytest.fixture(autouse=True, scope="session")
def _one_torch_thread():
    """Tiny test tensors run faster on one thread, and two test processes never oversubscribe 2 cores."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


# ---------------------------------------------------------------------------------------------- kill -9
_KILLER = textwrap.dedent("""
    import os, signal, sys
    import torch
    kill_at, what = int(sys.argv[1]), sys.argv[2]
    calls = {"n": 0}
    def bomb():
        calls["n"] += 1
        if calls["n"] == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
    if what == "step":  # in the middle of a round of fine-tuning
        orig = torch.optim.AdamW.step
        def step(self, *a, **k):
            bomb()
            return orig(self, *a, **k)
        torch.optim.AdamW.step = step
    else:  # right after the n-th file written atomically (before the state that names it)
        import asfda.io.atomic as atomic
        orig_write = atomic.atomic_write
        def write(path, fn):
            out = orig_write(path, fn)
            if not str(path).endswith(("project.json", ".bak")):
                bomb()
            return out
        atomic.atomic_write = write
        import asfda.project
        for module in list(sys.modules.values()):  # every project module that writes files
            if getattr(module, "__name__", "").startswith("asfda.project.") and hasattr(module, "atomic_write"):
                module.atomic_write = write
    from asfda.cli import main
    sys.exit(main(sys.argv[3:]))
""")


def run_cli_killed(kill_at: int, what: str, *args: str) -> int:
    """Runs ``asfda ARGS --no-progress`` in a subprocess that SIGKILLs itself at the ``kill_at``-th optimiser
    step (``what="step"``: in the middle of a round of fine-tuning) or right after the ``kill_at``-th file
    written atomically by asfda.project (``what="write"``: before the state naming it). Returns the exit code."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-c", _KILLER, str(kill_at), what, *args, "--no-progress"], env=env,
                          capture_output=True, text=True, timeout=300).returncode


_KILL_AT = textwrap.dedent("""
    import importlib, os, signal, sys
    target, kill_at, when, match = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
    module, _, attr = target.partition(":")
    owner = importlib.import_module(module)
    *parents, name = attr.split(".")
    for p in parents:
        owner = getattr(owner, p)
    orig = getattr(owner, name)
    calls = {"n": 0}
    def wrapper(*args, **kwargs):
        hit = not match or any(match in str(a) for a in args)
        if hit:
            calls["n"] += 1
        if hit and when == "before" and calls["n"] == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
        out = orig(*args, **kwargs)
        if hit and when == "after" and calls["n"] == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
        return out
    setattr(owner, name, wrapper)
    from asfda.cli import main
    sys.exit(main(sys.argv[5:]))
""")


def run_cli_killed_at(target: str, kill_at: int, when: str, *args: str, match: str = "",
                      cwd: Path | None = None) -> subprocess.CompletedProcess:
    """Runs ``asfda ARGS --no-progress`` in a subprocess that SIGKILLs itself at a point forced from outside:
    ``target`` is ``module:attr`` (``attr`` may be dotted, e.g. ``asfda.engine:InferenceEngine.run``; patch the
    module whose name the code calls through), and the process is killed ``when`` ("before" / "after") its
    ``kill_at``-th call (counting only calls with an argument whose text contains ``match``, when given)."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-c", _KILL_AT, target, str(kill_at), when, match, *args, "--no-progress"],
                          env=env, capture_output=True, text=True, timeout=300, cwd=cwd)


@pytest.fixture(scope="module")
def zoo(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The model-zoo bundles of tests/support/_zoo_bundles.py (tests/models/test_real_models*.py), once per module."""
    from _zoo_bundles import build_zoo

    return build_zoo(tmp_path_factory.mktemp("zoo"))
