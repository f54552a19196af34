"""MONAI Label's side of the app: `AsfdaApp` and its tasks, each a thin call into `asfda.monailabel.backend`.

Imported by the ``main.py`` that `asfda.monailabel.write_app` writes, inside ``monailabel start_server`` (MONAI Label
must be installed: ``pip install asfda[monailabel]``). What the 3D Slicer and OHIF plugins call, and what answers:

* ``POST /activelearning/{asfda|random|enpy}`` (Next Sample): `AppBackend.next_sample` over the datastore's
  unlabeled images; the answer's ``asfda`` entry says why (score, components, round, the labels just ingested).
* ``PUT /datastore/label?image=ID`` (Submit Label): `CheckedDatastore` checks the label as ``asfda ingest`` does and
  refuses it (HTTP 422, one line: what is wrong and how to fix it) before MONAI Label stores it.
* ``POST /train/asfda`` (Train): one asfda round in MONAI Label's training subprocess (`AppBackend.train`).
* ``POST /infer/asfda?image=ID`` (Run): the current model's label map on the image's grid (`AppBackend.infer`).

An `AsfdaError` reaches the client as its one line (HTTP 409 or 422), never as a traceback.
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path
from typing import Any

from fastapi import HTTPException
from monailabel.config import settings as ml_settings
from monailabel.datastore.local import LocalDatastore
from monailabel.interfaces.app import MONAILabelApp
from monailabel.interfaces.datastore import Datastore
from monailabel.interfaces.exception import MONAILabelError, MONAILabelException
from monailabel.interfaces.tasks.infer_v2 import InferTask, InferType
from monailabel.interfaces.tasks.strategy import Strategy
from monailabel.interfaces.tasks.train import TrainTask

from asfda.errors import AsfdaError

from .backend import LABEL_TAG, STRATEGY_NAMES, AppBackend

__all__ = ["AsfdaApp", "AsfdaInfer", "AsfdaStrategy", "AsfdaTrain", "CheckedDatastore"]

log = logging.getLogger(__name__)
MODEL_NAME = "asfda"
_DESCRIPTIONS = {"asfda": "asfda: source-free active query (divergence from the pretrained model, ASD, diversity)",
                 "random": "random (asfda's seeded random pick, for comparison)",
                 "enpy": "ENPY: mean voxel entropy of the current model (for comparison)"}


def _truthy(value: object) -> bool:
    return str(value).strip().lower() in ("1", "true", "yes", "on")


class CheckedDatastore(LocalDatastore):
    """MONAI Label's local datastore, whose finished labels (tag ``final``) are checked as ``asfda ingest`` checks
    them before they are stored: a label on another grid, with values that are not the project's, or empty, is
    refused with HTTP 422 and the reason."""

    def __init__(self, backend: AppBackend, *args: Any, **kwargs: Any) -> None:
        self._asfda = backend
        super().__init__(*args, **kwargs)

    def save_label(self, image_id: str, label_filename: str, label_tag: str, label_info: dict[str, Any]) -> str:
        if (label_tag or LABEL_TAG) == LABEL_TAG:
            problem = self._asfda.check_label(image_id, label_filename)
            if problem:
                raise HTTPException(status_code=422, detail=f"label for {image_id} refused: {problem} -- fix: save "
                                    "a NIfTI label map on the image's own grid with the values in /info/'s labels")
        return super().save_label(image_id, label_filename, label_tag, label_info)


class AsfdaStrategy(Strategy):
    """Next Sample by one of asfda's strategies over the datastore's unlabeled images."""

    def __init__(self, backend: AppBackend, name: str) -> None:
        super().__init__(_DESCRIPTIONS[name])
        self.backend = backend
        self.name = name

    def __call__(self, request: dict, datastore: Datastore) -> dict | None:
        try:
            return self.backend.next_sample(self.name, list(datastore.get_unlabeled_images()))
        except AsfdaError as exc:
            raise HTTPException(status_code=409, detail=exc.one_line()) from None


class AsfdaTrain(TrainTask):
    """Train: one asfda round on every label so far (MONAI Label runs it in its own subprocess)."""

    def __init__(self, backend: AppBackend) -> None:
        super().__init__("asfda round: fine-tune on the labels so far, keep it only if the guard agrees, export")
        self.backend = backend

    def config(self) -> dict:
        return {"force": False}

    def stats(self) -> dict:
        return self.backend.stats()

    def __call__(self, request: dict, datastore: Datastore) -> dict:
        try:
            result = self.backend.train(force=_truthy(request.get("force", False)))
        except AsfdaError as exc:
            log.error("asfda: %s", exc.one_line())
            raise SystemExit(1) from None  # the training task ends in ERROR with this line in its details
        log.info("asfda round: %s", result)
        return result


class AsfdaInfer(InferTask):
    """Infer: the project's current model (the last round's adapted weights, or the pretrained model)."""

    def __init__(self, backend: AppBackend, labels: dict[str, int]) -> None:
        super().__init__(InferType.SEGMENTATION, labels, 3, "asfda: the current adapted model")
        self.backend = backend

    def is_valid(self) -> bool:
        return True

    def __call__(self, request: dict) -> tuple[str, dict]:
        out = tempfile.NamedTemporaryFile(suffix=".nii.gz", delete=False).name
        try:
            info = self.backend.infer(request["image"], out)
        except AsfdaError as exc:
            Path(out).unlink(missing_ok=True)
            raise HTTPException(status_code=422, detail=exc.one_line()) from None
        return out, info


class AsfdaApp(MONAILabelApp):
    """asfda as a MONAI Label app: ``--conf device cpu`` and ``--conf trust_model_code true`` are the server's
    options (``monailabel start_server ... --conf KEY VALUE``)."""

    def __init__(self, app_dir: str, studies: str, conf: dict[str, str]) -> None:
        conf = conf or {}
        try:
            self.backend = AppBackend(app_dir, studies, device=conf.get("device") or None,
                                      trust_model_code=_truthy(conf.get("trust_model_code", False)))
            self.backend.open_project()
            labels = self.backend.labels()
        except AsfdaError as exc:
            raise MONAILabelException(MONAILabelError.APP_INIT_ERROR, f"asfda: {exc.one_line()}") from None
        self._asfda_labels = labels
        super().__init__(app_dir=app_dir, studies=studies, conf=conf, name="asfda",
                         description="asfda: active source-free adaptation of a pretrained segmentation model",
                         labels=labels)

    def init_datastore(self) -> Datastore:
        return CheckedDatastore(self.backend, self.studies, extensions=ml_settings.MONAI_LABEL_DATASTORE_FILE_EXT,
                                auto_reload=ml_settings.MONAI_LABEL_DATASTORE_AUTO_RELOAD,
                                read_only=ml_settings.MONAI_LABEL_DATASTORE_READ_ONLY)

    def init_infers(self) -> dict[str, InferTask]:
        return {MODEL_NAME: AsfdaInfer(self.backend, self._asfda_labels)}

    def init_trainers(self) -> dict[str, TrainTask]:
        return {MODEL_NAME: AsfdaTrain(self.backend)}

    def init_strategies(self) -> dict[str, Strategy]:
        return {name: AsfdaStrategy(self.backend, name) for name in STRATEGY_NAMES}
