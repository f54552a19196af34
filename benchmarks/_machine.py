"""The one place benchmark scripts read the machine they ran on (recorded next to every figure)."""

from __future__ import annotations

import platform
import subprocess


def cpu_model() -> str:
    """``lscpu``'s model name, or what ``platform`` knows when lscpu is missing."""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        out = ""
    return next((ln.split(":", 1)[1].strip() for ln in out.splitlines() if ln.startswith("Model name:")),
                platform.processor() or platform.machine())


def machine() -> str:
    """The CPU and, when torch sees CUDA (so the benchmark computes there), the GPU: the line a figure cites."""
    import torch

    cpu = f"{cpu_model()}, {torch.get_num_threads()} torch threads"
    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name(0)} GPU (torch {torch.__version__}); CPU {cpu}"
    return f"{cpu} (torch {torch.__version__}, no GPU)"


def code_version() -> str:
    """The git commit the benchmark ran from (``+dirty`` with uncommitted changes), or "unknown"."""
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True,
                             check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return rev + ("+dirty" if dirty else "")
