"""What asfda's MONAI Label app does, in asfda's own terms and without MONAI Label: the app's project, the label
check, the next sample, a round of fine-tuning and a prediction. `asfda.monailabel.server` puts MONAI Label's task
classes around these calls; everything here runs (and is tested) without MONAI Label installed.

The app keeps an ordinary asfda project (`asfda.project`) in ``APP/project/``, started on the first server start with
the studies folder as its pool (a plain folder of NIfTI images; MONAI Label's ``labels/`` folder inside it is not
read as images). Labels that Slicer or OHIF save land in MONAI Label's datastore, ``STUDIES/labels/final/``; each one
is checked as ``asfda ingest`` checks it (`asfda.io.labels.check_label`, the check `ingest_labels` runs) before
MONAI Label keeps it, and ingested into the project (`ingest_labels`) before each next sample and each training.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from asfda.config import config_from_dict
from asfda.errors import AsfdaError
from asfda.io.datasets import Case, Dataset
from asfda.io.labels import check_label
from asfda.io.nifti import strip_nifti_suffix, write_label_map
from asfda.models.native_grid import label_map_on_native_grid
from asfda.project import PROJECT_FILE, Project, ProjectSettings, finetune_project, ingest_labels, init_project
from asfda.rounds import select_batch
from asfda.selection import build_strategy

__all__ = ["APP_CONFIG", "LABEL_TAG", "PROJECT_FOLDER", "STRATEGY_NAMES", "AppBackend", "AppConfig",
           "read_app_config"]

APP_CONFIG = "asfda_app.json"
"""The app's settings file in the app folder: the model, the project folder and the project's settings."""
APP_FORMAT = 1
PROJECT_FOLDER = "project"
STRATEGY_NAMES = ("asfda", "random", "enpy")
"""The app's active-learning strategies: asfda's query, and random and ENPY to compare it with."""
LABEL_TAG = "final"
"""MONAI Label's tag of a finished label (``DefaultLabelTag.FINAL``): ``STUDIES/labels/final/CASE.nii.gz``."""


@dataclasses.dataclass(frozen=True)
class AppConfig:
    """``asfda_app.json``: the pretrained model, the project folder and the settings it is started with."""

    model: str
    project: Path
    settings: ProjectSettings


def read_app_config(app_dir: str | Path) -> AppConfig:
    """Reads ``APP/asfda_app.json`` (written by `asfda.monailabel.write_app`); a missing or damaged file, or
    settings asfda refuses, in one line."""
    path = Path(app_dir).resolve() / APP_CONFIG
    fix = "write the app again with `asfda monailabel-app APP --model MODEL`"
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise AsfdaError("not an asfda MONAI Label app (no asfda_app.json)", path.parent, fix) from None
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise AsfdaError(f"cannot read the app's settings ({exc.__class__.__name__})", path, fix) from None
    if not isinstance(data, dict) or data.get("format") != APP_FORMAT or not isinstance(data.get("model"), str):
        raise AsfdaError(f"not an app settings file of format {APP_FORMAT} naming a model", path, fix)
    settings = config_from_dict(ProjectSettings, dict(data.get("settings") or {}), "settings")
    project = Path(str(data.get("project") or PROJECT_FOLDER))
    return AppConfig(data["model"], (path.parent / project).resolve(), settings)


class AppBackend:
    """One app folder on one studies folder. ``device`` (``cpu``, ``cuda``...) overrides the project's setting;
    ``trust_model_code`` is ``--trust-model-code`` (given at each server start: a project never stores it)."""

    def __init__(self, app_dir: str | Path, studies: str | Path, *, device: str | None = None,
                 trust_model_code: bool = False) -> None:
        self.app_dir = Path(app_dir).resolve()
        self.config = read_app_config(self.app_dir)
        self.root = self.config.project
        self.studies = Path(studies).resolve()
        self.labels_dir = self.studies / "labels" / LABEL_TAG
        self.device = device
        self.trust_model_code = trust_model_code
        self._adapter: Any = None
        self._adapter_key: tuple | None = None

    # -- the project ---------------------------------------------------------------------------
    def open_project(self) -> Project:
        """The app's project, started with the studies folder as its pool on the first call; a project started on
        another folder is refused (its labels and weights belong to that pool)."""
        if not (self.root / PROJECT_FILE).exists():
            init_project(self.root, self.config.model, str(self.studies), self.config.settings,
                         trust_model_code=self.trust_model_code)
        project = Project(self.root)
        pool = Path(project.state["pool"]).resolve()
        if pool != self.studies:
            raise AsfdaError(f"this app's project was started on the studies folder {pool}, not {self.studies}",
                             self.root, f"start the server with --studies {pool}, or write a new app for this folder")
        return project

    def labels(self) -> dict[str, int]:
        """The project's label names -> values, background left out (what MONAI Label shows as segments)."""
        return {n: v for n, v in Project(self.root).state["labels"].items() if v}

    def stats(self) -> dict:
        """What MONAI Label shows as training statistics: rounds so far, labels ingested, the last guard."""
        state = Project(self.root).state
        last = state["rounds"][-1] if state["rounds"] else {}
        return {"rounds": len(state["rounds"]), "labelled": len(state["labelled"]),
                "last_round_guard_reverted": bool((last.get("guard") or {}).get("reverted"))}

    # -- labels --------------------------------------------------------------------------------
    def check_label(self, image_id: str, label_file: str | Path) -> str | None:
        """The first problem of ``label_file`` as the label of pool image ``image_id`` (`check_label`: grid,
        values, emptiness, as ``asfda ingest`` checks it), or None when it can be used."""
        project = Project(self.root)
        case = by_image_id(project.dataset()).get(image_id)
        if case is None:
            return f"{image_id!r} is not an image of the asfda pool {self.studies} (NIfTI images only)"
        allowed = set(project.state["labels"].values())
        return check_label(label_file, case, allowed, allow_empty=project.settings.allow_empty_labels)

    def sync_labels(self) -> dict:
        """Ingests the datastore's finished labels into the project (`ingest_labels`: checked, copied, recorded;
        a label ingested before is left as it is). Returns ingest's record; ``{"skipped": why}`` while another asfda
        process (a training) holds the project."""
        if not self.labels_dir.is_dir():
            return {"accepted": [], "refused": [], "replaced": [], "unchanged": []}
        try:
            return ingest_labels(self.root, self.labels_dir)
        except AsfdaError as exc:
            if "another asfda process" not in exc.problem:
                raise
            return {"skipped": exc.one_line()}

    # -- next sample ---------------------------------------------------------------------------
    def next_sample(self, strategy: str, candidates: list[str] | None = None) -> dict | None:
        """The next image to annotate by ``strategy`` (one of `STRATEGY_NAMES`) with the project's current model and
        settings: the pick `asfda next` makes with a budget of 1 (`select_batch`, the project's round and seed), among
        the pool images without a label in the project that are also in ``candidates`` (MONAI Label's unlabeled
        image ids; None: no such limit). None when nothing is left. The labels saved since the last call are
        ingested first, and anchor the pick. The answer's ``id`` is MONAI Label's image id."""
        if strategy not in STRATEGY_NAMES:
            raise AsfdaError(f"unknown strategy {strategy!r}", self.app_dir, f"use one of {list(STRATEGY_NAMES)}")
        synced = self.sync_labels()
        project = Project(self.root)
        s, r = project.settings, project.round
        ds = project.dataset()
        images = by_image_id(ds)
        allowed = set(images) if candidates is None else set(candidates)
        pool = [c for i, c in images.items() if c.case_id not in project.state["labelled"] and i in allowed]
        if not pool:
            return None
        adapter = self._current_adapter(project)
        strat = build_strategy(strategy, settings=s)
        if adapter.cold_start:
            strat.check_cold_start()
        batch = select_batch(adapter, strat, project.labelled_cases(ds), pool, 1, r, s.seed * 1000 + r,
                             t0=s.temperature0, grow_voxels=s.grow_voxels)
        q = batch.query
        case = ds.by_id()[q.ids[0]]
        return {"id": image_id(case), "asfda": {
            "case_id": case.case_id, "strategy": q.strategy, "score": q.scores[0],
            "components": q.components.get(case.case_id, {}), "round": r,
            "temperature": batch.temperature.temperature, "pool_left": len(pool), "labels": _brief(synced)}}

    # -- train ---------------------------------------------------------------------------------
    def train(self, *, force: bool = False) -> dict:
        """One asfda round: the datastore's labels ingested, then `finetune_project` (fine-tuning with the project's
        semi-supervision settings, the guard, the weights and the adapted bundle in ``project/model/``)."""
        synced = self.sync_labels()
        record = finetune_project(self.root, progress=False, force=force, device=self.device,
                                  trust_model_code=self.trust_model_code)
        guard = record.get("guard") or {}
        return {"round": record["round"], "labelled": record["labelled_ids"], "new": record["new_ids"],
                "guard_reverted": bool(guard.get("reverted")), "weights": record["weights"],
                "loss_final": record["loss_final"], "seconds": record["seconds"], "labels": _brief(synced)}

    # -- infer ---------------------------------------------------------------------------------
    def infer(self, image: str | Path, out: str | Path) -> dict:
        """Segments the pool image ``image`` with the project's current model (the adapted weights of the last
        round, or the pretrained model before any) and writes the label map on the image's own grid to ``out``,
        with the project's label values. Returns what it used."""
        image = Path(image)
        project = Project(self.root)
        case = by_image_id(project.dataset()).get(strip_nifti_suffix(image.name))
        if case is None or case.image_path.resolve() != image.resolve():
            raise AsfdaError("not an image of the app's pool", image, f"add it to the studies folder {self.studies}")
        adapter = self._current_adapter(project)
        vol = adapter.prepare(case, with_label=False)
        logits, _ = adapter.forward(case, vol)
        fg = tuple(range(1, len(adapter.target_names)))
        label = label_map_on_native_grid(logits, "softmax", fg, fg, vol.affine, vol.native_affine, vol.native_shape,
                                         adapter.pretrained.preprocessing)
        write_label_map(Path(out), label, case.image_path)
        return {"case_id": case.case_id, "rounds_trained": project.round, "weights": project.state.get("weights"),
                "labels": project.state["labels"]}

    def _current_adapter(self, project: Project) -> Any:
        """The project's model with its current weights, kept between calls until a round writes new ones."""
        key = (project.state.get("weights"), project.state.get("model_sha256_16"), project.round)
        if self._adapter is None or key != self._adapter_key:
            self._adapter = project.adapter(False, self.device, trust_model_code=self.trust_model_code)
            self._adapter_key = key
        return self._adapter


def image_id(case: Case) -> str:
    """MONAI Label's id of a pool image: its file name without the extension (``CASE_0000.nii.gz`` -> ``CASE_0000``,
    where asfda's case id is ``CASE``)."""
    return strip_nifti_suffix(case.image_path.name)


def by_image_id(ds: Dataset) -> dict[str, Case]:
    """The pool's cases by MONAI Label's image id, in the pool's order."""
    return {image_id(c): c for c in ds.cases}


def _brief(synced: dict) -> dict:
    """ingest's record, short: what was accepted and why a label was refused."""
    if "skipped" in synced:
        return synced
    return {"accepted": synced["accepted"], "replaced": synced["replaced"],
            "refused": [{"file": Path(r["file"]).name, "reason": r["reason"]} for r in synced["refused"]]}
