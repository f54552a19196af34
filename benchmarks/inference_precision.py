"""Inference in bf16 against fp32 (`--precision` of predict / evaluate / score / query / next): seconds per volume and
how far the label maps move, on a real model and real volumes. Each volume runs fp32 and bf16 alternately (the same
machine load for both), on the model grid (one sliding-window pass each).

    .venv/bin/python benchmarks/inference_precision.py --model ../shared/models/ct_abdomen_unet \
        --data ../shared/data/mr_chaos_t2 --cases 3 [--threads 1] [--out benchmarks/results/inference_precision.md]
"""

from __future__ import annotations

import argparse
import time
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import torch

from _machine import code_version, machine
from asfda.adapter import Adapter
from asfda.evaluation import compute_dice, mean_ignoring_nan
from asfda.io import load_dataset
from asfda.models import load_model


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="../shared/models/ct_abdomen_unet")
    ap.add_argument("--data", default="../shared/data/mr_chaos_t2")
    ap.add_argument("--cases", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--cache-dir", default=".cache")
    ap.add_argument("--out", default="benchmarks/results/inference_precision.md")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    ds = load_dataset(args.data, require_labels=True)
    loaded = load_model(args.model)
    adapters = {p: Adapter(loaded, ds.class_names, cache_dir=args.cache_dir, device="cpu", progress=False,
                           precision=p) for p in ("fp32", "bf16")}
    engines = {p: a.engine_current for p, a in adapters.items()}
    n = len(ds.class_names)
    rows: list[dict] = []
    for case in list(ds.cases)[: args.cases]:
        vol = adapters["fp32"].prepare(case)  # model grid, label included
        seconds: dict[str, list[float]] = {}
        maps: dict[str, torch.Tensor] = {}
        for p in ("fp32", "bf16", "fp32", "bf16"):  # alternately, twice: the same load for both
            t0 = time.perf_counter()
            logits, _ = engines[p].run(vol.image)
            seconds.setdefault(p, []).append(time.perf_counter() - t0)
            maps[p] = logits.argmax(0)
        agree = mean_ignoring_nan(compute_dice(maps["bf16"], maps["fp32"], n))
        assert vol.label is not None, "a dataset loaded with require_labels=True has a label for every case"
        truth = vol.label.long()
        rows.append({"case": case.case_id, "fp32_s": float(np.mean(seconds["fp32"])),
                     "bf16_s": float(np.mean(seconds["bf16"])), "agreement": agree,
                     "dice_fp32": mean_ignoring_nan(compute_dice(maps["fp32"], truth, n)),
                     "dice_bf16": mean_ignoring_nan(compute_dice(maps["bf16"], truth, n)),
                     "voxels_changed": float((maps["bf16"] != maps["fp32"]).float().mean())})
        print(rows[-1], flush=True)
    mean = {k: float(np.mean([r[k] for r in rows])) for k in rows[0] if k != "case"}
    lines = [
        "# Inference precision: bf16 autocast against fp32",
        "",
        f"Command: `python benchmarks/inference_precision.py --model {args.model} --data {args.data} --cases "
        f"{args.cases} --threads {args.threads}`  ",
        f"Machine: {machine()}  ",
        f"Code: {code_version()}; date {datetime.now(UTC).isoformat(timespec='minutes')}",
        "",
        "One sliding-window pass per volume on the model grid (the model's own roi and overlap), fp32 and bf16 run "
        "alternately twice per volume (mean seconds); agreement = mean Dice over classes between the two label maps; "
        "Dice against the labels on the model grid.",
        "",
        "| case | fp32 s | bf16 s | speed-up | agreement | voxels changed | Dice fp32 | Dice bf16 |",
        "|---|---|---|---|---|---|---|---|",
        *[f"| {r['case']} | {r['fp32_s']:.1f} | {r['bf16_s']:.1f} | {r['fp32_s'] / r['bf16_s']:.2f}x | "
          f"{r['agreement']:.4f} | {100 * r['voxels_changed']:.3f}% | {r['dice_fp32']:.4f} | {r['dice_bf16']:.4f} |"
          for r in rows],
        f"| mean | {mean['fp32_s']:.1f} | {mean['bf16_s']:.1f} | {mean['fp32_s'] / mean['bf16_s']:.2f}x | "
        f"{mean['agreement']:.4f} | {100 * mean['voxels_changed']:.3f}% | {mean['dice_fp32']:.4f} | "
        f"{mean['dice_bf16']:.4f} |",
        "",
    ]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text("\n".join(lines))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
