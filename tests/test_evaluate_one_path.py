"""Issue 36: one evaluation path. `asfda evaluate`'s rows are `Adapter.evaluate(cases, hd95=True)`'s; its files and
its table are the ones it wrote before (pinned here on the tiny fixtures), its label check still runs before the
model does. Issue 35: a model with fewer organs than the dataset is scored on its own organs (the others folded into
background), and says so."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from asfda.cli import main
from conftest import load_nifti, write_bundle, write_nnunet

# `asfda evaluate` of the tiny bundle (seed 0) on write_nnunet(n=2), as written before evaluate became a wrapper of
# Adapter.evaluate (the same text: every number, column and key)
PINNED_CSV = (
    "case_id,dice_liver,dice_spleen,dice_mean,hd95_mm_liver,hd95_mm_spleen\n"
    "case00,0.08865860679332183,0.040973111395646605,0.06481585909448422,23.323806762695312,24.70218849182129\n"
    "case01,0.08876080691642652,0.04381443298969072,0.06628761995305862,23.323806762695312,24.59674835205078\n")
PINNED_SUMMARY = {
    "model_weights_sha256_16": "387a9c9814c9f4e2",
    "class_map": {"background": "background", "liver": "liver", "spleen": "spleen"}, "precision": "fp32",
    "n_cases": 2,
    "mean": {"dice_liver": 0.08870970685487417, "dice_spleen": 0.04239377219266866, "dice_mean": 0.06555173952377141,
             "hd95_mm_liver": 23.323806762695312, "hd95_mm_spleen": 24.649468421936035},
    "empty_label_rule": "Dice is NaN (left out of means) for a class absent from both label and prediction, 0 when "
                        "absent from the label but predicted; HD95 NaN if either is empty"}
PINNED_TABLE = ["| class | Dice | HD95 (mm) |", "|---|---|---|", "| liver | 0.089 | 23.3 |",
                "| spleen | 0.042 | 24.6 |", "| mean | 0.066 | |"]


def _evaluate(capsys: pytest.CaptureFixture, model: Path, data: Path, out: Path) -> list[str]:
    capsys.readouterr()
    assert main(["evaluate", "--model", str(model), "--data", str(data), "--out", str(out), "--no-progress"]) == 0
    return capsys.readouterr().out.splitlines()


def _rows(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_evaluate_writes_and_prints_what_it_did_before(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    data, model, out = write_nnunet(tmp_path / "ds", n=2), write_bundle(tmp_path / "bundle"), tmp_path / "ev"
    printed = _evaluate(capsys, model, data, out)
    assert printed == [*PINNED_TABLE, f"per case: {out / 'per_case.csv'}; summary: {out / 'summary.json'}"]
    assert (out / "per_case.csv").read_text() == PINNED_CSV
    assert json.loads((out / "summary.json").read_text()) == {"model": str(model), "data": str(data),
                                                              **PINNED_SUMMARY}


def test_evaluate_rows_are_adapter_evaluates_with_hd95(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`asfda evaluate` asks `Adapter.evaluate` for its rows (with HD95), and that gives the pinned numbers."""
    from asfda.adapter import Adapter
    from asfda.evaluate import evaluate_model

    calls = []
    original = Adapter.evaluate

    def spy(self, cases, **kwargs):
        rows = original(self, cases, **kwargs)
        calls.append((kwargs, rows))
        return rows

    monkeypatch.setattr(Adapter, "evaluate", spy)
    result = evaluate_model(write_bundle(tmp_path / "bundle"), write_nnunet(tmp_path / "ds", n=2), tmp_path / "ev",
                            cache_dir=None, progress=False)
    assert len(calls) == 1 and calls[0][0].get("hd95") is True
    assert result.rows == [{k: v for k, v in r.items() if not k.startswith("lcc_")} for r in calls[0][1]]
    assert (tmp_path / "ev" / "per_case.csv").read_text() == PINNED_CSV


def test_adapter_evaluate_hd95_columns_are_off_by_default(tmp_path: Path) -> None:
    from asfda.adapter import Adapter
    from asfda.io import load_dataset
    from asfda.models import load_model

    ds = load_dataset(write_nnunet(tmp_path / "ds", n=2), require_labels=True)
    adapter = Adapter(load_model(write_bundle(tmp_path / "bundle")), ds.class_names, progress=False)
    plain, with_hd = adapter.evaluate(list(ds.cases)), adapter.evaluate(list(ds.cases), hd95=True)
    assert not any(k.startswith("hd95") for k in plain[0])
    pinned = list(csv.DictReader(PINNED_CSV.splitlines()))
    for row, plain_row, want in zip(with_hd, plain, pinned):
        assert {k: v for k, v in row.items() if not k.startswith("hd95")} == plain_row
        assert [row[f"hd95_mm_{n}"] for n in ("liver", "spleen")] == [float(want[f"hd95_mm_{n}"])
                                                                      for n in ("liver", "spleen")]


def _spoil(label_path: Path, value: float) -> Path:
    """Sets one voxel of a label file to ``value`` (a fraction, or a value that is no label)."""
    img = load_nifti(str(label_path))
    label = np.asarray(img.dataobj).astype(np.float32)
    label[0, 0, 0] = value
    nib.save(nib.Nifti1Image(label, img.affine), str(label_path))
    return label_path


@pytest.mark.parametrize(("value", "expected"), [(0.5, "non-integer"), (7, "values [7] that are not label values "
                                                                          "[0, 1, 2]")], ids=["fractional", "seven"])
def test_a_label_ingest_refuses_is_refused_before_the_model_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                 capsys: pytest.CaptureFixture, value: float,
                                                                 expected: str) -> None:
    """Labels are checked as `asfda ingest` checks them, every case's before the model runs on any: a bad label in
    the last case is refused in one line naming it, without a forward pass and without summary.json."""
    from asfda.engine import InferenceEngine
    from asfda.io import load_dataset
    from asfda.io.labels import check_label

    data = write_nnunet(tmp_path / "ds", n=2)
    bad = _spoil(data / "labelsTr" / "case01.nii.gz", value)
    assert expected in str(check_label(bad, load_dataset(data).by_id()["case01"], {0, 1, 2}))  # ingest's own verdict
    runs: list[int] = []
    original = InferenceEngine.run

    def counted(self, *a, **k):
        runs.append(1)
        return original(self, *a, **k)

    monkeypatch.setattr(InferenceEngine, "run", counted)
    out = tmp_path / "ev"
    assert main(["evaluate", "--model", str(write_bundle(tmp_path / "bundle")), "--data", str(data), "--out",
                 str(out), "--no-progress"]) == 2
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert len(err) == 1 and str(bad) in err[0] and expected in err[0] and "fix:" in err[0]
    assert runs == [] and not (out / "summary.json").exists()


def test_simulates_evaluation_refuses_bad_test_labels(tmp_path: Path) -> None:
    from asfda.adapter import Adapter
    from asfda.errors import AsfdaError
    from asfda.io import load_dataset
    from asfda.models import load_model

    data = write_nnunet(tmp_path / "ds", n=1)
    _spoil(data / "labelsTr" / "case00.nii.gz", 7)
    ds = load_dataset(data, require_labels=True)
    adapter = Adapter(load_model(write_bundle(tmp_path / "bundle")), ds.class_names, device="cpu", progress=False)
    with pytest.raises(AsfdaError, match=r"values \[7\] that are not label values"):
        adapter.evaluate(list(ds.cases))


# ---------------------------------------------------------------------------- a model with fewer organs
def _liver_only_dataset(src: Path, root: Path) -> Path:
    """``src`` with its spleen voxels set to background and dataset.json naming background and liver only."""
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    for p in (src / "imagesTr").iterdir():
        (root / "imagesTr" / p.name).write_bytes(p.read_bytes())
    for p in (src / "labelsTr").iterdir():
        img = load_nifti(str(p))
        label = np.asarray(img.dataobj).copy()
        label[label == 2] = 0
        nib.save(nib.Nifti1Image(label, img.affine, img.header), str(root / "labelsTr" / p.name))
    meta = json.loads((src / "dataset.json").read_text())
    (root / "dataset.json").write_text(json.dumps({**meta, "labels": {"background": 0, "liver": 1}}))
    return root


def test_a_one_organ_model_is_scored_on_its_organ_only(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """A liver-only model on a liver + spleen dataset: the spleen is folded into background before scoring (its
    Dice and HD95 NaN, not 0), the mean covers the liver only, and summary.json and the output say so. The liver's
    numbers are those of the same model on the dataset without its spleen."""
    data = write_nnunet(tmp_path / "ds", n=2)
    model = write_bundle(tmp_path / "liver", class_names=("background", "liver"))
    out = tmp_path / "ev"
    printed = _evaluate(capsys, model, data, out)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["uncovered_classes"] == ["spleen"]
    note = summary["note"]
    assert "spleen" in note and "folded into background" in note and printed[0] == f"note: {note}"
    rows = _rows(out / "per_case.csv")
    assert len(rows) == 2
    for row in rows:
        assert math.isnan(float(row["dice_spleen"])) and math.isnan(float(row["hd95_mm_spleen"]))
        assert float(row["dice_mean"]) == float(row["dice_liver"])
    assert summary["mean"]["dice_mean"] == summary["mean"]["dice_liver"]
    ref_out = tmp_path / "ref"
    _evaluate(capsys, model, _liver_only_dataset(data, tmp_path / "liver_ds"), ref_out)
    ref = _rows(ref_out / "per_case.csv")
    assert [(r["case_id"], r["dice_liver"], r["hd95_mm_liver"]) for r in rows] == [
        (r["case_id"], r["dice_liver"], r["hd95_mm_liver"]) for r in ref]
    assert "note" not in json.loads((ref_out / "summary.json").read_text())


def test_adapter_evaluate_folds_only_when_folding_is_on(tmp_path: Path) -> None:
    """Adapter.evaluate folds the uncovered classes of the label only for an adapter built with fold_uncovered (as
    `asfda evaluate` builds it); simulate's adapters (no folding) score the missing organ as before (Dice 0: in the
    label, never predicted)."""
    from asfda.adapter import Adapter
    from asfda.io import load_dataset
    from asfda.models import load_model

    ds = load_dataset(write_nnunet(tmp_path / "ds", n=2), require_labels=True)
    model = load_model(write_bundle(tmp_path / "liver", class_names=("background", "liver")))
    folded = Adapter(model, ds.class_names, progress=False, fold_uncovered=True).evaluate(list(ds.cases), hd95=True)
    plain = Adapter(model, ds.class_names, progress=False).evaluate(list(ds.cases))
    for f, p in zip(folded, plain):
        assert math.isnan(f["dice_spleen"]) and math.isnan(f["lcc_dice_spleen"])
        assert f["dice_mean"] == f["dice_liver"] and math.isnan(f["hd95_mm_spleen"])
        assert p["dice_spleen"] == 0.0 and p["dice_mean"] == pytest.approx(p["dice_liver"] / 2)
