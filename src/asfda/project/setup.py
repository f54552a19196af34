"""`asfda init` (a project folder built in a temporary folder and moved into place) and `asfda set` (a setting
changed with the checks of init)."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from asfda.config import config_from_dict, config_to_dict, read_config_file
from asfda.errors import AsfdaError
from asfda.io import atomic_write_json, load_dataset
from asfda.io.datasets import model_labels, parse_labels
from asfda.io.outputs import check_writable_folder, dataset_folders, dataset_input_folders, refuse_output_inside_inputs
from asfda.models import load_model, parse_class_map_override
from asfda.models.classmap import build_class_map
from asfda.options import did_you_mean

from .state import (
    BACKUP_FILE,
    COMMAND_LINE_ONLY,
    FORMAT,
    PROJECT_ENTRIES,
    PROJECT_FILE,
    Project,
    ProjectSettings,
    _check_budget,
    _check_settings,
    _now,
    project_lock,
)


def init_project(out: str | Path, model: str, pool: str, settings: ProjectSettings | None = None,
                 labels_json: str | None = None, *, trust_model_code: bool = False) -> Project:
    """Creates a project folder: checks that the model loads and maps onto the pool's labels.

    The folder may not be, or lie inside, the pool or the model, and must be writable (both checked before the
    model is loaded). The project is built in a temporary folder and moved into place at the end, so a failed
    init leaves nothing behind; an existing folder (empty, or holding none of `PROJECT_ENTRIES`) is kept and
    filled.
    """

    settings = settings or ProjectSettings()
    root = Path(out).resolve()
    if (root / PROJECT_FILE).exists() or (root / BACKUP_FILE).exists():
        what = "" if (root / PROJECT_FILE).exists() else " (its project.json is missing; project.json.bak is here)"
        raise AsfdaError(f"a project already exists here{what}", root,
                         "use `asfda status` on it, or choose another folder")
    _check_settings(settings)  # the strategy and its settings too
    refuse_output_inside_inputs(root, {"the pool": dataset_folders(pool), "the model": model,
                                       "the labels file": labels_json}, flag="project folder")
    check_writable_folder(root, flag="project folder")
    taken = sorted(n for n in PROJECT_ENTRIES if os.path.lexists(root / n)) if root.is_dir() else []
    if taken:
        raise AsfdaError(f"the folder already holds {', '.join(taken)}, which a project would use", root,
                         "choose a new or empty project folder")
    loaded = load_model(model, allow_code=trust_model_code, output_activation=settings.output_activation)
    loaded.check_usable(1)  # input channels, roi, output channels: refused now, not at the first `next`
    ds = load_dataset(pool)
    _check_budget(settings, len(ds.cases), pool)
    refuse_output_inside_inputs(root, {"the pool": dataset_input_folders(ds)}, flag="project folder")
    if labels_json:

        labels = parse_labels(read_config_file(labels_json, yaml_syntax=False, what="--labels JSON"),
                              Path(labels_json))
    elif (Path(pool) / "dataset.json").exists():
        labels = ds.labels
    else:  # a plain folder: the model's own classes

        labels = model_labels(loaded.label_names)  # a sigmoid head: background first, then its channels
    names = [n for n, _ in sorted(labels.items(), key=lambda kv: kv[1])]
    # a dataset class the model has no channel for (a one-organ model on a four-organ pool) is folded into background
    cmap = build_class_map(loaded.label_names, names, parse_class_map_override(settings.class_map),
                           fold_uncovered=True)
    cmap.refuse_new_classes(Path(pool) / "dataset.json" if (Path(pool) / "dataset.json").exists() else pool)
    project_state = {
        "format": FORMAT, "created": _now(),
        "model": str(Path(model).resolve()), "model_sha256_16": loaded.weights_hash,
        "pool": str(Path(pool).resolve()), "pool_cases": len(ds.cases), "labels": labels,
        "class_map": cmap.to_dict(), "settings": config_to_dict(settings),
        "query": None, "labelled": {}, "rounds": [], "weights": None, "events": [],
    }
    base = root if root.is_dir() else _nearest_existing_folder(root.parent)
    tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}.asfda-init-", dir=base))
    try:
        for sub in ("labels", "annotate", "weights"):
            (tmp / sub).mkdir()
        atomic_write_json(tmp / PROJECT_FILE, project_state)
        Project(tmp).save(f"created: model {project_state['model']}, pool of {len(ds.cases)} cases")
        _move_into_place(tmp, root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return Project(root)


def _nearest_existing_folder(path: Path) -> Path:
    while not path.is_dir() and path != path.parent:
        path = path.parent
    return path


def _move_into_place(tmp: Path, root: Path) -> None:
    """Moves a finished project from ``tmp`` to ``root``: renames the folder, or (``root`` exists) its entries,
    project.json last, so ``root`` is a project only once it is complete."""
    if not root.exists():
        root.parent.mkdir(parents=True, exist_ok=True)
        os.rename(tmp, root)
        os.chmod(root, 0o777 & ~_umask())  # mkdtemp made it private
        return
    entries = sorted(tmp.iterdir(), key=lambda p: p.name in (PROJECT_FILE, BACKUP_FILE))
    clash = [p.name for p in entries if os.path.lexists(root / p.name)]
    if clash:
        raise AsfdaError(f"the folder got {', '.join(clash)} while the project was being made", root,
                         "another process is using it: choose another project folder")
    for p in entries:
        os.rename(p, root / p.name)
    tmp.rmdir()


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# ---------------------------------------------------------------------------------------------- set
SETTING_ALIASES = {"steps": "train.steps", "precision": "train.precision", "guard": "train.guard",
                   "guard_volumes": "train.guard_volumes", "hold_back_discarded": "train.hold_back_discarded",
                   "augmentation": "train.augmentation", "restart": "train.restart", "lr": "train.lr",
                   "batch_size": "train.batch_size", "semi": "semi.enabled"}
"""Short names `asfda set` accepts for nested settings (``steps=100`` is ``train.steps=100``)."""
FIXED_SETTINGS = {"class_map": "the trained weights' output channels follow it",
                  "output_activation": "the trained weights were adapted under it"}
"""Settings `asfda set` refuses to change, and why (start a new project instead)."""


def _setting_keys(data: dict, prefix: str = "") -> list[str]:
    """The dotted names of every setting in a `config_to_dict` of `ProjectSettings`."""
    out = []
    for key, value in data.items():
        out += _setting_keys(value, f"{prefix}{key}.") if isinstance(value, dict) else [f"{prefix}{key}"]
    return out


def update_settings(root: str | Path, changes: dict[str, str]) -> list[tuple[str, object, object]]:
    """Changes settings of a project (``{"budget": "3", "train.steps": "100"}``, values as text as on the command
    line, or typed), with the checks of `init`; returns ``[(name, old, new)]`` of the settings whose value changed
    (none: nothing written). Unknown names are refused with a "did you mean"."""
    project = Project(root)
    with project_lock(project.root, "set"):
        project = Project(root)  # the state as the lock holder sees it
        data = config_to_dict(project.settings)
        valid = _setting_keys(data)
        names = {}
        for key, value in changes.items():
            name = SETTING_ALIASES.get(key, key)
            if name in COMMAND_LINE_ONLY:
                raise AsfdaError(f"{name} is not a project setting", project.root / PROJECT_FILE,
                                 COMMAND_LINE_ONLY[name])
            if name not in valid:
                top = sorted({n.split(".")[0] + (".NAME" if "." in n else "") for n in valid})
                raise AsfdaError(f"unknown setting {key!r}{did_you_mean(name, valid + list(SETTING_ALIASES))}",
                                 project.root / PROJECT_FILE,
                                 f"use one of {', '.join(top)} (project.json's settings list every NAME), or the "
                                 f"short names {', '.join(sorted(SETTING_ALIASES))}")
            if name in FIXED_SETTINGS:
                raise AsfdaError(f"{name} cannot be changed in a project ({FIXED_SETTINGS[name]})", project.root,
                                 "start a new project with `asfda init` for another setting")
            node = data
            *parents, last = name.split(".")
            for part in parents:
                node = node[part]
            node[last] = value
            names[name] = key
        try:
            settings = config_from_dict(ProjectSettings, data, "settings")
            _check_settings(settings)
            _check_budget(settings, project.state["pool_cases"], project.state["pool"], "set budget={n}")
        except AsfdaError as exc:
            raise AsfdaError(exc.problem, exc.path or project.root / PROJECT_FILE,
                             exc.fix or "choose another value") from None
        new = config_to_dict(settings)
        changed: list[tuple[str, object, object]] = []
        for name in names:
            old_v, new_v = config_to_dict(project.settings), new
            for part in name.split("."):
                old_v, new_v = old_v[part], new_v[part]
            if old_v != new_v:
                changed.append((name, old_v, new_v))
        if changed:
            project.state["settings"] = new
            project.save("settings: " + ", ".join(f"{n} {o!r} -> {v!r}" for n, o, v in changed))
    return changed
