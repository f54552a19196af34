"""Bad inputs through the CLI: each is one line naming the file, the problem and the fix, exit code 2, and nothing
written. (The cold start: test_cold_start.py.)"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from _bad_inputs_helpers import AFFINE, SHAPE, N, _argv, _one_line_error, _tree, make_inputs
from asfda.cli import main
from asfda.project import Project, init_project, next_query
from conftest import write_nifti, write_nnunet


@pytest.fixture
def inputs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, Path]:
    return make_inputs(tmp_path, monkeypatch)


# ---------------------------------------------------------------------------------------------- constant image
@pytest.mark.parametrize("command", ["score", "query", "predict", "evaluate", "simulate"])
def test_a_constant_image_is_refused_before_anything_is_written(inputs: dict, command: str,
                                                                 capsys: pytest.CaptureFixture) -> None:
    """A volume whose voxels are all equal holds no anatomy (a blank export or a failed anonymisation). Scored, it
    is the pool's most atypical volume, so asfda would ask for it first; it is refused wherever voxels are read."""
    blank = write_nifti(inputs["data"] / "imagesTr" / "case00_0000.nii.gz", np.full(SHAPE, 7.0, np.float32), AFFINE)
    out = inputs["root"] / "out"
    assert main(_argv(command, inputs["model"], inputs["data"], out)) == 2
    line = _one_line_error(capsys)
    assert str(blank) in line and "constant" in line
    assert not out.exists()


def test_predict_stops_at_a_constant_image_keeping_the_finished_cases(inputs: dict,
                                                                      capsys: pytest.CaptureFixture) -> None:
    """predict writes case by case: a constant image met mid-way stops it with the one-line error; the cases before
    it are complete label maps, nothing of the constant one is written, and the run after removing it skips them."""
    blank = write_nifti(inputs["data"] / "imagesTr" / "case02_0000.nii.gz", np.full(SHAPE, -1.0, np.float32), AFFINE)
    out = inputs["root"] / "out"
    assert main(_argv("predict", inputs["model"], inputs["data"], out)) == 2
    line = _one_line_error(capsys)
    assert str(blank) in line and "constant" in line
    assert sorted(p.name for p in out.iterdir()) == ["case00.asfda.json", "case00.nii.gz", "case01.asfda.json",
                                                     "case01.nii.gz", "labels.json"]
    blank.unlink()
    (inputs["data"] / "labelsTr" / "case02.nii.gz").unlink()
    assert main(_argv("predict", inputs["model"], inputs["data"], out)) == 0
    assert "1 case segmented, 2 skipped" in capsys.readouterr().out


def test_next_refuses_a_constant_pool_image_and_writes_no_query(inputs: dict, capsys: pytest.CaptureFixture) -> None:
    blank = write_nifti(inputs["data"] / "imagesTr" / "case02_0000.nii.gz", np.zeros(SHAPE, np.float32), AFFINE)
    proj = inputs["root"] / "proj"
    assert main(_argv("init", inputs["model"], inputs["data"], proj)) == 0  # init reads headers only
    before = _tree(proj)
    capsys.readouterr()
    assert main(["next", str(proj), "--no-progress"]) == 2
    line = _one_line_error(capsys)
    assert str(blank) in line and "constant" in line
    assert _tree(proj) == before


# ---------------------------------------------------------------------------------------------- symlinks
def _pool_and_truth(root: Path) -> dict[str, Path]:
    ds = write_nnunet(root / "pool", n=N)
    shutil.move(ds / "labelsTr", root / "truth")
    return {"pool": ds, "truth": root / "truth"}


def test_ingest_refuses_a_labels_folder_with_a_link_to_outside(inputs: dict, capsys: pytest.CaptureFixture) -> None:
    root = inputs["root"]
    p = _pool_and_truth(root)
    proj = root / "proj"
    assert main(_argv("init", inputs["model"], p["pool"], proj)) == 0
    ann = root / "ann"
    ann.mkdir()
    shutil.copyfile(p["truth"] / "case00.nii.gz", ann / "case00.nii.gz")
    (ann / "case01.nii.gz").symlink_to(p["truth"] / "case01.nii.gz")  # points outside the labels folder
    before = _tree(proj)
    capsys.readouterr()
    assert main(["ingest", str(ann), str(proj)]) == 2
    line = _one_line_error(capsys)
    assert str(ann / "case01.nii.gz") in line and "link" in line and str(p["truth"] / "case01.nii.gz") in line
    assert _tree(proj) == before  # not even the good case00 was taken: nothing written
    # a dangling link is refused alike
    (ann / "case01.nii.gz").unlink()
    (ann / "case01.nii.gz").symlink_to(root / "gone.nii.gz")
    assert main(["ingest", str(ann), str(proj)]) == 2
    assert "gone.nii.gz" in _one_line_error(capsys)
    # a link to a file inside the folder itself is fine
    (ann / "case01.nii.gz").unlink()
    shutil.copyfile(p["truth"] / "case01.nii.gz", ann / "real01.nii.gz.orig")
    (ann / "case01.nii.gz").symlink_to(ann / "real01.nii.gz.orig")
    assert main(["ingest", str(ann), str(proj)]) == 0
    assert sorted(Project(proj).state["labelled"]) == ["case00", "case01"]


@pytest.mark.parametrize("where", ["image", "label", "images_folder", "loop", "dangling"])
def test_a_dataset_with_links_to_outside_is_refused(inputs: dict, where: str, capsys: pytest.CaptureFixture) -> None:
    root, data = inputs["root"], inputs["data"]
    elsewhere = write_nnunet(root / "elsewhere", n=1)
    words = {"loop": "cannot be followed", "dangling": "does not exist"}.get(where, "outside")
    if where in ("loop", "dangling"):
        link = data / "labelsTr" / "case01.nii.gz"
        link.unlink()
        link.symlink_to(link if where == "loop" else root / "gone.nii.gz")
    elif where == "image":
        link = data / "imagesTr" / "case01_0000.nii.gz"
        link.unlink()
        link.symlink_to(elsewhere / "imagesTr" / "case00_0000.nii.gz")
    elif where == "label":
        link = data / "labelsTr" / "case01.nii.gz"
        link.unlink()
        link.symlink_to(elsewhere / "labelsTr" / "case00.nii.gz")
    else:
        link = data / "imagesTr"
        shutil.rmtree(link)
        link.symlink_to(elsewhere / "imagesTr", target_is_directory=True)
    out = root / "out"
    for command in ("score", "evaluate"):
        assert main(_argv(command, inputs["model"], data, out)) == 2
        line = _one_line_error(capsys)
        assert str(link) in line and "link" in line and words in line
    assert not out.exists()


def test_links_into_a_folder_the_dataset_json_declares_are_read(inputs: dict, capsys: pytest.CaptureFixture) -> None:
    """A dataset made of links (as benchmarks/cv.py's fold datasets are) says where they point, in dataset.json's
    ``asfda_linked_from``; links there are read, links anywhere else are still refused."""
    root, data = inputs["root"], inputs["data"]
    linked = root / "linked"
    (linked / "imagesTr").mkdir(parents=True)
    (linked / "labelsTr").mkdir()
    for i in range(N):
        (linked / "imagesTr" / f"case{i:02d}_0000.nii.gz").symlink_to(data / "imagesTr" / f"case{i:02d}_0000.nii.gz")
        (linked / "labelsTr" / f"case{i:02d}.nii.gz").symlink_to(data / "labelsTr" / f"case{i:02d}.nii.gz")
    meta = json.loads((data / "dataset.json").read_text())
    (linked / "dataset.json").write_text(json.dumps({**meta, "asfda_linked_from": str(data)}))
    assert main(_argv("evaluate", inputs["model"], linked, root / "ev")) == 0
    other = write_nnunet(root / "other", n=1)
    stray = linked / "labelsTr" / "case03.nii.gz"
    stray.unlink()
    stray.symlink_to(other / "labelsTr" / "case00.nii.gz")
    capsys.readouterr()
    assert main(_argv("evaluate", inputs["model"], linked, root / "ev2")) == 2
    assert str(stray) in _one_line_error(capsys)
    # the declaration must be a folder path
    (linked / "dataset.json").write_text(json.dumps({**meta, "asfda_linked_from": 3}))
    assert main(_argv("evaluate", inputs["model"], linked, root / "ev3")) == 2
    assert "asfda_linked_from" in _one_line_error(capsys)


# ---------------------------------------------------------------------------------------------- empty / not a folder
@pytest.mark.parametrize("kind", ["empty_folder", "empty_imagesTr", "a_file", "only_other_files"])
def test_an_empty_dataset_is_one_line(inputs: dict, kind: str, capsys: pytest.CaptureFixture) -> None:
    root = inputs["root"]
    data = root / "empty"
    data.mkdir()
    if kind == "empty_imagesTr":
        (data / "imagesTr").mkdir()
        shutil.copyfile(inputs["data"] / "dataset.json", data / "dataset.json")
    elif kind == "a_file":
        data = inputs["data"] / "dataset.json"
    elif kind == "only_other_files":
        (data / "notes.txt").write_text("no images here\n")
        (data / ".hidden.nii.gz").write_bytes(b"")
    for command in ("score", "query", "predict", "evaluate", "simulate", "init"):
        assert main(_argv(command, inputs["model"], data, root / "out")) == 2, command
        line = _one_line_error(capsys)
        assert str(data) in line, line
        assert not (root / "out").exists()


# ---------------------------------------------------------------------------------------------- dataset.json paths
@pytest.mark.parametrize("entry", [
    {"training": [{"image": "../../etc/passwd", "label": "./labelsTr/case00.nii.gz"}]},
    {"training": [{"image": "./imagesTr/case00_0000.nii.gz", "label": "/etc/passwd"}]},
    {"test": ["./imagesTs/../../x.nii.gz"]},
    {"dataset": {"../escape": {"images": ["imagesTr/case00_0000.nii.gz"], "label": "labelsTr/case00.nii.gz"}}},
    {"dataset": {"case00": {"images": ["/abs/case00_0000.nii.gz"], "label": "labelsTr/case00.nii.gz"}}},
    {"dataset": {"/abs": {"images": ["imagesTr/case00_0000.nii.gz"]}}},
], ids=["training-image-dotdot", "training-label-absolute", "test-dotdot", "v2-case-id-dotdot", "v2-image-absolute",
        "v2-case-id-absolute"])
def test_dataset_json_paths_and_ids_that_leave_the_dataset_are_refused(inputs: dict, entry: dict,
                                                                       capsys: pytest.CaptureFixture) -> None:
    meta_path = inputs["data"] / "dataset.json"
    meta_path.write_text(json.dumps({**json.loads(meta_path.read_text()), **entry}))
    for command in ("score", "evaluate", "predict"):
        assert main(_argv(command, inputs["model"], inputs["data"], inputs["root"] / "out")) == 2
        line = _one_line_error(capsys)
        assert str(meta_path) in line and "outside the dataset" in line
        assert not (inputs["root"] / "out").exists()


def test_dataset_json_paths_inside_the_dataset_are_fine(inputs: dict) -> None:
    meta_path = inputs["data"] / "dataset.json"
    meta = json.loads(meta_path.read_text())
    meta["training"] = [{"image": f"./imagesTr/case{i:02d}.nii.gz", "label": f"./labelsTr/case{i:02d}.nii.gz"}
                        for i in range(N)]
    meta_path.write_text(json.dumps(meta))
    assert main(_argv("evaluate", inputs["model"], inputs["data"], inputs["root"] / "ev")) == 0


# ---------------------------------------------------------------------------------------------- budget vs pool
def test_query_budget_larger_than_the_pool_names_the_pool_size(inputs: dict, capsys: pytest.CaptureFixture) -> None:
    out = inputs["root"] / "out"
    assert main(["query", "--model", str(inputs["model"]), "--data", str(inputs["data"]), "--budget", "99",
                 "--out", str(out / "q.json"), "--no-progress"]) == 2
    line = _one_line_error(capsys)
    assert "budget 99" in line and f"({N} volumes)" in line
    assert not out.exists()


def test_init_budget_larger_than_the_pool_is_refused(inputs: dict, capsys: pytest.CaptureFixture) -> None:
    proj = inputs["root"] / "proj"
    assert main(_argv("init", inputs["model"], inputs["data"], proj, "--budget", "99")) == 2
    line = _one_line_error(capsys)
    assert "budget 99" in line and f"{N} cases" in line and "--budget" in line
    assert not proj.exists() and not [p for p in inputs["root"].iterdir() if p.name.startswith(".proj")]


def test_simulate_budget_larger_than_the_pool_is_refused_before_writing(inputs: dict,
                                                                        capsys: pytest.CaptureFixture) -> None:
    out = inputs["root"] / "out"
    assert main(_argv("simulate", inputs["model"], inputs["data"], out)[:-1] + ["--budget", "99", "--no-progress"]) == 2
    line = _one_line_error(capsys)
    assert "99" in line and "pool of 3 volumes" in line  # 4 cases: 1 test, 3 pool
    assert not out.exists()


def test_next_offers_what_is_left_when_fewer_than_the_budget(inputs: dict, capsys: pytest.CaptureFixture) -> None:
    from asfda.project import ProjectSettings, ingest_labels
    from asfda.training import TrainConfig

    root = inputs["root"]
    p = _pool_and_truth(root)
    proj = root / "proj"
    init_project(proj, str(inputs["model"]), str(p["pool"]), ProjectSettings(budget=3, device="cpu",
                                                                             train=TrainConfig(steps=1)))
    q0 = next_query(proj, progress=False)
    assert len(q0["ids"]) == 3
    ann = root / "ann"
    ann.mkdir()
    for cid in q0["ids"]:
        shutil.copyfile(p["truth"] / f"{cid}.nii.gz", ann / f"{cid}.nii.gz")
    ingest_labels(proj, ann)
    capsys.readouterr()
    assert main(["finetune", str(proj), "--no-progress", ]) == 0
    capsys.readouterr()
    assert main(["next", str(proj), "--no-progress"]) == 0  # one case left, the budget is 3: that one is offered
    out = capsys.readouterr().out
    q1 = Project(proj).state["query"]
    assert len(q1["ids"]) == 1 and q1["ids"][0] not in q0["ids"]
    assert "only 1 unlabeled case is left" in out
    shutil.copyfile(p["truth"] / f"{q1['ids'][0]}.nii.gz", ann / f"{q1['ids'][0]}.nii.gz")
    ingest_labels(proj, ann)
    assert main(["finetune", str(proj), "--no-progress"]) == 0
    capsys.readouterr()
    assert main(["next", str(proj), "--no-progress"]) == 2  # nothing left
    line = _one_line_error(capsys)
    assert "every one of the 4 pool cases is labelled" in line


# ---------------------------------------------------------------------------------------------- odd values (issue 30)
RUN_CONFIGS = ["train: {weight_decay: -1}", "train: {warmup_fraction: .nan}", "train: {lr: 1.0e+300}",
               "train: {fg_oversample: -3}", "seeds: [-1]", "seeds: [99999999999999999999999]",
               "semi: {enabled: true, confident_fraction: -1}"]


@pytest.mark.parametrize("text", RUN_CONFIGS)
def test_a_run_config_value_out_of_range_is_one_line(inputs: dict, text: str, capsys: pytest.CaptureFixture) -> None:
    """Before: each stopped simulate with a traceback (AdamW's ValueError, int(NaN), torch's float overflow, numpy's
    negative seed, torch's seed overflow, the reliable-set rule's ValueError)."""
    out, cfg = inputs["root"] / "out", inputs["root"] / "run.yaml"
    cfg.write_text(text + "\n")
    assert main(_argv("simulate", inputs["model"], inputs["data"], out, "--config", str(cfg))) == 2
    assert "out-of-range config values" in _one_line_error(capsys)
    assert not out.exists()


@pytest.mark.parametrize("command", ["query", "score", "init"])
@pytest.mark.parametrize("seed", ["-1", str(2 ** 70)])
def test_a_seed_out_of_range_is_refused_when_parsed(inputs: dict, command: str, seed: str,
                                                   capsys: pytest.CaptureFixture) -> None:
    out = inputs["root"] / "out"
    with pytest.raises(SystemExit) as stop:
        main(_argv(command, inputs["model"], inputs["data"], out, "--seed", seed))
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "a seed is a whole number" in err
    assert not out.exists()


def test_a_dataset_json_number_past_python_s_digit_limit_is_one_line(inputs: dict,
                                                                     capsys: pytest.CaptureFixture) -> None:
    meta = inputs["data"] / "dataset.json"
    meta.write_text(meta.read_text()[:-1] + ', "numTraining": ' + "1" * 5000 + "}")
    out = inputs["root"] / "out"
    assert main(_argv("evaluate", inputs["model"], inputs["data"], out)) == 2
    assert "invalid JSON" in _one_line_error(capsys)
    assert not out.exists()


@pytest.mark.parametrize("name, content", [("ids.txt", b"\xff\xfe case00\n"), ("ids.json", b'{"ids": 5}'),
                                           ("ids.json", b'{"ids": [], "labelled": "case00"}'),
                                           ("ids.json", b"[" + b"1" * 5000 + b"]")])
def test_a_bad_labelled_ids_file_is_one_line(inputs: dict, name: str, content: bytes,
                                             capsys: pytest.CaptureFixture) -> None:
    """Before: a file that is not UTF-8, a query.json whose ids are not a list, or a 5000-digit number were
    tracebacks."""
    ids = inputs["root"] / name
    ids.write_bytes(content)
    out = inputs["root"] / "out"
    assert main(_argv("query", inputs["model"], inputs["data"], out, "--labelled", str(ids))) == 2
    _one_line_error(capsys)
    assert not out.exists()


def test_init_labels_json_that_is_not_json_is_one_line(inputs: dict, capsys: pytest.CaptureFixture) -> None:
    labels = inputs["root"] / "labels.json"
    labels.write_text('{"liver": 1,')
    proj = inputs["root"] / "proj"
    assert main(_argv("init", inputs["model"], inputs["data"], proj, "--labels", str(labels))) == 2
    assert "invalid JSON" in _one_line_error(capsys)
    assert not proj.exists()


def test_a_training_step_larger_than_the_cap_is_refused_before_any_work(tmp_path) -> None:
    """patch voxels x batch size above asfda.config.MAX_TRAIN_VOXELS (the red-team's [1000, 1000, 1000] patch reached
    19 GB in 40 s): refused when the config is read, and for the model's own window when it is the patch."""
    from asfda.config import load_config
    from asfda.errors import AsfdaError

    cfg = tmp_path / "c.yaml"
    cfg.write_text("train: {patch_size: [1000, 1000, 1000]}\n")
    with pytest.raises(AsfdaError, match="train.patch_size"):
        load_config(cfg)
    cfg.write_text("train: {batch_size: 100000, patch_size: [96, 96, 48]}\n")
    with pytest.raises(AsfdaError, match="train.patch_size"):
        load_config(cfg)
    cfg.write_text("train: {batch_size: 2, patch_size: [96, 96, 48]}\n")
    assert load_config(cfg).train.batch_size == 2
