"""The fine-tuning guard on the real pair: one labelled volume at a time, does the guard keep the good
adaptations and discard the ones that end below zero-shot?

For every volume of the seeded pool split (or those in --labels), the pretrained model is fine-tuned on
that volume alone (one round, the run recipe), evaluated on the held-out test split, and the guard of
`asfda.training.guard` decides on the unlabeled rest of the pool exactly as `Adapter.train_round` does
(same sample, same functions). "Dice, guarded" is what the loop ends the round with: the adapted Dice when
the guard keeps the weights, the zero-shot Dice when it discards them.

    .venv/bin/python benchmarks/guard.py --precision bf16 --out benchmarks/results/guard
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

from _machine import code_version, machine
from asfda.adapter import Adapter, mean_of
from asfda.config import SemiConfig
from asfda.io import atomic_write_json, atomic_write_text, load_dataset
from asfda.models import load_model
from asfda.simulate import split_pool
from asfda.training import TrainConfig
from asfda.training.guard import discards, guard_sample

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=str(REPO.parent / "shared/models/ct_abdomen_unet"))
    ap.add_argument("--data", default=str(REPO.parent / "shared/data/mr_chaos_t2"))
    ap.add_argument("--labels", help="comma-separated pool case ids (default: every pool volume of the split)")
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--test-fraction", type=float, default=0.3)
    ap.add_argument("--cache", default=str(REPO / ".cache"))
    ap.add_argument("--out", default=str(REPO / "benchmarks/results/guard"))
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    ds = load_dataset(args.data, require_labels=True)
    pool_ids, test_ids = split_pool(list(ds.by_id()), args.test_fraction, args.seed)
    cases = ds.by_id()
    test = [cases[i] for i in test_ids]
    adapter = Adapter(load_model(args.model), ds.class_names, cache_dir=args.cache, progress=sys.stderr.isatty())
    start = adapter.current_state()
    zero = mean_of(adapter.evaluate(test, pretrained=True), "dice_mean")
    labels = args.labels.split(",") if args.labels else pool_ids
    rows: list[dict] = []
    for cid in labels:
        adapter.load_current_state(start)
        adapter.is_adapted = False
        train = TrainConfig(steps=args.steps, seed=args.seed * 1000, precision=args.precision)
        unlabelled = [cases[i] for i in pool_ids if i != cid]
        t0 = time.perf_counter()
        adapter.train_round([cases[cid]], unlabelled, TrainConfig(**{**vars(train), "guard": False}),
                            SemiConfig(), 1.0)
        seconds_train = time.perf_counter() - t0
        dice = mean_of(adapter.evaluate(test), "dice_mean")
        sample = set(guard_sample([c.case_id for c in unlabelled], train.guard_volumes, train.seed))
        guard_cases = [c for c in unlabelled if c.case_id in sample]
        t1 = time.perf_counter()
        p0 = adapter.plausibility(guard_cases, pretrained=True)
        p1 = adapter.plausibility(guard_cases)
        seconds_guard = time.perf_counter() - t1
        reverted = discards(p0, p1)
        rows.append({"labelled": cid, "dice_adapted": dice, "plausibility_pretrained": p0, "plausibility_adapted": p1,
                     "reverted": reverted, "dice_guarded": zero if reverted else dice,
                     "seconds_train": round(seconds_train, 1), "seconds_guard": round(seconds_guard, 1)})
        print(json.dumps(rows[-1]), flush=True)
        atomic_write_json(out / "results.json", {"args": vars(args), "zero_shot": zero, "rows": rows})
    meta = {"command": "python " + " ".join(sys.argv), "code": code_version(), "machine": machine(),
            "date": datetime.now(UTC).isoformat(timespec="minutes"),
            "wall_minutes": round((time.perf_counter() - t_start) / 60, 1)}
    atomic_write_json(out / "results.json", {"args": vars(args), "meta": meta, "zero_shot": zero, "rows": rows})
    below = [r for r in rows if r["dice_adapted"] < zero]
    caught = [r for r in below if r["reverted"]]
    false = [r for r in rows if r["reverted"] and r["dice_adapted"] >= zero]
    lines = [f"Command: `{meta['command']}`  ", f"Machine: {meta['machine']}  ", f"Code: asfda commit {meta['code']}  ",
             f"Date: {meta['date']}; wall time {meta['wall_minutes']} min  ",
             f"Split seed {args.seed}: test {', '.join(test_ids)}; zero-shot mean Dice {zero:.3f}", "",
             "| labelled volume | Dice adapted | plausibility pretrained | plausibility adapted | guard "
             "| Dice guarded |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['labelled']} | {r['dice_adapted']:.3f} | {r['plausibility_pretrained']:.3f} | "
                     f"{r['plausibility_adapted']:.3f} | {'reverted' if r['reverted'] else 'kept'} | "
                     f"{r['dice_guarded']:.3f} |")
    mean = lambda k: sum(r[k] for r in rows) / len(rows)  # noqa: E731
    lines += ["", f"Adaptations below zero-shot: {len(below)}, discarded by the guard: {len(caught)}; good adaptations "
              f"discarded: {len(false)}. Mean Dice over the single-label choices: {mean('dice_adapted'):.3f} "
              f"unguarded, {mean('dice_guarded'):.3f} guarded. Guard cost: {mean('seconds_guard'):.1f} s a round "
              f"({len(guard_cases)} volumes, two models; the pretrained model's values are cached after the first "
              f"round) against {mean('seconds_train'):.0f} s of training."]
    atomic_write_text(out / "results.md", "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
