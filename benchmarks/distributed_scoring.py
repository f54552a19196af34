"""``asfda score`` of a phantom pool in one process against ``torchrun --standalone --nproc_per_node=N`` (one torch
thread per process): wall seconds of the whole command (start-up, model load, preprocessing, every pass, files), and
how far the sharded CSV and embeddings are from the one-process ones. Each run starts in a fresh folder (no score or
prepared-volume cache), the runs alternate.

    .venv/bin/python benchmarks/distributed_scoring.py --n-target 40 --nproc 2 [--reps 1] \
        [--work /tmp/asfda_distributed_bench] [--out benchmarks/results/distributed_scoring.md]
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

from _machine import code_version, cpu_model
from asfda.demo import phantom_model_path
from asfda.phantom import generate_benchmark


def _table(path: Path) -> tuple[list[str], np.ndarray]:
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    return [r[0] for r in rows[1:]], np.array([[float(v) for v in r[1:]] for r in rows[1:]])


def _run(cmd: list[str], cwd: Path) -> float:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    if cwd.exists():
        shutil.rmtree(cwd)
    cwd.mkdir(parents=True)
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return seconds


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n-target", type=int, default=40)
    ap.add_argument("--nproc", type=int, default=2)
    ap.add_argument("--reps", type=int, default=1)
    ap.add_argument("--work", default="/tmp/asfda_distributed_bench")
    ap.add_argument("--out", default="benchmarks/results/distributed_scoring.md")
    args = ap.parse_args(argv)
    work = Path(args.work)
    data = generate_benchmark(work / "phantom", n_source=2, n_target=args.n_target)["target"]
    model = phantom_model_path()
    bin_dir = Path(sys.executable).parent
    score = ["-m", "asfda", "score", "--model", str(model), "--data", str(data), "--out", "scores.csv",
             "--no-progress"]
    one = [sys.executable, *score]
    many = [str(bin_dir / "torchrun"), "--standalone", f"--nproc_per_node={args.nproc}", *score]
    load_before = os.getloadavg()[0]
    times: dict[str, list[float]] = {"1": [], str(args.nproc): []}
    for rep in range(args.reps):
        times["1"].append(_run(one, work / "one"))
        times[str(args.nproc)].append(_run(many, work / "many"))
        print(f"rep {rep}: 1 process {times['1'][-1]:.1f} s, {args.nproc} processes "
              f"{times[str(args.nproc)][-1]:.1f} s", flush=True)
    ids1, v1 = _table(work / "one" / "scores.csv")
    ids2, v2 = _table(work / "many" / "scores.csv")
    assert ids1 == ids2, "the sharded CSV's rows are not in the one-process order"
    csv_diff = float(np.abs(v1 - v2).max())
    emb_diff = float(np.abs(np.load(work / "one" / "scores.embeddings.npy")
                            - np.load(work / "many" / "scores.embeddings.npy")).max())
    load_after = os.getloadavg()[0]
    t1, tn = float(np.mean(times["1"])), float(np.mean(times[str(args.nproc)]))
    side = json.loads((work / "one" / "scores.json").read_text())
    passes = side["scoring"]["forward_passes_per_volume"]
    skipped = side["skipped_strategies"]
    skipped_text = f"; skipped, the network has no dropout: {', '.join(skipped)}" if skipped else ""
    shown = " ".join(a if a != str(data) else "PHANTOM/target" for a in score[1:])
    shown = shown.replace(str(model), "$(python -c 'import asfda.demo as d; print(d.phantom_model_path())')")
    text = f"""# Sharded pool scoring: `asfda score` in 1 process vs torchrun with {args.nproc}

Command: `python benchmarks/distributed_scoring.py --n-target {args.n_target} --nproc {args.nproc} --reps {args.reps}`,
which runs, each in a fresh folder (no score or prepared-volume cache), with `OMP_NUM_THREADS=1` (one torch thread per
process):

- 1 process: `python -m {shown}`
- {args.nproc} processes: `torchrun --standalone --nproc_per_node={args.nproc} -m {shown}`

Pool: the phantom target domain, {args.n_target} volumes (`asfda phantom PHANTOM --n-source 2 --n-target
{args.n_target}`), the shipped phantom model, the default strategies {side["strategies"]}
({passes} forward passes per volume{skipped_text}).
Machine: {cpu_model()}, {os.cpu_count()} cores, no GPU.
Code: {code_version()}; date {datetime.now(UTC).isoformat(timespec="minutes")}

| processes | wall seconds (whole command) |
|---|---|
| 1 | {t1:.1f} ({", ".join(f"{t:.1f}" for t in times["1"])}) |
| {args.nproc} | {tn:.1f} ({", ".join(f"{t:.1f}" for t in times[str(args.nproc)])}) |

Speed-up {t1 / tn:.2f}x. Same rows in the same order; largest difference between the two CSVs: {csv_diff:.3g}
(every metric and component), between the embeddings: {emb_diff:.3g}.

The {args.nproc}-process time includes torchrun's start, a model load and dataset read per process and the gather.
The machine was shared with other benchmark processes (three long runs on the same {os.cpu_count()} cores;
1-minute load average {load_before:.2f} before, {load_after:.2f} after) while this ran, so the figures are
indicative only: they show the sharded path works end to end and gives the one-process numbers, not the speed-up
an idle machine (or one GPU per rank) would give.
"""
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
