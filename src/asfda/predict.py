"""`asfda evaluate` (Dice and HD95 per case and class against labels)."""

from __future__ import annotations

import csv
import io
import math
from pathlib import Path

import numpy as np
import torch

from asfda.evaluation import compute_dice, compute_hd95, mean_ignoring_nan
from asfda.io import atomic_write_json, atomic_write_text, load_dataset, read_nifti
from asfda.models import load_model, parse_class_map_override, resample_to_native

__all__ = ["evaluate_model"]


def evaluate_model(model: str | Path, data: str | Path, out: str | Path, *, model_config: str | None = None,
                   class_map: str | None = None, progress: bool = True, cache_dir: str | None = ".cache") -> dict:
    """Evaluates a model on a labelled dataset at each case's native grid; writes per_case.csv + summary.json."""
    from asfda.loop import Adapter

    loaded = load_model(model, config=model_config)
    ds = load_dataset(data, require_labels=True)
    adapter = Adapter(loaded, ds.class_names, class_map_override=parse_class_map_override(class_map),
                      cache_dir=cache_dir, progress=progress)
    names = ds.class_names
    rows = []
    for case in adapter._bar(list(ds.cases), "evaluate"):
        vol = adapter.prepare(case, with_label=False)
        logits, _ = adapter.engine_current.run(vol.image)
        prob = resample_to_native(torch.softmax(logits, 0), vol.affine, vol.native_affine, vol.native_shape)
        pred = prob.argmax(0)
        label = torch.from_numpy(read_nifti(case.label_path)[0]).round().long()
        dice = compute_dice(pred, label, len(names))
        hd = compute_hd95(pred, label, len(names), case.spacing_mm)
        row = {"case_id": case.case_id}
        row.update({f"dice_{n}": float(d) for n, d in zip(names[1:], dice)})
        row["dice_mean"] = mean_ignoring_nan(dice)
        row.update({f"hd95_mm_{n}": float(h) for n, h in zip(names[1:], hd)})
        rows.append(row)
    summary = {k: mean_ignoring_nan([r[k] for r in rows]) for k in rows[0] if k != "case_id"}
    out = Path(out)
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(rows[0]))
    w.writeheader()
    w.writerows(rows)
    atomic_write_text(out / "per_case.csv", buf.getvalue())
    result = {"model": str(model), "data": str(data), "model_weights_sha256_16": loaded.weights_hash,
              "class_map": adapter.class_map.to_dict(), "n_cases": len(rows), "mean": summary,
              "empty_label_rule": "Dice is NaN (left out of means) for a class absent from both label and "
                                  "prediction, 0 when absent from the label but predicted; HD95 NaN if either is empty"}
    atomic_write_json(out / "summary.json", result)
    print("| class | Dice | HD95 (mm) |\n|---|---|---|")
    for n in names[1:]:
        print(f"| {n} | {summary[f'dice_{n}']:.3f} | {summary[f'hd95_mm_{n}']:.1f} |")
    print(f"| mean | {summary['dice_mean']:.3f} | |")
    print(f"per case: {out / 'per_case.csv'}; summary: {out / 'summary.json'}")
    return result


