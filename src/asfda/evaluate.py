"""`asfda evaluate`: Dice and HD95 per case and class of a model on a labelled dataset, at each case's native grid."""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from asfda.adapter import Adapter
from asfda.evaluation import mean_ignoring_nan
from asfda.io import atomic_write_json, load_dataset, read_nifti
from asfda.io.atomic import staged_write, write_failures_as_errors
from asfda.io.datasets import Dataset
from asfda.io.labels import check_label_values
from asfda.io.outputs import (
    OutputFiles,
    check_writable_folder,
    csv_header,
    dataset_folders,
    dataset_input_folders,
    json_object_with,
    refuse_foreign_files,
    refuse_output_inside_inputs,
)
from asfda.models import load_model, parse_class_map_override

__all__ = ["Evaluation", "evaluate_model"]


def _model_inputs(model: str | Path, model_config: str | Path | None) -> dict[str, object]:
    return {"the model": model, "the model config": model_config}


def _own_outputs(out: Path) -> OutputFiles:
    """per_case.csv and summary.json, each with how evaluate recognises its own (by their content)."""
    return [(out / "per_case.csv", lambda p: csv_header(p)[:1] == ["case_id"] and "dice_mean" in csv_header(p)),
            (out / "summary.json", lambda p: json_object_with(p, ("mean", "n_cases", "empty_label_rule")))]


@dataclass(frozen=True)
class Evaluation:
    """What `evaluate_model` measured and wrote: ``record`` is summary.json's content (``mean``: the mean of each
    column over the cases), ``rows`` per_case.csv's rows, ``class_names`` the foreground classes in label order."""

    record: dict
    rows: list[dict]
    class_names: list[str]
    per_case: Path
    summary: Path


def evaluate_model(model: str | Path, data: str | Path, out: str | Path, *, model_config: str | None = None,
                   class_map: str | None = None, progress: bool = True, cache_dir: str | None = ".cache",
                   trust_model_code: bool = False, device: str = "auto", output_activation: str | None = None,
                   precision: str = "fp32") -> Evaluation:
    """Evaluates a model on a labelled dataset at each case's native grid; writes per_case.csv + summary.json and
    returns them as an `Evaluation` (`asfda evaluate` prints its table).

    The rows are `Adapter.evaluate`'s (with HD95). Every label is checked as `asfda ingest` checks it (integer values
    among the dataset's label values) before the model runs on any case. A model with fewer organs than the dataset
    (`ClassMap.uncovered`) is scored on its own organs: the others are folded into background in the labels (their
    Dice NaN, left out of the means), and summary.json names them (``uncovered_classes``) and says so (``note``).
    ``trust_model_code``: build the model config with MONAI's full parser (`load_model`'s ``allow_code``);
    ``output_activation``: overrides what the model declares (`load_model`); ``precision``: inference precision
    (`InferenceEngine`).

    ``out`` may not be, or lie inside, the dataset or the model, nor any dataset, project or model folder; it must
    be writable, and an existing per_case.csv or summary.json in it must be evaluate's own (`_own_outputs`): all
    checked before the model is loaded. The two files are written as one set (`staged_write`): a full disk leaves
    the earlier pair whole.
    """
    out = Path(out)
    inputs: dict[str, object] = {"the dataset": dataset_folders(data), **_model_inputs(model, model_config)}
    refuse_output_inside_inputs(out, inputs)
    check_writable_folder(out)
    refuse_foreign_files(_own_outputs(out), "evaluate")
    loaded = load_model(model, config=model_config, allow_code=trust_model_code, output_activation=output_activation)
    ds = load_dataset(data, require_labels=True)
    refuse_output_inside_inputs(out, {"the dataset": dataset_input_folders(ds)})
    _check_labels(ds)  # every label, before the model runs on any case
    # one shot: no pass is read again, so none is kept (`Adapter.forward` runs the engine); the dataset's classes the
    # model lacks are folded into background (their Dice NaN: the means cover the model's organs)
    adapter = Adapter(loaded, ds.class_names, class_map_override=parse_class_map_override(class_map),
                      cache_dir=cache_dir, progress=progress, device=device, precision=precision, keep_outputs=False,
                      fold_uncovered=True)
    rows = adapter.evaluate(list(ds.cases), hd95=True, largest_component=False)
    summary = {k: mean_ignoring_nan([r[k] for r in rows]) for k in rows[0] if k != "case_id"}
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(rows[0]))
    w.writeheader()
    w.writerows(rows)
    cmap = adapter.class_map
    uncovered = {"uncovered_classes": [cmap.target_names[t] for t in cmap.uncovered],
                 "note": cmap.uncovered_note()} if cmap.uncovered else {}
    result = {"model": str(model), "data": str(data), "model_weights_sha256_16": loaded.weights_hash,
              "class_map": cmap.to_dict(), **uncovered, "precision": precision, "n_cases": len(rows),
              "mean": summary,
              "empty_label_rule": "Dice is NaN (left out of means) for a class absent from both label and "
                                  "prediction, 0 when absent from the label but predicted; HD95 NaN if either is empty"}
    with write_failures_as_errors(out, "the evaluation"), \
            staged_write(out / "per_case.csv", lambda p: p.write_text(buf.getvalue(), encoding="utf-8")):
        atomic_write_json(out / "summary.json", result)
    return Evaluation(result, rows, ds.class_names[1:], out / "per_case.csv", out / "summary.json")


def _check_labels(ds: Dataset) -> None:
    """Each case's label checked as `asfda ingest` checks it (integer values among the dataset's label values), all
    before the model runs: a bad label is a one-line error naming it, not one met after the cases before it ran."""
    allowed = set(ds.labels.values())
    for case in ds.cases:
        assert case.label_path is not None  # the dataset was loaded with require_labels
        check_label_values(read_nifti(case.label_path, dtype=np.float64)[0], allowed, case.label_path)
