"""What annotators get with a query and what their edits tell: label-description files for ITK-SNAP and 3D Slicer,
and how much a final label differs from the pre-segmentation it was corrected from (pure functions)."""

from __future__ import annotations

import numpy as np

from asfda.metrics import dice_per_class, mean_ignoring_nan

__all__ = ["PALETTE", "edit_summary", "itksnap_label_description", "slicer_color_table"]


def _palette(n: int) -> list[tuple[int, int, int]]:
    """``n`` distinct colours for label values 1..n: twelve chosen by hand, then, one at a time, the colour of a
    12-level RGB grid (nothing near black or white) farthest from every colour already taken, so that each new label's
    colour is as far from the others as the grid allows."""
    out = [(220, 60, 60), (60, 160, 220), (60, 200, 90), (240, 200, 40), (180, 90, 220), (250, 130, 40),
           (40, 200, 200), (230, 110, 180), (140, 140, 60), (100, 100, 240), (170, 60, 60), (60, 120, 90)]
    levels = np.linspace(30, 245, 12).round()
    grid = np.stack(np.meshgrid(levels, levels, levels, indexing="ij"), -1).reshape(-1, 3)
    grid = grid[(grid.max(1) >= 100) & (grid.min(1) <= 215)]  # nothing near black or white
    nearest = np.min(((grid[:, None, :] - np.array(out, float)[None]) ** 2).sum(-1), axis=1)
    while len(out) < n:
        k = int(np.argmax(nearest))  # the first of the farthest: deterministic
        out.append((int(grid[k, 0]), int(grid[k, 1]), int(grid[k, 2])))
        nearest = np.minimum(nearest, ((grid - grid[k]) ** 2).sum(-1))
    return out


PALETTE = _palette(1023)
"""Distinct colours for label values 1..1023 (value v gets ``PALETTE[v - 1]``); background is transparent."""


def _coloured(labels: dict[str, int]) -> list[tuple[int, str, tuple[int, int, int]]]:
    """(value, name, RGB) of each foreground label, by value."""
    return [(v, n, PALETTE[(v - 1) % len(PALETTE)]) for n, v in sorted(labels.items(), key=lambda kv: kv[1]) if v]


def itksnap_label_description(labels: dict[str, int]) -> str:
    """An ITK-SNAP label description file (Segmentation > Import Label Descriptions) for ``labels`` (name -> value)."""
    lines = ["################################################",
             "# ITK-SnAP Label Description File (written by asfda)",
             "# IDX   -R-  -G-  -B-  -A--  VIS MSH  LABEL",
             "################################################",
             '    0     0    0    0        0  0  0    "Clear Label"']
    for value, name, (r, g, b) in _coloured(labels):
        lines.append(f'{value:5d} {r:5d} {g:4d} {b:4d}        1  1  1    "{name}"')
    return "\n".join(lines) + "\n"


def slicer_color_table(labels: dict[str, int]) -> str:
    """A 3D Slicer colour table (load it as a Color node; then the segmentation's segments carry these names)."""
    lines = ["# Color table file written by asfda", f"# {len(labels)} values", "0 background 0 0 0 0"]
    for value, name, (r, g, b) in _coloured(labels):
        lines.append(f"{value} {name.replace(' ', '_')} {r} {g} {b} 255")
    return "\n".join(lines) + "\n"


def edit_summary(presegmentation: np.ndarray, label: np.ndarray, labels: dict[str, int]) -> dict[str, float]:
    """How much the annotator changed: per foreground class the Dice between the pre-segmentation and the final
    label (`asfda.metrics.dice_per_class`: NaN when the class is in neither), the mean of those (NaN left out), and
    the voxels whose value changed (count and fraction of the volume)."""
    if presegmentation.shape != label.shape:
        raise ValueError(f"pre-segmentation {presegmentation.shape} and label {label.shape} differ in shape")
    named = [(n, v) for n, v in sorted(labels.items(), key=lambda kv: kv[1]) if v != 0]
    dices = dice_per_class(presegmentation, label, [v for _, v in named])
    out: dict[str, float] = {f"edit_dice_{n}": float(d) for (n, _), d in zip(named, dices)}
    changed = int((presegmentation != label).sum())
    out["edit_dice_mean"] = mean_ignoring_nan(dices)
    out["voxels_changed"] = changed
    out["fraction_changed"] = changed / float(label.size)
    return out
