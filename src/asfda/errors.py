"""One exception type for everything a user can get wrong; the CLI prints it on one line."""

from __future__ import annotations

import os

__all__ = ["AsfdaError", "RunSettingsChanged", "missing_package", "missing_package_error"]


class AsfdaError(Exception):
    """A problem the user can fix: which file, what is wrong, what to do.

    Args:
        problem: what is wrong, in plain words.
        path: the file or folder concerned (optional).
        fix: what the user should do about it (optional).
    """

    def __init__(self, problem: str, path: str | os.PathLike[str] | None = None, fix: str | None = None) -> None:
        self.problem = problem
        self.path = None if path is None else str(path)
        self.fix = fix
        super().__init__(self.one_line())

    def one_line(self) -> str:
        """``PATH: PROBLEM -- fix: FIX`` on one line (line breaks inside a part, as a parser's message may hold, are
        folded into single spaces)."""
        parts = [f"{self.path}: {self.problem}" if self.path else self.problem]
        if self.fix:
            parts.append(f"fix: {self.fix}")
        text = " -- ".join(parts)
        lines = text.splitlines()
        return text if lines == [text] or not text else " ".join(ln.strip() for ln in lines if ln.strip())


class RunSettingsChanged(AsfdaError):
    """A results folder holds a run made with other settings, so it cannot be resumed with these."""


# import name -> the package pip installs it from, where they differ
_PIP_NAMES = {"skimage": "scikit-image", "PIL": "pillow", "nrrd": "pynrrd", "yaml": "pyyaml", "cv2": "opencv-python",
              "sklearn": "scikit-learn", "ignite": "pytorch-ignite", "dynamic_network_architectures":
              "dynamic-network-architectures"}


def missing_package(exc: BaseException) -> tuple[str, bool] | None:
    """``(pip package name, version mismatch possible)`` when ``exc`` (or an exception it was raised from) is a
    missing optional package: a ``ModuleNotFoundError``, or MONAI's ``OptionalImportError`` ("required package `itk`
    is not installed or the version doesn't match requirement"); None otherwise."""
    import re

    seen = 0
    cur: BaseException | None = exc
    while cur is not None and seen < 10:
        if isinstance(cur, ModuleNotFoundError) and cur.name:
            name = cur.name.split(".")[0]
            return _PIP_NAMES.get(name, name), False
        if isinstance(cur, ImportError) and type(cur).__name__ == "OptionalImportError":
            m = re.search(r"package `([\w.\-]+)`", str(cur)) or re.search(r"import (\w[\w.]*)", str(cur))
            if m:
                name = m.group(1).split(".")[0]
                return _PIP_NAMES.get(name, name), "version" in str(cur)
        cur = cur.__cause__ or cur.__context__
        seen += 1
    return None


def missing_package_error(exc: BaseException, what: str,
                          path: str | os.PathLike[str] | None = None) -> AsfdaError | None:
    """An `AsfdaError` naming the missing package and the pip command, when ``exc`` comes from one (see
    `missing_package`); ``what`` says what needs it ("the model's network_def")."""
    found = missing_package(exc)
    if found is None:
        return None
    name, version = found
    state = "not installed, or not at a version MONAI accepts" if version else "not installed"
    return AsfdaError(f"{what} needs the optional package '{name}', which is {state}", path,
                      f"pip install {'-U ' if version else ''}{name}")
