"""Atomic file writes: write to a temporary sibling, fsync, then rename over the target.

A reader (or a process restarted after kill -9) sees either the old file or the new one, never half. A folder
written as a whole (`atomic_write_folder`, e.g. an adapted model's bundle) is built in a temporary sibling folder and
swapped into place, so it too is either the old folder or the new one, never a mix of the two.

A kill inside a write leaves its temporary sibling behind (a hidden ``.NAME.asfda-HOST-PID-….tmp…`` file or folder,
which no asfda reader lists): the next write into the same folder by any asfda process removes those whose process,
on this host, is gone.

Several files that belong together are written with `staged_write`: each is written in full to its temporary
sibling first, and all are renamed into place only once every one is complete, so a full disk leaves the earlier
set as it was. `write_failures_as_errors` turns a full disk (ENOSPC), an exceeded quota (EDQUOT) or an I/O error
(EIO) met while writing into the one-line `AsfdaError`, after removing what the run left unfinished.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import json
import os
import re
import shutil
import socket
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from asfda.errors import AsfdaError

__all__ = ["PartialOutputs", "atomic_write", "atomic_write_bytes", "atomic_write_folder", "atomic_write_json",
           "atomic_write_text", "staged_write", "sweep_stale_temporaries", "write_failure", "write_failures_as_errors"]

_HOST = re.sub(r"[^A-Za-z0-9]", "_", socket.gethostname())[:40] or "host"
_TAG = re.compile(r"\.asfda-(?P<host>[A-Za-z0-9_]+)-(?P<pid>\d+)-")
_swept: set[str] = set()


def _temp_prefix(path: Path) -> str:
    return f".{path.name[:80]}.asfda-{_HOST}-{os.getpid()}-"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, ValueError):
        return True  # another user's process, or a number no process has: leave its files alone
    return True


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def sweep_stale_temporaries(folder: str | Path) -> list[Path]:
    """Removes the temporary files and folders that killed asfda processes of this host left in ``folder`` (see the
    module docstring); returns them. Done once per folder and process by every atomic write."""
    folder = Path(folder)
    removed: list[Path] = []
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return removed
    for entry in entries:
        if not entry.name.startswith(".") or ".asfda-" not in entry.name or ".tmp" not in entry.name:
            continue
        m = _TAG.search(entry.name)
        if m is None or m["host"] != _HOST:
            continue
        pid = int(m["pid"])
        if pid == os.getpid() or _alive(pid):
            continue
        _remove(Path(entry.path))
        removed.append(Path(entry.path))
    return removed


def _sweep_once(folder: Path) -> None:
    key = str(folder)
    if key not in _swept:
        _swept.add(key)
        sweep_stale_temporaries(folder)


def atomic_write(path: str | Path, write: Callable[[Path], object]) -> Path:
    """Calls ``write(tmp_path)`` then renames ``tmp_path`` onto ``path`` atomically.

    Args:
        path: final destination; its parent folders are created.
        write: a function that writes the complete file at the path it is given.
    """
    path = Path(path)
    tmp_path = _write_temporary(path, write)
    try:
        os.replace(tmp_path, path)
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise
    return path


def _write_temporary(path: Path, write: Callable[[Path], object]) -> Path:
    """The complete, fsynced temporary sibling of ``path`` that ``write`` wrote (removed if anything fails)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    _sweep_once(path.parent)
    suffix = "".join(path.suffixes[-2:])  # keep .nii.gz so writers that look at the suffix behave
    fd, tmp = tempfile.mkstemp(prefix=_temp_prefix(path), suffix=f".tmp{suffix}", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        write(tmp_path)
        os.chmod(tmp_path, 0o666 & ~_umask())
        with open(tmp_path, "rb") as fh:
            os.fsync(fh.fileno())
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise
    return tmp_path


@contextlib.contextmanager
def staged_write(path: str | Path, write: Callable[[Path], object]) -> Iterator[Path]:
    """Writes ``path``'s complete temporary sibling (``write(tmp_path)``), runs the block (which writes the other
    files of the set, or stages them too), and renames the temporary file onto ``path`` when the block ends without
    an exception; otherwise removes it, leaving ``path`` as it was. Yields ``path``."""
    path = Path(path)
    tmp_path = _write_temporary(path, write)
    try:
        yield path
        os.replace(tmp_path, path)
    finally:
        tmp_path.unlink(missing_ok=True)


def atomic_write_folder(path: str | Path, write: Callable[[Path], None]) -> Path:
    """Calls ``write(tmp_folder)`` (an empty folder) then puts ``tmp_folder`` in the place of the folder ``path``:
    an atomic exchange where the system has one (Linux ``renameat2``), else two renames (a kill between them leaves
    no ``path``, never a mix). Whatever ``path`` held before is removed: it is replaced as a whole."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _sweep_once(path.parent)
    tmp = Path(tempfile.mkdtemp(prefix=_temp_prefix(path), suffix=".tmp", dir=path.parent))
    try:
        write(tmp)
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp made it private
        if not os.path.lexists(path):
            os.rename(tmp, path)
            return path
        if _exchange(tmp, path):
            _remove(tmp)  # now the old folder
            return path
        old = Path(tempfile.mkdtemp(prefix=_temp_prefix(path), suffix=".old.tmp", dir=path.parent))
        os.rename(path, old / "x")
        os.rename(tmp, path)
        _remove(old)
    except BaseException:
        _remove(tmp)
        raise
    return path


def _exchange(a: Path, b: Path) -> bool:
    """Swaps two paths atomically (Linux renameat2 RENAME_EXCHANGE); False where that is not available."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV, errno.EPERM):
        return False
    raise OSError(err, os.strerror(err), str(b))


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    return atomic_write(path, lambda p: p.write_bytes(data))


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write(path, lambda p: p.write_text(text, encoding="utf-8"))


def atomic_write_json(path: str | Path, obj: Any) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=_json_default) + "\n")


def _json_default(obj: Any) -> Any:
    if hasattr(obj, "tolist"):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"cannot serialise {type(obj).__name__} to JSON")


# ---------------------------------------------------------------------------------------------- a full disk
WRITE_FAILURES = {errno.ENOSPC: "the disk is full (no space left on the device)",
                  errno.EDQUOT: "the disk quota is exceeded",
                  errno.EIO: "an input/output error (a failing disk, or a network mount that went away)"}
"""The errors of the storage, not of asfda or of the user's data, that `write_failure` recognises."""
_FAILURE_TEXT = [(re.compile(r"No space left on device|os error 28\b"), errno.ENOSPC),
                 (re.compile(r"Disk quota exceeded|os error 122\b"), errno.EDQUOT),
                 (re.compile(r"Input/output error|os error 5\b"), errno.EIO)]
_SHORT_WRITE = re.compile(r"\d+ requested and \d+ written|unexpected pos \d+ vs \d+|file write failed")
"""How NumPy (np.save) and torch (torch.save's zip writer) report a write the disk cut short, without an errno."""


def write_failure(exc: BaseException) -> str | None:
    """What the storage refused, when ``exc`` (or an exception it was raised from) is a full disk, an exceeded
    quota or an I/O error: an OSError's errno, or the text safetensors, NumPy and torch put in theirs; None for
    anything else."""
    cur: BaseException | None = exc
    for _ in range(10):
        if cur is None:
            break
        if isinstance(cur, OSError) and cur.errno in WRITE_FAILURES:
            return WRITE_FAILURES[cur.errno]
        text = str(cur)
        for pattern, code in _FAILURE_TEXT:
            if pattern.search(text):
                return WRITE_FAILURES[code]
        if _SHORT_WRITE.search(text):
            return "the disk is full, most likely (a write came up short)"
        cur = cur.__cause__ or cur.__context__
    return None


class PartialOutputs:
    """The files a run has begun writing and not finished as a whole (`add` them before writing, `done` once they
    are complete): what `write_failures_as_errors` removes when the disk fills up."""

    def __init__(self) -> None:
        self._pending: list[Path] = []

    def add(self, *paths: str | Path) -> None:
        self._pending += [Path(p) for p in paths]

    def done(self) -> None:
        self._pending.clear()

    def remove(self) -> None:
        for p in reversed(self._pending):
            with contextlib.suppress(OSError):
                if p.is_file() or p.is_symlink():
                    p.unlink()
        self._pending.clear()


@contextlib.contextmanager
def write_failures_as_errors(folder: str | Path, what: str = "the outputs") -> Iterator[PartialOutputs]:
    """Runs a block that writes into ``folder``; a full disk, an exceeded quota or an I/O error in it
    (`write_failure`) becomes a one-line `AsfdaError`, after the files the block registered and has not finished
    (`PartialOutputs`) are removed, and so are ``folder`` and the folders above it that the block created, when
    nothing finished is in them. Files the run finished, and the outputs of earlier runs, are left as they are."""
    folder = Path(os.path.abspath(folder))
    created: list[Path] = []  # folders that do not exist yet, deepest first: the block may create them
    p = folder
    while not os.path.lexists(p) and p != p.parent:
        created.append(p)
        p = p.parent
    partial = PartialOutputs()
    try:
        yield partial
    except Exception as exc:
        reason = write_failure(exc)
        if reason is None:
            raise
        partial.remove()
        for d in created:
            try:
                d.rmdir()
            except OSError:
                break
        where = getattr(exc, "filename", None) or folder
        raise AsfdaError(f"writing {what} failed: {reason}; what this run left unfinished was removed, earlier "
                         "outputs are as they were", where, "free some space on that disk (or write to another), "
                         "then run the same command again") from None
