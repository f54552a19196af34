"""One exception type for everything a user can get wrong; the CLI prints it on one line."""

from __future__ import annotations

from pathlib import Path

__all__ = ["AsfdaError", "RunSettingsChanged"]


class AsfdaError(Exception):
    """A problem the user can fix: which file, what is wrong, what to do.

    Args:
        problem: what is wrong, in plain words.
        path: the file or folder concerned (optional).
        fix: what the user should do about it (optional).
    """

    def __init__(self, problem: str, path: str | Path | None = None, fix: str | None = None) -> None:
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
