"""The fine-tuning recipe table: cross-validated runs of `benchmarks/cv.py` with different recipes, compared on the
folds that every variant has finished (paired: the same test volumes, seeds and picks where the strategy is random).

    .venv/bin/python benchmarks/recipe_table.py --variant "baseline=benchmarks/results/cv_first/ct_to_mr" \\
        --variant "spatial_mr=benchmarks/results/recipe/ct_to_mr_cv_spatial_mr" [--strategy random] [--rounds 4] \\
        [--out benchmarks/results/recipe/README.md]

For each variant and number labelled n: mean Dice over the shared folds' test volumes (case Dice = mean over the
foreground classes), without and with per-organ largest-connected-component post-processing (the ``lcc_dice_*``
columns every evaluation records), per class, and the median seconds of a round (training + guard, as simulate
records it). The command, machine and date of each variant's runs are in its own README / cv_provenance.json.
"""

from __future__ import annotations

import argparse
import json
import math
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

from asfda.results import read_run

CLASSES = ("liver", "kidney_right", "kidney_left", "spleen")


def fold_rounds(fold_dir: Path, strategy: str, seed: int) -> dict[int, dict]:
    """n_labelled -> {"per_case": [...], "seconds": train + score seconds} of one finished run."""
    return {int(r["n_labelled"]): {"per_case": r["per_case"],
                                   "seconds": float(r.get("seconds_train", 0)) + float(r.get("seconds_score", 0))}
            for r in read_run(fold_dir, [strategy], [seed]).rounds(strategy, seed)}


def _zero_shot(fold_dir: Path, seed: int) -> list | None:
    """The zero-shot per-case rows of one fold (None when it has none)."""
    zero = read_run(fold_dir, [], [seed]).zero_shot.get(seed)
    return None if zero is None else zero.get("per_case", [])


def _mean(values: list[float]) -> float:
    vals = [v for v in values if v is not None and not math.isnan(v)]
    return float(np.mean(vals)) if vals else math.nan


def table(variants: dict[str, Path], strategy: str, seed: int, rounds: int) -> tuple[str, dict]:
    folds = sorted({p.name for root in variants.values() for p in root.glob("fold*") if p.is_dir()},
                   key=lambda s: int(s[4:]))
    shared = [f for f in folds
              if all(len(fold_rounds(root / f, strategy, seed)) >= rounds and _zero_shot(root / f, seed) is not None
                     for root in variants.values())]
    result: dict = {"shared_folds": shared, "variants": {}}
    lines = [f"Folds finished by every variant ({strategy}, seed {seed}, n = 1..{rounds}): "
             f"{', '.join(shared) or 'none'}.", "",
             "| variant | post-processing | " + " | ".join(f"n={n}" for n in range(0, rounds + 1))
             + f" | mean n=1..{rounds} | " + " | ".join(f"{c} (n={rounds})" for c in CLASSES) + " | s/round (median) |",
             "|" + "---|" * (rounds + 5 + len(CLASSES))]
    for name, root in variants.items():
        zero = [r for f in shared for r in _zero_shot(root / f, seed) or []]
        runs = {f: fold_rounds(root / f, strategy, seed) for f in shared}
        secs = [rec["seconds"] for f in shared for rec in runs[f].values()]
        out = {}
        for prefix, label in (("dice_", "none"), ("lcc_dice_", "largest component")):
            curve = [_mean([r.get(prefix + "mean", r.get("dice_mean")) for r in zero])]
            for n in range(1, rounds + 1):
                curve.append(_mean([r.get(prefix + "mean", math.nan) for f in shared for r in runs[f][n]["per_case"]]))
            per_class = [_mean([r.get(prefix + c, math.nan) for f in shared for r in runs[f][rounds]["per_case"]])
                         for c in CLASSES]
            out[label] = {"dice_by_n": curve, "per_class_at_last_n": dict(zip(CLASSES, per_class))}
            lines.append(f"| {name} | {label} | " + " | ".join(f"{v:.3f}" for v in curve)
                         + f" | {_mean(curve[1:]):.3f} | " + " | ".join(f"{v:.3f}" for v in per_class)
                         + f" | {np.median(secs) if secs else math.nan:.0f} |")
        result["variants"][name] = {"path": str(root), **out,
                                    "seconds_per_round_median": float(np.median(secs)) if secs else None}
    return "\n".join(lines), result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--variant", action="append", required=True, help="NAME=RESULTS_FOLDER of a cv.py run")
    ap.add_argument("--strategy", default="random")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--out", help="markdown file for the table (default: print only)")
    args = ap.parse_args()
    variants = {v.split("=", 1)[0]: Path(v.split("=", 1)[1]) for v in args.variant}
    text, result = table(variants, args.strategy, args.seed, args.rounds)
    print(text)
    if args.out:
        out = Path(args.out)
        stamp = datetime.now(UTC).isoformat(timespec="minutes")
        out.with_suffix(".json").write_text(json.dumps(result, indent=2))
        out.write_text(f"Table written {stamp} by `python benchmarks/recipe_table.py "
                       + " ".join(f"--variant {k}={v}" for k, v in variants.items()) + "`\n\n" + text + "\n")


if __name__ == "__main__":
    main()
