"""How far off is the when-to-stop estimate (`asfda.stopping`)? Reads simulate run folders and compares, round by
round, the estimate made after each round (label-free: the change of the predictions on a few unlabeled pool
volumes; never test Dice) with the true next-round gain (the next round's test Dice minus this one's).

    # a small phantom simulation first (written to --sim-out), then the table:
    .venv/bin/python benchmarks/stopping.py --phantom [--n-target 60] [--data-seed 0] [--seeds 0,1,2]
        [--strategies random,asfda] [--budget 2] [--rounds 6] [--steps 60] [--threads 1]
    # existing runs (a simulate --out folder: STRATEGY/seedN/state.json; or a cross-validation folder: fold*/...):
    .venv/bin/python benchmarks/stopping.py --runs benchmarks/results/cv_first/ct_to_mr [--title "real pair"]

Writes ``--out`` (default benchmarks/results/stopping/README.md; ``--append`` adds a section to it). Runs written
before the estimate existed have no probe records: they are counted and named, not estimated.
"""

from __future__ import annotations

import argparse
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

from _machine import code_version, machine
from asfda.results import RunLayout, read_run
from asfda.stopping import (
    CONTINUE,
    GAIN_PER_CHANGE,
    PROBE_VOLUMES,
    STOP,
    STOP_BELOW,
    estimate_error,
    estimate_rows,
)

REPO = Path(__file__).resolve().parents[1]


def run_folders(folder: Path) -> list[Path]:
    """Every simulation results folder under ``folder`` (itself one, or a folder of ``fold*`` ones): those holding a
    ``STRATEGY/seedN/state.json``."""
    return sorted({p.parent.parent.parent for p in folder.glob(f"**/seed*/{RunLayout.STATE}")
                   if "upper_bound" not in p.parts})


def run_rows(folder: Path) -> tuple[list[dict], list[str]]:
    """The `estimate_rows` of every run under ``folder`` (with its run, strategy and seed), and the runs that lack the
    probe records the estimate needs."""
    rows, lacking = [], []
    runs = sorted(((got.layout.run_dir(name, seed), got.rounds(name, seed))
                   for got in map(read_run, run_folders(folder)) for name, seed in got.runs()), key=lambda t: t[0])
    for run_dir, rounds in runs:
        run = str(run_dir.relative_to(folder))
        if rounds and not any(r.get("probe") for r in rounds):
            lacking.append(run)
            continue
        rows += [{"run": run, **r} for r in estimate_rows(rounds)]
    return rows, lacking


def _f(v, digits: int = 3) -> str:
    return "" if v is None or (isinstance(v, float) and not np.isfinite(v)) else f"{v:+.{digits}f}"


def summary_lines(rows: list[dict]) -> list[str]:
    """The error table: all rounds, the first round (no earlier change to compare with), later rounds; then what the
    recommendation was worth."""
    err_lines = ["| rounds | n | MAE of the estimate | MAE of predicting 0 | MAE of the label curve | correlation |",
                 "|---|---|---|---|---|---|"]
    for label, keep in (("all", lambda r: True), ("after round 0", lambda r: r["round"] == 0),
                        ("after later rounds", lambda r: r["round"] > 0)):
        sub = [r for r in rows if keep(r)]
        e = estimate_error(sub)
        c = estimate_error(sub, "curve_gain")
        err_lines.append(f"| {label} | {e['n']} | {e['mae']:.4f} | {e['mae_of_zero']:.4f} | "
                         + (f"{c['mae']:.4f} (n={c['n']})" if c["n"] else "n/a") + f" | {e['correlation']:.2f} |")
    judged = [r for r in rows if r["true_next_gain"] is not None]
    rec_lines = ["| recommendation | rounds | true next gain: mean | min | max |", "|---|---|---|---|---|"]
    for rec in (CONTINUE, STOP):
        g = [r["true_next_gain"] for r in judged if r["recommendation"] == rec]
        if g:
            rec_lines.append(f"| {rec} | {len(g)} | {np.mean(g):+.4f} | {min(g):+.4f} | {max(g):+.4f} |")
    return [*err_lines, "", *rec_lines]


def round_lines(rows: list[dict]) -> list[str]:
    lines = [("| run | round | labelled | test Dice | prediction change | predicted next gain | true next gain | "
             "label-curve gain | recommendation |"), "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        change = "" if r["change"] is None else f"{r['change']:.3f}"
        lines.append(f"| {r['run']} | {r['round']}{' (discarded)' if r['discarded'] else ''} | {r['n_labelled']} | "
                     f"{r['dice_mean']:.3f} | {change} | {_f(r['predicted_next_gain'])} | {_f(r['true_next_gain'])} | "
                     f"{_f(r['curve_gain'])} | {r['recommendation']} |")
    return lines


def section(title: str, folder: Path, command: str, note: str = "") -> str:
    rows, lacking = run_rows(folder)
    lines = [f"## {title}", "", f"Runs: `{folder.relative_to(REPO) if folder.is_relative_to(REPO) else folder}`  ",
             f"Command: `{command}`  ", f"Machine: {machine()}  ",
             f"Date: {datetime.now(UTC).isoformat(timespec='minutes')}; code {code_version()}  "]
    if note:
        lines += [note]
    lines.append("")
    if lacking:
        lines += [(f"{len(lacking)} run(s) have no probe records (written before `asfda.stopping` existed, or by a "
                  f"copy of the code without it), so no estimate can be computed for them: {', '.join(lacking)}. "
                  "A run of the current `asfda simulate` records them."), ""]
    if not rows:
        return "\n".join(lines + ["No round with probe records.", ""])
    lines += [("Error of the estimate against the true next-round gain (mean Dice; each round's estimate against the "
              "test Dice of the round after it):"), "", *summary_lines(rows), "", "Per round:", "",
              *round_lines(rows), ""]
    return "\n".join(lines)


HEADER = f"""# When to stop: the estimate of the next round's gain against the true gain

After each round asfda estimates what the next round will add (`asfda.stopping`, shown by `asfda status` and the
simulation report) from label-free signals: the round's prediction change (1 - the mean Dice between the label maps
of the model before and after it on up to {PROBE_VOLUMES} seeded unlabeled pool volumes) times
`GAIN_PER_CHANGE = {GAIN_PER_CHANGE}`. The recommendation is "{STOP}" below {STOP_BELOW} mean Dice. The estimate never
reads test labels; the true gain is the next round's test Dice minus this round's. "MAE of predicting 0" is the error
of always saying the next round adds nothing: an estimate worth having is below it. "MAE of the label curve" is that
of the other signal shown beside the estimate, used as an estimate: the change, between the last two queries, of
the Dice of each query's model on the volumes it queried (in a project: the edit Dice of the pre-segmentations), a
measured gain one round behind.
"""


def run_phantom(args: argparse.Namespace) -> Path:
    """A small simulation on the phantom (the shipped model), with the probe records the estimate reads."""
    import torch

    from asfda.config import RunConfig
    from asfda.demo import phantom_model_path
    from asfda.phantom import generate_benchmark
    from asfda.simulate import run_simulation
    from asfda.training import TrainConfig

    if args.threads:
        torch.set_num_threads(args.threads)
    data = Path(args.data) / f"n{args.n_target}_seed{args.data_seed}"
    paths = generate_benchmark(data, seed=args.data_seed, n_source=1, n_target=args.n_target)
    cfg = RunConfig(model=str(phantom_model_path()), pool=str(paths["target"]), test_fraction=args.test_fraction,
                    strategies=[s for s in args.strategies.split(",") if s], budget=args.budget, rounds=args.rounds,
                    seeds=[int(s) for s in args.seeds.split(",")], train=TrainConfig(steps=args.steps, batch_size=2),
                    upper_bound=False, report=False, threads=args.threads, cache_dir=str(Path(args.data) / "cache"),
                    out_dir=str(args.sim_out), progress=sys.stderr.isatty())
    t0 = time.perf_counter()
    run_simulation(cfg)
    print(f"simulation: {(time.perf_counter() - t0) / 60:.1f} min", file=sys.stderr)
    return Path(args.sim_out)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", nargs="*", default=[], help="simulate output folders (or folders of fold* runs) to read")
    ap.add_argument("--title", action="append", default=[], help="a section title per --runs folder")
    ap.add_argument("--note", action="append", default=[], help="a note per section (the phantom's first, if run)")
    ap.add_argument("--phantom", action="store_true", help="run the phantom simulation first, then read it")
    ap.add_argument("--n-target", type=int, default=60)
    ap.add_argument("--data-seed", type=int, default=0)
    ap.add_argument("--strategies", default="random,asfda")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--budget", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--test-fraction", type=float, default=0.25)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--data", default=str(REPO / ".cache" / "bench_stopping"))
    ap.add_argument("--sim-out", default=str(REPO / "benchmarks/results/stopping/phantom"))
    ap.add_argument("--out", default=str(REPO / "benchmarks/results/stopping/README.md"))
    ap.add_argument("--append", action="store_true", help="add the sections to --out instead of replacing it")
    args = ap.parse_args(argv)
    given = sys.argv[1:] if argv is None else list(argv)
    shown, skip = [], False
    for a in given:  # the command without the titles and notes (they head and open the sections)
        if skip:
            skip = False
        elif a in ("--title", "--note"):
            skip = True
        else:
            shown.append(a)
    command = "python benchmarks/stopping.py " + " ".join(shown)
    parts = []
    notes = list(args.note)
    if args.phantom:
        folder = run_phantom(args)
        parts.append(section(f"Phantom (target pool of {args.n_target}, data seed {args.data_seed}; {args.budget} "
                             f"labels x {args.rounds} rounds, {args.steps} steps; strategies {args.strategies}; seeds "
                             f"{args.seeds})", folder.resolve(), command, notes.pop(0) if notes else ""))
    for i, folder in enumerate(args.runs):
        title = args.title[i] if i < len(args.title) else f"Runs in {folder}"
        parts.append(section(title, Path(folder).resolve(), command, notes.pop(0) if notes else ""))
    if not parts:
        ap.error("nothing to read: pass --phantom and/or --runs FOLDER")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    text = (out.read_text() if args.append and out.exists() else HEADER) + "\n" + "\n".join(parts)
    out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
