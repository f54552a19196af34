"""The folds of a cross-validation: which labelled volume is tested in which fold, and each fold's pool and test set
as nnU-Net raw datasets of symlinks (no image data is copied)."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

from asfda.errors import AsfdaError
from asfda.io import atomic_write_json, atomic_write_text, load_dataset
from asfda.io.datasets import LINKED_FROM_KEY
from asfda.results import read_json

__all__ = ["FOLDS_FILE", "assignment_for", "fold_assignment", "fold_datasets_root", "fold_dir", "make_fold_datasets",
           "read_json", "write_linked_dataset"]

FOLDS_FILE = "folds.json"
"""OUT/folds.json: the data folder, K, the fold seed and the assignment a cross-validation folder holds."""


def fold_dir(out: str | Path, k: int) -> Path:
    """Fold ``k``'s results folder under a cross-validation's ``out``: a simulation's folder
    (`asfda.results.RunLayout`)."""
    return Path(out) / f"fold{k}"


def fold_assignment(ids: Iterable[str], folds: int, seed: int = 0) -> list[list[str]]:
    """K disjoint folds covering every id once: sorted ids, a permutation seeded by ``seed``, ``np.array_split``
    (fold sizes differ by at most one).

    Each fold's ids are returned sorted. Deterministic: the same ids (in any order), K and seed give the same folds.
    """
    ids = sorted(ids)
    if len(set(ids)) != len(ids):
        raise ValueError("case ids are not unique")
    if not 2 <= folds <= len(ids):
        raise ValueError(f"--folds must be between 2 and the number of volumes ({len(ids)}), got {folds}")
    perm = np.random.default_rng(seed).permutation(len(ids))
    return [sorted(ids[i] for i in part) for part in np.array_split(perm, folds)]


def fold_datasets_root(cache_dir: str | Path, data: str | Path, folds: int, seed: int) -> Path:
    """Where the per-fold symlink datasets of ``data`` live: ``CACHE/cv/<dataset>/<K>folds_seed<S>``."""
    return Path(cache_dir) / "cv" / Path(data).resolve().name / f"{folds}folds_seed{seed}"


def _link(dst: Path, target: Path) -> None:
    """``dst`` -> ``target`` (absolute), replaced atomically when it points elsewhere; left alone when right."""
    if dst.is_symlink() and os.readlink(dst) == str(target):
        return
    tmp = dst.with_name(f".{dst.name}.tmp{os.getpid()}")  # dot files are skipped by the dataset reader
    tmp.unlink(missing_ok=True)
    os.symlink(target, tmp)
    os.replace(tmp, dst)


def write_linked_dataset(folder: Path, meta: dict, cases: list, ending: str, source: Path) -> Path:
    """One nnU-Net raw dataset of symlinks: dataset.json (numTraining adjusted, the ``source`` dataset the links
    point into named as ``asfda_linked_from``, without which asfda refuses links to outside a dataset) +
    imagesTr/labelsTr links; idempotent, and what an earlier call left that ``cases`` lacks is removed."""
    want = {"imagesTr": {f"{c.case_id}_0000{ending}": c.image_path for c in cases},
            "labelsTr": {f"{c.case_id}{ending}": c.label_path for c in cases}}
    for sub, files in want.items():
        d = folder / sub
        d.mkdir(parents=True, exist_ok=True)
        for name, src in files.items():
            _link(d / name, Path(src).resolve())
        for entry in d.iterdir():  # what an earlier assignment left
            if entry.name not in files:
                if entry.is_dir() and not entry.is_symlink():
                    shutil.rmtree(entry)
                else:
                    entry.unlink()
    meta = dict(meta, numTraining=len(cases), **{LINKED_FROM_KEY: str(Path(source).resolve())})
    if isinstance(meta.get("training"), list):  # nnU-Net v1 style case list
        keep = {c.case_id for c in cases}
        meta["training"] = [t for t in meta["training"] if isinstance(t, dict)
                            and Path(str(t.get("label", ""))).name.removesuffix(ending) in keep]
    meta.pop("test", None)
    meta.pop("numTest", None)
    text = json.dumps(meta, indent=2) + "\n"
    path = folder / "dataset.json"
    if not path.is_file() or path.read_text() != text:
        atomic_write_text(path, text)
    return folder


def make_fold_datasets(data: str | Path, assignment: Sequence[Sequence[str]], root: str | Path,
                       folds: Iterable[int] | None = None) -> dict[int, tuple[Path, Path]]:
    """Builds ``root/fold<k>/{pool,test}`` (symlinks to ``data``'s files, no copies) for the folds asked
    (default all); the pool of fold k is every volume not in its test set. Idempotent: a second call changes
    nothing, a changed assignment is corrected in place.

    Returns ``{k: (pool_dir, test_dir)}``.
    """
    data, root = Path(data), Path(root)
    ds = load_dataset(data, require_labels=True)
    meta = json.loads((data / "dataset.json").read_text(encoding="utf-8"))
    ending = meta.get("file_ending", ".nii.gz")
    by_id = ds.by_id()
    every = sorted(i for fold in assignment for i in fold)
    if every != sorted(by_id):
        raise ValueError(f"the fold assignment does not cover the dataset's {len(by_id)} cases exactly once")
    out = {}
    for k in (range(len(assignment)) if folds is None else folds):
        test = set(assignment[k])
        pool_dir = write_linked_dataset(root / f"fold{k}" / "pool", meta,
                                        [by_id[i] for i in sorted(by_id) if i not in test], ending, data)
        test_dir = write_linked_dataset(root / f"fold{k}" / "test", meta, [by_id[i] for i in sorted(test)], ending,
                                        data)
        out[k] = (pool_dir, test_dir)
    return out


def assignment_for(out: Path, data: Path, folds: int, fold_seed: int, write: bool) -> list[list[str]]:
    """The fold assignment of ``data`` (`fold_assignment`), checked against OUT/folds.json (and, when ``write``,
    written there when it is not yet) so that parts run elsewhere with another K or fold seed are not mixed in.
    Without the data (a summary where the data is absent) the saved assignment is used as it is."""
    saved = read_json(out / FOLDS_FILE)
    if not (data / "dataset.json").is_file():
        if saved and saved.get("folds") == folds and saved.get("fold_seed") == fold_seed:
            return saved["assignment"]
        raise AsfdaError(f"no dataset.json, and {out / FOLDS_FILE} does not hold a {folds}-fold assignment with fold "
                         f"seed {fold_seed}", data, "pass the labelled dataset the folds were drawn from")
    ids = sorted(load_dataset(data, require_labels=True).by_id())
    try:
        assignment = fold_assignment(ids, folds, fold_seed)
    except ValueError as exc:
        raise AsfdaError(str(exc), data) from None
    if saved and saved.get("assignment") != assignment:
        raise AsfdaError(f"it holds folds of another assignment ({saved.get('folds')} folds, fold seed "
                         f"{saved.get('fold_seed')}, {sum(map(len, saved.get('assignment') or []))} volumes)", out,
                         "use another --out, or the --folds / --fold-seed / --data it was run with")
    if write and not saved:
        atomic_write_json(out / FOLDS_FILE, {"data": str(data.resolve()), "folds": folds, "fold_seed": fold_seed,
                                             "assignment": assignment})
    return assignment
