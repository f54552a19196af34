"""benchmarks/cv.py: folds cover every volume once, per-fold datasets are symlinks, and a tiny phantom run
summarises every test volume once and resumes without recomputing."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import cv  # noqa: E402
from conftest import write_nnunet  # noqa: E402


def test_fold_assignment_covers_every_id_once_and_is_deterministic() -> None:
    ids = [f"chaos_{i:03d}" for i in range(14)]
    folds = cv.fold_assignment(ids, 7, seed=0)
    assert len(folds) == 7 and all(len(f) == 2 for f in folds)
    flat = [i for f in folds for i in f]
    assert sorted(flat) == sorted(ids) and len(flat) == len(set(flat))
    assert folds == cv.fold_assignment(list(reversed(ids)), 7, seed=0)  # order of the input does not matter
    assert folds != cv.fold_assignment(ids, 7, seed=1)
    six = cv.fold_assignment([f"btcv{i:02d}" for i in range(24)], 6, seed=0)
    assert [len(f) for f in six] == [4] * 6
    uneven = cv.fold_assignment(ids, 4, seed=0)
    assert sorted(len(f) for f in uneven) == [3, 3, 4, 4] and sorted(i for f in uneven for i in f) == sorted(ids)
    with pytest.raises(ValueError):
        cv.fold_assignment(ids, 15)
    with pytest.raises(ValueError):
        cv.fold_assignment(["a", "a", "b"], 2)


def test_fold_datasets_are_symlinks_with_adjusted_dataset_json(tmp_path: Path) -> None:
    from asfda.io import load_dataset

    data = write_nnunet(tmp_path / "src", n=5)
    assignment = cv.fold_assignment([f"case{i:02d}" for i in range(5)], 2, seed=0)
    root = cv.fold_datasets_root(tmp_path / "cache", data, 2, 0)
    assert root == tmp_path / "cache" / "cv" / "src" / "2folds_seed0"
    dirs = cv.make_fold_datasets(data, assignment, root)
    assert set(dirs) == {0, 1}
    for k, (pool, test) in dirs.items():
        assert (pool, test) == (root / f"fold{k}" / "pool", root / f"fold{k}" / "test")
        for folder, ids in ((test, assignment[k]), (pool, assignment[1 - k])):
            meta = json.loads((folder / "dataset.json").read_text())
            src_meta = json.loads((data / "dataset.json").read_text())
            assert meta == {**src_meta, "numTraining": len(ids), "asfda_linked_from": str(data.resolve())}
            images = sorted(p.name for p in (folder / "imagesTr").iterdir())
            labels = sorted(p.name for p in (folder / "labelsTr").iterdir())
            assert images == [f"{i}_0000.nii.gz" for i in ids] and labels == [f"{i}.nii.gz" for i in ids]
            for i in ids:
                img, lab = folder / "imagesTr" / f"{i}_0000.nii.gz", folder / "labelsTr" / f"{i}.nii.gz"
                assert img.is_symlink() and lab.is_symlink()
                assert Path(os.readlink(img)) == (data / "imagesTr" / f"{i}_0000.nii.gz").resolve()
                assert Path(os.readlink(lab)) == (data / "labelsTr" / f"{i}.nii.gz").resolve()
            ds = load_dataset(folder, require_labels=True)
            assert sorted(ds.by_id()) == ids
    # idempotent: a second build changes nothing (same links, same dataset.json file)
    link = dirs[0][1] / "imagesTr" / f"{assignment[0][0]}_0000.nii.gz"
    stamps = (link.lstat().st_mtime_ns, (dirs[0][1] / "dataset.json").stat().st_mtime_ns)
    cv.make_fold_datasets(data, assignment, root)
    assert (link.lstat().st_mtime_ns, (dirs[0][1] / "dataset.json").stat().st_mtime_ns) == stamps
    # another assignment in the same folder is corrected in place (stale links removed)
    other = cv.fold_assignment([f"case{i:02d}" for i in range(5)], 2, seed=3)
    assert other != assignment
    cv.make_fold_datasets(data, other, root, folds=[0])
    assert sorted(load_dataset(root / "fold0" / "test").by_id()) == other[0]
    assert sorted(load_dataset(root / "fold0" / "pool").by_id()) == other[1]
    with pytest.raises(ValueError):
        cv.make_fold_datasets(data, [assignment[0]], root)  # does not cover the dataset


def test_tiny_cross_validation_summarises_every_volume_once_and_resumes(tmp_path: Path, tiny_bundle: Path,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    data = write_nnunet(tmp_path / "ds", n=6)
    ids = [f"case{i:02d}" for i in range(6)]
    assignment = cv.fold_assignment(ids, 3, seed=0)
    dirs = cv.make_fold_datasets(data, assignment, cv.fold_datasets_root(tmp_path / "cache", data, 3, 0))
    out = tmp_path / "out"
    opts = dict(strategies=["random"], seeds=[0], rounds=1, steps=2, precision="fp32", upper_bound=False,
                cache_dir=tmp_path / "cache", progress=False, report=False, machine_line="test machine",
                commit="abc1234")
    sum_opts = dict(strategies=["random"], seeds=[0], rounds=1, upper_bound=False, command="test",
                    machine_line="test machine", commit="abc1234", plot=False)

    # fold 1 only: a partial summary lists what the other folds lack
    cv.run_fold(1, tiny_bundle, *dirs[1], out / "fold1", **opts)
    part = cv.summarize(out, assignment, **sum_opts)
    assert part["complete"] is False
    assert sorted(part["missing"]) == sorted([f"fold{k} zero_shot seed0" for k in (0, 2)]
                                             + [f"fold{k} random seed0 n=1" for k in (0, 2)])
    assert sorted(part["per_fold"]["1"]["test"]) == assignment[1]
    assert part["per_fold"]["1"]["strategies"]["random"]["auc"] is not None
    assert part["per_fold"]["0"]["strategies"]["random"]["auc"] is None

    for k in (0, 2):
        cv.run_fold(k, tiny_bundle, *dirs[k], out / f"fold{k}", **opts)
    summary = cv.summarize(out, assignment, **{**sum_opts, "plot": True})
    assert summary["complete"] is True and summary["missing"] == []
    assert sorted(summary["per_volume"]) == ids  # every test volume once
    assert summary["folds"] == 3 and summary["seeds"] == [0] and summary["upper_bound"] is None
    assert set(summary) == {"folds", "seeds", "zero_shot", "upper_bound", "strategies", "per_fold", "per_volume",
                            "complete", "missing", "machine", "commit", "command", "date", "metric"}
    lcc = cv.summarize(out, assignment, **{**sum_opts, "plot": False, "metric": "lcc_dice_mean"})
    assert (out / "summary.lcc_dice_mean.json").is_file() and lcc["metric"] == "lcc_dice_mean"
    rnd = summary["strategies"]["random"]
    assert set(rnd["dice_by_n"]) == {"0", "1"} and set(rnd["dice_by_n_per_seed"]) == {"0"}
    # n=1: the mean over all 6 test volumes of what each fold's state.json holds for its own test volumes
    per_case, per_case_lcc = {}, {}
    for k in range(3):
        state = json.loads((out / f"fold{k}" / "random" / "seed0" / "state.json").read_text())
        (rec,) = state["rounds"]
        assert rec["n_labelled"] == 1 and sorted(pc["case_id"] for pc in rec["per_case"]) == assignment[k]
        per_case.update({pc["case_id"]: pc["dice_mean"] for pc in rec["per_case"]})
        per_case_lcc.update({pc["case_id"]: pc["lcc_dice_mean"] for pc in rec["per_case"]})
    assert {c: v["random"]["1"] for c, v in lcc["per_volume"].items()} == pytest.approx(per_case_lcc)
    assert rnd["dice_by_n"]["1"] == pytest.approx(sum(per_case.values()) / 6)
    assert {c: v["random"]["1"] for c, v in summary["per_volume"].items()} == pytest.approx(per_case)
    assert rnd["dice_by_n"]["0"] == pytest.approx(summary["zero_shot"])
    assert rnd["auc"] == pytest.approx((rnd["dice_by_n"]["0"] + rnd["dice_by_n"]["1"]) / 2)
    assert "cpu" in summary["per_fold"]["0"]["provenance"]["random"]
    assert "test machine" in summary["per_fold"]["0"]["provenance"]["random"]
    on_disk = json.loads((out / "summary.json").read_text())
    assert on_disk["per_volume"].keys() == summary["per_volume"].keys() and on_disk["complete"] is True
    readme = (out / "README.md").read_text()
    assert all(i in readme for i in ids) and "Nothing: every fold" in readme
    assert (out / "learning_curve.png").stat().st_size > 1000

    # a second invocation resumes: no round is trained again, the per-round files stay as they were
    from asfda.adapter import Adapter

    def no_training(*a, **k):
        raise AssertionError("a finished round was recomputed")

    monkeypatch.setattr(Adapter, "train_round", no_training)
    monkeypatch.setattr(Adapter, "finetune", no_training)
    states = [out / f"fold{k}" / "random" / "seed0" / "state.json" for k in range(3)]
    mtimes = [p.stat().st_mtime_ns for p in states]
    for k in range(3):
        cv.run_fold(k, tiny_bundle, *dirs[k], out / f"fold{k}", **opts)
    assert [p.stat().st_mtime_ns for p in states] == mtimes
    again = cv.summarize(out, assignment, **sum_opts)
    assert again["strategies"] == summary["strategies"] and again["per_volume"] == summary["per_volume"]
    log = json.loads((out / "fold0" / cv.PROVENANCE).read_text())["entries"]
    assert [e["computed"] for e in log] == [["random/seed0/n=1", "zero_shot/seed0"]]  # the resume computed nothing


def test_main_summarize_only_reads_disk_and_refuses_other_folds(tmp_path: Path) -> None:
    data = write_nnunet(tmp_path / "ds", n=4)
    out = tmp_path / "out"
    args = ["--data", str(data), "--folds", "2", "--strategies", "random", "--seeds", "0", "--rounds", "1",
            "--no-upper-bound", "--out", str(out)]
    # nothing on disk yet: a partial summary, everything missing
    summary = cv.main([*args, "--summarize-only"])
    assert summary["complete"] is False and len(summary["missing"]) == 4 and len(summary["per_volume"]) == 4
    assert summary["strategies"]["random"]["auc"] is None
    (out / cv.FOLDS_FILE).write_text(json.dumps({"folds": 2, "fold_seed": 5, "assignment": [["case00"], ["x"]]}))
    with pytest.raises(SystemExit):
        cv.main([*args, "--summarize-only"])


def _row(case: str, dice: dict[str, float], lcc: dict[str, float]) -> dict:
    return {"case_id": case, "dice_mean": sum(dice.values()) / len(dice), **{f"dice_{c}": v for c, v in dice.items()},
            "lcc_dice_mean": sum(lcc.values()) / len(lcc), **{f"lcc_dice_{c}": v for c, v in lcc.items()}}


def test_postprocessing_is_chosen_per_class_by_the_cross_validation(tmp_path: Path) -> None:
    # liver: the largest component helps on average (0.8, 0.6 -> 0.9, 0.6); spleen: it hurts (0.7, 0.5 -> 0.4, 0.5)
    rows = [_row("a", {"liver": 0.8, "spleen": 0.7}, {"liver": 0.9, "spleen": 0.4}),
            _row("b", {"liver": 0.6, "spleen": 0.5}, {"liver": 0.6, "spleen": 0.5})]
    for k, row in enumerate(rows):
        run = tmp_path / f"fold{k}" / "random" / "seed0"
        run.mkdir(parents=True)
        (run / "state.json").write_text(json.dumps({"rounds": [{"n_labelled": 1, "round": 0, "per_case": [row]}]}))
    choice = cv.choose_postprocessing(tmp_path, 2, ["random", "asfda"], [0])
    assert choice["classes"] == ["liver"]
    assert choice["per_class"]["liver"] == pytest.approx({"dice": 0.7, "lcc_dice": 0.75, "predictions": 2})
    assert choice["per_class"]["spleen"] == pytest.approx({"dice": 0.6, "lcc_dice": 0.45, "predictions": 2})
    assert choice["predict"] == "asfda predict --largest-component liver"
    # the case Dice with the choice: liver cut, spleen as predicted
    assert cv._case_dice(rows[0], "pp_dice_mean", choice["classes"]) == pytest.approx((0.9 + 0.7) / 2)
    assert cv._case_dice(rows[0], "lcc_dice_mean") == pytest.approx((0.9 + 0.4) / 2)
    assert cv._case_dice(rows[0], "pp_dice_mean", []) == pytest.approx(rows[0]["dice_mean"])
    nan_row = {**rows[1], "dice_spleen": float("nan")}
    assert cv._case_dice(nan_row, "pp_dice_mean", ["liver"]) == pytest.approx(0.6)  # NaN classes left out
