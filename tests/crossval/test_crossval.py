"""asfda crossval: folds cover every volume once, fold datasets are symlinks, the statistics on hand-made numbers,
and a 2-fold run on tiny volumes through the CLI (split over two processes, merged, resumed)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from asfda.cli import main
from asfda.crossval import (
    bootstrap_mean,
    curve_auc,
    fold_assignment,
    fold_datasets_root,
    make_fold_datasets,
    paired_difference,
    plan_seeds,
)
from asfda.crossval.read import case_dice, choose_postprocessing
from asfda.crossval.summary import first_picks
from asfda.results import summarise
from conftest import write_nnunet


def test_fold_assignment_covers_every_id_once_and_is_deterministic() -> None:
    ids = [f"chaos_{i:03d}" for i in range(14)]
    folds = fold_assignment(ids, 7, seed=0)
    assert len(folds) == 7 and all(len(f) == 2 for f in folds)
    flat = [i for f in folds for i in f]
    assert sorted(flat) == sorted(ids) and len(flat) == len(set(flat))
    assert folds == fold_assignment(list(reversed(ids)), 7, seed=0)  # order of the input does not matter
    assert folds != fold_assignment(ids, 7, seed=1)
    assert [len(f) for f in fold_assignment([f"btcv{i:02d}" for i in range(24)], 6, seed=0)] == [4] * 6
    uneven = fold_assignment(ids, 4, seed=0)
    assert sorted(len(f) for f in uneven) == [3, 3, 4, 4] and sorted(i for f in uneven for i in f) == sorted(ids)
    with pytest.raises(ValueError):
        fold_assignment(ids, 15)
    with pytest.raises(ValueError):
        fold_assignment(["a", "a", "b"], 2)


def test_fold_datasets_are_symlinks_with_adjusted_dataset_json(tmp_path: Path) -> None:
    from asfda.io import load_dataset

    data = write_nnunet(tmp_path / "src", n=5)
    assignment = fold_assignment([f"case{i:02d}" for i in range(5)], 2, seed=0)
    root = fold_datasets_root(tmp_path / "cache", data, 2, 0)
    assert root == tmp_path / "cache" / "cv" / "src" / "2folds_seed0"
    dirs = make_fold_datasets(data, assignment, root)
    assert set(dirs) == {0, 1}
    src_meta = json.loads((data / "dataset.json").read_text())
    for k, (pool, test) in dirs.items():
        assert (pool, test) == (root / f"fold{k}" / "pool", root / f"fold{k}" / "test")
        for folder, ids in ((test, assignment[k]), (pool, assignment[1 - k])):
            meta = json.loads((folder / "dataset.json").read_text())
            assert meta == {**src_meta, "numTraining": len(ids), "asfda_linked_from": str(data.resolve())}
            assert sorted(p.name for p in (folder / "imagesTr").iterdir()) == [f"{i}_0000.nii.gz" for i in ids]
            assert sorted(p.name for p in (folder / "labelsTr").iterdir()) == [f"{i}.nii.gz" for i in ids]
            for i in ids:
                img, lab = folder / "imagesTr" / f"{i}_0000.nii.gz", folder / "labelsTr" / f"{i}.nii.gz"
                assert Path(os.readlink(img)) == (data / "imagesTr" / f"{i}_0000.nii.gz").resolve()
                assert Path(os.readlink(lab)) == (data / "labelsTr" / f"{i}.nii.gz").resolve()
            assert sorted(load_dataset(folder, require_labels=True).by_id()) == ids
    # idempotent: a second build changes nothing (same links, same dataset.json file)
    link = dirs[0][1] / "imagesTr" / f"{assignment[0][0]}_0000.nii.gz"
    stamps = (link.lstat().st_mtime_ns, (dirs[0][1] / "dataset.json").stat().st_mtime_ns)
    make_fold_datasets(data, assignment, root)
    assert (link.lstat().st_mtime_ns, (dirs[0][1] / "dataset.json").stat().st_mtime_ns) == stamps
    # another assignment in the same folder is corrected in place (stale links removed)
    other = fold_assignment([f"case{i:02d}" for i in range(5)], 2, seed=3)
    assert other != assignment
    make_fold_datasets(data, other, root, folds=[0])
    assert sorted(load_dataset(root / "fold0" / "test").by_id()) == other[0]
    assert sorted(load_dataset(root / "fold0" / "pool").by_id()) == other[1]
    with pytest.raises(ValueError):
        make_fold_datasets(data, [assignment[0]], root)  # does not cover the dataset


# ------------------------------------------------------------------------------------------ statistics
def test_auc_is_the_normalised_trapezoid_and_the_one_simulate_reports() -> None:
    curve = {"0": 0.3, "1": 0.6, "2": 0.8}
    assert curve_auc(curve) == pytest.approx(((0.3 + 0.6) / 2 + (0.6 + 0.8) / 2) / 2)  # 0.575, not the mean 0.567
    assert curve_auc({0: 0.5, 2: 0.5, 4: 0.5}) == pytest.approx(0.5)
    assert curve_auc({0: 0.3, 1: None}) is None and curve_auc({0: 0.3, 1: float("nan")}) is None
    rows = [{"strategy": "x", "seed": 0, "n_labelled": n, "dice_mean": d} for n, d in enumerate([0.3, 0.6, 0.8])]
    assert summarise(rows)["x"]["auc"] == pytest.approx(curve_auc(curve))  # asfda simulate's AUC: the same


def test_paired_bootstrap_interval_on_hand_made_numbers() -> None:
    strategy = {"v1": 0.8, "v2": 0.6, "v3": 0.7, "v5": float("nan")}
    rnd = {"v1": 0.7, "v2": 0.6, "v3": 0.5, "v4": 0.9, "v5": 0.4}
    # paired per volume: differences 0.1, 0.0, 0.2 (v4 and v5 have no pair); a resample's mean is (sum of 3 draws
    # from {0, 1, 2}) / 30: P(0) = P(0.2) = 1/27 > 2.5%, so the 95% percentile interval is [0.0, 0.2]
    d = paired_difference(strategy, rnd)
    assert d is not None and d["n"] == 3 and d["mean"] == pytest.approx(0.1)
    assert d["ci95"] == pytest.approx([0.0, 0.2])
    assert paired_difference(strategy, rnd) == d  # seeded
    same = paired_difference({"a": 0.9, "b": 0.7}, {"a": 0.8, "b": 0.6})
    assert same is not None and same["ci95"] == pytest.approx([0.1, 0.1])
    assert paired_difference({"a": 0.9}, {"b": 0.8}) is None
    # 100 volumes 0.00..0.99: mean 0.495, standard error 0.2887 / 10; the interval is mean +- 1.96 SE within noise
    big = bootstrap_mean([i / 100 for i in range(100)])
    assert big is not None and big["mean"] == pytest.approx(0.495)
    assert big["ci95"] == pytest.approx([0.495 - 1.96 * 0.02887, 0.495 + 1.96 * 0.02887], abs=0.006)
    assert bootstrap_mean([i / 100 for i in range(100)], seed=1) != big


def test_random_gets_at_least_three_seeds() -> None:
    assert plan_seeds(["asfda"], [0, 1]) == {"asfda": [0, 1], "random": [0, 1, 2]}
    assert plan_seeds(["asfda", "random"], [5]) == {"asfda": [5], "random": [5, 6, 7]}
    assert plan_seeds(["asfda", "random"], [0], random_seeds=[4]) == {"asfda": [0], "random": [4]}


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
    choice = choose_postprocessing(tmp_path, 2, {"random": [0], "asfda": [0]})
    assert choice["classes"] == ["liver"]
    assert choice["per_class"]["liver"] == pytest.approx({"dice": 0.7, "lcc_dice": 0.75, "predictions": 2})
    assert choice["per_class"]["spleen"] == pytest.approx({"dice": 0.6, "lcc_dice": 0.45, "predictions": 2})
    assert choice["predict"] == "asfda predict --largest-component liver"
    # the case Dice with the choice: liver cut, spleen as predicted
    assert case_dice(rows[0], "pp_dice_mean", choice["classes"]) == pytest.approx((0.9 + 0.7) / 2)
    assert case_dice(rows[0], "lcc_dice_mean") == pytest.approx((0.9 + 0.4) / 2)
    assert case_dice(rows[0], "pp_dice_mean", []) == pytest.approx(rows[0]["dice_mean"])
    nan_row = {**rows[1], "dice_spleen": float("nan")}
    assert case_dice(nan_row, "pp_dice_mean", ["liver"]) == pytest.approx(0.6)  # NaN classes left out


# ------------------------------------------------------------------------------------------ a tiny run
def _state_dice(fold: Path, name: str, seed: int) -> dict[str, float]:
    (rec,) = json.loads((fold / name / f"seed{seed}" / "state.json").read_text())["rounds"]
    return {pc["case_id"]: pc["dice_mean"] for pc in rec["per_case"]}


def test_two_fold_crossval_split_over_two_processes_merges_and_resumes(tmp_path: Path, tiny_bundle: Path,
                                                                       monkeypatch: pytest.MonkeyPatch,
                                                                       capsys: pytest.CaptureFixture) -> None:
    data = write_nnunet(tmp_path / "ds", n=4)
    ids = [f"case{i:02d}" for i in range(4)]
    utility = tmp_path / "utility.json"
    utility.write_text(json.dumps({"utility": {"case00": 0.3, "case01": 0.1, "case02": 0.2, "case03": float("nan")}}))
    here, there = tmp_path / "here", tmp_path / "there"
    args = ["crossval", "--model", str(tiny_bundle), "--data", str(data), "--folds", "2", "--strategies", "asfda",
            "--seeds", "0,1", "--budget", "1", "--rounds", "1", "--steps", "2", "--upper-bound-steps", "2",
            "--set", "train.batch_size=1", "--set", "train.guard_volumes=1", "--cache-dir", str(tmp_path / "cache"),
            "--utility", str(utility), "--no-progress", "--device", "cpu"]
    assert main([*args, "--out", str(here), "--only-folds", "0"]) == 0
    part = json.loads((here / "summary.json").read_text())
    assert part["complete"] is False and any(m.startswith("fold1 ") for m in part["missing"])
    assert not any(m.startswith("fold0 ") for m in part["missing"])
    assert main([*args, "--out", str(there), "--only-folds", "1"]) == 0  # "another machine"
    shutil.copytree(there / "fold1", here / "fold1")
    assert main([*args, "--out", str(here), "--summarize-only"]) == 0
    out = capsys.readouterr().out
    assert "| asfda | 0,1 |" in out and "strategy - random" in out

    s = json.loads((here / "summary.json").read_text())
    assert {"folds", "seeds", "zero_shot", "upper_bound", "complete", "strategies", "oracle_1", "per_volume",
            "machine", "commit", "command", "date"} <= set(s)
    assert s["complete"] is True and s["missing"] == [] and s["folds"] == 2
    # random on 3 seeds by default; the upper bound on the first seed, in a call of its own
    assert s["seeds"] == {"asfda": [0, 1], "random": [0, 1, 2]} and s["upper_bound_seeds"] == [0]
    assert sorted(p.name for p in here.glob("fold*/upper_bound/*.json")) == ["seed0.json"] * 2
    assert sorted(s["per_volume"]) == ids and s["upper_bound"] is not None  # every test volume once
    assert json.loads((here / "folds.json").read_text())["assignment"] == fold_assignment(ids, 2, 0)
    asfda, rnd = s["strategies"]["asfda"], s["strategies"]["random"]
    assert set(asfda["dice_by_n"]) == {"0", "1"} and rnd["diff_vs_random"] is None
    assert asfda["auc"] == pytest.approx((asfda["dice_by_n"]["0"] + asfda["dice_by_n"]["1"]) / 2)
    # the paired difference, recomputed from the per-round files: per volume asfda's seed mean minus random's
    mine: dict[str, float] = {}
    theirs: dict[str, float] = {}
    for k in range(2):
        fold = here / f"fold{k}"
        for name, seeds, means in (("asfda", (0, 1), mine), ("random", (0, 1, 2), theirs)):
            per_seed = [_state_dice(fold, name, seed) for seed in seeds]
            means.update({c: sum(d[c] for d in per_seed) / len(seeds) for c in per_seed[0]})
    diff = asfda["diff_vs_random"]["1"]
    assert diff["mean"] == pytest.approx(sum(mine[c] - theirs[c] for c in ids) / 4)
    assert diff["ci95"][0] <= diff["mean"] <= diff["ci95"][1]
    assert rnd["dice_by_n"]["1"] == pytest.approx(sum(theirs.values()) / 4)
    assert {c: v["random"]["1"] for c, v in s["per_volume"].items()} == pytest.approx(theirs)
    assert s["oracle_1"]["best"] == pytest.approx(0.3) and s["oracle_1"]["best_volume"] == "case00"
    assert s["oracle_1"]["expected_random"] == pytest.approx(0.2)
    # each run's first pick against the table (case03 has no utility: runs that picked it are left out)
    util = {"case00": 0.3, "case01": 0.1, "case02": 0.2}
    for name, fp in s["first_picks"].items():
        for r in fp["runs"]:
            state = json.loads((here / f"fold{r['fold']}" / name / f"seed{r['seed']}" / "state.json").read_text())
            assert r["pick"] == state["rounds"][0]["queried"][0] and r["utility"] == pytest.approx(util[r["pick"]])
        assert fp["below_zero"] == 0 and fp["at_or_above_median"] == sum(r["utility"] >= r["pool_median"]
                                                                         for r in fp["runs"])
    assert set(s["largest_component"]) >= {"classes", "strategies"}
    readme = (here / "README.md").read_text()
    assert all(i in readme for i in ids) and "Nothing: every fold" in readme and "bootstrap" in readme
    html = (here / "report.html").read_text()
    assert "data:image/png;base64" in html and all(i in html for i in ids)

    # the same command again resumes: nothing is trained, the per-round files stay as they were
    from asfda.adapter import Adapter

    def no_training(*a, **k):
        raise AssertionError("a finished round was recomputed")

    monkeypatch.setattr(Adapter, "train_round", no_training)
    monkeypatch.setattr(Adapter, "finetune", no_training)
    states = sorted(here.glob("fold*/*/seed*/state.json"))
    mtimes = [p.stat().st_mtime_ns for p in states]
    assert len(states) == 10 and main([*args, "--out", str(here)]) == 0
    assert [p.stat().st_mtime_ns for p in states] == mtimes
    again = json.loads((here / "summary.json").read_text())
    assert again["strategies"] == s["strategies"] and again["per_volume"] == s["per_volume"]
    # another fold assignment in the same folder is refused
    assert main([*args, "--out", str(here), "--fold-seed", "1", "--summarize-only"]) == 2


def test_crossval_refuses_an_output_inside_the_dataset_before_writing(tmp_path: Path, tiny_bundle: Path) -> None:
    from asfda.cli import main

    data = write_nnunet(tmp_path / "ds", n=4)
    before = sorted(p.name for p in data.rglob("*"))
    assert main(["crossval", "--model", str(tiny_bundle), "--data", str(data), "--folds", "2",
                 "--out", str(data / "cv")]) == 2
    assert sorted(p.name for p in data.rglob("*")) == before


def test_first_picks_rank_each_runs_first_label_in_its_folds_pool(tmp_path: Path) -> None:
    utility = tmp_path / "utility.json"
    utility.write_text(json.dumps({"utility": {"a": 0.4, "b": -0.1, "c": 0.2, "d": 0.3}}))
    assignment = [["a"], ["b"], ["c", "d"]]
    for k, name, seed, pick in ((0, "asfda", 0, "b"), (1, "asfda", 0, "a"), (2, "asfda", 0, "a"),
                                (0, "random", 0, "c")):
        state = tmp_path / f"fold{k}" / name / f"seed{seed}" / "state.json"
        state.parent.mkdir(parents=True)
        state.write_text(json.dumps({"rounds": [{"round": 0, "queried": [pick]}, {"round": 1, "queried": ["x"]}]}))
    fp = first_picks(tmp_path, assignment, {"asfda": [0], "random": [0, 1]}, utility)
    assert fp is not None
    runs = fp["asfda"]["runs"]
    assert [(r["fold"], r["pick"], r["rank"], r["pool"]) for r in runs] == [(0, "b", 3, 3), (1, "a", 1, 3),
                                                                              (2, "a", 1, 2)]
    assert runs[0]["pool_median"] == pytest.approx(0.2) and runs[2]["pool_median"] == pytest.approx(0.15)
    assert fp["asfda"]["below_zero"] == 1 and fp["asfda"]["at_or_above_median"] == 2
    assert len(fp["random"]["runs"]) == 1 and fp["random"]["at_or_above_median"] == 1  # c: 0.2, the median of b c d
    assert first_picks(tmp_path, assignment, {"asfda": [0]}, None) is None


def test_zero_shot_is_averaged_over_the_same_volumes_for_every_seed() -> None:
    """A partial run: seed 0's zero-shot exists for all three volumes, seed 1's for one fold only. The pretrained
    model's Dice does not depend on the seed, so seed 1 counts the missing volumes at their seed-0 value (before,
    seed 1's mean was over its one fold and dragged the summary's zero-shot to 0.35)."""
    from asfda.crossval.summary import zero_shot_by_seed

    vols = {"a": {"zero": {0: 0.2, 1: 0.2}}, "b": {"zero": {0: 0.5}}, "c": {"zero": {0: 0.5}}, "d": {"zero": {}}}
    assert zero_shot_by_seed(vols, [0, 1]) == {0: pytest.approx(0.4), 1: pytest.approx(0.4)}
    assert zero_shot_by_seed({}, [0]) == {0: None}


def test_a_partial_seed_does_not_bias_the_curve_towards_its_folds() -> None:
    """Random seed 0 ran both folds, seed 1 only the fold of the easy volume a. The curve is the mean over volumes
    of each volume's mean over seeds (a: 0.9, b: 0.5 -> 0.7), not the mean of the seeds' means ((0.7 + 0.9) / 2 =
    0.8, which counts a three times and b once); once both seeds cover both volumes the two are the same."""
    from asfda.crossval.summary import _strategy, _volume_curves

    def vols(b_seed1: float | None) -> dict:
        b_runs = {0: 0.5} if b_seed1 is None else {0: 0.5, 1: b_seed1}
        return {"a": {"zero": {0: 0.3}, "runs": {"random": {1: {0: 0.9, 1: 0.9}}}},
                "b": {"zero": {0: 0.3}, "runs": {"random": {1: b_runs}}}}

    seeds = {"random": [0, 1]}
    partial = vols(None)
    got = _strategy("random", seeds, partial, [1], _volume_curves(partial, seeds, [1]), {0: 0.3, 1: 0.3}, 100, 0)
    assert got["dice_by_n"][1] == pytest.approx(0.7)
    assert got["dice_by_n_per_seed"][1][1] == pytest.approx(0.9)  # seed 1 alone: its one volume
    full = vols(0.7)
    got = _strategy("random", seeds, full, [1], _volume_curves(full, seeds, [1]), {0: 0.3, 1: 0.3}, 100, 0)
    per_seed = got["dice_by_n_per_seed"]
    assert got["dice_by_n"][1] == pytest.approx((per_seed[0][1] + per_seed[1][1]) / 2) == pytest.approx(0.75)


def test_upper_bound_only_adds_the_upper_bound_to_a_run_made_without_it(tmp_path: Path, tiny_bundle: Path,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """--upper-bound-only trains the fold's whole-pool model on the first seed and touches no strategy round (not even
    to read it: a round made by other code stays as it is); with --no-upper-bound it is refused."""
    data = write_nnunet(tmp_path / "ds", n=4)
    out = tmp_path / "out"
    args = ["crossval", "--model", str(tiny_bundle), "--data", str(data), "--folds", "2", "--strategies", "random",
            "--random-seeds", "0", "--budget", "1", "--rounds", "1", "--steps", "2", "--set", "train.batch_size=1",
            "--set", "train.guard_volumes=1", "--cache-dir", str(tmp_path / "cache"), "--no-progress",
            "--device", "cpu", "--out", str(out), "--only-folds", "0"]
    assert main([*args, "--no-upper-bound"]) == 0
    state = out / "fold0" / "random" / "seed0" / "state.json"
    state.write_text(state.read_text().replace('"fingerprint": "', '"fingerprint": "other'))  # made by other code
    before = state.read_text()
    assert not (out / "fold0" / "upper_bound").exists()
    assert main([*args, "--upper-bound-only", "--no-upper-bound"]) == 2
    assert main([*args, "--upper-bound-only", "--upper-bound-steps", "2"]) == 0
    assert (out / "fold0" / "upper_bound" / "seed0.json").is_file() and state.read_text() == before
    s = json.loads((out / "summary.json").read_text())
    assert s["per_fold"]["0"]["upper_bound"] is not None and s["strategies"]["random"]["dice_by_n"]["1"] is not None
