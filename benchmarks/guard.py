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

import numpy as np

from _machine import code_version, machine
from asfda.adapter import Adapter, mean_of
from asfda.config import SemiConfig
from asfda.io import atomic_write_json, atomic_write_text, load_dataset
from asfda.models import load_model
from asfda.simulate import split_pool
from asfda.training import TrainConfig
from asfda.training.guard import discards

REPO = Path(__file__).resolve().parents[1]


def organ_centroids(label_map: np.ndarray, n_classes: int) -> np.ndarray:
    """Centroid (voxel coordinates) of each foreground class 1 .. ``n_classes`` - 1 of a 3D label map; NaN rows for
    a class predicted nowhere."""
    out = np.full((n_classes - 1, 3), np.nan)
    for k in range(1, n_classes):
        idx = np.argwhere(label_map == k)
        if len(idx):
            out[k - 1] = idx.mean(axis=0)
    return out


def layout_deviation(predicted: list[np.ndarray], annotated: list[np.ndarray]) -> float:
    """How far the predicted organs' layout is from the labelled volumes': per predicted volume and per organ
    besides the first, the distance (voxels of the model's grid) between its offset from the first organ and the
    median of that offset over the labelled volumes; the mean over volumes and organs (NaN where nothing compares).
    ``predicted`` / ``annotated``: `organ_centroids` arrays. A round that moves the kidneys caudally (pair 2's
    btcv_014 round) raises it even when the organs stay whole and of the right size."""
    ref = np.nanmedian(np.stack([a[1:] - a[0] for a in annotated]), axis=0)
    dev = [np.linalg.norm((p[1:] - p[0]) - ref, axis=1) for p in predicted]
    vals = np.concatenate(dev) if dev else np.array([])
    vals = vals[np.isfinite(vals)]
    return float(vals.mean()) if vals.size else float("nan")


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
    inside = sorted(set(labels) & set(test_ids))
    if inside:
        raise SystemExit(f"--labels: {', '.join(inside)} in the test split of seed {args.seed}; pool volumes only")
    for cid in labels:
        adapter.load_current_state(start)
        adapter.is_adapted = False
        train = TrainConfig(steps=args.steps, seed=args.seed * 1000, precision=args.precision)
        unlabelled = [cases[i] for i in pool_ids if i != cid]
        t0 = time.perf_counter()
        done = adapter.train_round([cases[cid]], unlabelled, train, SemiConfig(), 1.0)
        seconds_train = time.perf_counter() - t0
        guard = done.guard
        assert guard is not None
        if done.discarded_state is not None:  # judge the trained weights, whatever the guard decided
            adapter.load_current_state(done.discarded_state)
        dice = mean_of(adapter.evaluate(test), "dice_mean")
        guard_cases = [cases[i] for i in guard.cases]
        t1 = time.perf_counter()
        p0, p1 = guard.plausibility_pretrained, guard.plausibility_adapted
        n = len(ds.class_names)
        label = adapter.prepare(cases[cid], with_label=True).label
        annotated = [organ_centroids(np.asarray(label).reshape(np.asarray(label).shape[-3:]), n)]
        layout = [layout_deviation([organ_centroids(adapter.forward(c, pretrained=pre)[0].argmax(0).numpy(), n)
                                    for c in guard_cases], annotated) for pre in (True, False)]
        seconds_guard = time.perf_counter() - t1
        reverted = discards(p0, p1)
        rows.append({"labelled": cid, "dice_adapted": dice, "plausibility_pretrained": p0, "plausibility_adapted": p1,
                     "reverted": reverted, "dice_guarded": zero if reverted else dice,
                     "volume_ratio_pretrained": guard.volume_ratio_pretrained,
                     "volume_ratio_adapted": guard.volume_ratio_adapted,
                     "layout_pretrained": layout[0], "layout_adapted": layout[1],
                     "seconds_train": round(seconds_train, 1), "seconds_guard": round(seconds_guard, 1)})
        print(json.dumps(rows[-1]), flush=True)
        atomic_write_json(out / "results.json", {"args": vars(args), "zero_shot": zero, "rows": rows})
    meta = {"command": "python " + " ".join(sys.argv), "code": code_version(), "machine": machine(),
            "date": datetime.now(UTC).isoformat(timespec="minutes"),
            "wall_minutes": round((time.perf_counter() - t_start) / 60, 1)}
    atomic_write_json(out / "results.json", {"args": vars(args), "meta": meta, "zero_shot": zero, "rows": rows})
    lines = report_lines(rows, meta, args, test_ids, zero, len(guard_cases))
    atomic_write_text(out / "results.md", "\n".join(lines) + "\n")
    print("\n".join(lines))


def report_lines(rows: list[dict], meta: dict, args: argparse.Namespace, test_ids: list[str], zero: float,
                 n_guard: int) -> list[str]:
    """results.md: the table of every labelled volume and the summary line."""
    below = [r for r in rows if r["dice_adapted"] < zero]
    caught = [r for r in below if r["reverted"]]
    false = [r for r in rows if r["reverted"] and r["dice_adapted"] >= zero]
    lines = [f"Command: `{meta['command']}`  ", f"Machine: {meta['machine']}  ", f"Code: asfda commit {meta['code']}  ",
             f"Date: {meta['date']}; wall time {meta['wall_minutes']} min  ",
             f"Split seed {args.seed}: test {', '.join(test_ids)}; zero-shot mean Dice {zero:.3f}", "",
             "| labelled volume | Dice adapted | plausibility pretrained | plausibility adapted | guard "
             "| Dice guarded | smallest organ volume ratio, pretrained -> adapted | layout deviation (voxels), "
             "pretrained -> adapted |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        ratio = [min(r.get(k) or [float("nan")]) for k in ("volume_ratio_pretrained", "volume_ratio_adapted")]
        lines.append(f"| {r['labelled']} | {r['dice_adapted']:.3f} | {r['plausibility_pretrained']:.3f} | "
                     f"{r['plausibility_adapted']:.3f} | {'reverted' if r['reverted'] else 'kept'} | "
                     f"{r['dice_guarded']:.3f} | {ratio[0]:.2f} -> {ratio[1]:.2f} | "
                     f"{r.get('layout_pretrained', float('nan')):.1f} -> {r.get('layout_adapted', float('nan')):.1f} |")
    mean = lambda k: sum(r[k] for r in rows) / len(rows)  # noqa: E731
    lines += ["", f"Adaptations below zero-shot: {len(below)}, discarded by the guard: {len(caught)}; good adaptations "
              f"discarded: {len(false)}. Mean Dice over the single-label choices: {mean('dice_adapted'):.3f} "
              f"unguarded, {mean('dice_guarded'):.3f} guarded. Training and guard ({n_guard} volumes, two "
              f"models) {mean('seconds_train'):.0f} s a round; the layout columns {mean('seconds_guard'):.1f} s "
              "(they read the guard's stored passes). Layout deviation: `organ_centroids` / `layout_deviation` of "
              "this script, the labelled volume's organ offsets from the liver against the guard volumes' predicted "
              "ones."]
    return lines


if __name__ == "__main__":
    main()
