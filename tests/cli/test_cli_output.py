"""Issue 36: the library returns records and the command line prints them. evaluate, predict, score and query print
nothing themselves; `asfda` prints the same text as before from what they return, and `asfda evaluate`'s Dice is
`Adapter.evaluate`'s."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest

from asfda.cli import main
from conftest import TINY_NET, write_bundle, write_nnunet

N_CASES = 4


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("cli_output")
    return {"data": write_nnunet(root / "ds", n=N_CASES), "model": write_bundle(root / "bundle"),
            "nodrop": write_bundle(root / "nodrop", net=dict(TINY_NET, dropout=0.0)),
            "cold": write_bundle(root / "cold", class_names=("background", "kidney", "heart"))}


def _run(capsys: pytest.CaptureFixture, *argv: str) -> list[str]:
    capsys.readouterr()
    assert main([*argv, "--no-progress"]) == 0
    return capsys.readouterr().out.splitlines()


def test_evaluate_prints_its_table_and_its_dice_is_adapter_evaluates(tiny: dict, tmp_path: Path,
                                                                      capsys: pytest.CaptureFixture) -> None:
    from asfda.adapter import Adapter
    from asfda.io import load_dataset
    from asfda.models import load_model

    out = tmp_path / "ev"
    printed = _run(capsys, "evaluate", "--model", str(tiny["model"]), "--data", str(tiny["data"]), "--out", str(out))
    mean = json.loads((out / "summary.json").read_text())["mean"]
    table = [f"| {n} | {mean[f'dice_{n}']:.3f} | {mean[f'hd95_mm_{n}']:.1f} |" for n in ("liver", "spleen")]
    assert printed == ["| class | Dice | HD95 (mm) |", "|---|---|---|", *table,
                       f"| mean | {mean['dice_mean']:.3f} | |",
                       f"per case: {out / 'per_case.csv'}; summary: {out / 'summary.json'}"]
    with open(out / "per_case.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    ds = load_dataset(tiny["data"], require_labels=True)
    reference = Adapter(load_model(tiny["model"]), ds.class_names, cache_dir=None, progress=False).evaluate(
        list(ds.cases))
    assert [r["case_id"] for r in rows] == [r["case_id"] for r in reference] == [c.case_id for c in ds.cases]
    for key in ("dice_liver", "dice_spleen", "dice_mean"):
        np.testing.assert_array_equal([float(r[key]) for r in rows], [r[key] for r in reference], err_msg=key)


def test_the_library_functions_print_nothing(tiny: dict, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from asfda.evaluate import evaluate_model
    from asfda.predict import predict_model
    from asfda.query import query_dataset, score_dataset

    capsys.readouterr()
    result = evaluate_model(tiny["model"], tiny["data"], tmp_path / "ev", cache_dir=None, progress=False)
    assert result.class_names == ["liver", "spleen"] and len(result.rows) == N_CASES
    assert result.record == json.loads(result.summary.read_text())
    assert predict_model(tiny["model"], tiny["data"], tmp_path / "pr", progress=False)["written"]
    assert score_dataset(tiny["nodrop"], tiny["data"], tmp_path / "s.csv", cache_dir=None, progress=False)
    run = query_dataset(tiny["cold"], tiny["data"], "random", 1, tmp_path / "q.json", cache_dir=None,
                        progress=False)
    assert run is not None
    assert run.record == json.loads((tmp_path / "q.json").read_text()) and run.record["cold_start"]
    assert capsys.readouterr().out == ""


def test_predict_prints_what_it_wrote_and_skipped(tiny: dict, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "pr"
    argv = ("predict", "--model", str(tiny["model"]), "--data", str(tiny["data"]), "--out", str(out))
    where = f"label maps in {out} (values named in {out / 'labels.json'})"
    assert _run(capsys, *argv) == [f"predict: {N_CASES} cases segmented; {where}"]
    weights = json.loads((out / "case00.asfda.json").read_text())["settings"]["model_weights_sha256_16"]
    assert _run(capsys, *argv) == [f"predict: 0 cases segmented, {N_CASES} skipped (outputs already up to date for "
                                   f"weights {weights} and these settings); {where}"]


def test_score_prints_its_files_and_the_strategies_it_skipped(tiny: dict, tmp_path: Path,
                                                              capsys: pytest.CaptureFixture,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "s.csv"
    printed = _run(capsys, "score", "--model", str(tiny["nodrop"]), "--data", str(tiny["data"]), "--out", str(out),
                   "--temperature", "1.5")
    meta = json.loads((tmp_path / "s.json").read_text())
    assert meta["skipped_strategies"] == ["bald", "mc_entropy"]
    assert printed == [
        "note: the network has no dropout, so ['bald', 'mc_entropy'] were skipped (use 'tta' for a stochastic-free "
        "uncertainty)",
        f"scored {N_CASES} cases for {meta['strategies']} ({meta['scoring']['forward_passes_per_volume']} forward "
        f"passes per volume, T=1.5); per case: {out}; embeddings: {tmp_path / 's.embeddings.npy'}; "
        f"how: {tmp_path / 's.json'}"]


def _query_lines(rec: dict) -> list[str]:
    """query.json's picks as `asfda query` lists them."""
    n = len(rec["ids"])
    lines = [f"{rec['strategy']}: {n} {'case' if n == 1 else 'cases'} to annotate next"]
    for rank, (cid, score) in enumerate(zip(rec["ids"], rec["scores"]), 1):
        comps = ", ".join(f"{k}={v:.4g}" for k, v in rec["components"].get(cid, {}).items())
        lines.append(f"{rank:3d}. {cid}  score={score:.4g}" + (f"  ({comps})" if comps else ""))
    return lines


def test_query_prints_its_picks_the_temperature_and_a_cold_start(tiny: dict, tmp_path: Path,
                                                                 capsys: pytest.CaptureFixture,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "q.json"
    printed = _run(capsys, "query", "--model", str(tiny["model"]), "--data", str(tiny["data"]), "--budget", "2",
                   "--out", str(out))
    rec = json.loads(out.read_text())
    assert rec["components"] and printed == [
        *_query_lines(rec), f"T=1 (default (nothing labelled with label files)); pool {N_CASES}, labelled 0; "
        f"written: {out}"]
    printed = _run(capsys, "query", "--model", str(tiny["cold"]), "--data", str(tiny["data"]), "--budget", "1",
                   "--strategy", "random", "--labelled", str(out), "--out", "q2.json")
    rec = json.loads((tmp_path / "q2.json").read_text())
    assert printed == [
        "note: cold start: no model class ['background', 'kidney', 'heart'] matches a dataset label ['liver', "
        "'spleen'], so every one gets a new output channel and the 'random' pick reads the model's embeddings alone "
        "(fine-tuning such a model is not yet supported from the CLI: `init` and `simulate` need at least one "
        "matching class)",
        *_query_lines(rec), f"T=1 (unused (the strategy reads no scores)); pool {N_CASES - 2}, labelled 2; "
        "written: q2.json"]
