"""Where commands write: never into their inputs (dataset or model), only where writing works (checked before any
model is loaded), and a failed command leaves nothing half-written behind."""

from __future__ import annotations

import errno
import json
import os
import tempfile
from pathlib import Path

import numpy as np
import pytest

from _output_helpers import _argv as command_line
from asfda.cli import main
from conftest import write_bundle, write_nnunet


@pytest.fixture
def inputs(tmp_path: Path) -> dict[str, Path]:
    return {"data": write_nnunet(tmp_path / "ds", n=4), "model": write_bundle(tmp_path / "bundle"), "root": tmp_path}


def _files(*folders: Path) -> dict[Path, bytes]:
    return {p: p.read_bytes() for f in folders for p in sorted(Path(f).rglob("*")) if p.is_file()}


def _argv(command: str, data: Path, model: Path, out: Path) -> list[str]:
    """A command line of ``command`` that writes to ``out`` (small settings: it must never get that far)."""
    return command_line(command, {"model": model, "data": data}, out)


def _one_line_error(capsys: pytest.CaptureFixture) -> str:
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


# ---------------------------------------------------------------------------------------------- 1: inputs
INSIDE_INPUTS = [
    ("query", "ds/imagesTr/case00_0000.nii.gz"),  # would replace an MR image by a JSON file
    ("score", "ds/labelsTr/case00.nii.gz"),  # would replace a label by a CSV
    ("score", "ds/scores.csv"),  # inside the dataset folder
    ("query", "bundle/models/model.pt"),  # the model's weights
    ("predict", "ds/labelsTr"),
    ("predict", "ds/predictions"),
    ("predict", "bundle"),
    ("evaluate", "ds"),
    ("evaluate", "bundle/configs"),
    ("simulate", "ds/runs"),
    ("simulate", "bundle"),
    ("init", "ds/project"),
    ("init", "bundle/project"),
]


@pytest.mark.parametrize(("command", "out"), INSIDE_INPUTS, ids=[f"{c}-{o}" for c, o in INSIDE_INPUTS])
def test_no_command_writes_inside_its_inputs(inputs: dict, command: str, out: str,
                                             capsys: pytest.CaptureFixture) -> None:
    root = inputs["root"]
    before = _files(inputs["data"], inputs["model"])
    assert main(_argv(command, inputs["data"], inputs["model"], root / out)) == 2
    line = _one_line_error(capsys)
    assert str(root / out) in line and "overwrite" in line and "fix:" in line
    assert _files(inputs["data"], inputs["model"]) == before


def test_outputs_are_resolved_through_symlinks(inputs: dict, capsys: pytest.CaptureFixture) -> None:
    link = inputs["root"] / "elsewhere"
    link.symlink_to(inputs["data"] / "labelsTr", target_is_directory=True)
    before = _files(inputs["data"])
    assert main(_argv("query", inputs["data"], inputs["model"], link / "case00.nii.gz")) == 2
    assert "overwrite" in _one_line_error(capsys)
    assert main(_argv("predict", inputs["data"], inputs["model"], link)) == 2
    assert "overwrite" in _one_line_error(capsys)
    assert _files(inputs["data"]) == before


def test_score_sidecars_never_replace_an_input(inputs: dict, capsys: pytest.CaptureFixture) -> None:
    """score writes OUT-stem.json beside its CSV: with --out net.csv that would be the model's config net.json."""
    root = inputs["root"]
    (root / "net.pt").write_bytes((inputs["model"] / "models" / "model.pt").read_bytes())
    (root / "net.json").write_text((inputs["model"] / "configs" / "inference.json").read_text())
    before = _files(root / "net.json")
    assert main(["score", "--model", str(root / "net.pt"), "--model-config", str(root / "net.json"),
                 "--data", str(inputs["data"]), "--strategies", "enpy", "--out", str(root / "net.csv"),
                 "--no-progress"]) == 2
    line = _one_line_error(capsys)
    assert str(root / "net.json") in line and "overwrite" in line
    assert _files(root / "net.json") == before and not (root / "net.csv").exists()


def test_the_shared_check_directly(tmp_path: Path) -> None:
    from asfda.errors import AsfdaError
    from asfda.io.outputs import refuse_output_inside_inputs

    data = write_nnunet(tmp_path / "ds", n=1)
    refuse_output_inside_inputs(tmp_path / "out", inputs=[data, tmp_path / "model.pt"])  # beside: fine
    refuse_output_inside_inputs(tmp_path / "ds2", inputs=[data])  # a name that merely starts alike
    for bad in (data, data / "imagesTr", data / "new" / "deeper", tmp_path / "model.pt"):
        with pytest.raises(AsfdaError, match="overwrite"):
            refuse_output_inside_inputs(bad, inputs=[data, tmp_path / "model.pt"])


# ---------------------------------------------------------------------------------------------- 2: writable
COMMANDS = ["query", "score", "predict", "evaluate", "simulate", "init"]


def _no_model_loading(monkeypatch: pytest.MonkeyPatch) -> None:
    def boom(*args, **kwargs):
        raise AssertionError("the model was loaded before the output was checked")

    for where in ("asfda.predict.load_model", "asfda.query.load_model", "asfda.simulate.load_model",
                  "asfda.evaluate.load_model", "asfda.project.setup.load_model", "asfda.project.state.load_model",
                  "asfda.models.load_model"):  # the package last: a module imported by the patching binds the real one
        monkeypatch.setattr(where, boom)


def _out_name(command: str) -> str:
    return {"query": "q.json", "score": "s.csv"}.get(command, "out")


@pytest.mark.parametrize("command", COMMANDS)
def test_an_output_under_a_regular_file_is_one_line_before_any_work(inputs: dict, command: str,
                                                                    monkeypatch: pytest.MonkeyPatch,
                                                                    capsys: pytest.CaptureFixture) -> None:
    _no_model_loading(monkeypatch)
    afile = inputs["root"] / "notes.txt"
    afile.write_text("a file, not a folder\n")
    out = afile / "sub" / _out_name(command)
    assert main(_argv(command, inputs["data"], inputs["model"], out)) == 2
    line = _one_line_error(capsys)
    assert str(afile) in line and "fix:" in line
    assert afile.read_text() == "a file, not a folder\n"


@pytest.mark.parametrize("command", COMMANDS)
def test_a_read_only_output_folder_is_one_line_before_any_work(inputs: dict, command: str,
                                                               monkeypatch: pytest.MonkeyPatch,
                                                               capsys: pytest.CaptureFixture) -> None:
    """A read-only mount, simulated (tests run as root, for whom chmod changes nothing): creating any file
    under ``ro/`` fails with EROFS, as the kernel answers on a read-only file system."""
    _no_model_loading(monkeypatch)
    ro = inputs["root"] / "ro"
    ro.mkdir()
    real_mkstemp, real_mkdir = tempfile.mkstemp, Path.mkdir

    def mkstemp(*args, dir=None, **kwargs):
        if dir is not None and Path(dir).resolve().is_relative_to(ro):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(dir))
        return real_mkstemp(*args, dir=dir, **kwargs)

    def mkdir(self, *args, **kwargs):
        if Path(self).resolve().is_relative_to(ro):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(self))
        return real_mkdir(self, *args, **kwargs)

    monkeypatch.setattr(tempfile, "mkstemp", mkstemp)
    monkeypatch.setattr(Path, "mkdir", mkdir)
    out = ro / "results" / _out_name(command)
    assert main(_argv(command, inputs["data"], inputs["model"], out)) == 2
    line = _one_line_error(capsys)
    assert str(ro) in line and "read-only" in line.lower()
    assert list(ro.iterdir()) == []


def test_an_output_under_proc_is_one_line(inputs: dict, monkeypatch: pytest.MonkeyPatch,
                                          capsys: pytest.CaptureFixture) -> None:
    """/proc refuses new files even to root."""
    if not Path("/proc").is_dir():
        pytest.skip("no /proc here")
    _no_model_loading(monkeypatch)
    out = Path("/proc") / f"asfda-test-{os.getpid()}"
    assert main(_argv("predict", inputs["data"], inputs["model"], out)) == 2
    assert "/proc" in _one_line_error(capsys)


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into folders without write permission")
def test_a_folder_without_write_permission_is_one_line(inputs: dict, monkeypatch: pytest.MonkeyPatch,
                                                       capsys: pytest.CaptureFixture) -> None:
    _no_model_loading(monkeypatch)
    locked = inputs["root"] / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        assert main(_argv("evaluate", inputs["data"], inputs["model"], locked / "out")) == 2
        assert str(locked) in _one_line_error(capsys)
    finally:
        locked.chmod(0o755)


def test_the_write_probe_leaves_nothing(tmp_path: Path) -> None:
    from asfda.io.outputs import check_writable_folder

    check_writable_folder(tmp_path / "a" / "b")  # not made: nothing is created by the check
    assert list(tmp_path.iterdir()) == []
    (tmp_path / "c").mkdir()
    check_writable_folder(tmp_path / "c")
    assert list((tmp_path / "c").iterdir()) == []


# ---------------------------------------------------------------------------------------------- 4: debris
def test_a_failed_predict_leaves_no_labels_json(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    data = write_nnunet(tmp_path / "ds", n=1)
    image = data / "imagesTr" / "case00_0000.nii.gz"
    blob = image.read_bytes()
    image.write_bytes(blob[: len(blob) // 2])  # the header reads, the voxels do not
    out = tmp_path / "out"
    assert main(["predict", "--model", str(write_bundle(tmp_path / "bundle")), "--images", str(data),
                 "--out", str(out), "--no-progress"]) == 2
    assert str(image) in _one_line_error(capsys)
    assert not out.exists() or list(out.iterdir()) == []


def test_predict_writes_labels_json_once_a_case_is_done(tmp_path: Path) -> None:
    from asfda.predict import predict_model

    data = write_nnunet(tmp_path / "ds", n=2)
    out = tmp_path / "out"
    predict_model(write_bundle(tmp_path / "bundle"), data, out, progress=False)
    assert json.loads((out / "labels.json").read_text()) == {"background": 0, "liver": 1, "spleen": 2}
    (out / "labels.json").unlink()  # every case up to date: labels.json is written all the same
    assert predict_model(tmp_path / "bundle", data, out, progress=False)["skipped"] == ["case00", "case01"]
    assert (out / "labels.json").is_file()


def test_a_failed_init_leaves_no_half_made_project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from asfda.project import Project, ProjectSettings, init_project

    data = write_nnunet(tmp_path / "ds", n=2)
    model = write_bundle(tmp_path / "bundle")
    before = sorted(p.name for p in tmp_path.iterdir())

    def fail(self, event=None):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Project, "save", fail)
    with pytest.raises(OSError):
        init_project(tmp_path / "proj", str(model), str(data), ProjectSettings(device="cpu"))
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # no project folder, no temporary sibling
    with pytest.raises(OSError):
        init_project(tmp_path / "deep" / "er" / "proj", str(model), str(data), ProjectSettings(device="cpu"))
    assert sorted(p.name for p in tmp_path.iterdir()) == before
    # an existing empty folder (made by the user) stays as it was
    (tmp_path / "mine").mkdir()
    with pytest.raises(OSError):
        init_project(tmp_path / "mine", str(model), str(data), ProjectSettings(device="cpu"))
    assert list((tmp_path / "mine").iterdir()) == []
    monkeypatch.undo()
    p = init_project(tmp_path / "mine", str(model), str(data), ProjectSettings(device="cpu"))
    assert (p.root / "project.json").is_file() and p.root == (tmp_path / "mine").resolve()
    assert sorted(x.name for x in tmp_path.iterdir()) == sorted([*before, "mine"])
    np.testing.assert_equal(p.state["pool_cases"], 2)


def test_init_refuses_a_folder_holding_names_a_project_uses(tmp_path: Path) -> None:
    """A user's own model/ or labels/ folder would be written over by finetune or ingest."""
    from asfda.errors import AsfdaError
    from asfda.project import ProjectSettings, init_project

    data = write_nnunet(tmp_path / "ds", n=2)
    work = tmp_path / "work"
    mine = write_bundle(work / "model")  # the user's model, where the project exports its adapted bundle
    (work / "notes.txt").write_text("mine\n")
    before = _files(work)
    with pytest.raises(AsfdaError, match="already holds model"):
        init_project(work, str(mine), str(data), ProjectSettings(device="cpu"))
    assert _files(work) == before and sorted(p.name for p in work.iterdir()) == ["model", "notes.txt"]
    (work / "model").rename(tmp_path / "model")
    p = init_project(work, str(tmp_path / "model"), str(data), ProjectSettings(device="cpu"))  # other files: kept
    assert (work / "notes.txt").read_text() == "mine\n" and (p.root / "project.json").is_file()
    assert not [x for x in work.iterdir() if "asfda-init" in x.name]
