"""What annotators get with a query and what their edits tell: label-description files for ITK-SNAP and 3D Slicer,
and how much a final label differs from the pre-segmentation it was corrected from (pure functions)."""

from __future__ import annotations

import numpy as np

from asfda.metrics import dice_per_class, mean_ignoring_nan

__all__ = ["PALETTE", "edit_summary", "itksnap_label_description", "slicer_color_table"]

# distinct colours for label values 1..; background is transparent
PALETTE = [(220, 60, 60), (60, 160, 220), (60, 200, 90), (240, 200, 40), (180, 90, 220), (250, 130, 40),
           (40, 200, 200), (230, 110, 180), (140, 140, 60), (100, 100, 240), (170, 60, 60), (60, 120, 90)]


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
