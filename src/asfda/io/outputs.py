"""Where a command may write: never into its inputs, never into what the tool or the user owns, and only where
writing works.

Every command that writes calls these before it loads a model or does any work:

* `refuse_output_inside_inputs`: an output path (file or folder, resolved with symlinks followed) that is, or lies
  inside, an input (a dataset folder, the folders its images and labels are in, the model folder or file, a config)
  is refused, so an output can never replace input data. It also runs `refuse_owned_place`: an output that is, or
  lies inside, ANY dataset (a folder with ``dataset.json`` or ``imagesTr/``), asfda project (``project.json``) or
  model folder (a MONAI bundle's ``configs/inference.json``, an nnU-Net results folder's ``plans.json``), this
  command's input or not, is refused too, as is an output named like the file that marks one (``dataset.json``,
  ``project.json``, ...), which would make its folder look like one. A project's own commands (next, ingest,
  finetune) write inside it through their own code, never through these checks;
* `refuse_foreign_files`: an existing file at a path the command would write is refused unless the command
  recognises it as its own earlier output (each command says how, by the file's content: `json_object_with`,
  `csv_header`, `is_npy`), so re-running a command into the same output works and nothing else is replaced;
* `check_writable_folder` / `check_output_file`: a folder that cannot be written (under a regular file, a read-only
  mount, no permission) is a one-line error naming it, found with a tiny probe file that is removed at once.
  Nothing is created by the check: a folder that does not exist yet is probed at its nearest existing ancestor.
"""

from __future__ import annotations

import csv
import errno
import json
import os
import tempfile
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

from asfda.errors import AsfdaError

__all__ = ["MARKER_NAMES", "OutputFiles", "check_output_file", "check_writable_folder", "csv_header", "dataset_folders",
           "dataset_input_folders", "is_npy", "json_object_with", "owned_place", "refuse_foreign_files",
           "refuse_output_inside_inputs", "refuse_owned_place"]

PathLike = str | os.PathLike
OutputFiles = list[tuple[Path, Callable[[Path], bool]]]
"""The files a command will write, each with how it recognises its own earlier one (`refuse_foreign_files`)."""
CACHE_FLAG = "cache folder (crossval's --cache-dir, cache_dir in a run config; default .cache in the working folder)"
"""How a refusal names the cache folder (`refuse_output_inside_inputs`'s ``flag``): it is written too."""
NNUNET_SUBFOLDERS = ("imagesTr", "imagesTs", "labelsTr", "labelsTs")


def dataset_folders(data: PathLike | None) -> list[Path]:
    """The folders a dataset argument stands for: the folder itself and, for an nnU-Net ``imagesTr``-like folder,
    the dataset above it."""
    if data is None:
        return []
    path = Path(data)
    out = [path]
    if path.name in NNUNET_SUBFOLDERS and (path.parent / "dataset.json").is_file():
        out.append(path.parent)
    return out


def dataset_input_folders(ds) -> list[Path]:
    """The folders of a loaded `Dataset`: its root and every folder holding one of its images or labels (resolved,
    so an image linked in from elsewhere protects the folder it really lives in)."""
    folders = {Path(ds.root)}
    for case in ds.cases:
        for p in (case.image_path, case.label_path):
            if p is not None:
                folders.add(Path(p).resolve().parent)
    return sorted(folders)


def _flatten(inputs: Mapping[str, object] | Iterable[object]) -> list[tuple[str, Path]]:
    items = inputs.items() if isinstance(inputs, Mapping) else (("input", p) for p in inputs)
    out = []
    for label, value in items:
        if value is None:
            continue
        values: Iterable[Any] = value if isinstance(value, (list, tuple, set)) else [value]  # paths: str or PathLike
        out += [(label, Path(v)) for v in values if v is not None and str(v) != ""]
    return out


def refuse_output_inside_inputs(out_path: PathLike, inputs: Mapping[str, object] | Iterable[object], *,
                                flag: str = "--out") -> None:
    """Refuses an output path that is, or lies inside, one of ``inputs``.

    Args:
        out_path: the file or folder the command will write (it need not exist).
        inputs: input paths (dataset folders, the model folder or file, configs), or a mapping of a description
            (``"the dataset"``) to a path or a list of paths; None entries are skipped.
        flag: how the user gave the output, for the fix.
    """
    target = Path(out_path).resolve()  # symlinks followed, also where only a prefix exists
    for label, path in _flatten(inputs):
        source = path.resolve()
        if target == source or source in target.parents:
            where = "is" if target == source else "lies inside"
            raise AsfdaError(f"this output {where} {label} {source}; writing there could overwrite input data",
                             out_path, f"choose another {flag}, outside the input dataset and model folders")
    refuse_owned_place(out_path, flag=flag)


# ---------------------------------------------------------------------------------------------- owned places
PROJECT_MARKERS = ("project.json", "project.json.bak")
"""The files that make a folder an asfda project (`asfda.project.state`'s PROJECT_FILE and BACKUP_FILE: the io layer
cannot import the project package; tests/io/test_output_ownership.py checks that the names agree)."""
_PROJECT_KEYS = ("format", "pool", "labelled", "settings")
BUNDLE_CONFIGS = ("inference.json", "inference.yaml", "inference.yml")
MARKER_NAMES = ("dataset.json", "imagesTr", *PROJECT_MARKERS, "plans.json")
"""Names an output may not take: each makes the folder it is in look like a dataset, a project or an nnU-Net results
folder (to asfda, which would then refuse to write there, and to the tools that read those)."""


def _exists(path: Path, kind: str = "any") -> bool:
    try:
        return path.is_file() if kind == "file" else path.is_dir() if kind == "dir" else path.exists()
    except OSError:  # a folder we may not look into: not a marker we can see
        return False


def _foreign_project_file(path: Path) -> bool:
    """A ``project.json`` that is clearly another tool's (a JSON object without any key asfda's state has, as an Nx
    or .NET project.json); an unreadable or damaged one counts as asfda's."""
    try:
        if path.stat().st_size > 64 << 20:
            return False
        obj = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(obj, dict) and not any(k in obj for k in _PROJECT_KEYS)


def _folder_kind(folder: Path) -> str | None:
    if _exists(folder / "dataset.json", "file") and _exists(folder / "plans.json", "file"):
        return "an nnU-Net results folder, a model (plans.json and dataset.json are in it)"
    if _exists(folder / "dataset.json", "file") or _exists(folder / "imagesTr", "dir"):
        return f"a dataset ({'dataset.json' if _exists(folder / 'dataset.json', 'file') else 'imagesTr/'} is in it)"
    for name in PROJECT_MARKERS:
        if _exists(folder / name, "file") and not _foreign_project_file(folder / name):
            return f"an asfda project ({name} is in it)"
    for name in BUNDLE_CONFIGS:
        if _exists(folder / "configs" / name, "file"):
            return f"a model folder (a MONAI bundle: configs/{name} is in it)"
    if _exists(folder / "plans.json", "file") and any(_exists(folder / n) for n in ("fold_0", "fold_all")):
        return "an nnU-Net results folder, a model (plans.json and fold_X/ are in it)"
    return None


def owned_place(path: PathLike) -> tuple[Path, str] | None:
    """The dataset, asfda project or model folder that ``path`` is or lies inside, and what it is; None if none.
    Both the path as written (made absolute, ``..`` folded) and the path with its symlinks followed are walked up."""
    absolute = Path(os.path.abspath(path))
    chains = [absolute, *absolute.parents], [Path(path).resolve(), *Path(path).resolve().parents]
    seen: set[Path] = set()
    for chain in chains:
        for folder in chain:
            if folder in seen:
                continue
            seen.add(folder)
            kind = _folder_kind(folder)
            if kind is not None:
                return folder, kind
    return None


def refuse_owned_place(out_path: PathLike, *, flag: str = "--out") -> None:
    """Refuses an output that is, or lies inside, a dataset, an asfda project or a model folder (`owned_place`),
    whoever's input it is, and an output named like one of `MARKER_NAMES`."""
    found = owned_place(out_path)
    if found is not None:
        folder, kind = found
        where = "is" if Path(out_path).resolve() == folder.resolve() else "lies inside"
        own = " (a project's own commands, next, ingest and finetune, write inside it)" if "project" in kind else ""
        raise AsfdaError(f"this output {where} {folder}, {kind}; writing there could overwrite its data", out_path,
                         f"choose another {flag}, outside datasets, asfda projects and model folders{own}")
    for name in {Path(out_path).name, Path(out_path).resolve().name}:
        if name in MARKER_NAMES:
            raise AsfdaError(f"an output named {name} would make its folder look like a dataset, a project or a "
                             "model (and could overwrite one's own file)", out_path, f"give {flag} another name")


# ---------------------------------------------------------------------------------------------- existing files
def refuse_foreign_files(files: Iterable[tuple[PathLike, Callable[[Path], bool]]], command: str, *,
                         flag: str = "--out") -> None:
    """Refuses, before anything is written, an existing path among those the command will write that it does not
    recognise as its own earlier output: ``files`` pairs each path with a test of an existing regular file (True:
    this command wrote it, so re-running into it replaces it). A folder, a symlink or anything else is never one."""
    for path, is_ours in files:
        path = Path(path)
        if not os.path.lexists(path):
            continue
        if path.is_symlink():
            what = "is a symbolic link"
        elif not path.is_file():
            what = "exists and is not a file"
        else:
            try:
                ours = bool(is_ours(path))
            except (OSError, ValueError):
                ours = False
            if ours:
                continue
            what = f"exists and was not written by asfda {command}"
        raise AsfdaError(f"{path.name} {what}; this output would overwrite it", path,
                         f"choose another {flag}, or move {path.name} away if it is not needed")


_MAX_RECORD_BYTES = 256 << 20


def json_object_with(path: PathLike, keys: Iterable[str], where: Callable[[dict], bool] | None = None) -> bool:
    """Whether ``path`` holds a JSON object that has every one of ``keys`` (and passes ``where``): how a command
    recognises a record it wrote (query.json, summary.json, a sidecar)."""
    path = Path(path)
    if path.stat().st_size > _MAX_RECORD_BYTES:
        return False
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError):
        return False
    return isinstance(obj, dict) and all(k in obj for k in keys) and (where is None or bool(where(obj)))


def csv_header(path: PathLike) -> list[str]:
    """The first row of a CSV file (empty when there is none or it is not text)."""
    try:
        with open(path, encoding="utf-8", newline="") as f:
            line = f.readline(1 << 20)
    except UnicodeDecodeError:
        return []
    return next(csv.reader([line]), [])


def is_npy(path: PathLike) -> bool:
    """Whether ``path`` starts as a NumPy ``.npy`` file does."""
    with open(path, "rb") as f:
        return f.read(6) == b"\x93NUMPY"


def _nearest_existing(path: Path) -> Path:
    p = path
    while not os.path.lexists(p) and p != p.parent:
        p = p.parent
    return p


def _probe(folder: Path) -> None:
    """Creates and removes one empty file in ``folder`` (raises OSError where that cannot be done)."""
    fd, name = tempfile.mkstemp(prefix=".asfda-write-probe-", dir=folder)
    os.close(fd)
    os.unlink(name)


def check_writable_folder(folder: PathLike, *, flag: str = "--out") -> None:
    """Refuses, in one line naming it, an output folder that cannot be written: one that is a file or lies under a
    regular file, on a read-only mount, or without permission. Creates nothing (the probe file is removed)."""
    folder = Path(folder)
    absolute = Path(os.path.abspath(folder))
    existing = _nearest_existing(absolute)
    if existing.exists() and not existing.is_dir():
        where = "is a file" if existing == absolute else f"lies under {existing}, which is a file"
        raise AsfdaError(f"the output folder {where}, not a folder", folder,
                         f"choose another {flag}: a folder that is not a file and not under one")
    if not existing.exists():  # a dangling symlink
        raise AsfdaError(f"the output folder lies under {existing}, a link to nothing", folder,
                         f"fix the link, or choose another {flag}")
    try:
        _probe(existing)
    except OSError as exc:
        reasons: dict[int | None, str] = {errno.EROFS: "is on a read-only file system",
                                          errno.EACCES: "is not writable (permission denied)",
                                          errno.EPERM: "is not writable (operation not permitted)",
                                          errno.ENOSPC: "is on a full disk"}
        reason = reasons.get(exc.errno, f"cannot be written ({exc.strerror or exc})")
        place = "" if existing == absolute else f" (its nearest existing folder {existing})"
        raise AsfdaError(f"the output folder{place} {reason}", folder,
                         f"choose another {flag} where files can be written, or fix its mount or "
                         "permissions") from None


def check_output_file(path: PathLike, *, flag: str = "--out") -> None:
    """`check_writable_folder` for the folder of an output file, and the file itself must not be a folder."""
    path = Path(path)
    if path.is_dir():
        raise AsfdaError("the output file is a folder", path, f"give {flag} a file name, e.g. {path / 'out.json'}")
    check_writable_folder(path.parent if str(path.parent) else Path("."), flag=flag)
