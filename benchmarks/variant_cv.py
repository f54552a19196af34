"""A variant of asfda cross-validated against the decisive run: per fold its labels and test Dice beside the
reference asfda run's, and per n the paired difference against that run and against random, per test volume with a
percentile bootstrap (`asfda.crossval.stats`).

The variant folder holds ``asfda crossval`` folds (``fold<k>/asfda/seed<s>/state.json``) run with one setting changed
(e.g. ``--set diversity=none``), the reference folder the decisive run's folds (``fold<k>/asfda``, ``fold<k>/random``).
A test volume enters n where the variant, the reference asfda seed and every random seed have it. Reads records only.

    python benchmarks/variant_cv.py benchmarks/results/crossval_divnone/mr_to_ct benchmarks/results/crossval/mr_to_ct
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from asfda.crossval.stats import bootstrap_mean
from asfda.results import read_run


def fold_rows(variant: Path, reference: Path, seed: int, random_seeds: list[int]) -> tuple[list[str], dict]:
    """(per fold: a line with both runs' labels and Dice; per n: [(test volume, variant, reference, random mean)])."""
    lines: list[str] = []
    by_n: dict[int, list[tuple[str, float, float, float]]] = {}
    for fold in sorted(variant.glob("fold[0-9]*"), key=lambda p: int(p.name[4:])):
        var = read_run(fold, ["asfda"], [seed]).rounds("asfda", seed)
        ref_run = read_run(reference / fold.name, ["asfda", "random"])
        ref = ref_run.rounds("asfda", seed)
        if not var:
            continue
        lines.append(f"| {fold.name[4:]} | {_labels(var)} | {_labels(ref)} |")
        for rec in var:
            n = rec["n_labelled"]
            other = _at(ref, n)
            found = [_at(ref_run.rounds("random", s), n) for s in random_seeds]
            rnd = [r for r in found if r is not None]
            if other is None or len(rnd) < len(found):
                continue
            for case in rec["per_case"]:
                v = case["case_id"]
                r_mean = float(np.mean([_dice(r, v) for r in rnd]))
                by_n.setdefault(n, []).append((v, case["dice_mean"], _dice(other, v), r_mean))
    return lines, by_n


def _labels(rounds: list[dict]) -> str:
    return ", ".join(r["queried"][0] if len(r["queried"]) == 1 else "+".join(r["queried"]) for r in rounds) + ": " + \
        " / ".join(f"{r['dice_mean']:.3f}" for r in rounds)


def _at(rounds: list[dict], n: int) -> dict | None:
    return next((r for r in rounds if r["n_labelled"] == n), None)


def _dice(rec: dict, case_id: str) -> float:
    return next(float(c["dice_mean"]) for c in rec["per_case"] if c["case_id"] == case_id)


def _ci(diffs: list[float], resamples: int) -> str:
    b = bootstrap_mean(diffs, resamples)
    return "-" if b is None else f"{b['mean']:+.3f} [{b['ci95'][0]:+.3f}, {b['ci95'][1]:+.3f}]"


def table(by_n: dict, label: str, resamples: int = 10_000) -> list[str]:
    lines = [f"| n | test volumes | {label} | reference asfda | random | {label} - reference [95%] | "
             f"{label} - random [95%] |", "|---|---|---|---|---|---|---|"]
    for n in sorted(by_n):
        rows = np.array([r[1:] for r in by_n[n]], dtype=float)
        means = " | ".join(f"{m:.3f}" for m in rows.mean(axis=0))
        diffs = " | ".join(_ci(list(rows[:, 0] - rows[:, k]), resamples) for k in (1, 2))
        lines.append(f"| {n} | {len(rows)} | {means} | {diffs} |")
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("variant", type=Path, help="the variant's asfda crossval folder")
    ap.add_argument("reference", type=Path, help="the decisive run's folder (its asfda and random rows)")
    ap.add_argument("--seed", type=int, default=0, help="asfda's seed in both folders")
    ap.add_argument("--random-seeds", default="0,1,2", help="random's seeds in the reference folder")
    ap.add_argument("--label", default="variant")
    args = ap.parse_args()
    lines, by_n = fold_rows(args.variant, args.reference, args.seed, [int(s) for s in args.random_seeds.split(",")])
    print(f"| fold | {args.label}: labels in order, test Dice n = 1.. | reference asfda |\n|---|---|---|")
    print("\n".join(lines) + "\n")
    print("\n".join(table(by_n, args.label)))


if __name__ == "__main__":
    main()
