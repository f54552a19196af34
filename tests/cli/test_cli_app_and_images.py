"""The command line of issue 35's parts: ``asfda monailabel-app`` (writes the MONAI Label app with init's settings
flags and prints the server command) and ``asfda next --images copy|link``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from asfda.cli import main
from conftest import make_volume, write_bundle, write_nifti

AFFINE = np.diag([2.0, 2.0, 3.0, 1.0])


def _settings_written(app: Path) -> dict:
    return json.loads((app / "asfda_app.json").read_text())["settings"]


def test_monailabel_app_writes_the_app_and_prints_the_server_command(tmp_path: Path,
                                                                     capsys: pytest.CaptureFixture) -> None:
    from asfda.monailabel import read_app_config, write_app

    model = write_bundle(tmp_path / "bundle")
    out = tmp_path / "app"
    assert main(["monailabel-app", str(out), "--model", str(model)]) == 0
    printed = capsys.readouterr().out.splitlines()
    assert printed[-1] == f"next: monailabel start_server --app {out} --studies STUDIES --conf device cpu"
    assert "from asfda.monailabel.server import AsfdaApp" in (out / "main.py").read_text()
    cfg = read_app_config(out)
    assert cfg.model == str(model.resolve()) and cfg.settings.budget == 1
    # without flags: the settings write_app gives an app it is given none of (budget 1, the project's others)
    assert _settings_written(out) == _settings_written(write_app(tmp_path / "reference", model))


def test_monailabel_app_takes_inits_settings_flags(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from asfda.monailabel import read_app_config

    model = write_bundle(tmp_path / "bundle")
    out = tmp_path / "app"
    assert main(["monailabel-app", str(out), "--model", str(model), "--budget", "2", "--steps", "7", "--device", "cpu",
                 "--seed", "4", "--no-guard", "--strategy", "random"]) == 0
    s = read_app_config(out).settings
    assert (s.budget, s.train.steps, s.device, s.seed, s.train.guard, s.strategy) == (2, 7, "cpu", 4, False, "random")
    capsys.readouterr()
    # a bad setting and a missing model: one line each, exit 2
    assert main(["monailabel-app", str(tmp_path / "app2"), "--model", str(model), "--budget", "0"]) == 2
    assert main(["monailabel-app", str(tmp_path / "app3"), "--model", str(tmp_path / "nothing")]) == 2
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert len(err) == 2 and "budget" in err[0] and "model not found" in err[1]
    assert not (tmp_path / "app2").exists() and not (tmp_path / "app3").exists()


def test_monailabel_app_device_flag_is_in_the_printed_command(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "my app"
    assert main(["monailabel-app", str(out), "--model", str(write_bundle(tmp_path / "bundle")), "--device",
                 "cuda:1"]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == (
        f"next: monailabel start_server --app '{out}' --studies STUDIES --conf device cuda:1")


def test_asfda_help_lists_monailabel_app_and_imports_no_torch() -> None:
    code = ("import contextlib, io, sys\nfrom asfda.cli import main\nbuf = io.StringIO()\n"
            "with contextlib.redirect_stdout(buf):\n    try:\n        main(['--help'])\n    except SystemExit:\n"
            "        pass\nprint('monailabel-app' in buf.getvalue(), 'torch' in sys.modules)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["True", "False"]


# ---------------------------------------------------------------------------------------------- next --images
@pytest.fixture
def project(tmp_path: Path) -> Path:
    for i in range(3):
        write_nifti(tmp_path / "pool" / f"case{i:02d}.nii.gz", make_volume(i)[0], AFFINE)
    write_bundle(tmp_path / "bundle")
    proj = tmp_path / "proj"
    assert main(["init", str(proj), "--model", str(tmp_path / "bundle"), "--pool", str(tmp_path / "pool"),
                 "--budget", "1", "--device", "cpu", "--no-progress"]) == 0
    return proj


def _round_images(proj: Path) -> list[Path]:
    return sorted((proj / "annotate" / "round0" / "images").iterdir())


def test_next_links_the_images_when_asked(project: Path) -> None:
    assert main(["next", str(project), "--images", "link", "--no-progress"]) == 0
    images = _round_images(project)
    assert len(images) == 1 and images[0].is_symlink() and not os.path.isabs(os.readlink(images[0]))


def test_next_copies_the_images_by_default(project: Path) -> None:
    assert main(["next", str(project), "--no-progress"]) == 0
    images = _round_images(project)
    assert len(images) == 1 and images[0].is_file() and not images[0].is_symlink()


def test_next_refuses_an_unknown_images_mode(project: Path, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as e:
        main(["next", str(project), "--images", "absolute"])
    assert e.value.code == 2 and "invalid choice: 'absolute'" in capsys.readouterr().err


def test_next_help_shows_the_images_modes_and_default(capsys: pytest.CaptureFixture) -> None:
    from asfda.project import next_query
    from asfda.project.annotate import IMAGE_MODES

    with pytest.raises(SystemExit):
        main(["next", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    default = __import__("inspect").signature(next_query).parameters["images"].default
    assert ", ".join(IMAGE_MODES) in text and f"(default: {default})" in text
