"""`write_app`: the folder ``monailabel start_server --app`` takes, for one pretrained model."""

from __future__ import annotations

from pathlib import Path

from asfda.config import config_to_dict
from asfda.errors import AsfdaError
from asfda.io import atomic_write_json, atomic_write_text
from asfda.io.outputs import check_writable_folder, refuse_output_inside_inputs
from asfda.project import ProjectSettings

from .backend import APP_CONFIG, APP_FORMAT, PROJECT_FOLDER, read_app_config

__all__ = ["MAIN_PY", "write_app"]

MAIN_PY = '''"""asfda's MONAI Label app, written by `asfda monailabel-app`. Start it with

    monailabel start_server --app THIS_FOLDER --studies STUDIES [--conf device cpu] [--conf trust_model_code true]

STUDIES: a folder of NIfTI images (the pool). The model and the project's settings are in asfda_app.json beside this
file; the project (ingested labels, weights per round, the adapted model as a MONAI bundle) is kept in project/.
Strategies: asfda, random, enpy. Train: one asfda round (fine-tuning, guard, export). Infer: the current model.
"""

from asfda.monailabel.server import AsfdaApp  # noqa: F401  (MONAI Label looks for a MONAILabelApp here)
'''


def write_app(out: str | Path, model: str | Path, *, settings: ProjectSettings | None = None) -> Path:
    """Writes the MONAI Label app for ``model`` (a bundle folder, checkpoint or TorchScript file, as `asfda init`
    takes it) into the folder ``out``: ``main.py`` (which imports `asfda.monailabel.server.AsfdaApp`) and
    ``asfda_app.json`` (the model's absolute path and the project's ``settings``, default
    ``ProjectSettings(budget=1)``: MONAI Label asks for one image at a time). The project itself is started on the
    first ``monailabel start_server``, when the studies folder is known.

    ``out`` may be new, empty, or an app written before (its settings are replaced; a started project is kept, and
    keeps the settings it was started with: change them with ``asfda set APP/project ...``); it may not lie inside
    the model nor hold other files. Returns ``out``."""
    out = Path(out)
    model_path = Path(model).resolve()
    if not model_path.exists():
        raise AsfdaError("model not found", model, "pass a bundle folder, a checkpoint or a TorchScript file")
    refuse_output_inside_inputs(out, {"the model": model_path}, flag="app folder")
    check_writable_folder(out, flag="app folder")
    settings = settings or ProjectSettings(budget=1)
    settings.check()
    if out.is_dir():
        if (out / APP_CONFIG).exists():
            read_app_config(out)  # an app of ours (a damaged file is refused, not overwritten)
        else:
            taken = sorted(p.name for p in out.iterdir() if not p.name.startswith("."))
            if taken:
                raise AsfdaError(f"the folder holds {', '.join(taken[:5])}, and is not an asfda MONAI Label app", out,
                                 "choose a new or empty app folder")
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / APP_CONFIG, {"format": APP_FORMAT, "model": str(model_path), "project": PROJECT_FOLDER,
                                         "settings": config_to_dict(settings)})
    atomic_write_text(out / "main.py", MAIN_PY)
    return out
