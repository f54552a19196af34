"""Outputs never land on what the tool or the user owns: any dataset, asfda project or model folder (whether or not
it is the command's input), a name that marks one, or an existing file the command did not write itself; a full disk
is one line that leaves the earlier outputs whole; --alpha and --device are checked when they are parsed."""

from __future__ import annotations

import errno
import json
import os
import subprocess
from pathlib import Path

import pytest

from asfda.cli import main
from asfda.errors import AsfdaError
from conftest import write_bundle, write_nnunet


@pytest.fixture
def world(tmp_path: Path) -> dict[str, Path]:
    """The command's inputs, and what the user owns beside them: another dataset, a project, another model."""
    project = tmp_path / "project"
    (project / "labels").mkdir(parents=True)
    (project / "annotate" / "round0").mkdir(parents=True)
    (project / "project.json").write_text(json.dumps({"format": 1, "pool": "somewhere", "labelled": {"case00": 0}}))
    (project / "labels" / "case00.nii.gz").write_bytes(b"an accepted label")
    return {"data": write_nnunet(tmp_path / "ds", n=2), "model": write_bundle(tmp_path / "bundle"),
            "other": write_nnunet(tmp_path / "other", n=1), "other_model": write_bundle(tmp_path / "other_model"),
            "project": project, "root": tmp_path}


@pytest.fixture(autouse=True)
def _cwd(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The CLI's prepared-volume cache (./.cache) goes to a folder of its own, outside what the tests compare."""
    (tmp_path / "cwd").mkdir()
    monkeypatch.chdir(tmp_path / "cwd")


def _files(folder: Path) -> dict[Path, bytes]:
    return {p: p.read_bytes() for p in sorted(Path(folder).rglob("*")) if p.is_file()}


def _paths(folder: Path) -> set[Path]:
    return set(Path(folder).rglob("*"))


def _one_line_error(capsys: pytest.CaptureFixture) -> str:
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def _argv(command: str, w: dict, out: Path | str, *extra: str) -> list[str]:
    m, d, o = str(w["model"]), str(w["data"]), str(out)
    return {
        "query": ["query", "--model", m, "--data", d, "--budget", "1", "--strategy", "random", "--out", o],
        "score": ["score", "--model", m, "--data", d, "--strategies", "enpy", "--out", o],
        "predict": ["predict", "--model", m, "--images", d, "--out", o],
        "evaluate": ["evaluate", "--model", m, "--data", d, "--out", o],
        "simulate": ["simulate", "--model", m, "--pool", d, "--out", o, "--strategies", "random", "--budget", "1",
                     "--rounds", "1", "--steps", "1", "--no-upper-bound", "--no-guard"],
        "init": ["init", o, "--model", m, "--pool", d, "--steps", "1"],
        "phantom": ["phantom", o, "--n-source", "1", "--n-target", "1"],
    }[command] + ["--no-progress", *(["--device", "cpu"] if command != "phantom" else []), *extra]


def _no_model_loading(monkeypatch: pytest.MonkeyPatch) -> None:
    def boom(*args, **kwargs):
        raise AssertionError("the model was loaded before the output was checked")

    for where in ("asfda.predict.load_model", "asfda.query.load_model", "asfda.simulate.load_model",
                  "asfda.evaluate.load_model", "asfda.project.setup.load_model", "asfda.models.load_model"):
        monkeypatch.setattr(where, boom)


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

    assert PROJECT_MARKERS == (PROJECT_FILE, BACKUP_FILE)
    (tmp_path / "plain").mkdir()
    assert owned_place(tmp_path / "plain" / "x") is None
    (tmp_path / "nx").mkdir()  # another tool's project.json (Nx, .NET): not an asfda project
    (tmp_path / "nx" / "project.json").write_text('{"name": "app", "targets": {}}')
    assert owned_place(tmp_path / "nx" / "out") is None
    (tmp_path / "bak").mkdir()  # an asfda project whose project.json is lost: its .bak still marks it
    (tmp_path / "bak" / "project.json.bak").write_text('{"format": 1, "pool": "p"}')
    assert owned_place(tmp_path / "bak" / "o")[0] == tmp_path / "bak"
    (tmp_path / "broken").mkdir()  # a damaged project.json: counted as asfda's
    (tmp_path / "broken" / "project.json").write_text("{not json")
    assert owned_place(tmp_path / "broken")[0] == tmp_path / "broken"
    (tmp_path / "raw" / "imagesTr").mkdir(parents=True)  # a dataset without its dataset.json yet
    assert "dataset" in owned_place(tmp_path / "raw" / "out")[1]
    res = tmp_path / "nnUNet_results" / "Dataset001_X" / "nnUNetTrainer__nnUNetPlans__3d_fullres"
    (res / "fold_0").mkdir(parents=True)
    (res / "plans.json").write_text("{}")
    (res / "dataset.json").write_text("{}")
    assert "model" in owned_place(res / "fold_0" / "preds")[1]
    (tmp_path / "yaml_bundle" / "configs").mkdir(parents=True)
    (tmp_path / "yaml_bundle" / "configs" / "inference.yaml").write_text("network_def: {}\n")
    assert "MONAI bundle" in owned_place(tmp_path / "yaml_bundle" / "eval")[1]


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


# ---------------------------------------------------------------------------------------------- a full disk
def test_write_failure_recognises_what_the_writers_raise() -> None:
    from asfda.io.atomic import write_failure

    assert "full" in write_failure(OSError(errno.ENOSPC, "No space left on device"))
    assert "quota" in write_failure(OSError(errno.EDQUOT, "Disk quota exceeded"))
    assert "input/output" in write_failure(OSError(errno.EIO, "Input/output error"))
    assert "full" in write_failure(OSError("1000000 requested and 131056 written"))  # np.save
    assert "full" in write_failure(RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 "
                                                "vs 534"))  # torch.save
    assert "full" in write_failure(Exception("Error while serializing: I/O error: No space left on device (os "
                                             "error 28)"))  # safetensors
    try:
        try:
            raise OSError(errno.ENOSPC, "No space left on device")
        except OSError as inner:
            raise RuntimeError("wrapped") from inner
    except RuntimeError as outer:
        assert "full" in write_failure(outer)
    assert write_failure(OSError(errno.ENOENT, "No such file")) is None
    assert write_failure(ValueError("bad")) is None


def _enospc(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def test_a_full_disk_mid_predict_keeps_finished_cases_and_removes_the_unfinished_one(
        world: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    import asfda.predict as P

    real = P.write_label_map
    calls = {"n": 0}

    def second_fails(*args, **kwargs):
        calls["n"] += 1
        return _enospc() if calls["n"] == 2 else real(*args, **kwargs)

    monkeypatch.setattr(P, "write_label_map", second_fails)
    out = tmp_path / "deep" / "pred"
    assert main(_argv("predict", world, out)) == 2
    line = _one_line_error(capsys)
    assert "disk is full" in line and "run the same command again" in line
    assert sorted(p.name for p in out.iterdir()) == ["case00.asfda.json", "case00.nii.gz", "labels.json"]
    monkeypatch.setattr(P, "write_label_map", _enospc)  # the very first case: nothing is left, not even the folders
    fresh = tmp_path / "new" / "er"
    assert main(_argv("predict", world, fresh)) == 2
    assert "disk is full" in _one_line_error(capsys)
    assert not (tmp_path / "new").exists()
    monkeypatch.undo()
    assert main(_argv("predict", world, out)) == 0
    assert "1 case segmented, 1 skipped" in capsys.readouterr().out


@pytest.mark.parametrize("command", ["score", "evaluate", "query"])
def test_a_full_disk_leaves_the_earlier_outputs_whole(world: dict, tmp_path: Path, command: str,
                                                      monkeypatch: pytest.MonkeyPatch,
                                                      capsys: pytest.CaptureFixture) -> None:
    work = tmp_path / "work"
    out = work / {"score": "s.csv", "evaluate": "ev", "query": "q.json"}[command]
    assert main(_argv(command, world, out)) == 0
    before, paths = _files(work), _paths(work)
    if command == "score":  # NumPy's short write has no errno
        def short(*args, **kwargs):
            raise OSError("1000 requested and 12 written")

        monkeypatch.setattr("asfda.query._write_npy", short)
    else:
        monkeypatch.setattr(f"asfda.{command if command == 'evaluate' else 'query'}.atomic_write_json", _enospc)
    capsys.readouterr()
    assert main(_argv(command, world, out, *(["--seed", "3"] if command == "query" else []))) == 2
    assert "disk is full" in _one_line_error(capsys)
    assert _files(work) == before and _paths(work) == paths  # no temporary left


def test_an_io_error_in_a_command_without_its_own_handling_is_one_line(tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch,
                                                                       capsys: pytest.CaptureFixture) -> None:
    """`dispatch` turns any storage failure into one line (phantom builds aside: nothing is left)."""
    def eio(*args, **kwargs):
        raise OSError(errno.EIO, os.strerror(errno.EIO))

    monkeypatch.setattr("asfda.phantom.writer._save_nifti", eio)
    assert main(["phantom", str(tmp_path / "b" / "bench"), "--n-source", "1", "--n-target", "1"]) == 2
    assert "input/output error" in _one_line_error(capsys)
    assert list((tmp_path / "b").iterdir()) == []


def test_a_full_disk_in_finetune_is_one_line_and_the_round_is_not_recorded(tmp_path: Path,
                                                                          monkeypatch: pytest.MonkeyPatch,
                                                                          capsys: pytest.CaptureFixture) -> None:
    """safetensors says "os error 28" in an exception of its own: the round's weights are not kept, the state is
    the one before, and finetune run again (space freed) finishes the round."""
    import shutil

    import safetensors.torch

    pool = write_nnunet(tmp_path / "pool", n=3)
    shutil.move(pool / "labelsTr", tmp_path / "truth")
    proj = tmp_path / "proj"
    assert main(["init", str(proj), "--model", str(write_bundle(tmp_path / "bundle")), "--pool", str(pool),
                 "--budget", "1", "--steps", "2", "--strategy", "random", "--device", "cpu", "--no-progress",
                 "--no-guard"]) == 0
    assert main(["next", str(proj), "--no-progress"]) == 0
    ids = json.loads((proj / "project.json").read_text())["query"]["ids"]
    (tmp_path / "answers").mkdir()
    for cid in ids:
        shutil.copyfile(tmp_path / "truth" / f"{cid}.nii.gz", tmp_path / "answers" / f"{cid}.nii.gz")
    assert main(["ingest", str(tmp_path / "answers"), str(proj), "--no-progress"]) == 0
    state = (proj / "project.json").read_text()

    class SafetensorError(Exception):
        pass

    def full(*args, **kwargs):
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(safetensors.torch, "save_file", full)
    capsys.readouterr()
    assert main(["finetune", str(proj), "--no-progress"]) == 2
    assert "disk is full" in _one_line_error(capsys)
    assert (proj / "project.json").read_text() == state
    assert not [p for p in (proj / "weights").iterdir()]  # no round weights, no temporary
    monkeypatch.undo()
    assert main(["finetune", str(proj), "--no-progress"]) == 0
    assert json.loads((proj / "project.json").read_text())["rounds"][0]["round"] == 0


@pytest.fixture
def small_disk(tmp_path: Path):
    """A 1 MiB tmpfs mounted for the test (root only; skipped where mounting is not allowed)."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    disk = tmp_path / "disk"
    disk.mkdir()
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(disk)], capture_output=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {proc.stderr.decode(errors='replace').strip()}")
    try:
        yield disk
    finally:
        subprocess.run(["umount", "-l", str(disk)], capture_output=True)


def _fill(disk: Path, leave: int) -> None:
    """Fills ``disk`` until ``leave`` bytes are free."""
    (disk / "filler").unlink(missing_ok=True)
    st = os.statvfs(disk)
    with open(disk / "filler", "wb") as f:
        f.write(b"\0" * max(st.f_bavail * st.f_frsize - leave, 0))


def test_a_really_full_disk(world: dict, small_disk: Path, capsys: pytest.CaptureFixture) -> None:
    """On a full tmpfs: predict, score, evaluate and query fail in one line, every earlier output as it was; a
    predict into a new folder that fills the disk mid-way keeps its finished case, and nothing unfinished."""
    pred, scores, ev, q = small_disk / "pred", small_disk / "s.csv", small_disk / "ev", small_disk / "q.json"
    for command, out in [("predict", pred), ("score", scores), ("evaluate", ev), ("query", q)]:
        assert main(_argv(command, world, out)) == 0
    earlier = _files(small_disk)
    _fill(small_disk, 0)
    capsys.readouterr()
    for argv in [_argv("predict", world, pred, "--overwrite", "--tta"), _argv("score", world, scores, "--seed", "1"),
                 _argv("evaluate", world, ev), _argv("query", world, q, "--seed", "2"),
                 _argv("predict", world, small_disk / "new")]:
        assert main(argv) == 2, argv
        assert "disk is full" in _one_line_error(capsys)
    now = _files(small_disk)
    del now[small_disk / "filler"]
    assert now == earlier and not (small_disk / "new").exists()

    _fill(small_disk, 16 << 10)  # four pages: the first case of a new folder fits, the second does not
    assert main(_argv("predict", world, small_disk / "new")) == 2
    assert "disk is full" in _one_line_error(capsys)
    new = small_disk / "new"
    names = sorted(p.name for p in new.iterdir())
    assert not [n for n in names if n.startswith(".")]  # no temporary
    maps = [n for n in names if n.endswith(".nii.gz")]
    assert 0 < len(maps) < 2 and sorted(n for n in names if n.endswith(".asfda.json")) == [
        m.replace(".nii.gz", ".asfda.json") for m in maps]  # a sidecar for each map, none for the unfinished case
    assert all(json.loads((new / n).read_text())["settings"] for n in names if n.endswith(".asfda.json"))
    (small_disk / "filler").unlink()
    assert main(_argv("predict", world, new)) == 0
    assert "1 case segmented, 1 skipped" in capsys.readouterr().out


# ---------------------------------------------------------------------------------------------- parse-time checks
@pytest.mark.parametrize("value", ["inf", "-inf", "nan", "-0.1", "1.5", "half"])
def test_query_alpha_outside_0_1_is_refused_when_parsed(value: str, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["query", "--model", "m", "--data", "d", "--budget", "1", f"--alpha={value}"])
    assert exc.value.code == 2 and "--alpha" in capsys.readouterr().err


@pytest.mark.parametrize("value", ["evil", "gpu", "cuda:", "cuda:x", "CPU", "cpu:0", ""])
def test_a_device_name_that_is_none_of_the_forms_is_refused_when_parsed(value: str,
                                                                        capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["predict", "--model", "m", "--data", "d", "--out", "o", f"--device={value}"])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and "auto, cpu, cuda, cuda:N" in err and "mps" in err and "Traceback" not in err


def test_the_device_forms_parse_and_select_device_names_what_is_missing() -> None:
    import torch

    from asfda.cli import build_parser
    from asfda.engine import select_device

    parser = build_parser()
    for value in ("auto", "cpu", "cuda", "cuda:1", "mps"):
        assert parser.parse_args(["query", "--model", "m", "--data", "d", "--budget", "1", "--device", value,
                                  "--alpha", "1"]).device == value
    assert select_device("cpu") == torch.device("cpu") and select_device(None).type in ("cpu", "cuda")
    with pytest.raises(AsfdaError, match="auto, cpu, cuda"):
        select_device("evil")
    if not torch.cuda.is_available():
        with pytest.raises(AsfdaError, match="CUDA is not available"):
            select_device("cuda:0")
    else:
        with pytest.raises(AsfdaError, match="CUDA device"):
            select_device(f"cuda:{torch.cuda.device_count()}")
    if not torch.backends.mps.is_available():
        with pytest.raises(AsfdaError, match="MPS"):
            select_device("mps")
