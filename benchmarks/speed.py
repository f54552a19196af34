"""Speed and memory of the stages a 2-core machine runs, side by side (results: benchmarks/results/speed.md).

1. Scoring throughput: the scoring stage (`asfda.scoring.pool.score_volumes`, every asfda number) against the
   bare sliding-window forward passes those numbers need, on the same prepared volumes: round 0 (one pass of
   the pretrained model, normalisation-statistics hooks on it) and a later round (the adapted and the frozen
   model: two passes, kd). Goal: scoring / bare <= 1.3. Preprocessing is done once before timing.
2. Peak memory when scoring a pool of 20 vs 200 phantom volumes (each size in a fresh process, resident set
   high-water mark): the pool is streamed, so the ratio should stay under 1.2.
3. Fine-tuning step time (`benchmarks/train_step.py`) and selection time on 10,000 embeddings
   (`benchmarks/selection_speed.py`), run as they are and quoted.

    .venv/bin/python benchmarks/speed.py [--parts scoring,memory,train,selection] [--n 4]
        [--out benchmarks/results/speed.md]
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import torch
from monai.inferers import sliding_window_inference

from _machine import cpu_model

REPO = Path(__file__).resolve().parents[1]


def _best_interleaved(methods: dict, items: list, repeats: int) -> dict[str, float]:
    """Best-of-``repeats`` total seconds per method, run volume by volume with the order alternating."""
    for fn in methods.values():  # warm-up
        fn(items[:1])
    totals = {k: [0.0] * repeats for k in methods}
    order = list(methods)
    for r in range(repeats):
        for i, item in enumerate(items):
            for name in (order if (r * len(items) + i) % 2 == 0 else order[::-1]):
                t = time.perf_counter()
                methods[name]([item])
                totals[name][r] += time.perf_counter() - t
        print(f"  repeat {r + 1}: " + ", ".join(f"{k} {v[r]:.1f} s" for k, v in totals.items()), file=sys.stderr)
    return {k: min(v) for k, v in totals.items()}


def scoring_part(args) -> list[str]:
    from asfda.adapter import Adapter
    from asfda.io import load_dataset
    from asfda.models import load_model
    from asfda.scoring.pool import score_volumes
    from asfda.selection import get_strategy

    loaded = load_model(args.model)
    ds = load_dataset(args.data)
    adapter = Adapter(loaded, ds.class_names, cache_dir=str(REPO / ".cache"), device="cpu", progress=False)
    t0 = time.perf_counter()
    vols = [adapter.prepare(c, with_label=False) for c in list(ds.cases)[: args.n]]
    prep = time.perf_counter() - t0
    needs = get_strategy("asfda").needs
    needs_norm = get_strategy("asfda", round0_gap="norm_kl").needs
    roi, swb, overlap = loaded.roi_size, loaded.sw_batch_size, loaded.overlap

    def bare(nets):
        def run(batch):
            with torch.inference_mode():
                for v in batch:
                    for net in nets:
                        sliding_window_inference(v.image[None], roi, swb, net, overlap=overlap, mode="constant")
        return run

    def scoring(frozen, what=needs):
        return lambda batch: score_volumes(batch, adapter.engine_current, 1.0, frozen=frozen, needs=what)

    rows = []
    print("scoring, round 0 (one pass):", file=sys.stderr)
    best0 = _best_interleaved({"scoring": scoring(None), "bare": bare([adapter.current])}, vols, args.repeats)
    rows.append(("round 0: pretrained model (asfda's default, feature gap)", 1, best0))
    print("scoring, round 0 with round0_gap=norm_kl (statistics hooks on every normalisation layer):",
          file=sys.stderr)
    best0n = _best_interleaved({"scoring": scoring(None, needs_norm), "bare": bare([adapter.current])}, vols,
                               args.repeats)
    rows.append(("round 0 with `round0_gap: norm_kl` (normalisation-statistics hooks)", 1, best0n))
    print("scoring, later round (adapted + frozen: two passes):", file=sys.stderr)
    best1 = _best_interleaved({"scoring": scoring(adapter.engine_frozen),
                               "bare": bare([adapter.current, adapter.frozen])}, vols, args.repeats)
    rows.append(("later round: adapted + frozen model, kd", 2, best1))
    shapes = sorted({tuple(v.image.shape[1:]) for v in vols})
    out = ["## 1. Scoring throughput (goal: scoring / bare <= 1.3)", "",
           f"- model {args.model} (roi {list(roi)}, sw_batch_size {swb}, overlap {overlap}); {len(vols)} volumes of "
           f"{args.data}, model-grid shapes {shapes}; preprocessing {prep:.1f} s (cached, not timed)",
           f"- best of {args.repeats} interleaved repeats after a warm-up; bare = `sliding_window_inference` of the "
           "same (class-mapped) networks under `torch.inference_mode()`, nothing else", "",
           "| pass(es) | forward passes / volume | scoring s / volume | bare s / volume | ratio |",
           "|---|---|---|---|---|"]
    for name, passes, best in rows:
        out.append(f"| {name} | {passes} | {best['scoring'] / len(vols):.2f} | {best['bare'] / len(vols):.2f} | "
                   f"{best['scoring'] / best['bare']:.2f} |")
    return out + [""]


def _memory_child(n: int, pool: str) -> None:
    """Scores the first n cases of ``pool`` (no caches) and prints JSON with the peak resident set."""
    from asfda.adapter import Adapter
    from asfda.demo import phantom_model_path
    from asfda.io import load_dataset
    from asfda.models import load_model
    from asfda.selection import get_strategy

    torch.set_num_threads(1)
    ds = load_dataset(pool)
    adapter = Adapter(load_model(phantom_model_path()), ds.class_names, cache_dir=None, device="cpu", progress=False)
    base = _vm_hwm_mb()
    # the peak-RSS mark restarts here (Linux /proc/PID/clear_refs "5"), so the peak below is the scoring's;
    # ru_maxrss cannot be used: it keeps the parent's peak across fork + exec
    Path("/proc/self/clear_refs").write_text("5")
    t0 = time.perf_counter()
    scored = adapter.score_pool(list(ds.cases)[:n], 1.0, needs=get_strategy("asfda").needs)
    seconds = time.perf_counter() - t0
    print(json.dumps({"n": n, "scored": len(scored.ids), "peak_mb": _vm_hwm_mb(), "before_scoring_mb": base,
                      "seconds": seconds}))


def _vm_hwm_mb() -> float:
    """This process's peak resident set (VmHWM), MB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status (Linux only)")


def memory_part(args) -> list[str]:
    from asfda.phantom import generate_benchmark

    n_max = max(args.pool_sizes)
    pool = generate_benchmark(REPO / ".cache" / f"speed_pool{n_max}", n_source=1, n_target=n_max)["target"]
    results = []
    for n in args.pool_sizes:
        proc = subprocess.run([sys.executable, __file__, "--memory-child", str(n), "--pool", str(pool)],
                              capture_output=True, text=True, check=True)
        results.append(json.loads(proc.stdout.strip().splitlines()[-1]))
        print(f"  memory: {results[-1]}", file=sys.stderr)
    ratio = results[-1]["peak_mb"] / results[0]["peak_mb"]
    out = ["## 2. Peak memory: scoring a pool of " + " vs ".join(str(n) for n in args.pool_sizes) +
           " volumes (goal: ratio < 1.2)", "",
           f"- phantom target pool ({pool}), shipped phantom model, asfda's round-0 needs, no caches (each volume "
           "read, preprocessed and scored once); each size in a fresh process, 1 torch thread; peak resident set "
           "(VmHWM) after loading the model, then its peak while scoring (the mark reset in between)", "",
           "| pool volumes | peak while scoring, MB | peak after loading, MB | scoring s | s / volume |",
           "|---|---|---|---|---|"]
    for r in results:
        out.append(f"| {r['n']} | {r['peak_mb']:.0f} | {r['before_scoring_mb']:.0f} | {r['seconds']:.1f} | "
                   f"{r['seconds'] / r['n']:.3f} |")
    return out + ["", f"Peak ratio {args.pool_sizes[-1]} / {args.pool_sizes[0]} volumes: **{ratio:.2f}**", ""]


def _quoted(title: str, cmd: list[str]) -> list[str]:
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
    text = (proc.stdout + ("\n" + proc.stderr[-2000:] if proc.returncode else "")).strip()
    return [f"## {title}", "", f"`{shlex.join(cmd[1:])}` ({time.perf_counter() - t0:.0f} s):", "", "```", text,
            "```", ""]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--parts", default="scoring,memory,train,selection")
    ap.add_argument("--model", default=str(REPO.parent / "shared/models/ct_abdomen_unet"))
    ap.add_argument("--data", default=str(REPO.parent / "shared/data/mr_chaos_t2"))
    ap.add_argument("--n", type=int, default=4, help="volumes for the scoring throughput")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--pool-sizes", type=int, nargs="+", default=[20, 200])
    ap.add_argument("--out", default=str(REPO / "benchmarks/results/speed.md"))
    ap.add_argument("--memory-child", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--pool", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.memory_child:
        _memory_child(args.memory_child, args.pool)
        return
    parts = args.parts.split(",")
    t0 = time.perf_counter()
    body: list[str] = []
    if "scoring" in parts:
        body += scoring_part(args)
    if "memory" in parts:
        body += memory_part(args)
    if "train" in parts:
        body += _quoted("3. Fine-tuning step time (profile of the slowest stage: fp32 vs bf16 autocast vs "
                        "channels-last)",
                        [sys.executable, "benchmarks/train_step.py", "--steps", "8", "--variants",
                         "fp32,bf16,channels_last"])
    if "selection" in parts:
        body += _quoted("4. Selection time", [sys.executable, "benchmarks/selection_speed.py", "--out", "/dev/null"])
    head = ["# Speed and memory", "",
            f"- command: `python {shlex.join(['benchmarks/speed.py', *sys.argv[1:]])}`",
            f"- date (UTC): {datetime.now(UTC).strftime('%Y-%m-%d %H:%M')}; total "
            f"{time.perf_counter() - t0:.0f} s",
            f"- machine: {cpu_model()}, {torch.get_num_threads()} torch threads (scoring and training), torch "
            f"{torch.__version__}", ""]
    Path(args.out).write_text("\n".join(head + body) + "\n")
    print("\n".join(head + body))


if __name__ == "__main__":
    main()
