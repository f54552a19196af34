"""What each volume teaches when it is the only label, and which selection score predicts it.

For every labelled volume v of a target dataset: fine-tune the pretrained model on v alone (the cross-validated
benchmark's recipe: 1 label, ``--steps`` steps, batch 2, guard off so the harm of a bad first label shows) and test
on every other volume. v's *utility* is the mean Dice over the others minus their zero-shot Dice. Then each
strategy's round-0 score of v on the whole pool (`asfda score`, the user's setting) is set against the utility:
Spearman's rank correlation, and the utility of each strategy's first pick. This is the 1-label question of the
selection issue asked of every volume at once, so a selection rule can be judged on all of them instead of on the
few first picks a cross-validation happens to draw, and without tuning on its folds.

    python benchmarks/single_label_utility.py --model ../shared/models/ct_abdomen_unet \\
        --data ../shared/data/mr_chaos_t2 --out benchmarks/results/single_label_utility/ct_to_mr [--device cuda]

Resumable per volume (each fine-tuning is a `run_simulation` upper-bound run cached under OUT/runs/<id>); writes
OUT/utility.json and OUT/README.md with the command, machine, commit and date.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
from scipy.stats import spearmanr

from _machine import code_version, machine
from asfda.crossval.folds import write_linked_dataset as _write_dataset
from asfda.io import atomic_write_json, atomic_write_text, load_dataset
from asfda.results import RunLayout, read_run

REPO = Path(__file__).resolve().parents[1]


def _datasets(data: Path, root: Path, held: str) -> tuple[Path, Path]:
    """``root/<held>/{pool,test}``: the one volume ``held`` as the pool, every other volume as the test set
    (symlinks into ``data``)."""
    ds = load_dataset(data, require_labels=True)
    meta = json.loads((data / "dataset.json").read_text(encoding="utf-8"))
    ending = meta.get("file_ending", ".nii.gz")
    by_id = ds.by_id()
    pool = _write_dataset(root / held / "pool", meta, [by_id[held]], ending, data)
    test = _write_dataset(root / held / "test", meta, [by_id[i] for i in sorted(by_id) if i != held], ending, data)
    return pool, test


def fine_tune_on_one(model: str, data: Path, ids: list[str], held: str, out: Path, *, steps: int, precision: str,
                     device: str, threads: int, cache_dir: str) -> None:
    """Fine-tunes the model on ``held`` alone and tests it on every other volume (simulate's upper bound on a pool of
    one, cached in ``out/runs/<held>``: `read_held_out_run`)."""
    from asfda.config import RunConfig
    from asfda.simulate import run_simulation
    from asfda.training import TrainConfig

    pool, test = _datasets(data, out / "datasets", held)
    _seed_zero_shot(out, held, ids)
    cfg = RunConfig(model=model, pool=str(pool), test=str(test), strategies=[], seeds=[0], budget=1, rounds=1,
                    upper_bound=True, upper_bound_steps=steps,
                    train=TrainConfig(steps=steps, batch_size=2, precision=precision, guard=False),
                    device=device, threads=threads, report=False, out_dir=str(out / "runs" / held),
                    cache_dir=cache_dir, progress=False)
    run_simulation(cfg)


def read_held_out_run(run: Path) -> dict[str, dict[str, float]] | None:
    """``{"adapted": {case: dice}, "zero_shot": {case: dice}}`` of a finished `fine_tune_on_one` run (None when it
    has not finished)."""
    got = read_run(run, [], [0])
    if 0 not in got.upper_bound or 0 not in got.zero_shot:
        return None
    return {name: {r["case_id"]: r["dice_mean"] for r in files[0]["per_case"]}
            for name, files in (("adapted", got.upper_bound), ("zero_shot", got.zero_shot))}


def _seed_zero_shot(out: Path, held: str, ids: list[str]) -> None:
    """The pretrained model's Dice on a volume does not depend on which volume is held: when earlier runs hold every
    other volume's zero-shot row, write them as this run's zero-shot file (with the key simulate checks), so it is
    not computed again."""
    run = RunLayout(out / "runs" / held)
    if run.zero_shot(0).is_file():
        return
    rows: dict[str, dict] = {}
    model = None
    others_runs = sorted(p for p in (out / "runs").iterdir() if p.is_dir()) if (out / "runs").is_dir() else []
    for saved in (read_run(p, [], [0]).zero_shot.get(0) for p in others_runs):
        if saved is None:
            continue
        model = model or saved["key"]["model"]
        rows.update({r["case_id"]: r for r in saved["per_case"]})
    others = [i for i in ids if i != held]
    if model is None or any(c not in rows for c in others) or len(others) < 2:
        return
    run.out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(run.zero_shot(0), {"key": {"model": model, "test": others},
                                                     "per_case": [rows[c] for c in others]})


def utility(result: dict[str, dict[str, float]]) -> float:
    """Mean over the test volumes of (Dice fine-tuned on the one label - zero-shot Dice); NaN volumes left out."""
    gains = [a - result["zero_shot"][c] for c, a in result["adapted"].items()
             if not (math.isnan(a) or math.isnan(result["zero_shot"].get(c, math.nan)))]
    return float(np.mean(gains)) if gains else math.nan


def score_table(path: Path) -> dict[str, dict[str, float]]:
    """``asfda score``'s CSV as ``{column: {case: value}}``."""
    lines = path.read_text().strip().splitlines()
    cols = lines[0].split(",")[1:]
    table: dict[str, dict[str, float]] = {c: {} for c in cols}
    for line in lines[1:]:
        cid, *vals = line.split(",")
        for c, v in zip(cols, vals, strict=True):
            table[c][cid] = float(v)
    return table


def correlations(util: dict[str, float], table: dict[str, dict[str, float]]) -> dict[str, dict[str, object]]:
    """Per score column: Spearman's rho with the utility over the volumes both have, the utility of the volume with
    the column's highest value (the first pick of a strategy that takes the highest), and its rank by utility (1 =
    the most useful volume)."""
    by_util = sorted(util, key=lambda c: -util[c])
    out = {}
    for col, values in table.items():
        ids = [c for c in util if c in values and not math.isnan(values[c]) and not math.isnan(util[c])]
        if len(ids) < 3 or len({values[c] for c in ids}) < 2:
            continue
        rho = spearmanr([values[c] for c in ids], [util[c] for c in ids]).statistic
        top = max(ids, key=lambda c: (values[c], c))
        out[col] = {"spearman": float(rho), "first_pick": top, "first_pick_utility": util[top],
                    "first_pick_rank": by_util.index(top) + 1}
    return out


def add_fine_tune_args(ap: argparse.ArgumentParser) -> None:
    """The options of a script that fine-tunes with the cross-validated run's recipe and can resume or only summarise
    (``--steps``, ``--precision``, ``--device``, ``--threads``, ``--cache-dir``, ``--summarize-only``)."""
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--precision", choices=["fp32", "bf16"], default="bf16")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--cache-dir", default=str(REPO / ".cache"))
    ap.add_argument("--summarize-only", action="store_true")


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=str(REPO.parent / "shared/models/ct_abdomen_unet"))
    ap.add_argument("--data", default=str(REPO.parent / "shared/data/mr_chaos_t2"))
    ap.add_argument("--out", default=str(REPO / "benchmarks/results/single_label_utility/ct_to_mr"))
    ap.add_argument("--only", help="comma-separated volume ids to fine-tune on here (the others are read from disk)")
    add_fine_tune_args(ap)
    ap.add_argument("--no-scores", action="store_true",
                    help="do not score the pool (round0_scores.csv) here: a partial run's fine-tunings come first")
    args = ap.parse_args(argv)
    data, out = Path(args.data), Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    ids = sorted(load_dataset(data, require_labels=True).by_id())
    todo = [] if args.summarize_only else ([i.strip() for i in args.only.split(",")] if args.only else ids)
    for held in todo:
        print(f"fine-tune on {held} alone, test on the other {len(ids) - 1}", file=sys.stderr, flush=True)
        fine_tune_on_one(args.model, data, ids, held, out, steps=args.steps, precision=args.precision,
                         device=args.device, threads=args.threads, cache_dir=args.cache_dir)
    runs = {held: read_held_out_run(out / "runs" / held) for held in ids}
    results = {held: r for held, r in runs.items() if r is not None}
    util = {h: utility(r) for h, r in results.items()}
    scores = out / "round0_scores.csv"
    if not scores.is_file() and not (args.summarize_only or args.no_scores):
        from asfda.query import score_dataset

        score_dataset(args.model, str(data), scores, cache_dir=args.cache_dir, device=args.device, progress=False)
    corr = correlations(util, score_table(scores)) if scores.is_file() and len(util) >= 3 else {}
    summary = {"utility": util, "mean_dice_adapted": {h: float(np.nanmean(list(r["adapted"].values())))
                                                      for h, r in results.items()},
               "correlations": corr, "volumes": len(util), "of": len(ids), "steps": args.steps,
               "precision": args.precision, "command": "python " + " ".join(["benchmarks/single_label_utility.py",
                                                                            *(sys.argv[1:] if argv is None else argv)]),
               "machine": machine(), "commit": code_version(),
               "date": datetime.now(UTC).isoformat(timespec="minutes")}
    atomic_write_json(out / "utility.json", summary)
    atomic_write_text(out / "README.md", readme(summary))
    print((out / "README.md").read_text())
    return summary


def readme(s: dict) -> str:
    lines = ["# What one label teaches: every volume fine-tuned on alone", "",
             f"Command: `{s['command']}`  ", f"Machine: {s['machine']}  ", f"Code: {s['commit']}  ",
             f"Date: {s['date']}  ", f"Volumes measured: {s['volumes']} of {s['of']} ({s['steps']} steps, "
             f"{s['precision']}, batch 2, guard off)", "",
             "Utility = mean Dice over every other volume after fine-tuning on this one alone, minus their zero-shot "
             "Dice." + (" PARTIAL: the correlations and first picks below are over the measured volumes only."
                        if s["volumes"] < s["of"] else ""), "",
             "| volume | utility | mean Dice of the others |", "|---|---|---|"]
    for v in sorted(s["utility"], key=lambda c: -s["utility"][c]):
        lines.append(f"| {v} | {s['utility'][v]:+.3f} | {s['mean_dice_adapted'][v]:.3f} |")
    if s["correlations"]:
        lines += ["", "Round-0 scores on the whole pool (`asfda score`) against the utility (Spearman's rho; the "
                  "volume with the column's highest value, its utility and its rank by utility, 1 = best):", "",
                  "| score column | rho | first pick | its utility | its rank |", "|---|---|---|---|---|"]
        for col, c in sorted(s["correlations"].items(), key=lambda kv: -kv[1]["spearman"]):
            lines.append(f"| {col} | {c['spearman']:+.2f} | {c['first_pick']} | {c['first_pick_utility']:+.3f} | "
                         f"{c['first_pick_rank']} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
