"""Cross-validated active adaptation on a real pair: every labelled target volume is a test volume exactly once.

A thin caller of `asfda.crossval` (what ``asfda crossval`` runs), kept for its flags and the runs made with them.
The target dataset's volumes are split into K folds (sorted ids, a permutation seeded by --fold-seed, then
``np.array_split``); fold k's pool is the other folds' volumes. Each fold runs ``asfda.simulate.run_simulation``
(strategies x seeds, 1 label per round, rounds 1..R, optionally the full-pool upper bound for every seed) under
OUT/fold<k>, resumable per round; the per-fold datasets are folders of symlinks under ``CACHE/cv/``.

    # CT model -> CHAOS MR (14 volumes, 7 folds of 2)
    .venv/bin/python benchmarks/cv.py
    # MR model -> BTCV CT (24 volumes, 6 folds of 4)
    .venv/bin/python benchmarks/cv.py --model ../shared/models/mr_abdomen_unet --data ../shared/data/ct_btcv4 \\
        --folds 6 --out benchmarks/results/cv_first/mr_to_ct
    # parts on different machines: --only-folds 0,1,2 here, --only-folds 3,4,5,6 there (same --out, then copy the
    # fold folders together); --summarize-only re-reads what is on disk and writes the summary

Writes OUT/summary.json, OUT/README.md, OUT/report.html and OUT/learning_curve.png (and the same per
post-processing: summary.lcc_dice_mean.json, summary.pp_dice_mean.json, postprocessing.json).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from _machine import code_version, machine
from asfda.config import RunConfig
from asfda.crossval import crossval
from asfda.errors import AsfdaError
from asfda.training import TrainConfig

REPO = Path(__file__).resolve().parents[1]

__all__ = ["main"]


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=str(REPO.parent / "shared/models/ct_abdomen_unet"))
    ap.add_argument("--data", default=str(REPO.parent / "shared/data/mr_chaos_t2"),
                    help="labelled target dataset (nnU-Net raw layout)")
    ap.add_argument("--folds", type=int, default=7)
    ap.add_argument("--fold-seed", type=int, default=0)
    ap.add_argument("--strategies", default="asfda,random")
    ap.add_argument("--seeds", default="0,1", help="seeds of every strategy (and of the upper bound)")
    ap.add_argument("--rounds", type=int, default=4, help="rounds of 1 label each (labelled 1..R)")
    ap.add_argument("--steps", type=int, default=200, help="fine-tuning steps per round")
    ap.add_argument("--precision", choices=["fp32", "bf16"], default="bf16")
    ap.add_argument("--augmentation", default="intensity", help="training augmentation (asfda.training.augment): "
                    "intensity (default), spatial_mr or none")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--restart", action="store_true", help="each round trains from the pretrained weights on every "
                    "label so far (default: continue from the previous round)")
    ap.add_argument("--evaluate-tta", action="store_true", help="test Dice with flip test-time augmentation")
    ap.add_argument("--hold-back", action="store_true", help="leave a volume whose round the guard discarded out of "
                    "training until 3 other labels exist (train.hold_back_discarded)")
    ap.add_argument("--representativeness", default="none", choices=["none", "density", "typical"],
                    help="asfda's typicality term (default: none, METHOD.md's rule)")
    ap.add_argument("--upper-bound-steps", type=int, default=1000)
    ap.add_argument("--no-upper-bound", action="store_true")
    ap.add_argument("--no-report", action="store_true", help="skip each fold's report.html (and its previews)")
    ap.add_argument("--only-folds", help="comma-separated folds to run here (the others are read from disk)")
    ap.add_argument("--out", default=str(REPO / "benchmarks/results/cv_first/ct_to_mr"))
    ap.add_argument("--cache-dir", default=str(REPO / ".cache"))
    ap.add_argument("--utility", help="a single-label utility table (benchmarks/single_label_utility.py's "
                    "utility.json): the 1-label oracle of the summary")
    ap.add_argument("--summarize-only", action="store_true", help="run nothing: read what is on disk, summarise")
    args = ap.parse_args(argv)
    strategies = [s.strip() for s in args.strategies.split(",") if s.strip()]
    seeds = _ints(args.seeds)
    command = "python " + " ".join([sys.argv[0] if argv is None else "benchmarks/cv.py",
                                    *(sys.argv[1:] if argv is None else argv)])
    base = RunConfig(model=str(args.model), strategies=strategies, seeds=seeds, budget=1, rounds=args.rounds,
                     train=TrainConfig(steps=args.steps, batch_size=2, precision=args.precision,
                                       augmentation=args.augmentation, restart=args.restart,
                                       hold_back_discarded=args.hold_back),
                     threads=args.threads, evaluate_tta=args.evaluate_tta, representativeness=args.representativeness,
                     upper_bound=not args.no_upper_bound, upper_bound_steps=args.upper_bound_steps,
                     report=not args.no_report, cache_dir=str(args.cache_dir), progress=sys.stderr.isatty())
    try:
        summary = crossval(base, args.data, args.out, folds=args.folds, fold_seed=args.fold_seed,
                           upper_seeds=seeds, summarize_only=args.summarize_only,
                           only_folds=_ints(args.only_folds) if args.only_folds else None, utility=args.utility,
                           command=command, machine=machine(), commit=code_version())
    except AsfdaError as exc:
        raise SystemExit(f"cv.py: {exc.one_line()}") from None
    print((Path(args.out) / "README.md").read_text())
    return summary


if __name__ == "__main__":
    main()
