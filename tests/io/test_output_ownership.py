"""Outputs never land on what the tool or the user owns: any dataset, asfda project or model folder (whether or not
it is the command's input), a name that marks one, or an existing file the command did not write itself. (A full
disk: test_full_disk.py; --alpha and --device when they are parsed: test_cli.py.)"""

from __future__ import annotations

from pathlib import Path

import pytest

from _output_helpers import _argv, _files, _no_model_loading, _one_line_error, _paths
from asfda.cli import main

pytestmark = pytest.mark.usefixtures("cwd_apart")


# ---------------------------------------------------------------------------------------------- owned places
OWNED = [  # (command, output relative to the test folder, what the message names)
    ("predict", "project/labels", "asfda project"),  # would overwrite an annotator's accepted label
    ("predict", "project/annotate/round0", "asfda project"),  # a round folder of the project
    ("query", "project/project.json", "asfda project"),  # the project's state
    ("evaluate", "project", "asfda project"),
    ("query", "other/dataset.json", "dataset"),  # another dataset's description
    ("score", "other/dataset.csv", "dataset"),  # its side file would be other/dataset.json
    ("predict", "other/labelsTr", "dataset"),
    ("predict", "other/imagesTr/../preds", "dataset"),  # .. folded: still inside the other dataset
    ("simulate", "other/runs", "dataset"),
    ("init", "other", "dataset"),
    ("init", "other/project", "dataset"),
    ("init", "project/sub", "asfda project"),
    ("phantom", "other/bench", "dataset"),
    ("phantom", "project", "asfda project"),
    ("predict", "other_model/preds", "model folder"),
    ("query", "other_model/configs/q.json", "model folder"),
    ("score", "other_model/s.csv", "model folder"),
]


@pytest.mark.parametrize(("command", "out", "kind"), OWNED, ids=[f"{c}-{o}" for c, o, _ in OWNED])
def test_no_command_writes_into_any_dataset_project_or_model(world: dict, command: str, out: str, kind: str,
                                                              monkeypatch: pytest.MonkeyPatch,
                                                              capsys: pytest.CaptureFixture) -> None:
    _no_model_loading(monkeypatch)
    root = world["root"]
    before, paths = _files(root), _paths(root)
    assert main(_argv(command, world, root / out)) == 2
    line = _one_line_error(capsys)
    assert kind in line and "overwrite" in line and "fix:" in line, line
    assert _files(root) == before and _paths(root) == paths  # nothing written, nothing created


CACHES = [("simulate", "ds/labelsTr", "the pool"), ("simulate", "bundle", "the model"),
          ("simulate", "project", "asfda project"), ("simulate", "other/cache", "dataset"),
          ("crossval", "ds/labelsTr", "the dataset"), ("crossval", "project", "asfda project"),
          ("crossval", "bundle/cache", "the model")]


@pytest.mark.parametrize(("command", "cache", "kind"), CACHES, ids=[f"{c}-{d}" for c, d, _ in CACHES])
def test_the_cache_folder_never_lands_in_a_dataset_project_or_model(world: dict, command: str, cache: str, kind: str,
                                                                     monkeypatch: pytest.MonkeyPatch,
                                                                     capsys: pytest.CaptureFixture) -> None:
    """Before: crossval's --cache-dir and a run config's cache_dir were not checked: the folds' linked datasets,
    prepared volumes and forward outputs were written into a dataset's labelsTr, a project or a model folder."""
    _no_model_loading(monkeypatch)
    root = world["root"]
    before, paths = _files(root), _paths(root)
    if command == "simulate":
        cfg = root / "cwd" / "run.yaml"
        cfg.write_text(f"cache_dir: {root / cache}\n")
        argv = _argv("simulate", world, root / "runs", "--config", str(cfg))
        before[cfg], paths = cfg.read_bytes(), paths | {cfg}
    else:
        argv = ["crossval", "--model", str(world["model"]), "--data", str(world["data"]), "--out", str(root / "cv"),
                "--folds", "2", "--budget", "1", "--rounds", "1", "--steps", "1", "--strategies", "random",
                "--no-upper-bound", "--cache-dir", str(root / cache), "--no-progress"]
    assert main(argv) == 2
    line = _one_line_error(capsys)
    assert kind in line and "cache" in line and "fix:" in line, line
    assert _files(root) == before and _paths(root) - {root / "cv"} == paths  # nothing written but the empty --out


def test_the_default_cache_in_a_working_folder_inside_the_pool_is_refused(world: dict,
                                                                          monkeypatch: pytest.MonkeyPatch,
                                                                          capsys: pytest.CaptureFixture) -> None:
    _no_model_loading(monkeypatch)
    monkeypatch.chdir(world["data"])
    before, paths = _files(world["data"]), _paths(world["data"])
    assert main(_argv("simulate", world, world["root"] / "runs")) == 2
    assert "the pool" in _one_line_error(capsys)
    assert _files(world["data"]) == before and _paths(world["data"]) == paths


@pytest.mark.parametrize(("command", "out"), [("score", "fresh/dataset.csv"), ("score", "fresh/project.csv"),
                                              ("query", "fresh/project.json"), ("query", "fresh/plans.json"),
                                              ("predict", "fresh/imagesTr"), ("evaluate", "fresh/imagesTr")])
def test_an_output_named_like_a_marker_is_refused(world: dict, command: str, out: str,
                                                  monkeypatch: pytest.MonkeyPatch,
                                                  capsys: pytest.CaptureFixture) -> None:
    """score --out fresh/dataset.csv would write fresh/dataset.json: the folder would look like a dataset."""
    _no_model_loading(monkeypatch)
    assert main(_argv(command, world, world["root"] / out)) == 2
    assert "another name" in _one_line_error(capsys)
    assert not (world["root"] / "fresh").exists()


def test_a_symlinked_output_into_a_dataset_or_project_is_refused(world: dict, monkeypatch: pytest.MonkeyPatch,
                                                                 capsys: pytest.CaptureFixture) -> None:
    _no_model_loading(monkeypatch)
    root = world["root"]
    (root / "to_other").symlink_to(world["other"], target_is_directory=True)
    (root / "to_labels").symlink_to(world["project"] / "labels", target_is_directory=True)
    before = _files(root)
    for command, out in [("predict", root / "to_other" / "preds"), ("predict", root / "to_labels"),
                         ("query", root / "to_labels" / "q.json"), ("evaluate", root / "to_other")]:
        assert main(_argv(command, world, out)) == 2
        assert "overwrite" in _one_line_error(capsys)
    assert _files(root) == before


def test_a_relative_output_with_dotdot_is_resolved(world: dict, monkeypatch: pytest.MonkeyPatch,
                                                   capsys: pytest.CaptureFixture) -> None:
    _no_model_loading(monkeypatch)
    monkeypatch.chdir(world["project"] / "annotate" / "round0")
    assert main(_argv("predict", world, "../../labels")) == 2
    assert "asfda project" in _one_line_error(capsys)
    monkeypatch.chdir(world["other"] / "imagesTr")
    assert main(_argv("query", world, "../x/../../other/q.json")) == 2
    assert "dataset" in _one_line_error(capsys)


def test_what_counts_as_a_dataset_project_or_model(tmp_path: Path) -> None:
    from asfda.io.outputs import PROJECT_MARKERS, owned_place
    from asfda.project.state import BACKUP_FILE, PROJECT_FILE

    def owner(path: Path) -> tuple[Path, str]:
        found = owned_place(path)
        assert found is not None, path
        return found

    assert PROJECT_MARKERS == (PROJECT_FILE, BACKUP_FILE)
    (tmp_path / "plain").mkdir()
    assert owned_place(tmp_path / "plain" / "x") is None
    (tmp_path / "nx").mkdir()  # another tool's project.json (Nx, .NET): not an asfda project
    (tmp_path / "nx" / "project.json").write_text('{"name": "app", "targets": {}}')
    assert owned_place(tmp_path / "nx" / "out") is None
    (tmp_path / "bak").mkdir()  # an asfda project whose project.json is lost: its .bak still marks it
    (tmp_path / "bak" / "project.json.bak").write_text('{"format": 1, "pool": "p"}')
    assert owner(tmp_path / "bak" / "o")[0] == tmp_path / "bak"
    (tmp_path / "broken").mkdir()  # a damaged project.json: counted as asfda's
    (tmp_path / "broken" / "project.json").write_text("{not json")
    assert owner(tmp_path / "broken")[0] == tmp_path / "broken"
    (tmp_path / "raw" / "imagesTr").mkdir(parents=True)  # a dataset without its dataset.json yet
    assert "dataset" in owner(tmp_path / "raw" / "out")[1]
    res = tmp_path / "nnUNet_results" / "Dataset001_X" / "nnUNetTrainer__nnUNetPlans__3d_fullres"
    (res / "fold_0").mkdir(parents=True)
    (res / "plans.json").write_text("{}")
    (res / "dataset.json").write_text("{}")
    assert "model" in owner(res / "fold_0" / "preds")[1]
    (tmp_path / "yaml_bundle" / "configs").mkdir(parents=True)
    (tmp_path / "yaml_bundle" / "configs" / "inference.yaml").write_text("network_def: {}\n")
    assert "MONAI bundle" in owner(tmp_path / "yaml_bundle" / "eval")[1]


# ---------------------------------------------------------------------------------------------- existing files
def test_an_existing_file_a_command_did_not_write_is_refused(world: dict, monkeypatch: pytest.MonkeyPatch,
                                                             capsys: pytest.CaptureFixture) -> None:
    """Checked before the model is loaded (query, score, evaluate): the user's notes, another command's report,
    a model file, a folder or a link where an output file would go."""
    _no_model_loading(monkeypatch)
    root = world["root"]
    work = root / "work"
    (work / "ev").mkdir(parents=True)
    (work / "notes.json").write_text('{"my": "notes"}')
    (work / "scores.csv").write_text("case_id,mine\ncase00,1\n")  # a CSV of the user's, not score's (no sidecar)
    (work / "ev" / "summary.json").write_text('{"strategy": "random", "budget": 1, "ids": [], "labelled": [], '
                                              '"pool_size": 2}')  # a query's record, where evaluate writes
    (work / "net.pt").write_bytes(b"weights")
    (work / "q.json").mkdir()
    (work / "link.json").symlink_to(work / "notes.json")
    before = _files(root)
    cases = [("query", work / "notes.json", "was not written by asfda query"),
             ("query", work / "scores.csv", "was not written by asfda query"),  # score's report
             ("query", work / "net.pt", "was not written by asfda query"),  # a model file
             ("query", work / "link.json", "symbolic link"),
             ("score", work / "scores.csv", "was not written by asfda score"),
             ("score", work / "notes.csv", "notes.json exists and was not written by asfda score"),  # its sidecar
             ("evaluate", work / "ev", "summary.json exists and was not written by asfda evaluate"),
             ("query", work / "q.json", "is a folder")]
    for command, out, expected in cases:
        assert main(_argv(command, world, out)) == 2
        line = _one_line_error(capsys)
        assert expected in line and "fix:" in line, line
    assert _files(root) == before


def test_rerunning_into_the_same_outputs_works_and_other_commands_reports_are_refused(world: dict, tmp_path: Path,
                                                                                      capsys: pytest.CaptureFixture
                                                                                      ) -> None:
    out = tmp_path / "work"
    for command, name in [("query", "q.json"), ("score", "s.csv"), ("evaluate", "ev"), ("predict", "pred")]:
        assert main(_argv(command, world, out / name)) == 0
        assert main(_argv(command, world, out / name)) == 0  # its own earlier output: replaced (or skipped)
    capsys.readouterr()
    reports = [("query", out / "s.json"), ("query", out / "s.csv"), ("query", out / "ev" / "summary.json"),
               ("score", out / "q.csv"), ("evaluate", out / "pred"), ("query", out / "pred" / "labels.json")]
    for command, target in reports:
        before = _files(out)
        if command == "evaluate":  # a folder holding predict's labels.json and maps, and now a query record
            (out / "pred" / "summary.json").write_text((out / "q.json").read_text())
            before = _files(out)
        assert main(_argv(command, world, target)) == 2, (command, target)
        assert "was not written by asfda" in _one_line_error(capsys)
        assert _files(out) == before


def test_predict_keeps_label_maps_and_labels_json_it_did_not_write(world: dict, tmp_path: Path,
                                                                   capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "mine"
    out.mkdir()
    (out / "case01.nii.gz").write_bytes(b"the user's own segmentation")
    assert main(_argv("predict", world, out)) == 2
    assert "case01.nii.gz exists and was not written by asfda predict" in _one_line_error(capsys)
    assert sorted(p.name for p in out.iterdir()) == ["case01.nii.gz"]  # nothing written: not even case00
    (out / "case01.nii.gz").unlink()
    (out / "labels.json").write_text('{"background": 0, "tumour": 1}')  # e.g. the --labels file of an init
    assert main(_argv("predict", world, out)) == 2
    assert "labels.json exists" in _one_line_error(capsys)
    (out / "labels.json").unlink()
    assert main(_argv("predict", world, out)) == 0
