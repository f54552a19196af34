"""When to stop, fitted on real rounds: leave-one-fold-out error of label-free estimates of the next round's gain.

Reads the rounds of cross-validated runs (``asfda crossval`` output folders: ``FOLDER/fold<k>/<strategy>/seed<s>/
state.json``), and for every round r with a round r+1 the true next gain (test Dice of r+1 minus r's) and the
label-free signals recorded after round r (``stopping`` in the round record: the prediction change on the probe
volumes, the one before it, the change of their mean entropy; the round index; the number of labels). Each candidate
estimate is fitted on the other folds' rounds and scored on the held-out fold's (never on the rounds it was fitted on),
pair by pair. Prints a markdown table per pair: MAE of each estimate, MAE of predicting 0, and the mean next gain of
the rounds each estimate flags "consider stopping" (predicted gain below ``--threshold``) against those it flags
"continue".

With ``--pooled`` every folder's rounds are one data set: each estimate is fitted on the rounds of both pairs but the
held-out fold (a fold is a pair's fold: the folder's name, e.g. ``ct_to_mr``, and its index, so two folders of the
same pair leave the same test volumes out together), and scored per folder. That is the fit a shipped rule would be:
one scale for every pool.

    python benchmarks/stop_fit.py benchmarks/results/crossval/ct_to_mr benchmarks/results/crossval/mr_to_ct
    python benchmarks/stop_fit.py --pooled benchmarks/results/crossval/ct_to_mr benchmarks/results/crossval/mr_to_ct
    python benchmarks/stop_fit.py --pooled --all    # every committed crossval*/<pair> folder (issue 34's data)

In pooled mode it also prints the least-squares scale through 0 over every distinct round (what
``asfda.stopping.GAIN_PER_CHANGE`` ships), over each pair alone, and a table per pair over that pair's distinct rounds.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from asfda.results import read_run

Row = dict[str, Any]


def rounds_of(folder: Path) -> list[Row]:
    """One row per round with a next round and the stopping record: fold, signals, true next gain."""
    rows: list[Row] = []
    for fold_dir in sorted(p for p in folder.glob("fold*") if p.is_dir()):
        got = read_run(fold_dir)
        # in the order of their paths (FOLDER/fold<k>/<strategy>/seed<s>/state.json sorted), as before read_run
        for name, seed in sorted(got.runs(), key=lambda run: (run[0], f"seed{run[1]}")):
            source = str((fold_dir / name / f"seed{seed}").resolve())
            rows += [{**r, "source": source}
                     for r in _round_rows(int(fold_dir.name.removeprefix("fold")), got.rounds(name, seed))]
    return rows


PAIRS = ("ct_to_mr", "mr_to_ct")


def committed_folders(results: Path) -> list[Path]:
    """Every cross-validated run folder under ``results`` (``crossval*/<pair>``): the decisive rows, the baselines and
    the selection variants, all with probe-recorded rounds. Semi-supervision's runs (``semi/``) are another recipe,
    not the default's, and stay out."""
    return sorted(p for p in results.glob("crossval*/*")
                  if p.is_dir() and p.name in PAIRS and any(p.glob("fold*/*/seed*/state.json")))


def rounds_by_folder(folders: list[Path]) -> dict[Path, list[Row]]:
    """Each folder's rounds (``rounds_of``), each row marked with its pair (the folder's name)."""
    return {folder: [{**r, "pair": folder.name} for r in rounds_of(folder)] for folder in folders}


def scale_through_zero(rows: list[Row]) -> float:
    """The least-squares slope through 0 of the next gain on the prediction change ("a x change")."""
    return CANDIDATES["a x change"](rows)({"change": 1.0})


def pooled_rows(per_folder: list[list[Row]]) -> list[Row]:
    """The rows of every folder as one data set, each round once: a run two folders share (a folder that links
    another's random runs, as ``crossval_density`` links ``crossval``'s) and a rerun that trained the same models
    (a variant whose picks matched another's: the same change and the same next gain, in the same pair and fold) are
    not counted twice."""
    seen: set[tuple] = set()
    out = []
    for rows in per_folder:
        for r in rows:
            keys = {(str(r.get("source", id(r))), int(r["round"])),
                    (str(r.get("pair", "")), int(r["fold"]), int(r["round"]), round(float(r["change"]), 9),
                     round(float(r["gain"]), 9))}
            if not keys & seen:
                seen |= keys
                out.append(r)
    return out


def _round_rows(fold: int, recs: list[dict]) -> list[Row]:
    rows: list[Row] = []
    for rec, nxt in zip(recs, recs[1:]):
        st = rec.get("stopping")
        if not st or st.get("change") is None or rec.get("dice_mean") is None or nxt.get("dice_mean") is None:
            continue
        rows.append({"fold": fold, "round": rec["round"], "n": rec["n_labelled"], "change": st["change"],
                     "change_before": st.get("change_before") if st.get("change_before") is not None
                     else float("nan"), "entropy_change": st.get("entropy_change") or 0.0,
                     "rule": st["predicted_gain"], "gain": nxt["dice_mean"] - rec["dice_mean"],
                     "reverted": float(bool((nxt.get("guard") or {}).get("reverted")))})
    return rows


Fit = Callable[[list[Row]], Callable[[Row], float]]


def _lsq(features: Callable[[Row], list[float]]) -> Fit:
    def fit(train: list[Row]) -> Callable[[Row], float]:
        x = np.array([features(r) for r in train])
        y = np.array([r["gain"] for r in train])
        w = np.linalg.lstsq(x, y, rcond=None)[0]
        return lambda r: float(np.dot(features(r), w))
    return fit


def _per_round(train: list[Row]) -> Callable[[Row], float]:
    by: dict[int, list[float]] = {}
    for r in train:
        by.setdefault(int(r["round"]), []).append(r["gain"])
    every = float(np.median([r["gain"] for r in train]))
    return lambda r: float(np.median(by[int(r["round"])])) if int(r["round"]) in by else every


def _constant(value: float) -> Callable[[Row], float]:
    return lambda r: value


CANDIDATES: dict[str, Fit] = {
    "predict 0": lambda train: (lambda r: 0.0),
    "the rounds' recorded estimate (0.1 x change, before 9b6008a)": lambda train: (lambda r: r["rule"]),
    "median gain (a constant)": lambda train: _constant(float(np.median([t["gain"] for t in train]))),
    "median gain per round index": _per_round,
    "a / labels": _lsq(lambda r: [1.0 / r["n"]]),
    "a x change": _lsq(lambda r: [r["change"]]),
    "a + b x change": _lsq(lambda r: [1.0, r["change"]]),
    "a / labels + b x change": _lsq(lambda r: [1.0 / r["n"], r["change"]]),
}


def leave_one_fold_out(rows: list[Row], fit: Fit, train_on: list[Row] | None = None) -> np.ndarray:
    """Each row's estimate from a fit on the rows of ``train_on`` (default: ``rows``) outside its fold.

    ``fold`` identifies a fold; pooled rows carry ``pair`` too, and a fold is then (pair, fold)."""
    pool = rows if train_on is None else train_on
    pred = np.full(len(rows), np.nan)
    for k in sorted({_fold_key(r) for r in rows}):
        train = [r for r in pool if _fold_key(r) != k]
        if not train:
            continue
        f = fit(train)
        for i, r in enumerate(rows):
            if _fold_key(r) == k:
                pred[i] = f(r)
    return pred


def _fold_key(row: Row) -> tuple[str, int]:
    return str(row.get("pair", "")), int(row["fold"])


def _cell(gain: np.ndarray, mask: np.ndarray) -> str:
    return f"{int(mask.sum())}, {gain[mask].mean():+.4f}" if mask.any() else "0, -"


def table(rows: list[Row], threshold: float, train_on: list[Row] | None = None) -> str:
    gain = np.array([r["gain"] for r in rows])
    out = ["| estimate | MAE (held-out folds) | vs predicting 0 | flagged stop: n, mean next gain | flagged "
           "continue: n, mean next gain |", "|---|---|---|---|---|"]
    zero = float(np.mean(np.abs(gain)))
    for name, fit in CANDIDATES.items():
        pred = leave_one_fold_out(rows, fit, train_on)
        ok = ~np.isnan(pred)
        mae = float(np.mean(np.abs(pred[ok] - gain[ok])))
        stop, go = ok & (pred < threshold), ok & (pred >= threshold)
        out.append(f"| {name} | {mae:.4f} | {mae - zero:+.4f} | {_cell(gain, stop)} | {_cell(gain, go)} |")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("folders", nargs="*", type=Path, help="asfda crossval output folders (one per pair)")
    ap.add_argument("--all", action="store_true",
                    help="add every committed benchmarks/results/crossval*/<pair> folder (with --pooled: issue 34's "
                         "fit)")
    ap.add_argument("--threshold", type=float, default=0.01, help="stop below this predicted gain (mean Dice)")
    ap.add_argument("--pooled", action="store_true",
                    help="fit on every folder's rounds (leaving the held-out pair-fold out), score per folder")
    args = ap.parse_args(argv)
    if args.all:
        results = Path(__file__).resolve().parent / "results"
        args.folders = list(dict.fromkeys([*(f.resolve() for f in args.folders), *committed_folders(results)]))
    if not args.folders:
        ap.error("no folders: name them, or give --all")
    by_folder = rounds_by_folder(args.folders)
    pooled = pooled_rows(list(by_folder.values())) if args.pooled else None
    if pooled is not None:
        print(f"pooled fit: {len(pooled)} rounds from {len(by_folder)} folders (a run two folders share counted once); "
              "a fold is (pair, fold)")
        by_pair = {p: sub for p in PAIRS if (sub := [r for r in pooled if r["pair"] == p])}
        print(f"least squares through 0 (a x change): a = {scale_through_zero(pooled):.4f} over every round; "
              + "; ".join(f"{p} alone {scale_through_zero(sub):.4f} ({len(sub)})" for p, sub in by_pair.items()))
        for pair, rows in by_pair.items():
            print(f"\n## pair {pair}: every folder's distinct rounds ({len(rows)})\n")
            print(table(rows, args.threshold, pooled))
    for folder, rows in by_folder.items():
        folds = sorted({int(r['fold']) for r in rows})
        print(f"\n## {folder} ({len(rows)} rounds with a next round, folds {folds})\n")
        if pooled is None and len({r["fold"] for r in rows}) < 2:
            print("fewer than 2 folds with rounds: nothing to leave out yet")
            continue
        by_round = {k: [r["gain"] for r in rows if r["round"] == k] for k in sorted({r["round"] for r in rows})}
        print("true next gain by round: " + ", ".join(f"after round {k}: mean {np.mean(v):+.4f} (n={len(v)})"
                                                     for k, v in by_round.items()) + "\n")
        print(table(rows, args.threshold, pooled))


if __name__ == "__main__":
    main()
