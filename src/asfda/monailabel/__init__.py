"""asfda inside MONAI Label: the app that 3D Slicer's and OHIF's MONAI Label plugins talk to.

    asfda monailabel-app APP --model MODEL          # or write_app(APP, MODEL): APP/main.py + APP/asfda_app.json
    monailabel start_server --app APP --studies STUDIES --conf device cpu

Next Sample asks asfda's query (strategies asfda, random and enpy), Submit Label checks the label as ``asfda ingest``
does, Train runs one asfda round (fine-tuning, semi-supervision settings, guard, export), Run segments with the
current adapted model. The app keeps an asfda project in ``APP/project/`` (see `asfda.project`).

Modules: `backend` (the asfda calls, no MONAI Label needed), `server` (MONAI Label's app and task classes; imports
MONAI Label), `writer` (`write_app`). Only `backend` and `writer` are imported here, so ``import asfda.monailabel``
works without MONAI Label.
"""

from __future__ import annotations

from .backend import APP_CONFIG, LABEL_TAG, PROJECT_FOLDER, STRATEGY_NAMES, AppBackend, AppConfig, read_app_config
from .writer import write_app

__all__ = ["APP_CONFIG", "LABEL_TAG", "PROJECT_FOLDER", "STRATEGY_NAMES", "AppBackend", "AppConfig",
           "read_app_config", "write_app"]
