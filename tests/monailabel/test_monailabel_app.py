"""asfda's MONAI Label app without MONAI Label: the app folder `write_app` writes, and the backend its tasks call
(next sample = asfda query's pick, labels checked as ingest checks them, a round, inference with the current model).
The same app behind a real ``monailabel start_server`` is tested in test_monailabel_server.py beside it (slow)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from _monailabel_helpers import AFFINE, N_STUDIES, app_settings, write_studies
from asfda.errors import AsfdaError
from asfda.monailabel import APP_CONFIG, STRATEGY_NAMES, AppBackend, read_app_config, write_app
from asfda.predict import predict_model
from asfda.project import Project, ProjectSettings, project_lock
from asfda.query import query_dataset
from conftest import load_nifti, write_bundle, write_nifti


@pytest.fixture
def app(tmp_path: Path) -> dict[str, Path]:
    studies, truth = write_studies(tmp_path)
    model = write_bundle(tmp_path / "bundle")
    out = write_app(tmp_path / "app", model, settings=app_settings())
    return {"app": out, "studies": studies, "truth": truth, "model": model, "root": tmp_path}


def test_write_app_writes_main_py_and_settings(app: dict, tmp_path: Path) -> None:
    main_py = (app["app"] / "main.py").read_text()
    assert "from asfda.monailabel.server import AsfdaApp" in main_py
    cfg = read_app_config(app["app"])
    assert cfg.model == str(app["model"].resolve()) and cfg.project == (app["app"] / "project").resolve()
    assert cfg.settings == app_settings()
    write_app(app["app"], app["model"], settings=ProjectSettings(budget=1, seed=3))  # an app of ours: rewritten
    assert read_app_config(app["app"]).settings.seed == 3
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    with pytest.raises(AsfdaError, match="not an asfda MONAI Label app"):
        write_app(tmp_path / "busy", app["model"])
    with pytest.raises(AsfdaError, match="lies inside the model"):
        write_app(app["model"] / "app", app["model"])
    with pytest.raises(AsfdaError, match="model not found"):
        write_app(tmp_path / "app2", tmp_path / "nothing")
    (app["app"] / APP_CONFIG).write_text("{")
    with pytest.raises(AsfdaError, match="cannot read the app's settings"):
        AppBackend(app["app"], app["studies"])


@pytest.mark.parametrize("strategy", STRATEGY_NAMES)
def test_next_sample_is_asfda_querys_pick(app: dict, strategy: str) -> None:
    backend = AppBackend(app["app"], app["studies"])
    backend.open_project()
    pick = backend.next_sample(strategy)
    assert pick is not None
    expected = query_dataset(app["model"], app["studies"], strategy, 1, app["root"] / f"q_{strategy}.json",
                             device="cpu", progress=False, cache_dir=None)
    assert expected is not None
    assert pick is not None and pick["id"] == expected.ids[0]
    assert pick["asfda"]["strategy"] == strategy and pick["asfda"]["round"] == 0
    others = [f"case{i:02d}" for i in range(N_STUDIES) if f"case{i:02d}" != pick["id"]]
    assert (backend.next_sample(strategy, others) or {})["id"] in others  # only MONAI Label's unlabeled images
    assert backend.next_sample(strategy, []) is None


def test_project_is_started_on_the_studies_folder_once(app: dict, tmp_path: Path) -> None:
    backend = AppBackend(app["app"], app["studies"])
    project = backend.open_project()
    assert Path(project.state["pool"]).resolve() == app["studies"].resolve()
    assert backend.labels() == {"liver": 1, "spleen": 2}
    other = tmp_path / "other"
    shutil.copytree(app["studies"], other)
    with pytest.raises(AsfdaError, match="started on the studies folder"):
        AppBackend(app["app"], other).open_project()


def test_saved_labels_are_checked_and_ingested_then_a_round_and_inference(app: dict) -> None:
    backend = AppBackend(app["app"], app["studies"])
    backend.open_project()
    truth = app["truth"]
    assert backend.check_label("case01", truth / "case01.nii.gz") is None
    bad = write_nifti(app["root"] / "bad" / "case02.nii.gz", np.zeros((4, 4, 4), np.uint8), AFFINE)
    assert "differs from the image's" in (backend.check_label("case02", bad) or "")
    wrong_values = load_nifti(truth / "case03.nii.gz").get_fdata().astype(np.uint8) * 3
    assert "not label values [0, 1, 2]" in (backend.check_label(
        "case03", write_nifti(app["root"] / "bad" / "case03.nii.gz", wrong_values, AFFINE)) or "")
    assert "not an image of the asfda pool" in (backend.check_label("nope", truth / "case01.nii.gz") or "")

    final = backend.labels_dir
    final.mkdir(parents=True)
    shutil.copyfile(truth / "case01.nii.gz", final / "case01.nii.gz")
    shutil.copyfile(bad, final / "case02.nii.gz")  # put there by hand: ingest refuses it
    pick = backend.next_sample("asfda")
    assert pick is not None
    assert pick["asfda"]["labels"]["accepted"] == ["case01"]
    assert [r["file"] for r in pick["asfda"]["labels"]["refused"]] == ["case02.nii.gz"]
    assert pick["id"] != "case01" and sorted(Project(backend.root).state["labelled"]) == ["case01"]

    before = backend.infer(app["studies"] / "case04.nii.gz", app["root"] / "pred0.nii.gz")
    assert before["rounds_trained"] == 0 and before["weights"] is None
    predict_model(app["model"], app["studies"], app["root"] / "predicted", device="cpu", progress=False)
    assert np.array_equal(load_nifti(app["root"] / "pred0.nii.gz").get_fdata(),
                          load_nifti(app["root"] / "predicted" / "case04.nii.gz").get_fdata())
    result = backend.train()
    assert result["round"] == 0 and result["labelled"] == ["case01"] and result["weights"].endswith(".safetensors")
    assert (backend.root / "model" / "configs" / "metadata.json").exists()  # the round's export
    assert backend.stats()["rounds"] == 1
    after = backend.infer(app["studies"] / "case04.nii.gz", app["root"] / "pred1.nii.gz")
    img = load_nifti(app["studies"] / "case04.nii.gz")
    lab = load_nifti(app["root"] / "pred1.nii.gz")
    assert after["weights"] == result["weights"] and lab.shape == img.shape
    assert np.allclose(lab.affine, img.affine) and set(np.unique(lab.get_fdata())) <= {0, 1, 2}
    with pytest.raises(AsfdaError, match="not an image of the app's pool"):
        backend.infer(truth / "case04.nii.gz", app["root"] / "x.nii.gz")
    assert json.loads((backend.root / "project.json").read_text())["rounds"][0]["labelled_ids"] == ["case01"]


def test_image_ids_are_monai_labels_and_a_busy_project_is_not_ingested(tmp_path: Path) -> None:
    """Images named ``CASE_0000.nii.gz``: MONAI Label's id is ``CASE_0000``, asfda's case id ``CASE``; each side
    gets its own. While another asfda process (a training) holds the project, Next Sample still answers."""
    studies, truth = write_studies(tmp_path, 3)
    for p in sorted(studies.glob("*.nii.gz")):
        p.rename(p.with_name(p.name.replace(".nii.gz", "_0000.nii.gz")))
    app = write_app(tmp_path / "app", write_bundle(tmp_path / "bundle"), settings=app_settings())
    backend = AppBackend(app, studies)
    backend.open_project()
    assert backend.check_label("case01_0000", truth / "case01.nii.gz") is None
    pick = backend.next_sample("enpy", ["case00_0000", "case02_0000"])
    assert pick is not None
    assert pick["id"] in ("case00_0000", "case02_0000") and pick["id"] == pick["asfda"]["case_id"] + "_0000"
    backend.labels_dir.mkdir(parents=True)
    shutil.copyfile(truth / "case01.nii.gz", backend.labels_dir / "case01_0000.nii.gz")  # as MONAI Label names it
    with project_lock(backend.root, "finetune"):
        busy = backend.next_sample("enpy", ["case00_0000", "case02_0000"])
        assert busy is not None
    assert "another asfda process" in busy["asfda"]["labels"]["skipped"] and busy["id"] == pick["id"]
    after = backend.next_sample("enpy")
    assert after is not None and after["asfda"]["labels"]["accepted"] == ["case01"]
    info = backend.infer(studies / "case02_0000.nii.gz", tmp_path / "p.nii.gz")
    assert info["case_id"] == "case02" and load_nifti(tmp_path / "p.nii.gz").shape == (20, 18, 12)


def test_the_app_folder_never_lands_inside_a_dataset_or_a_project(app: dict, tmp_path: Path) -> None:
    """Hostile outputs: an app folder inside a dataset (nnU-Net raw) or inside an asfda project is refused."""
    from asfda.errors import AsfdaError
    from asfda.monailabel import write_app
    from asfda.project import init_project
    from conftest import write_bundle, write_nnunet

    data = write_nnunet(tmp_path / "ds", n=3)
    with pytest.raises(AsfdaError):
        write_app(data / "app", str(app["model"]))
    proj = init_project(tmp_path / "proj", str(write_bundle(tmp_path / "b")), str(data))
    with pytest.raises(AsfdaError):
        write_app(proj.root / "app", str(app["model"]))
    assert not (data / "app").exists() and not (proj.root / "app").exists()
