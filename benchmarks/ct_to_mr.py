"""Real CT -> MR adaptation benchmark: strategies x labelled counts x seeds through `asfda simulate`.

Profiles:
  quick  asfda vs random, 2 seeds, 1 label per round, 3 rounds (labelled 1..3); ~45 min on 2 cores
  full   asfda, random, enpy, coreset, mc_entropy, badge; 3 seeds; 5 rounds (labelled 1..5); background job

    .venv/bin/python benchmarks/ct_to_mr.py --profile quick [--model ../shared/models/ct_abdomen_unet]
        [--data ../shared/data/mr_chaos_t2] [--steps 200] [--out benchmarks/results/ct_to_mr_quick]

Writes the simulate outputs under --out plus README.md with the command, machine and date.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from _machine import code_version, machine
from asfda.config import RunConfig, SemiConfig
from asfda.io import atomic_write_text
from asfda.selection import DEFAULT_DIVERSITY, DIVERSITY_SPACES
from asfda.simulate import results_table, run_simulation
from asfda.training import TrainConfig
from ct_to_mr_analysis import analyse

REPO = Path(__file__).resolve().parents[1]
PROFILES: dict[str, dict[str, Any]] = {
    # the upper bound (whole pool labelled, 1,000 steps: the guide's full-pool reference) costs ~15 min per seed
    # on 2 cores, so only the full profile runs it
    "quick": dict(strategies=["asfda", "random"], seeds=[0, 1], budget=1, rounds=3, upper_bound=False, previews=2),
    "full": dict(strategies=["asfda", "random", "enpy", "coreset", "mc_entropy", "badge"], seeds=[0, 1, 2],
                 budget=1, rounds=5, upper_bound=True, upper_bound_steps=1000, previews=3),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--profile", choices=sorted(PROFILES), default="quick")
    ap.add_argument("--model", default=str(REPO.parent / "shared/models/ct_abdomen_unet"))
    ap.add_argument("--data", default=str(REPO.parent / "shared/data/mr_chaos_t2"))
    ap.add_argument("--steps", type=int, default=200, help="fine-tuning steps per round")
    ap.add_argument("--semi", choices=["on", "off"], default="off", help="selective semi-supervision (default "
                    "off, as in RunConfig: see results/semi_ablation)")
    ap.add_argument("--precision", choices=["fp32", "bf16"], default="fp32",
                    help="training precision (bf16: autocast, ~1.7x faster steps on CPUs with bf16 instructions; "
                         "see results/speed.md and results/guard)")
    ap.add_argument("--seeds", help="comma-separated seeds (overrides the profile's)")
    ap.add_argument("--diversity", choices=list(DIVERSITY_SPACES), default=DEFAULT_DIVERSITY,
                    help=f"asfda's diversity space (default: {DEFAULT_DIVERSITY}, the package default); another value "
                         "needs another --out (the other strategies' finished runs can be copied there and resume)")
    ap.add_argument("--test-fraction", type=float, default=0.3)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    out = Path(args.out or REPO / "benchmarks/results" / f"ct_to_mr_{args.profile}")
    cfg = RunConfig(model=args.model, pool=args.data, test_fraction=args.test_fraction,
                    train=TrainConfig(steps=args.steps, batch_size=2, precision=args.precision),
                    semi=SemiConfig(enabled=args.semi == "on"),
                    cache_dir=str(REPO / ".cache"), out_dir=str(out), progress=sys.stderr.isatty(),
                    diversity=args.diversity,
                    **{**PROFILES[args.profile],
                       **({"seeds": [int(x) for x in args.seeds.split(",")]} if args.seeds else {})})
    version = code_version()  # before the run: the code that produced the numbers
    t0 = time.perf_counter()
    result = run_simulation(cfg)
    minutes = (time.perf_counter() - t0) / 60
    # a run resumed on another machine (a GPU, say) keeps its earlier parts: provenance.md, written by whoever
    # moved them, says where each part ran; this invocation's own line is the Machine line below
    provenance = out / "provenance.md"
    text = "\n".join([
        f"# CT -> MR adaptation ({args.profile} profile)", "",
        f"Command: `python {' '.join(sys.argv)}`  ",
        f"Machine: {machine()}  ",
        f"Code: asfda commit {version}  ",
        f"Date: {datetime.now(UTC).isoformat(timespec='minutes')}; wall time {minutes:.1f} min  ",
        f"Config: {dataclasses.asdict(cfg)}", "",
        "Mean Dice on the held-out test split (mean over seeds; n=0 is zero-shot):", "",
        results_table(result.summary), "", "![learning curve](learning_curve.png)", "",
        "The full report (rounds, what was queried and why, overlay previews) is `report.html` here; the targets, "
        "per-class and per-case Dice, score components and cost per round are in `ANALYSIS.md`.", "",
        *([provenance.read_text()] if provenance.exists() else [])])
    atomic_write_text(out / "README.md", text)
    atomic_write_text(out / "ANALYSIS.md", analyse(out.resolve()))
    print(text)


if __name__ == "__main__":
    main()
