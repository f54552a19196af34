"""Dice-vs-number-labelled learning curves (mean and +-1 std band over seeds) as a PNG, with the upper
bound (whole pool labelled) as a dashed line when the run has one."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from asfda.io.atomic import atomic_write

__all__ = ["plot_learning_curves"]


def plot_learning_curves(rows: list[dict], path: str | Path, title: str = "Dice vs number of labelled volumes") -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    upper = [r["dice_mean"] for r in rows if r["strategy"] == "upper_bound"]
    for name in sorted({r["strategy"] for r in rows} - {"upper_bound"}):
        mine = [r for r in rows if r["strategy"] == name]
        counts = sorted({r["n_labelled"] for r in mine})
        mean = np.array([np.nanmean([r["dice_mean"] for r in mine if r["n_labelled"] == n]) for n in counts])
        std = np.array([np.nanstd([r["dice_mean"] for r in mine if r["n_labelled"] == n]) for n in counts])
        ax.plot(counts, mean, marker="o", label=name)
        ax.fill_between(counts, mean - std, mean + std, alpha=0.2)
    if upper:
        n_pool = next(r["n_labelled"] for r in rows if r["strategy"] == "upper_bound")
        ax.axhline(float(np.nanmean(upper)), color="0.3", linestyle="--", linewidth=1,
                   label=f"upper bound (all {n_pool} labelled)")
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("labelled target volumes")
    ax.set_ylabel("mean Dice (test set)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    atomic_write(path, lambda p: fig.savefig(p, format="png"))
    plt.close(fig)
    return Path(path)
