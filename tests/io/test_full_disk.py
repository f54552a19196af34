"""A full disk (or another write error) is one line that leaves the earlier outputs whole: predict keeps its finished
cases, finetune does not record the round, and a really full (small tmpfs) disk."""

from __future__ import annotations

import errno
import json
import os
import subprocess
from pathlib import Path

import pytest

from _output_helpers import _argv, _files, _one_line_error, _paths
from asfda.cli import main
from conftest import write_bundle, write_nnunet

pytestmark = pytest.mark.usefixtures("cwd_apart")


# ---------------------------------------------------------------------------------------------- a full disk
def test_write_failure_recognises_what_the_writers_raise() -> None:
    from asfda.io.atomic import write_failure

    assert "full" in str(write_failure(OSError(errno.ENOSPC, "No space left on device")))
    assert "quota" in str(write_failure(OSError(errno.EDQUOT, "Disk quota exceeded")))
    assert "input/output" in str(write_failure(OSError(errno.EIO, "Input/output error")))
    assert "full" in str(write_failure(OSError("1000000 requested and 131056 written")))  # np.save
    assert "full" in str(write_failure(RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 "
                                                    "vs 534")))  # torch.save
    assert "full" in str(write_failure(Exception("Error while serializing: I/O error: No space left on device (os "
                                                 "error 28)")))  # safetensors
    try:
        try:
            raise OSError(errno.ENOSPC, "No space left on device")
        except OSError as inner:
            raise RuntimeError("wrapped") from inner
    except RuntimeError as outer:
        assert "full" in str(write_failure(outer))
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
