"""The annotation workflow (asfda.project): init / next / ingest / finetune / status, label checks, the lock,
kill -9 in the middle of a step, pre-segmentations and the edits measured. (Settings: test_project_settings.py;
damaged and hostile project.json files: test_project_hostile.py.)"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from _project_helpers import N_POOL, _answer, _settings, make_pool
from asfda.cli import main
from asfda.errors import AsfdaError
from asfda.project import (
    Project,
    ProjectSettings,
    finetune_project,
    ingest_labels,
    init_project,
    next_query,
    project_lock,
    project_status,
)
from asfda.training import TrainConfig
from conftest import load_nifti, run_cli_killed, write_bundle, write_nifti, write_nnunet

AFFINE = np.diag([2.0, 2.0, 3.0, 1.0])


@pytest.fixture
def pool(tmp_path: Path) -> dict[str, Path]:
    return make_pool(tmp_path)


def test_full_workflow_two_rounds(pool: dict, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    proj = tmp_path / "proj"
    assert main(["init", str(proj), "--model", str(pool["model"]), "--pool", str(pool["pool"]), "--budget", "2",
                 "--steps", "4", "--device", "cpu", "--no-progress", "--no-guard"]) == 0
    state = json.loads((proj / "project.json").read_text())
    assert state["pool_cases"] == N_POOL and state["labels"] == {"background": 0, "liver": 1, "spleen": 2}
    assert main(["next", str(proj), "--no-progress"]) == 0
    q = json.loads((proj / "project.json").read_text())["query"]
    assert len(q["ids"]) == 2 and q["round"] == 0
    folder = proj / q["folder"]
    assert (folder / "cases.txt").read_text().split() == q["ids"]
    assert sorted(p.name for p in (folder / "images").iterdir()) == sorted(f"{i}_0000.nii.gz" for i in q["ids"])
    assert all((folder / "previews" / f"{i}.png").stat().st_size > 1000 for i in q["ids"])
    assert "asfda ingest" in (folder / "README.txt").read_text()
    out = capsys.readouterr().out
    assert all(i in out for i in q["ids"]) and "feature_gap=" in out  # why each case was picked
    # asking again before the labels are in shows the same query
    assert next_query(proj, progress=False)["ids"] == q["ids"]
    status = project_status(proj)
    assert status["pending_query"]["missing_labels"] == q["ids"] and "ingest" in status["next"]

    assert main(["ingest", str(_answer(pool["truth"], q["ids"], tmp_path / "ann0")), str(proj), "--no-progress"]) == 0
    assert sorted(Project(proj).state["labelled"]) == sorted(q["ids"])
    assert "finetune" in project_status(proj)["next"]
    capsys.readouterr()
    assert main(["finetune", str(proj), "--no-progress"]) == 0
    st = Project(proj).state
    assert st["rounds"][0]["guard"] is None and "guard" not in capsys.readouterr().out  # --no-guard
    assert st["query"] is None and len(st["rounds"]) == 1 and st["weights"] == "weights/round0.safetensors"
    assert (proj / "model" / "models" / "model.pt").exists()
    meta = json.loads((proj / "model" / "configs" / "metadata.json").read_text())
    assert meta["asfda"]["round"] == 0 and sorted(meta["asfda"]["labelled"]) == sorted(q["ids"])
    with pytest.raises(AsfdaError, match="no new or changed labels"):
        finetune_project(proj, progress=False)

    q1 = next_query(proj, progress=False)  # round 1: the adapted model, T fitted on the two labels
    assert q1["round"] == 1 and not set(q1["ids"]) & set(q["ids"])
    assert q1["temperature"] > 0 and q1["ece_before"] is not None
    assert all("kd" in c for c in q1["components"].values())  # adapted: knowledge divergence
    # every forward pass once: the pool through the adapted model once (the pre-segmentations reuse the scoring
    # pass); the pretrained model's pool outputs were kept on disk by round 0
    pool_size = len(list((pool["pool"] / "imagesTr").glob("*.nii.gz")))
    assert q1["forward_passes"]["pretrained"] == 0 and 0 < q1["forward_passes"]["adapted"] <= pool_size
    ingest_labels(proj, _answer(pool["truth"], q1["ids"], tmp_path / "ann1"))
    rec = finetune_project(proj, progress=False)
    assert rec["round"] == 1 and sorted(rec["new_ids"]) == sorted(q1["ids"]) and len(rec["labelled_ids"]) == 4
    capsys.readouterr()
    assert main(["status", str(proj), "--json"]) == 0
    st = json.loads(capsys.readouterr().out)
    assert st["rounds_finished"] == 2 and st["labelled"] == 4 and "next" in st["next"]


def test_finetune_runs_the_guard_and_the_next_query_follows_its_decision(pool: dict, tmp_path: Path,
                                                                          capsys: pytest.CaptureFixture) -> None:
    proj = tmp_path / "proj"
    init_project(proj, str(pool["model"]), str(pool["pool"]), ProjectSettings(budget=2, train=TrainConfig(steps=4)))
    q = next_query(proj, progress=False)
    ingest_labels(proj, _answer(pool["truth"], q["ids"], tmp_path / "ann0"))
    capsys.readouterr()
    assert main(["finetune", str(proj), "--no-progress"]) == 0
    guard = Project(proj).state["rounds"][0]["guard"]
    assert guard["cases"] and not set(guard["cases"]) & set(q["ids"])  # unlabeled pool cases only
    assert 0 <= guard["plausibility_adapted"] <= 1 and 0 <= guard["plausibility_pretrained"] <= 1
    assert ("discarded" in capsys.readouterr().out) is guard["reverted"]
    q1 = next_query(proj, progress=False)
    # weights the guard discarded leave the pretrained model: the round-0 gap, not f_t || f_0 divergence
    assert all(("kd" in c) is (not guard["reverted"]) for c in q1["components"].values())


def test_status_json_and_text(pool: dict, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    init_project(tmp_path / "p", str(pool["model"]), str(pool["pool"]), _settings())
    capsys.readouterr()
    assert main(["status", str(tmp_path / "p"), "--json"]) == 0
    st = json.loads(capsys.readouterr().out)
    assert st["rounds_finished"] == 0 and st["labelled"] == 0 and st["pending_query"] is None
    assert "asfda next" in st["next"]
    assert main(["status", str(tmp_path / "p")]) == 0
    assert "0 of 6 pool cases labelled" in capsys.readouterr().out


def test_init_refuses_an_existing_project_and_a_missing_one(pool: dict, tmp_path: Path) -> None:
    init_project(tmp_path / "p", str(pool["model"]), str(pool["pool"]), _settings())
    with pytest.raises(AsfdaError, match="already exists"):
        init_project(tmp_path / "p", str(pool["model"]), str(pool["pool"]), _settings())
    with pytest.raises(AsfdaError, match="not an asfda project"):
        project_status(tmp_path / "nothing")
    with pytest.raises(AsfdaError, match="unknown strategy"):
        init_project(tmp_path / "q", str(pool["model"]), str(pool["pool"]), _settings(strategy="entropyy"))


# ---------------------------------------------------------------------------------------------- ingest checks
def _bad_labels(pool: dict, folder: Path) -> dict[str, str]:
    """One label file per refusal kind; returns file name -> expected words of the reason."""
    folder.mkdir(parents=True, exist_ok=True)
    truth = pool["truth"]
    good = np.asarray(__import__("nibabel").load(str(truth / "case00.nii.gz")).dataobj)
    write_nifti(folder / "case00.nii.gz", good, AFFINE)  # good
    write_nifti(folder / "case01.nii.gz", good[:, :, :-1], AFFINE)  # shape
    shifted = AFFINE.copy()
    shifted[0, 3] = 1.0
    write_nifti(folder / "case02.nii.gz", good, shifted)  # affine
    wrong = good.astype(np.int16).copy()
    wrong[0, 0, 0] = 7
    write_nifti(folder / "case03.nii.gz", wrong, AFFINE)  # values
    write_nifti(folder / "case04.nii.gz", np.zeros_like(good), AFFINE)  # empty
    write_nifti(folder / "case05.nii.gz", good.astype(np.float32) * 0.5, AFFINE)  # non-integer
    (folder / "notacase.nii.gz").write_bytes((folder / "case00.nii.gz").read_bytes())  # not in the pool
    (folder / "broken.nii.gz").write_bytes(b"not a nifti file")  # unreadable (also not a case)
    return {"case01.nii.gz": "shape", "case02.nii.gz": "affine", "case03.nii.gz": "values [7]",
            "case04.nii.gz": "empty", "case05.nii.gz": "non-integer", "notacase.nii.gz": "not a case of the pool",
            "broken.nii.gz": "not a case of the pool"}


def test_ingest_refuses_each_bad_label_kind_and_keeps_the_good_ones(pool: dict, tmp_path: Path,
                                                                    capsys: pytest.CaptureFixture) -> None:
    proj = tmp_path / "p"
    init_project(proj, str(pool["model"]), str(pool["pool"]), _settings())
    expected = _bad_labels(pool, tmp_path / "ann")
    assert main(["ingest", str(tmp_path / "ann"), str(proj)]) == 1  # some refused: exit 1, the good kept
    err = capsys.readouterr().err
    for name, words in expected.items():
        line = next(ln for ln in err.splitlines() if name in ln)
        assert words in line, (name, line)
    st = Project(proj).state
    assert sorted(st["labelled"]) == ["case00"]
    assert (proj / st["labelled"]["case00"]["file"]).exists()
    # a second ingest of the same folder changes nothing; a corrected file is taken
    res = ingest_labels(proj, tmp_path / "ann")
    assert res["accepted"] == [] and len(res["refused"]) == len(expected)
    shutil.copyfile(pool["truth"] / "case01.nii.gz", tmp_path / "ann" / "case01.nii.gz")
    assert ingest_labels(proj, tmp_path / "ann")["accepted"] == ["case01"]


def test_ingest_unreadable_file_named_like_a_case(pool: dict, tmp_path: Path) -> None:
    proj = tmp_path / "p"
    init_project(proj, str(pool["model"]), str(pool["pool"]), _settings())
    (tmp_path / "ann").mkdir()
    (tmp_path / "ann" / "case02.nii.gz").write_bytes(b"\x1f\x8b truncated")
    res = ingest_labels(proj, tmp_path / "ann")
    assert res["accepted"] == [] and "readable" in res["refused"][0]["reason"]


def test_empty_labels_allowed_when_the_project_says_so(pool: dict, tmp_path: Path) -> None:
    proj = tmp_path / "p"
    init_project(proj, str(pool["model"]), str(pool["pool"]), _settings(allow_empty_labels=True))
    write_nifti(tmp_path / "ann" / "case04.nii.gz", np.zeros((20, 18, 12), np.uint8), AFFINE)
    assert ingest_labels(proj, tmp_path / "ann")["accepted"] == ["case04"]


# ---------------------------------------------------------------------------------------------- lock
def test_lock_stops_a_second_process(pool: dict, tmp_path: Path) -> None:
    proj = tmp_path / "p"
    init_project(proj, str(pool["model"]), str(pool["pool"]), _settings())
    script = f"import time; from asfda.project import project_lock\nwith project_lock({str(proj)!r}, 'next'):\n" \
             f"    print('locked', flush=True); time.sleep(30)\n"
    holder = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
        with pytest.raises(AsfdaError, match=r"another asfda process is working on this project \(pid"):
            ingest_labels(proj, pool["truth"])
        # killed with -9 the holder leaves no stale lock behind
        holder.send_signal(signal.SIGKILL)
        holder.wait(10)
        with project_lock(proj, "status"):
            pass
    finally:
        holder.kill()


# ---------------------------------------------------------------------------------------------- kill -9
def test_kill_9_mid_finetune_and_mid_ingest_loses_nothing(pool: dict, tmp_path: Path) -> None:
    from safetensors.torch import load_file

    def fresh(name: str) -> Path:
        proj = tmp_path / name
        init_project(proj, str(pool["model"]), str(pool["pool"]), _settings())
        return proj

    ref, proj = fresh("ref"), fresh("killed")
    for p in (ref, proj):
        q = next_query(p, progress=False)
    ids = q["ids"]
    ann = _answer(pool["truth"], ids, tmp_path / "ann")
    # kill -9 after the first accepted label's file is written, before the state records it
    assert run_cli_killed(1, "write", "ingest", str(ann), str(proj)) == -signal.SIGKILL
    assert len(Project(proj).state["labelled"]) == 0
    assert ingest_labels(proj, ann)["accepted"] == ids  # the re-run takes both
    ingest_labels(ref, ann)
    # kill -9 at step 3 of 4 of round 0: nothing recorded, the re-run trains the whole round
    assert run_cli_killed(3, "step", "finetune", str(proj)) == -signal.SIGKILL
    st = Project(proj).state
    assert st["rounds"] == [] and st["weights"] is None and sorted(st["labelled"]) == sorted(ids)
    assert st["query"]["ids"] == ids  # the query is still pending
    finetune_project(proj, progress=False)
    finetune_project(ref, progress=False)
    a = load_file(str(proj / "weights" / "round0.safetensors"))
    b = load_file(str(ref / "weights" / "round0.safetensors"))
    assert all(np.array_equal(a[k].numpy(), b[k].numpy()) for k in a)  # as if never interrupted
    # killed after the weights file but before the state: the round is redone, not counted twice
    next_query(proj, progress=False)
    ingest_labels(proj, _answer(pool["truth"], Project(proj).state["query"]["ids"], tmp_path / "ann1"))
    assert run_cli_killed(1, "write", "finetune", str(proj)) == -signal.SIGKILL
    assert len(Project(proj).state["rounds"]) == 1
    finetune_project(proj, progress=False)
    assert [r["round"] for r in Project(proj).state["rounds"]] == [0, 1]


def test_plain_folder_pool_uses_the_labels_json_or_the_model_classes(pool: dict, tmp_path: Path) -> None:
    images = pool["pool"] / "imagesTr"  # a plain folder of CASE_0000.nii.gz images, no dataset.json
    p = init_project(tmp_path / "a", str(pool["model"]), str(images), _settings())
    assert p.state["labels"] == {"background": 0, "liver": 1, "spleen": 2}  # the model's classes
    (tmp_path / "labels.json").write_text(json.dumps({"background": 0, "liver": 1}))
    p = init_project(tmp_path / "b", str(pool["model"]), str(images), _settings(),
                     labels_json=str(tmp_path / "labels.json"))
    assert p.state["labels"] == {"background": 0, "liver": 1}
    q = next_query(p.root, progress=False)
    # a label with the spleen value is refused here: only background and liver are label values
    res = ingest_labels(p.root, _answer(pool["truth"], q["ids"], tmp_path / "ann"))
    assert res["accepted"] == [] and all("values [2]" in r["reason"] for r in res["refused"])


def test_next_writes_presegmentations_and_ingest_measures_the_edits(pool: dict, tmp_path: Path) -> None:
    """A pre-segmentation per queried case on the image's own grid (shape and affine) with the dataset's values,
    ITK-SNAP and Slicer label files naming every label; ingest records the edit Dice; a replaced label is kept."""
    import nibabel as nib

    from asfda.annotation import edit_summary

    proj = tmp_path / "proj"
    init_project(proj, str(pool["model"]), str(pool["pool"]), ProjectSettings(budget=2, train=TrainConfig(steps=2)))
    q = next_query(proj, progress=False)
    folder = proj / q["folder"]
    labels = Project(proj).state["labels"]
    for cid in q["ids"]:
        pre = load_nifti(str(folder / "presegmentations" / f"{cid}.nii.gz"))
        img = load_nifti(str(pool["pool"] / "imagesTr" / f"{cid}_0000.nii.gz"))
        assert pre.shape == img.shape and np.allclose(pre.affine, img.affine)
        assert set(np.unique(np.asarray(pre.dataobj)).tolist()) <= set(labels.values())
    itk = (folder / "labels.itksnap.txt").read_text()
    ctbl = (folder / "labels.slicer.ctbl").read_text()
    for name, value in labels.items():
        if value:
            assert f'"{name}"' in itk and f"\n{value} {name} " in ctbl
    assert "presegmentations" in (folder / "README.txt").read_text()
    answers = _answer(pool["truth"], q["ids"], tmp_path / "ann0")
    ingest_labels(proj, answers)
    rec = Project(proj).state["labelled"][q["ids"][0]]
    offered = np.asarray(load_nifti(folder / "presegmentations" / f"{q['ids'][0]}.nii.gz").dataobj).astype(np.int64)
    truth = np.asarray(load_nifti(answers / f"{q['ids'][0]}.nii.gz").dataobj).astype(np.int64)
    assert rec["edit"] == pytest.approx(edit_summary(offered, truth, labels), nan_ok=True)
    effort = project_status(proj)["annotation_effort"]
    assert effort[0]["round"] == 0 and effort[0]["cases"] == 2
    # a corrected label replaces the first one, which is kept as CASE.v1.nii.gz
    fixed = np.array(truth, dtype=np.uint8)
    fixed.flat[0] = 1 if fixed.flat[0] != 1 else 0  # one voxel corrected
    again = tmp_path / "ann0b"
    again.mkdir()
    src = load_nifti(str(answers / f"{q['ids'][0]}.nii.gz"))
    nib.save(nib.Nifti1Image(fixed, src.affine, src.header), str(again / f"{q['ids'][0]}.nii.gz"))
    assert ingest_labels(proj, again)["replaced"] == [q["ids"][0]]
    rec = Project(proj).state["labelled"][q["ids"][0]]
    assert rec["versions"][0]["file"] == f"labels/{q['ids'][0]}.v1.nii.gz"
    assert (proj / rec["versions"][0]["file"]).is_file() and (proj / rec["file"]).is_file()


def test_edit_summary_by_hand() -> None:
    from asfda.annotation import edit_summary

    pre = np.zeros((4, 4, 2), np.int64)
    pre[0:2, 0:2, :] = 1  # 8 voxels of liver
    lab = pre.copy()
    lab[0, 0, :] = 0      # annotator removed 2 liver voxels
    lab[3, 3, 0] = 2      # and drew 1 spleen voxel
    e = edit_summary(pre, lab, {"background": 0, "liver": 1, "spleen": 2})
    assert e["edit_dice_liver"] == pytest.approx(2 * 6 / (8 + 6)) and e["edit_dice_spleen"] == 0.0
    assert e["voxels_changed"] == 3 and e["fraction_changed"] == pytest.approx(3 / 32)
    assert e["edit_dice_mean"] == pytest.approx((12 / 14 + 0.0) / 2)


def test_init_folds_a_dataset_class_the_model_lacks_into_background(tmp_path: Path) -> None:
    """Issue 35: a model with fewer organs than the dataset starts a project (before: refused); the class it lacks
    is folded into background and recorded as such (tests/project/test_project_fewer_organs.py runs a round)."""
    from asfda.project import init_project

    bundle = write_bundle(tmp_path / "b", class_names=("background", "liver"))
    data = write_nnunet(tmp_path / "ds", n=3, labels={"background": 0, "liver": 1, "spleen": 2})
    p = init_project(tmp_path / "p", str(bundle), str(data))
    assert p.uncovered_classes() == ["spleen"] and p.state["class_map"]["spleen"] is None
