"""Overlay previews of a volume: the image and label maps (annotation, prediction before / after
adaptation) side by side, on an axial and a coronal slice through the most foreground.

Volumes are on the model grid (RAS after the model's preprocessing); slices are shown in the radiological
convention (the patient's right on the left of the picture, anterior / superior up).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from asfda.io.atomic import atomic_write

__all__ = ["preview_png", "slice_through_most_foreground"]

_COLOURS = np.array([[0.90, 0.10, 0.10], [0.10, 0.75, 0.20], [0.15, 0.45, 0.95], [0.95, 0.75, 0.10],
                     [0.70, 0.20, 0.85], [0.10, 0.80, 0.80], [0.95, 0.45, 0.10], [0.55, 0.55, 0.10]])


def slice_through_most_foreground(labels: np.ndarray | None, axis: int, size: int) -> int:
    """Index along ``axis`` of the slice with the most foreground voxels (the middle one without labels)."""
    if labels is None or not np.any(labels > 0):
        return size // 2
    other = tuple(a for a in range(3) if a != axis)
    return int(np.argmax((labels > 0).sum(axis=other)))


def _rgb_slice(image2d: np.ndarray, label2d: np.ndarray | None, lo: float, hi: float) -> np.ndarray:
    grey = np.clip((image2d - lo) / max(hi - lo, 1e-6), 0.0, 1.0)
    rgb = np.repeat(grey[..., None], 3, axis=-1)
    if label2d is not None:
        lab = label2d.astype(np.int64)
        fg = lab > 0
        colours = _COLOURS[(lab[fg] - 1) % len(_COLOURS)]
        rgb[fg] = 0.55 * rgb[fg] + 0.45 * colours
    return rgb


def _display(plane: np.ndarray) -> np.ndarray:
    """[first in-plane axis, second] in RAS -> rows top-down, columns with the patient's right on the left."""
    return np.flip(plane.T, axis=(0, 1))


def preview_png(image: np.ndarray, panels: dict[str, np.ndarray | None], path: str | Path, *, title: str = "",
                class_names: list[str] | None = None) -> Path:
    """Writes a PNG: one column for the image and one per label map in ``panels`` (None: left blank), rows
    axial and coronal through the slice with the most foreground of the first non-empty map.

    Args:
        image: ``[X, Y, Z]`` on the model grid (RAS).
        panels: name -> ``[X, Y, Z]`` integer label map (0 = background) or None.
        class_names: for the colour legend (index = label value).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    image = np.asarray(image, dtype=np.float32)
    ref = next((p for p in panels.values() if p is not None and np.any(p > 0)), None)
    lo, hi = np.percentile(image, [1, 99]) if image.size else (0.0, 1.0)
    z = slice_through_most_foreground(ref, 2, image.shape[2])
    y = slice_through_most_foreground(ref, 1, image.shape[1])
    planes = [("axial", lambda v: v[:, :, z]), ("coronal", lambda v: v[:, y, :])]
    cols = [("image", None), *panels.items()]
    fig, axes = plt.subplots(len(planes), len(cols), figsize=(2.2 * len(cols), 2.3 * len(planes)), dpi=90,
                             squeeze=False)
    for r, (plane_name, take) in enumerate(planes):
        for c, (name, lab) in enumerate(cols):
            ax = axes[r][c]
            ax.set_xticks([])
            ax.set_yticks([])
            if c > 0 and lab is None:
                ax.set_facecolor("0.85")
                ax.text(0.5, 0.5, "n/a", ha="center", va="center", transform=ax.transAxes)
            else:
                rgb = _rgb_slice(take(image), None if lab is None else take(np.asarray(lab)), lo, hi)
                ax.imshow(np.stack([_display(rgb[..., k]) for k in range(3)], axis=-1), interpolation="nearest",
                          aspect="auto")
            if r == 0:
                ax.set_title(name, fontsize=9)
            if c == 0:
                ax.set_ylabel(plane_name, fontsize=9)
                ax.text(0.02, 0.5, "R", color="yellow", fontsize=8, transform=ax.transAxes, va="center")
    if class_names:
        handles = [Patch(color=_COLOURS[(i - 1) % len(_COLOURS)], label=n) for i, n in enumerate(class_names) if i > 0]
        fig.legend(handles=handles, loc="lower center", ncol=min(len(handles), 5), fontsize=8, frameon=False)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout(rect=(0, 0.06 if class_names else 0, 1, 0.95 if title else 1))
    atomic_write(path, lambda p: fig.savefig(p, format="png"))
    plt.close(fig)
    return Path(path)
