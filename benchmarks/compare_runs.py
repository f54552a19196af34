"""Compare one strategy across two `asfda simulate` results folders of the same pool, splits and seeds (e.g.
asfda with two diversity spaces): per seed, the volume labelled each round and the test Dice after it, and the
area under the Dice-vs-labelled curve (from zero-shot). Reads only the folders' `state.json` and
`zero_shot_seed*.json` files (no model, no data).

    .venv/bin/python benchmarks/compare_runs.py A_DIR B_DIR [--labels A B] [--strategy asfda] [--out FILE.md]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from asfda.io import atomic_write_text
from asfda.results import RunRecords, area_under_curve, read_run


def curve(got: RunRecords, strategy: str, seed: int) -> tuple[list[str], list[float]] | None:
    """(picked ids per round, [zero-shot Dice, Dice after each round]) or None when the run is missing."""
    if seed not in got.states.get(strategy, {}) or seed not in got.zero_shot:
        return None
    rounds = got.rounds(strategy, seed)
    z = float(np.nanmean([c["dice_mean"] for c in got.zero_shot[seed]["per_case"]]))
    return [",".join(r["queried"]) for r in rounds], [z, *(float(r["dice_mean"]) for r in rounds)]


def compare(a: Path, b: Path, labels: tuple[str, str], strategy: str) -> str:
    runs = {lab: read_run(f, [strategy]) for lab, f in zip(labels, (a, b), strict=True)}
    seeds = sorted({s for got in runs.values() for s in got.states.get(strategy, {})})
    lines = [f"| seed | {strategy} | labelled, round by round (test Dice after the round; zero-shot first) | AUC |",
             "|---|---|---|---|"]
    aucs: dict[str, list[float]] = {labels[0]: [], labels[1]: []}
    for seed in seeds:
        found = {lab: curve(runs[lab], strategy, seed) for lab in labels}
        got = {lab: c for lab, c in found.items() if c is not None}
        if len(got) < len(labels):
            continue
        n = min(len(d) for _, d in got.values())
        for lab, (picks, dice) in got.items():
            auc = area_under_curve(list(range(n)), dice[:n])
            aucs[lab].append(auc)
            steps = ", ".join(f"{p.replace('chaos_', '')} {d:.3f}" for p, d in zip(picks[: n - 1], dice[1:n]))
            lines.append(f"| {seed} | {lab} | {dice[0]:.3f}; {steps} | {auc:.3f} |")
    if aucs[labels[0]]:
        lines += ["", "Mean AUC over the seeds both runs have: " + ", ".join(
            f"{lab} {np.mean(v):.3f}" for lab, v in aucs.items())
            + f" (difference {np.mean(aucs[labels[1]]) - np.mean(aucs[labels[0]]):+.3f}, per seed "
            + ", ".join(f"{y - x:+.3f}" for x, y in zip(*aucs.values())) + ")."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("a", type=Path)
    ap.add_argument("b", type=Path)
    ap.add_argument("--labels", nargs=2, default=["A", "B"])
    ap.add_argument("--strategy", default="asfda")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args(argv)
    text = compare(args.a, args.b, tuple(args.labels), args.strategy)
    if args.out:
        atomic_write_text(args.out, text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
