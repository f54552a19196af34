"""How good would semi-supervision's pseudo-labels be from each teacher? Measured without training a round.

Selective semi-supervision trains on the teacher model's masked pseudo-labels of unlabeled volumes; it cannot add
more than those labels know. This scores candidate teachers on every unlabeled volume of a labelled dataset against
the true labels (which a simulation has and never trains on): the model as it is (one pass) and flip-averaged (the
engine's TTA flips, never left-right: ``semi.flip_average``), each at several confidence thresholds
(``semi.prob_threshold``): the whole pseudo-label's Dice, the Dice over the voxels kept, the fraction kept, and per
organ (`asfda.training.pseudo_label_quality`). A teacher variant whose pseudo-labels are no better than the plain
model's cannot make semi-supervision pay, so the cross-validated arm is run only for one that is.

    python benchmarks/teacher_quality.py --model ../shared/models/ct_abdomen_unet --data ../shared/data/mr_chaos_t2 \\
        --weights benchmarks/results/pair_utility/ct_to_mr_031/first.safetensors --labelled chaos_031 \\
        --out benchmarks/results/semi/teacher_quality_ct_to_mr_031.json

``--weights``: the adapted model's state dict (safetensors; a run's ``weights_round<r>.safetensors``), the
pretrained model without it. Writes the JSON and a markdown table beside it, with the command, machine and date.
"""

from __future__ import annotations

import argparse
import sys
import warnings
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

from _machine import code_version, machine
from asfda.io import atomic_write_json, atomic_write_text, load_dataset

TEACHERS = ("model", "flip_average")


def summarize(rows: list[dict]) -> dict[str, dict[str, float]]:
    """Mean of every quality column over the volumes, per (teacher, threshold) key of ``rows``."""
    out: dict[str, dict[str, float]] = {}
    for key in sorted({r["key"] for r in rows}):
        sel = [r["quality"] for r in rows if r["key"] == key]
        with np.errstate(all="ignore"), warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # a column NaN on every volume stays NaN
            out[key] = {c: float(np.nanmean([q[c] for q in sel])) for c in sel[0]}
    return out


def table(summary: dict[str, dict[str, float]]) -> list[str]:
    organs = sorted({c.split(":", 1)[1] for s in summary.values() for c in s if c.startswith("pseudo_dice:")})
    lines = ["| teacher @ threshold | pseudo Dice | over the kept voxels | kept | " + " | ".join(organs) + " |",
             "|---|---|---|---|" + "---|" * len(organs)]
    for key, s in summary.items():
        lines.append(f"| {key} | {s['pseudo_dice']:.4f} | {s['pseudo_dice_masked']:.4f} | {s['kept_fraction']:.3f} | "
                     + " | ".join(f"{s[f'pseudo_dice:{o}']:.3f}" for o in organs) + " |")
    return lines


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--data", required=True)
    ap.add_argument("--weights", help="the adapted model's state dict (safetensors); default: the pretrained model")
    ap.add_argument("--labelled", default="", help="comma-separated ids the model was trained on (left out)")
    ap.add_argument("--thresholds", default="0.8,0.9,0.95")
    ap.add_argument("--temperature", type=float, default=1.0, help="T of softmax(z / T) before the threshold")
    ap.add_argument("--teachers", default=",".join(TEACHERS))
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--cache-dir", default=".cache")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--threads", type=int, default=0)
    args = ap.parse_args(argv)

    import torch
    from safetensors.torch import load_file

    from asfda.adapter import Adapter
    from asfda.models import load_model
    from asfda.training import pseudo_label, pseudo_label_quality

    if args.threads > 0:
        torch.set_num_threads(args.threads)
    ds = load_dataset(args.data, require_labels=True)
    adapter = Adapter(load_model(args.model), ds.class_names, cache_dir=args.cache_dir, device=args.device,
                      progress=False)
    if args.weights:
        adapter.load_current_state(load_file(args.weights))
    labelled = {i for i in args.labelled.split(",") if i}
    thresholds = [float(t) for t in args.thresholds.split(",")]
    teachers = [t for t in args.teachers.split(",") if t]
    names = adapter.target_names
    rows: list[dict] = []
    for case in (c for c in ds.cases if c.case_id not in labelled):
        vol = adapter.prepare(case, with_label=True)
        truth = vol.label
        if truth is None:  # (require_labels: every case has one)
            continue
        for teacher in teachers:
            with torch.inference_mode():
                logits = adapter.engine_current.run(vol.image, tta=True)[0] if teacher == "flip_average" \
                    else adapter.forward(case, vol)[0]
            for thr in thresholds:
                label, mask = pseudo_label(logits, args.temperature, thr)
                rows.append({"case_id": case.case_id, "key": f"{teacher} @ {thr:g}",
                             "quality": pseudo_label_quality(label, mask, truth, names)})
        print(f"{case.case_id} done", file=sys.stderr, flush=True)
    summary = summarize(rows)
    record = {"summary": summary, "rows": rows, "volumes": len({r["case_id"] for r in rows}),
              "weights": args.weights, "labelled": sorted(labelled),
              "command": "python " + " ".join(["benchmarks/teacher_quality.py",
                                               *(sys.argv[1:] if argv is None else argv)]),
              "machine": machine(), "commit": code_version(), "date": datetime.now(UTC).isoformat(timespec="minutes")}
    atomic_write_json(args.out, record)
    md = [f"Command: `{record['command']}`  ", f"Machine: {record['machine']}, commit {record['commit']}, "
          f"{record['date']}; {record['volumes']} unlabeled volumes", "", *table(summary), ""]
    atomic_write_text(args.out.with_suffix(".md"), "\n".join(md))
    print("\n".join(md))
    return record


if __name__ == "__main__":
    main()
