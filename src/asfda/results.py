"""A simulation's result files, read back and summarised: the learning-curve rows and their summary (Dice per
labelled count, spread over seeds, area under the curve, fraction of the upper bound), ``per_case.csv`` and
``stopping.csv``. Shared by `asfda.simulate` (which writes them) and `asfda.report` (which shows them)."""

from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path

import numpy as np

from asfda import stopping
from asfda.config import RunConfig
from asfda.io import atomic_write_text

__all__ = ["UPPER_BOUND", "area_under_curve", "csv_text", "per_case_rows", "results_table", "stopping_rows",
           "summarise", "write_per_case", "write_stopping"]


def area_under_curve(n_labelled: list[float], dice: list[float]) -> float:
    """Trapezoid area under Dice vs number labelled, divided by the n range (a mean Dice level): asfda's one AUC
    (``simulate``'s results and report, ``crossval``'s summary). Over n = 0..N in steps of 1 it is
    (D_0 / 2 + D_1 + ... + D_(N-1) + D_N / 2) / N, not the plain mean of D_0..D_N."""
    x, y = np.asarray(n_labelled, float), np.asarray(dice, float)
    order = np.argsort(x)
    x, y = x[order], y[order]
    if len(x) < 2 or x[-1] == x[0]:
        return float(y.mean()) if len(y) else math.nan
    return float(np.sum((x[1:] - x[:-1]) * (y[1:] + y[:-1]) / 2) / (x[-1] - x[0]))


UPPER_BOUND = "upper_bound"
"""The strategy name of the full-supervision upper bound's rows (every pool case labelled)."""


def summarise(rows: list[dict]) -> dict[str, dict]:
    """Per strategy: mean Dice per labelled count (over seeds), its spread, the area under the curve and, when
    the upper bound was run, each count's Dice as a fraction of the upper bound's (same seed's, averaged)."""
    out: dict[str, dict] = {}
    upper = {r["seed"]: r["dice_mean"] for r in rows if r["strategy"] == UPPER_BOUND}
    for name in sorted({r["strategy"] for r in rows} - {UPPER_BOUND}):
        mine = [r for r in rows if r["strategy"] == name]
        counts = sorted({r["n_labelled"] for r in mine})
        curve = {n: float(np.nanmean([r["dice_mean"] for r in mine if r["n_labelled"] == n])) for n in counts}
        spread = {n: float(np.nanstd([r["dice_mean"] for r in mine if r["n_labelled"] == n])) for n in counts}
        seeds = sorted({r["seed"] for r in mine})
        aucs = [area_under_curve([r["n_labelled"] for r in mine if r["seed"] == s],
                                 [r["dice_mean"] for r in mine if r["seed"] == s]) for s in seeds]
        out[name] = {"curve": curve, "std": spread, "auc": float(np.mean(aucs)), "auc_per_seed": aucs}
        if upper:
            out[name]["of_upper"] = {n: float(np.nanmean([r["dice_mean"] / upper[r["seed"]] for r in mine
                                                          if r["n_labelled"] == n and r["seed"] in upper]))
                                     for n in counts}
    if upper:
        vals = list(upper.values())
        n_pool = next(r["n_labelled"] for r in rows if r["strategy"] == UPPER_BOUND)
        out[UPPER_BOUND] = {"dice": float(np.mean(vals)), "std": float(np.std(vals)), "per_seed": upper,
                            "n_labelled": n_pool}
    return out


def results_table(summary: dict[str, dict]) -> str:
    """A markdown table: strategy x number labelled (mean Dice over seeds, +- std when several seeds), AUC,
    and the last count's % of the upper bound; then the upper bound's line."""
    curves = {k: v for k, v in summary.items() if k != UPPER_BOUND}
    upper = summary.get(UPPER_BOUND)
    counts = sorted({n for s in curves.values() for n in s["curve"]})
    several = any(len(s["auc_per_seed"]) > 1 for s in curves.values())
    head = ("| strategy | " + " | ".join(f"n={n}" for n in counts) + " | AUC |"
            + (" % of upper bound |" if upper else ""))
    lines = [head, "|" + "---|" * (len(counts) + 2 + bool(upper))]
    for name, s in curves.items():
        cells = [(f"{s['curve'][n]:.3f}" + (f" ± {s['std'][n]:.3f}" if several else "")) if n in s["curve"] else ""
                 for n in counts]
        line = f"| {name} | " + " | ".join(cells) + f" | {s['auc']:.3f} |"
        if upper:
            last = max(s["of_upper"])
            line += f" {100 * s['of_upper'][last]:.0f}% (n={last}) |"
        lines.append(line)
    if upper:
        lines.append("")
        lines.append(f"Upper bound (fine-tuned on all {upper['n_labelled']} pool volumes, labelled): "
                     f"{upper['dice']:.3f}" + (f" ± {upper['std']:.3f}" if len(upper["per_seed"]) > 1 else "") + ".")
    return "\n".join(lines)


def per_case_rows(out: Path, cfg: RunConfig) -> list[dict]:
    """Every test case's Dice (mean and per class) for every evaluated model of the run: zero-shot, each
    strategy x seed x round, the upper bound; read back from what the run wrote."""
    rows: list[dict] = []
    for seed in cfg.seeds:
        zero = out / f"zero_shot_seed{seed}.json"
        if zero.exists():
            rows += [{"strategy": "zero_shot", "seed": seed, "round": -1, "n_labelled": 0, **pc}
                     for pc in json.loads(zero.read_text())["per_case"]]
        for name in cfg.strategies:
            state = out / name / f"seed{seed}" / "state.json"
            if state.exists():
                for rec in json.loads(state.read_text())["rounds"]:
                    rows += [{"strategy": name, "seed": seed, "round": rec["round"], "n_labelled": rec["n_labelled"],
                              **pc} for pc in rec["per_case"]]
        upper = out / UPPER_BOUND / f"seed{seed}.json"
        if cfg.upper_bound and upper.exists():
            n_pool = len(json.loads(upper.read_text())["key"]["pool"])
            rows += [{"strategy": UPPER_BOUND, "seed": seed, "round": -1, "n_labelled": n_pool, **pc}
                     for pc in json.loads(upper.read_text())["per_case"]]
    return rows


def csv_text(rows: list[dict]) -> str:
    keys: list[str] = []
    for r in rows:
        keys += [k for k in r if k not in keys]
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=keys)
    w.writeheader()
    w.writerows(rows)
    return buf.getvalue()


def write_per_case(out: Path, cfg: RunConfig) -> None:
    """``per_case.csv``: see `per_case_rows`."""
    atomic_write_text(out / "per_case.csv", csv_text(per_case_rows(out, cfg)))


def stopping_rows(out: Path, cfg: RunConfig) -> list[dict]:
    """Per strategy, seed and round: the when-to-stop estimate made after the round beside the true next-round gain
    (`asfda.stopping.estimate_rows`), read back from what the run wrote."""
    rows: list[dict] = []
    for name in cfg.strategies:
        for seed in cfg.seeds:
            state = out / name / f"seed{seed}" / "state.json"
            if state.exists():
                rows += [{"strategy": name, "seed": seed, **r}
                         for r in stopping.estimate_rows(json.loads(state.read_text())["rounds"])]
    return rows


def write_stopping(out: Path, cfg: RunConfig) -> None:
    """``stopping.csv``: see `stopping_rows`."""
    rows = stopping_rows(out, cfg)
    if rows:
        atomic_write_text(out / "stopping.csv", csv_text(rows))
