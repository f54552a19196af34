"""Where a command may write: never into its inputs, and only where writing works.

Every command that writes calls these before it loads a model or does any work:

* `refuse_output_inside_inputs`: an output path (file or folder, resolved with symlinks followed) that is, or lies
  inside, an input (a dataset folder, the folders its images and labels are in, the model folder or file, a config)
  is refused, so an output can never replace input data;
* `check_writable_folder` / `check_output_file`: a folder that cannot be written (under a regular file, a read-only
  mount, no permission) is a one-line error naming it, found with a tiny probe file that is removed at once.
  Nothing is created by the check: a folder that does not exist yet is probed at its nearest existing ancestor.
"""

from __future__ import annotations

import errno
import os
import tempfile
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from asfda.errors import AsfdaError

__all__ = ["check_output_file", "check_writable_folder", "dataset_folders", "dataset_input_folders",
           "refuse_output_inside_inputs"]

PathLike = str | os.PathLike
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
