"""The learning-curve figure, read from its matplotlib artists: each strategy's line is the mean over seeds, its band
spans mean - std to mean + std (the spread the report states), and the dashed line is at the upper bound's Dice."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from asfda.report.curves import plot_learning_curves

# Dice per (strategy, n_labelled) over three seeds, with spreads that differ from point to point
DICE = {
    "asfda": {0: [0.30, 0.30, 0.30], 2: [0.40, 0.50, 0.60], 4: [0.70, 0.72, 0.80]},
    "random": {0: [0.30, 0.30, 0.30], 2: [0.35, 0.45, 0.40], 4: [0.50, 0.65, 0.62]},
}
UPPER = [0.85, 0.90, 0.86]  # the upper bound of each seed, all 12 volumes labelled


def _rows() -> list[dict]:
    rows = [{"strategy": s, "seed": k, "n_labelled": n, "dice_mean": d}
            for s, curve in DICE.items() for n, seeds in curve.items() for k, d in enumerate(seeds)]
    return rows + [{"strategy": "upper_bound", "seed": k, "n_labelled": 12, "dice_mean": d}
                   for k, d in enumerate(UPPER)]


@pytest.fixture
def axes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """The Axes `plot_learning_curves` drew on (the figure is closed but its artists stay)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    made = []
    subplots = plt.subplots

    def recording(*args, **kwargs):
        fig, ax = subplots(*args, **kwargs)
        made.append(ax)
        return fig, ax

    monkeypatch.setattr(plt, "subplots", recording)
    assert plot_learning_curves(_rows(), tmp_path / "curves.png").is_file()
    assert len(made) == 1
    return made[0]


def test_each_band_spans_mean_plus_minus_std_over_seeds(axes) -> None:
    from matplotlib.collections import PolyCollection

    bands = [c for c in axes.collections if isinstance(c, PolyCollection)]
    lines = {ln.get_label(): ln for ln in axes.lines}
    assert len(bands) == len(DICE)
    for band, name in zip(bands, sorted(DICE)):  # drawn in the strategies' sorted order
        counts = sorted(DICE[name])
        mean = np.array([np.mean(DICE[name][n]) for n in counts])
        std = np.array([np.std(DICE[name][n]) for n in counts])  # population std (ddof 0), as the report says
        assert std[1] > 0.03 and std[0] == 0.0  # the spread differs from point to point
        np.testing.assert_allclose(lines[name].get_xdata(), counts)
        np.testing.assert_allclose(lines[name].get_ydata(), mean, atol=1e-12)
        vertices = np.concatenate([p.vertices for p in band.get_paths()])
        for n, m, s in zip(counts, mean, std):
            ys = vertices[np.isclose(vertices[:, 0], n), 1]
            assert ys.size >= 2
            assert ys.min() == pytest.approx(m - s, abs=1e-12)
            assert ys.max() == pytest.approx(m + s, abs=1e-12)
        assert vertices[:, 0].min() == counts[0] and vertices[:, 0].max() == counts[-1]


def test_upper_bound_line_is_at_the_upper_bounds_dice(axes) -> None:
    upper = [ln for ln in axes.lines if ln.get_label().startswith("upper bound")]
    assert len(upper) == 1
    line = upper[0]
    assert line.get_label() == "upper bound (all 12 labelled)"
    assert line.get_linestyle() == "--"
    np.testing.assert_allclose(line.get_ydata(), [np.mean(UPPER)] * 2, atol=1e-12)
    # axhline: spans the whole width in axes coordinates
    assert list(line.get_xdata()) == [0, 1]
