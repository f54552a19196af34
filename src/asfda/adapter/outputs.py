"""Every forward pass once: the logits and embedding of each (weights, volume) pair, kept on disk for the stages after.

A round sends the same volume through the same weights several times when each stage runs the network itself: the
pretrained model for round 0's scoring, the guard's reference and the when-to-stop probe; the adapted model after a
round for the guard, the probe, the next round's temperature fit and pool scoring, and the labels of what it queried.
`ForwardStore` keeps the output of a pass (the ``[C, X, Y, Z]`` logits and the ``[D]`` embedding, float32 as the
engine returns them) on disk under the hash of the weights that made it, so every later stage reads the very same
numbers instead of running the network again: reuse is exact, and memory stays flat in the pool size (one volume's
logits at a time, as before).

* The pretrained model's outputs (its weights never change) are kept under ``CACHE/outputs/pretrained/<hash>/``,
  across runs, resumes, folds and projects: a volume goes through the pretrained model once, ever.
* The adapted model's outputs are kept for the last `ForwardStore.keep_adapted` weight versions of this process (a
  round the guard discards goes back one version), under a folder of this process that is removed when it exits; a
  later process starting with a folder of a process that no longer runs removes it.
* Passes that are not the deterministic pass of a volume (MC dropout, test-time flips, the pass whose normalisation
  statistics a hook reads) run as before; the hooked pass stores its output for the stages after it.

Without a cache folder the store lives in a temporary folder removed at exit; a one-shot command without one (a
`query` with ``--no-cache``: no stage reads a pass again) keeps nothing (``keep=False``). A full disk, or any error
writing an entry, only turns the store off for that entry (the numbers are the same, the pass is run again when
asked).
"""

from __future__ import annotations

import atexit
import contextlib
import errno
import logging
import os
import shutil
import tempfile
import uuid
from collections import Counter
from pathlib import Path

import numpy as np
import torch

from asfda.io.dicom import volume_file_stamp

__all__ = ["PASS_KINDS", "ForwardStore", "volume_stamp"]

log = logging.getLogger(__name__)

PASS_KINDS = ("pretrained", "adapted")
"""The two models a pass is counted for (`ForwardStore.passes`)."""

_OWNER_FILE = "owner.pid"


def volume_stamp(image_path: Path) -> str:
    """What identifies a volume's file: its path, size and modification time (a changed file is another volume; a
    DICOM series folder: its slices', `asfda.io.dicom.volume_file_stamp`)."""
    return volume_file_stamp(image_path)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


class ForwardStore:
    """Outputs of forward passes by (weights hash, volume key); see the module docstring.

    Args:
        cache_dir: the run's cache folder (None: a temporary folder, removed at exit).
        keep_adapted: how many adapted weight versions keep their outputs (the newest ones).
        keep: False: nothing is kept (every `get` misses, `put` writes nothing; passes are still counted).
    """

    def __init__(self, cache_dir: str | Path | None, *, keep_adapted: int = 3, keep: bool = True) -> None:
        self._tmp: tempfile.TemporaryDirectory | None = None
        if not keep:
            root = Path(os.devnull)  # never written: the store is off
        elif cache_dir is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="asfda-outputs-")
            root = Path(self._tmp.name)
        else:
            root = Path(cache_dir) / "outputs"
        self.root = root
        self.keep_adapted = max(1, int(keep_adapted))
        self._process_dir = root / "adapted" / f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self._adapted_versions: list[str] = []  # oldest first
        self.keep = keep
        self._disabled = not keep
        self.passes: Counter[str] = Counter({k: 0 for k in PASS_KINDS})
        self.reads: Counter[str] = Counter({k: 0 for k in PASS_KINDS})
        if keep:
            atexit.register(self.close)
            self._remove_stale()

    # -- where -----------------------------------------------------------------------------------
    def _folder(self, kind: str, weights: str) -> Path:
        return self.root / "pretrained" / weights if kind == "pretrained" else self._process_dir / weights

    def _path(self, kind: str, weights: str, key: str) -> Path:
        return self._folder(kind, weights) / f"{key}.npz"

    # -- read / write ----------------------------------------------------------------------------
    def get(self, kind: str, weights: str, key: str) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The stored (logits, embedding) of ``key`` under ``weights`` (None when not stored or unreadable)."""
        if not self.keep:
            return None
        path = self._path(kind, weights, key)
        if not path.is_file():
            return None
        try:
            with np.load(path) as z:
                logits, emb = torch.from_numpy(z["logits"].copy()), torch.from_numpy(z["embedding"].copy())
        except (OSError, ValueError, KeyError, EOFError):
            return None  # a damaged or vanishing entry is a miss: the pass runs again
        self.reads[kind] += 1
        return logits, emb

    def put(self, kind: str, weights: str, key: str, logits: torch.Tensor, embedding: torch.Tensor) -> None:
        """Stores one pass's output (atomically: a reader never sees half an entry)."""
        if self._disabled:
            return
        folder = self._folder(kind, weights)
        try:
            if kind == "adapted":
                self._enter_version(weights)
            folder.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".npz", dir=folder)
            try:
                with os.fdopen(fd, "wb") as f:
                    np.savez(f, logits=logits.numpy(), embedding=embedding.numpy())
                os.replace(tmp, self._path(kind, weights, key))
            except BaseException:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
                raise
        except OSError as exc:
            if exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EROFS):
                self._disabled = True
                log.warning("forward outputs are no longer kept (%s): passes will be repeated where needed", exc)
            else:
                log.warning("could not keep a forward output in %s (%s)", folder, exc)

    def count(self, kind: str, n: int = 1) -> None:
        """Counts ``n`` passes of the network made for ``kind`` (`PASS_KINDS`)."""
        self.passes[kind] += int(n)

    # -- housekeeping ----------------------------------------------------------------------------
    def _enter_version(self, weights: str) -> None:
        if weights in self._adapted_versions:
            self._adapted_versions.remove(weights)
            self._adapted_versions.append(weights)
            return
        if not self._adapted_versions:
            self._process_dir.mkdir(parents=True, exist_ok=True)
            (self._process_dir / _OWNER_FILE).write_text(str(os.getpid()))
        self._adapted_versions.append(weights)
        while len(self._adapted_versions) > self.keep_adapted:
            old = self._adapted_versions.pop(0)
            shutil.rmtree(self._process_dir / old, ignore_errors=True)

    def _remove_stale(self) -> None:
        """Removes the adapted-output folders of processes that no longer run (a killed run leaves its folder)."""
        parent = self.root / "adapted"
        if not parent.is_dir():
            return
        for folder in parent.iterdir():
            owner = folder / _OWNER_FILE
            try:
                pid = int(owner.read_text())
            except (OSError, ValueError):
                continue
            if pid != os.getpid() and not _pid_alive(pid):
                shutil.rmtree(folder, ignore_errors=True)

    def close(self) -> None:
        """Removes this process's adapted outputs (and the temporary folder, when there is no cache folder)."""
        shutil.rmtree(self._process_dir, ignore_errors=True)
        self._adapted_versions = []
        if self._tmp is not None:
            with contextlib.suppress(OSError):
                self._tmp.cleanup()
            self._tmp = None
