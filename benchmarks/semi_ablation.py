"""Fine-tuning with and without the selective semi-supervised term, same labelled volumes, same seed.

Default: ../shared/models/ct_abdomen_unet adapted to ../shared/data/mr_chaos_t2 (seeded pool/test split).
For each k in --labels, the first k volumes of a fixed seeded order of the pool are labelled; the model
is fine-tuned from the pretrained weights (one round) with the plain recipe and with semi-supervision,
and evaluated on the held-out test split at each image's native grid.

    .venv/bin/python benchmarks/semi_ablation.py --labels 1,2,4 --steps 200 --out benchmarks/results/semi_ablation
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import torch

from _machine import machine
from asfda.adapter import Adapter, mean_of
from asfda.config import SemiConfig
from asfda.io import atomic_write_json, atomic_write_text, load_dataset
from asfda.models import load_model
from asfda.simulate import split_pool
from asfda.training import TrainConfig

REPO = Path(__file__).resolve().parents[1]



def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=str(REPO.parent / "shared/models/ct_abdomen_unet"))
    ap.add_argument("--data", default=str(REPO.parent / "shared/data/mr_chaos_t2"))
    ap.add_argument("--labels", default="1,2,4")
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--batch-size", type=int, default=2)
    ap.add_argument("--freeze-encoder", action="store_true")
    ap.add_argument("--variants", default="plain,semi", help="plain, semi (warmup pseudo-labels), semi_previous")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--test-fraction", type=float, default=0.3)
    ap.add_argument("--cache", default=str(REPO / ".cache"))
    ap.add_argument("--out", default=str(REPO / "benchmarks/results/semi_ablation"))
    args = ap.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model = load_model(args.model)
    ds = load_dataset(args.data, require_labels=True)
    pool_ids, test_ids = split_pool(list(ds.by_id()), args.test_fraction, args.seed)
    order = [pool_ids[i] for i in np.random.default_rng(args.seed + 100).permutation(len(pool_ids))]
    cases = ds.by_id()
    test = [cases[i] for i in test_ids]
    adapter = Adapter(model, ds.class_names, cache_dir=args.cache, progress=sys.stderr.isatty())
    start = adapter.current_state()
    zero = adapter.evaluate(test, pretrained=True)
    rows = [{"variant": "zero-shot", "n_labelled": 0, "dice_mean": mean_of(zero, "dice_mean"),
             **{k: mean_of(zero, k) for k in zero[0] if k.startswith("dice_") and k != "dice_mean"}}]
    print(json.dumps(rows[-1]), flush=True)
    semis = {"plain": SemiConfig(enabled=False), "semi": SemiConfig(enabled=True, pseudo_from="warmup"),
             "semi_previous": SemiConfig(enabled=True, pseudo_from="previous")}
    for k in [int(x) for x in args.labels.split(",")]:
        labelled = [cases[i] for i in order[:k]]
        unlabelled = [cases[i] for i in pool_ids if i not in set(order[:k])]
        for variant in args.variants.split(","):
            adapter.load_current_state(start)
            adapter.is_adapted = False
            train = TrainConfig(steps=args.steps, batch_size=args.batch_size, lr=args.lr, seed=args.seed,
                                freeze_encoder=args.freeze_encoder, guard=False)
            t0 = time.perf_counter()
            reliable = adapter.train_round(labelled, unlabelled, train, semis[variant], 1.0, None, [],
                                           desc=f"{variant} k={k}").reliable
            seconds = time.perf_counter() - t0
            per_case = adapter.evaluate(test)
            row = {"variant": variant, "n_labelled": k, "labelled": [c.case_id for c in labelled],
                   "reliable": sorted(reliable), "dice_mean": mean_of(per_case, "dice_mean"),
                   **{m: mean_of(per_case, m) for m in per_case[0] if m.startswith("dice_") and m != "dice_mean"},
                   "train_seconds": round(seconds, 1), "seconds_per_step": round(seconds / args.steps, 3),
                   "per_case": per_case}
            rows.append(row)
            print(json.dumps({x: y for x, y in row.items() if x != "per_case"}), flush=True)
            atomic_write_json(out / "results.json", {"args": vars(args), "rows": rows})
    meta = {"command": "python " + " ".join(sys.argv), "machine": machine(),
            "date": datetime.now(UTC).isoformat(timespec="minutes"), "test": test_ids, "pool": pool_ids}
    atomic_write_json(out / "results.json", {"args": vars(args), "meta": meta, "rows": rows})
    classes = [c for c in rows[0] if c.startswith("dice_") and c != "dice_mean"]
    lines = [f"Command: `{meta['command']}`  ", f"Machine: {meta['machine']}  ", f"Date: {meta['date']}  ",
             f"Test split ({len(test_ids)}): {', '.join(test_ids)}", "",
             "| variant | labelled | mean Dice | " + " | ".join(c[5:] for c in classes) + " | s/step |",
             "|---|---|---|" + "---|" * len(classes) + "---|"]
    for r in rows:
        lines.append(f"| {r['variant']} | {r['n_labelled']} | {r['dice_mean']:.3f} | "
                     + " | ".join(f"{r[c]:.3f}" for c in classes) + f" | {r.get('seconds_per_step', '')} |")
    atomic_write_text(out / "results.md", "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
