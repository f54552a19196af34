"""Reports: overlay previews, learning curves, and the HTML report as rendered by headless Chromium. The
learning-curve figure is read from its matplotlib artists: each strategy's line is the mean over seeds, its band spans
mean - std to mean + std (the spread the report states), and the dashed line is at the upper bound's Dice."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from asfda.config import RunConfig
from asfda.report.curves import plot_learning_curves
from asfda.report.previews import preview_png, slice_through_most_foreground
from asfda.simulate import run_simulation
from asfda.training import TrainConfig
from conftest import write_bundle, write_nnunet

CHROMIUM = next((shutil.which(b) for b in ("chromium", "chromium-browser", "google-chrome") if shutil.which(b)), None)


def _png(path: Path) -> np.ndarray:
    import matplotlib.image as mpimg

    return mpimg.imread(str(path))


def test_slice_through_most_foreground() -> None:
    lab = np.zeros((4, 5, 6), np.uint8)
    lab[1, 2, 4] = 1
    lab[2, 2, 4] = 2
    lab[0, 0, 1] = 1
    assert slice_through_most_foreground(lab, 2, 6) == 4
    assert slice_through_most_foreground(lab, 1, 5) == 2
    assert slice_through_most_foreground(None, 2, 6) == 3
    assert slice_through_most_foreground(np.zeros((4, 5, 6)), 0, 4) == 2


def test_preview_png_overlays_in_radiological_view(tmp_path: Path) -> None:
    image = np.zeros((20, 10, 8), np.float32)
    image[:10] = 1.0  # the patient's left half (low x in RAS) bright
    label = np.zeros((20, 10, 8), np.uint8)
    label[14:18, 3:7, 2:6] = 1  # a class-1 blob on the patient's right (high x)
    path = preview_png(image, {"label": label, "missing": None}, tmp_path / "p.png", title="t",
                       class_names=["background", "liver"])
    rgb = _png(path)[..., :3]
    assert rgb.shape[0] > 100 and rgb.shape[1] > 200
    red = (rgb[..., 0] - rgb[..., 1] > 0.3) & (rgb[..., 0] - rgb[..., 2] > 0.3)
    assert red.sum() > 20  # the overlay is drawn
    # radiological view: in the label panel the blob (patient's right) is in the left half of the panel
    cols = np.nonzero(red[: rgb.shape[0] // 2].any(axis=0))[0]
    width = rgb.shape[1]
    panel = (width // 3, 2 * width // 3)  # columns: image, label, missing
    inside = cols[(cols > panel[0]) & (cols < panel[1])]
    assert inside.size and inside.mean() < (panel[0] + panel[1]) / 2


def test_learning_curves_with_spread_and_upper_bound(tmp_path: Path) -> None:
    rows = [{"strategy": s, "seed": k, "n_labelled": n, "dice_mean": 0.2 + 0.1 * n + 0.01 * k}
            for s in ("asfda", "random") for k in (0, 1) for n in (0, 1, 2)]
    rows += [{"strategy": "upper_bound", "seed": k, "n_labelled": 9, "dice_mean": 0.8} for k in (0, 1)]
    path = plot_learning_curves(rows, tmp_path / "c.png")
    assert _png(path).shape[0] > 300


# ---------------------------------------------------------------------------------------------- the curves' artists
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


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("report")
    cfg = RunConfig(model=str(write_bundle(root / "bundle")), pool=str(write_nnunet(root / "ds", n=7)),
                    test_fraction=0.3, strategies=["asfda", "random"], budget=1, rounds=2, seeds=[0, 1],
                    train=TrainConfig(steps=3, batch_size=1), cache_dir=str(root / "cache"),
                    out_dir=str(root / "run"), progress=False)
    return run_simulation(cfg).out_dir


def test_report_html_is_self_contained_with_spread_over_seeds(run_dir: Path) -> None:
    page = (run_dir / "report.html").read_text()
    assert "±" in page  # two seeds: mean ± std
    assert "seed 1" in page and "% of upper bound" in page
    assert "guard (plausibility adapted / pretrained)" in page
    assert re.search(r"(kept|DISCARDED) \(\d\.\d{3} / \d\.\d{3}\)", page)  # the guard's verdict per round
    assert "http://" not in page and "https://" not in page and "<script" not in page


@pytest.mark.skipif(CHROMIUM is None, reason="headless Chromium (Debian package `chromium`) is not installed")
def test_report_html_renders_in_headless_chromium(run_dir: Path, tmp_path: Path) -> None:
    shot = tmp_path / "shot.png"
    assert CHROMIUM is not None
    proc = subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                           "--window-size=1200,3000", f"--screenshot={shot}", (run_dir / "report.html").as_uri()],
                          capture_output=True, text=True, timeout=120)
    assert shot.exists(), proc.stderr[-2000:]
    rgb = _png(shot)[..., :3]
    assert rgb.shape[:2] == (3000, 1200)
    # text and tables are grey; coloured pixels mean the inlined curve and overlay images were decoded
    colourful = (rgb.max(axis=-1) - rgb.min(axis=-1)) > 0.3
    assert colourful.sum() > 2000, colourful.sum()
    assert (rgb < 0.2).all(axis=-1).sum() > 500  # and there is text


def test_the_guard_cell_says_which_half_of_a_semi_round_was_kept() -> None:
    from asfda.report.html import _guard_cell

    guard = {"reverted": False, "plausibility_adapted": 0.81, "plausibility_pretrained": 0.7}
    assert _guard_cell(guard) == "kept (0.810 / 0.700)"
    assert _guard_cell({**guard, "reverted": True}).startswith("DISCARDED")
    assert _guard_cell({**guard, "semi_discarded": {"reverted": True}}).startswith(
        "labelled half kept, pseudo-labelled half DISCARDED")
    assert _guard_cell(None) != ""
