"""The annotate-and-resume workflow of a hospital team: a project folder that asfda and the annotators share.

    asfda init --model M --pool P OUT   # once: the pretrained model, the unlabeled pool, the settings
    asfda next OUT                      # score + query; OUT/annotate/roundR/ holds what to label
    asfda ingest LABELS_DIR OUT         # check each label against its image; keep the good ones
    asfda finetune OUT                  # one round of fine-tuning on every label so far
    asfda status OUT                    # where the project stands, what to do next, and whether to stop
    asfda set OUT budget=3 ...          # change a setting (the checks of init)

Everything the project knows is in ``OUT/project.json`` (human-readable, rewritten atomically after each
step that changes it; ``project.json.bak`` is a copy of the last state asfda wrote, so restoring it after a
hand edit gone wrong never loses a finished step). Files are written before the state that names them, so
after ``kill -9`` at any point the project is at the last completed step: an accepted label is never lost (its
file is kept before it is recorded, and a re-run of ``ingest`` records it), and a round of fine-tuning is either
finished (weights, bundle and state) or redone from the previous round's weights. A lock file stops two asfda
processes from working on one project at once; the operating system releases it when a process dies.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import shlex
import shutil
import tempfile
import time
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from asfda.config import SemiConfig, config_from_dict, config_to_dict
from asfda.selection.strategies import DEFAULT_DIVERSITY
from asfda.errors import AsfdaError
from asfda.io import atomic_write, atomic_write_json, atomic_write_text, load_dataset
from asfda.io.datasets import Case, Dataset
from asfda.io.labels import check_label, label_case_id, label_files
from asfda.io.outputs import check_writable_folder, dataset_folders, dataset_input_folders, refuse_output_inside_inputs
from asfda.training import TrainConfig
from asfda.training.guard import blamed, held_back

__all__ = ["PROJECT_FILE", "Project", "ProjectSettings", "finetune_project", "ingest_labels", "init_project",
           "next_query", "project_lock", "project_status", "update_settings"]

PROJECT_FILE = "project.json"
BACKUP_FILE = "project.json.bak"
LOCK_FILE = ".asfda.lock"
PROJECT_ENTRIES = ("labels", "annotate", "weights", "model", "cache", PROJECT_FILE, BACKUP_FILE, LOCK_FILE)
"""What a project folder holds (asfda's own names): `init_project` refuses a folder that has any of them."""
FORMAT = 1


@dataclasses.dataclass
class ProjectSettings:
    """A project's settings: `asfda init` sets them, `asfda set` (`update_settings`) changes them."""

    strategy: str = "asfda"
    budget: int = 2
    seed: int = 0
    alpha: float = 0.5
    round0_gap: str = "feature_gap"
    diversity: str = DEFAULT_DIVERSITY
    representativeness: str = "none"
    temperature0: float = 1.0
    grow_voxels: int = 2
    class_map: str | None = None
    allow_empty_labels: bool = False
    device: str = "auto"
    # build the model config with MONAI's full ConfigParser ($ expressions, any _target_): trusted bundles only
    trust_model_code: bool = False
    # softmax, sigmoid or none (the network already outputs probabilities); None: what the model declares
    output_activation: str | None = None
    train: TrainConfig = dataclasses.field(default_factory=lambda: TrainConfig(steps=200))
    semi: SemiConfig = dataclasses.field(default_factory=SemiConfig)


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:16]


@contextlib.contextmanager
def project_lock(root: str | Path, command: str) -> Iterator[None]:
    """Exclusive lock on a project folder for the duration of one command (POSIX ``flock``: the kernel
    drops it when the process exits, even after ``kill -9``, so a crash never leaves a stale lock)."""
    import fcntl

    path = Path(root) / LOCK_FILE
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = Path(path).read_text(errors="replace").strip() or "another process"
            raise AsfdaError(f"another asfda process is working on this project ({holder})", root,
                             "wait for it to finish, then run the command again") from None
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()}, `asfda {command}` since {_now()}".encode())
        yield
    finally:
        os.close(fd)


class Project:
    """A project folder and its state (``project.json``); see the module docstring for the layout."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root).resolve()
        path = self.root / PROJECT_FILE
        if not path.is_file():
            bak = self.root / BACKUP_FILE
            if bak.is_file():
                raise AsfdaError("project.json is missing, but project.json.bak (a copy of the last state asfda "
                                 "wrote) is here", path, _restore_fix(path, "restore it"))
            raise AsfdaError("not an asfda project (no project.json)", self.root,
                             "create one with `asfda init --model M --pool P FOLDER`")
        try:
            self.state, self.settings = _read_state(path)
        except AsfdaError as exc:
            raise AsfdaError(exc.problem, path, _restore_fix(path, exc.fix)) from None

    # -- state ------------------------------------------------------------------------------------
    def save(self, event: str | None = None) -> None:
        """Writes the state atomically, then copies it to ``project.json.bak``: both hold the latest state, so
        restoring the copy (after a hand edit gone wrong, or a lost project.json) never loses a finished step.
        A kill between the two writes leaves the copy one step behind, with project.json complete."""
        if event:
            self.state.setdefault("events", []).append({"time": _now(), "event": event})
        path = self.root / PROJECT_FILE
        atomic_write_json(path, self.state)
        atomic_write(self.root / BACKUP_FILE, lambda p: shutil.copyfile(path, p))

    def dataset(self) -> Dataset:
        ds = load_dataset(self.state["pool"])
        labels = self.state["labels"]
        if ds.labels != labels and (Path(self.state["pool"]) / "dataset.json").exists():
            raise AsfdaError(f"the pool's labels {ds.labels} changed since init ({labels})",
                             Path(self.state["pool"]) / "dataset.json")
        return Dataset(ds.root, labels, ds.cases)

    def labelled_cases(self, ds: Dataset) -> list[Case]:
        """Pool cases with an ingested label, the label file being the project's copy."""
        by_id = ds.by_id()
        out = []
        for cid, rec in sorted(self.state["labelled"].items(), key=lambda kv: (kv[1]["ingested"], kv[0])):
            if cid not in by_id:
                raise AsfdaError(f"labelled case {cid!r} is no longer in the pool", self.state["pool"],
                                 "put its image back, or remove it from project.json 'labelled'")
            out.append(dataclasses.replace(by_id[cid], label_path=self.root / rec["file"]))
        return out

    @property
    def round(self) -> int:
        return len(self.state["rounds"])

    def adapter(self, progress: bool, device: str | None = None):
        """The pretrained model with the project's current weights; ``device`` overrides the setting for one command."""
        from asfda.loop import Adapter
        from asfda.models import load_model, parse_class_map_override

        model = load_model(self.state["model"], allow_code=self.settings.trust_model_code,
                           output_activation=self.settings.output_activation)
        if model.weights_hash != self.state["model_sha256_16"]:
            raise AsfdaError("the pretrained model's weights changed since `asfda init`", self.state["model"],
                             "point project.json 'model' back at the original weights, or start a new project")
        adapter = Adapter(model, self.dataset().class_names,
                          class_map_override=parse_class_map_override(self.settings.class_map),
                          cache_dir=str(self.root / "cache"), device=device or self.settings.device, progress=progress)
        if self.state.get("weights"):
            from safetensors.torch import load_file

            adapter.load_current_state(load_file(str(self.root / self.state["weights"])))
        return adapter


def _restore_fix(path: Path, fix: str | None) -> str:
    """The fix of a damaged or missing project.json: ``fix`` (or a hand correction), or restoring the .bak when
    it is a valid state (the command to type), or why it cannot be."""
    bak = path.with_name(BACKUP_FILE)
    first = fix or "correct the file by hand"
    if not bak.is_file():
        return f"{first} (there is no project.json.bak to restore)"
    try:
        _read_state(bak)
    except AsfdaError as exc:
        if fix == "restore it":
            return f"project.json.bak is damaged too ({exc.problem}): correct it by hand, then copy it to {path}"
        return f"{first} (project.json.bak is damaged too: {exc.problem})"
    restore = f"cp {shlex.quote(str(bak))} {shlex.quote(str(path))}"
    if fix == "restore it":
        return f"restore it: {restore}"
    return f"{first}; or restore the last state asfda wrote, which project.json.bak holds: {restore}"


def _read_state(path: Path) -> tuple[dict, ProjectSettings]:
    """The state and settings of a project.json (or its .bak); AsfdaError (problem and fix, no path) when the file
    is not UTF-8 JSON holding a project state of the right types, or its settings are invalid."""
    try:
        state = json.loads(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise AsfdaError(f"{path.name} is not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    except json.JSONDecodeError as exc:
        raise AsfdaError(f"{path.name} is not valid JSON ({exc.msg}, line {exc.lineno})",
                         fix="fix the edit") from None
    if not isinstance(state, dict):
        raise AsfdaError(f"{path.name} must hold a JSON object, not a JSON {type(state).__name__}")
    if state.get("format") != FORMAT:
        raise AsfdaError(f"project format {state.get('format')!r} is not {FORMAT}")
    _check_state_types(state)
    from asfda.io.datasets import parse_labels

    try:
        parse_labels(state["labels"], path)
    except AsfdaError as exc:
        raise AsfdaError(f"labels: {exc.problem}", fix=exc.fix) from None
    # projects started before the setting existed picked in the embedding space: they go on doing so
    state["settings"].setdefault("diversity", "embedding")
    try:
        settings = config_from_dict(ProjectSettings, state["settings"], "settings")
    except AsfdaError as exc:
        raise AsfdaError(exc.problem, fix="correct the setting") from None
    try:
        _check_settings(settings, path)
    except AsfdaError as exc:
        raise AsfdaError(exc.problem, fix=exc.fix) from None
    return state, settings


_STATE_TYPES = {"model": "str", "model_sha256_16": "str", "pool": "str", "pool_cases": "int", "labels": "object",
                "settings": "object", "query": "object or null", "labelled": "object", "rounds": "list",
                "weights": "str or null", "events": "list?", "class_map": "object?", "created": "str?"}
_LABELLED_TYPES = {"file": "str", "sha256": "str", "ingested": "str", "source": "str?", "query_round": "int or null?"}
_ROUND_TYPES = {"round": "int", "labelled_ids": "list of str", "weights": "str", "label_sha256": "object?",
                "new_ids": "list of str?", "seconds": "number?", "loss_final": "number?", "temperature": "number?",
                "finished": "str?", "guard": "object or null?", "probe": "object or null?"}
_QUERY_TYPES = {"round": "int", "ids": "list of str", "folder": "str", "strategy": "str", "temperature": "number",
                "components": "object"}


def _is_kind(value: object, kind: str) -> bool:
    return any({
        "str": lambda v: isinstance(v, str),
        "int": lambda v: isinstance(v, int) and not isinstance(v, bool),
        "number": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
        "object": lambda v: isinstance(v, dict),
        "list": lambda v: isinstance(v, list),
        "list of str": lambda v: isinstance(v, list) and all(isinstance(x, str) for x in v),
        "null": lambda v: v is None,
    }[k](value) for k in kind.split(" or "))


def _check_fields(obj: dict, types: dict[str, str], where: str) -> None:
    for key, kind in types.items():
        optional = kind.endswith("?")
        kind = kind.rstrip("?")
        if key not in obj:
            if optional:
                continue
            raise AsfdaError(f"{where}{key} is missing", fix=f"add {where}{key} ({kind})")
        if not _is_kind(obj[key], kind):
            got = json.dumps(obj[key])
            got = got if len(got) <= 60 else got[:57] + "..."
            raise AsfdaError(f"{where}{key} must be {'an' if kind[0] in 'aeiou' else 'a'} {kind}, got {got}",
                             fix=f"correct {where}{key}")


def _check_state_types(state: dict) -> None:
    """Refuses a project state whose entries have the wrong JSON types (a hand edit gone wrong)."""
    _check_fields(state, _STATE_TYPES, "")
    for cid, rec in state["labelled"].items():
        if not isinstance(rec, dict):
            raise AsfdaError(f"labelled[{cid!r}] must be an object, got {json.dumps(rec)[:60]}",
                             fix=f"correct labelled[{cid!r}]")
        _check_fields(rec, _LABELLED_TYPES, f"labelled[{cid!r}].")
    for i, rec in enumerate(state["rounds"]):
        if not isinstance(rec, dict):
            raise AsfdaError(f"rounds[{i}] must be an object, got {json.dumps(rec)[:60]}", fix=f"correct rounds[{i}]")
        _check_fields(rec, _ROUND_TYPES, f"rounds[{i}].")
    if state["query"] is not None:
        _check_fields(state["query"], _QUERY_TYPES, "query.")


def _check_settings(settings: ProjectSettings, path: Path | None = None) -> None:
    """Refuses settings out of range (``path``: the project.json they came from; None: from the command line). `init`,
    `set` and every read of project.json run these same checks."""
    import math

    from asfda.config import PSEUDO_SOURCES
    from asfda.selection import build_strategy
    from asfda.training.augment import AUGMENTATIONS
    from asfda.training.trainer import PRECISIONS

    try:
        build_strategy(settings.strategy, settings.alpha, settings.round0_gap, settings.diversity,
                       settings.representativeness)
    except (AsfdaError, ValueError) as exc:
        problem = exc.problem if isinstance(exc, AsfdaError) else str(exc)
        raise AsfdaError(f"settings: {problem}", path, "fix settings.strategy / alpha / round0_gap / diversity / representativeness"
                         + (" in project.json" if path else "")) from None
    if settings.budget < 1:
        raise AsfdaError(f"budget must be >= 1, got {settings.budget}", path,
                         "set settings.budget to 1 or more" if path else "pass --budget 1 or more")
    if settings.train.guard_volumes < 1:
        raise AsfdaError(f"train.guard_volumes must be >= 1, got {settings.train.guard_volumes}", path,
                         "set settings.train.guard_volumes to 1 or more (settings.train.guard: false turns the "
                         "guard off)")
    t = settings.train
    ranges = [("train.steps", t.steps >= 1, ">= 1"), ("train.batch_size", t.batch_size >= 1, ">= 1"),
              ("train.lr", math.isfinite(t.lr) and t.lr > 0, "a finite number > 0"),
              ("alpha", 0 <= settings.alpha <= 1, "in [0, 1]"),
              ("temperature0", math.isfinite(settings.temperature0) and settings.temperature0 > 0, "a finite number > 0"),
              ("grow_voxels", settings.grow_voxels >= 0, ">= 0"),
              ("train.precision", t.precision in PRECISIONS, f"one of {', '.join(PRECISIONS)}"),
              ("train.augmentation", t.augmentation in AUGMENTATIONS, f"one of {', '.join(AUGMENTATIONS)}"),
              ("semi.pseudo_from", settings.semi.pseudo_from in PSEUDO_SOURCES, f"one of {', '.join(PSEUDO_SOURCES)}")]
    for name, ok, want in ranges:
        if not ok:
            value = dataclasses.asdict(settings)
            for part in name.split("."):
                value = value[part]
            raise AsfdaError(f"{name} must be {want}, got {value!r}", path,
                             f"set settings.{name} in project.json" if path else f"set {name} to a value {want}")


def _check_budget(settings: ProjectSettings, pool_cases: int, pool: str | Path, how: str = "pass --budget {n}") -> None:
    """Refuses a budget larger than the pool (``how``: how to give a smaller one, ``{n}`` the pool size)."""
    if settings.budget > pool_cases:
        raise AsfdaError(f"budget {settings.budget} is larger than the pool ({pool_cases} cases)", pool,
                         f"{how.format(n=pool_cases)} or less, or add cases to the pool")


# ---------------------------------------------------------------------------------------------- init
def init_project(out: str | Path, model: str, pool: str, settings: ProjectSettings | None = None,
                 labels_json: str | None = None) -> Project:
    """Creates a project folder: checks that the model loads and maps onto the pool's labels.

    The folder may not be, or lie inside, the pool or the model, and must be writable (both checked before the
    model is loaded). The project is built in a temporary folder and moved into place at the end, so a failed
    init leaves nothing behind; an existing folder (empty, or holding none of `PROJECT_ENTRIES`) is kept and
    filled.
    """
    from asfda.models import load_model, parse_class_map_override
    from asfda.models.classmap import build_class_map

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
    loaded = load_model(model, allow_code=settings.trust_model_code, output_activation=settings.output_activation)
    loaded.check_usable(1)  # input channels, roi, output channels: refused now, not at the first `next`
    ds = load_dataset(pool)
    _check_budget(settings, len(ds.cases), pool)
    refuse_output_inside_inputs(root, {"the pool": dataset_input_folders(ds)}, flag="project folder")
    if labels_json:
        from asfda.io.datasets import parse_labels

        labels = parse_labels(json.loads(Path(labels_json).read_text()), Path(labels_json))
    elif (Path(pool) / "dataset.json").exists():
        labels = ds.labels
    else:  # a plain folder: the model's own classes
        from asfda.io.datasets import model_labels

        labels = model_labels(loaded.label_names)  # a sigmoid head: background first, then its channels
    names = [n for n, _ in sorted(labels.items(), key=lambda kv: kv[1])]
    cmap = build_class_map(loaded.label_names, names, parse_class_map_override(settings.class_map))
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
    import difflib

    project = Project(root)
    with project_lock(project.root, "set"):
        project = Project(root)  # the state as the lock holder sees it
        data = config_to_dict(project.settings)
        valid = _setting_keys(data)
        names = {}
        for key, value in changes.items():
            name = SETTING_ALIASES.get(key, key)
            if name not in valid:
                close = difflib.get_close_matches(name, valid + list(SETTING_ALIASES), n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                top = sorted({n.split(".")[0] + (".NAME" if "." in n else "") for n in valid})
                raise AsfdaError(f"unknown setting {key!r}{hint}", project.root / PROJECT_FILE,
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
        changed = []
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


# ---------------------------------------------------------------------------------------------- next
def next_query(root: str | Path, *, progress: bool = True, force: bool = False, device: str | None = None) -> dict:
    """Scores the unlabeled pool with the current model and picks the next batch to annotate.

    Writes ``annotate/roundR/``: ``cases.txt`` (ids), ``images/`` (links to the pool images),
    ``previews/CASE.png`` (image and current prediction), ``query.json`` (scores and why) and
    ``README.txt``. A pending query whose labels are not all in is shown again, not replaced (``force``
    replaces it); the record returned then has ``"shown_again": True``. After a round the guard discarded, the
    query is a replacement: ``"replaces": {"round", "ids"}`` names that round and the volumes it blames (their labels
    are kept). ``device`` overrides the project's setting for this command.
    """
    project = Project(root)
    with project_lock(project.root, "next"):
        pending = project.state.get("query")
        if pending and not force:
            missing = [i for i in pending["ids"] if i not in project.state["labelled"]]
            if missing:
                return {**pending, "shown_again": True}
            raise AsfdaError(f"every case of round {pending['round']}'s query is labelled, and that round is not "
                             "fine-tuned yet", project.root, "run `asfda finetune` first")
        return _new_query(project, progress, device)


def _trained_history(rounds: list[dict]) -> list[tuple[list[str], bool]]:
    """(ids trained on, discarded by the guard) of each finished round (`asfda.training.guard.held_back`'s input)."""
    return [(rec.get("trained_ids", rec["labelled_ids"]), bool((rec.get("guard") or {}).get("reverted")))
            for rec in rounds]


def _new_query(project: Project, progress: bool, device: str | None = None) -> dict:
    from asfda.selection import build_strategy

    s = project.settings
    r = project.round
    ds = project.dataset()
    adapter = project.adapter(progress, device)
    labelled = project.labelled_cases(ds)
    unlabelled = [c for c in ds.cases if c.case_id not in project.state["labelled"]]
    rounds = project.state["rounds"]
    # after a round the guard discarded: this query replaces the volumes it blames (their labels are kept)
    replaces = ({"round": rounds[-1]["round"], "ids": blamed(_trained_history(rounds))[-1]}
                if rounds and (rounds[-1].get("guard") or {}).get("reverted") else None)
    if not unlabelled:
        raise AsfdaError(f"every one of the {len(ds.cases)} pool cases is labelled: there is nothing left to query",
                         project.root, "run `asfda finetune` if the last labels are not trained on yet, or add cases "
                         "to the pool")
    budget = min(s.budget, len(unlabelled))  # fewer left than the budget: the last round asks for all of them
    t0 = time.perf_counter()
    strategy = build_strategy(s.strategy, s.alpha, s.round0_gap, s.diversity, s.representativeness)
    temp, scores = adapter.round_scores(strategy, labelled, unlabelled, s.temperature0, r, s.seed * 1000 + r,
                                        s.grow_voxels)
    query = strategy.select(scores, budget, s.seed * 1000 + r)
    folder = project.root / "annotate" / f"round{r}"
    by_id = ds.by_id()
    images = folder / "images"
    images.mkdir(parents=True, exist_ok=True)
    for cid in query.ids:
        src = by_id[cid].image_path
        link = images / src.name
        if not link.exists():
            try:
                os.symlink(src, link)
            except OSError:  # file systems without symlinks
                atomic_write(link, lambda p, src=src: shutil.copyfile(src, p))
    _write_annotation_aids(adapter, [by_id[i] for i in query.ids], folder, ds.class_names, project.state["labels"])
    record = {"round": r, "strategy": query.strategy, "ids": query.ids, "scores": query.scores,
              "components": query.components, "strategy_settings": strategy.settings(),
              "temperature": temp.temperature, "ece_before": temp.ece_before, "ece_after": temp.ece_after, "seconds": round(time.perf_counter() - t0, 2),
              "folder": str(folder.relative_to(project.root)), "created": _now(), "budget": s.budget,
              "unlabelled_left": len(unlabelled), **({"replaces": replaces} if replaces else {})}
    atomic_write_json(folder / "query.json", record)
    atomic_write_text(folder / "cases.txt", "\n".join(query.ids) + "\n")
    values = ", ".join(f"{v} = {n}" for n, v in sorted(project.state["labels"].items(), key=lambda kv: kv[1]))
    why = (f"Round {replaces['round']}'s fine-tuning was discarded by the guard (its model segmented unlabeled volumes "
           f"worse than the pretrained model); this query replaces {', '.join(replaces['ids'])} "
           f"({'its label is' if len(replaces['ids']) == 1 else 'their labels are'} kept).\n" if replaces else "")
    atomic_write_text(folder / "README.txt", why + (
        f"Round {r}: please annotate {'this case' if len(query.ids) == 1 else f'these {len(query.ids)} cases'} "
        "(ids in cases.txt, images in images/).\n"
        f"Save each label map on its image's grid as CASE.nii.gz with the values {values}.\n"
        "Correcting is faster than drawing: presegmentations/CASE.nii.gz is the current model's prediction on the\n"
        "image's own grid, with these values. ITK-SNAP: open images/CASE_0000.nii.gz, then Segmentation > Open\n"
        "Segmentation... presegmentations/CASE.nii.gz and Segmentation > Import Label Descriptions...\n"
        "labels.itksnap.txt; edit, then Segmentation > Save Segmentation Image as CASE.nii.gz. 3D Slicer: load\n"
        "labels.slicer.ctbl (a colour table), then the image, then presegmentations/CASE.nii.gz as a segmentation\n"
        "with that colour table; edit in Segment Editor; export it as a labelmap CASE.nii.gz on the image's grid.\n"
        f"Then: asfda ingest LABELS_FOLDER {project.root}\n"))
    project.state["query"] = record
    project.save(f"round {r}: queried {', '.join(query.ids)}")
    return record


def _write_annotation_aids(adapter, cases: list[Case], folder: Path, class_names: list[str],
                           labels: dict[str, int]) -> None:
    """Per queried case, from one forward pass of the current model: ``previews/CASE.png`` and
    ``presegmentations/CASE.nii.gz`` (the prediction on the image's own grid, the dataset's label values); plus
    the label descriptions for ITK-SNAP and 3D Slicer."""
    from asfda.annotation import itksnap_label_description, slicer_color_table
    from asfda.predict import _write_label_map, label_map_on_native_grid
    from asfda.report.previews import preview_png

    fg = tuple(range(1, len(class_names)))
    for case in cases:
        vol = adapter.prepare(case, with_label=False)
        logits, _ = adapter.engine_current.run(vol.image)
        pred = logits.argmax(0).numpy().astype(np.uint8)
        preview_png(vol.image[0].numpy(), {"current prediction": pred}, folder / "previews" / f"{case.case_id}.png",
                    title=case.case_id, class_names=class_names)
        native = label_map_on_native_grid(logits, "softmax", fg, fg, vol.affine, vol.native_affine, vol.native_shape,
                                          adapter.pretrained.preprocessing)
        (folder / "presegmentations").mkdir(parents=True, exist_ok=True)
        _write_label_map(folder / "presegmentations" / f"{case.case_id}.nii.gz", native, case.image_path)
    atomic_write_text(folder / "labels.itksnap.txt", itksnap_label_description(labels))
    atomic_write_text(folder / "labels.slicer.ctbl", slicer_color_table(labels))


# ---------------------------------------------------------------------------------------------- ingest
def ingest_labels(root: str | Path, labels_dir: str | Path) -> dict:
    """Checks each label file of ``labels_dir`` against its pool image and keeps the good ones.

    Each accepted file is copied to ``labels/`` (atomically) before the state records it. Returns
    ``{"accepted": [ids], "refused": [{"file", "reason"}], "replaced": [ids], "unchanged": [ids]}`` (unchanged:
    the same file was ingested before).
    """
    project = Project(root)
    accepted, refused, replaced, unchanged = [], [], [], []
    with project_lock(project.root, "ingest"):
        ds = project.dataset()
        by_id = ds.by_id()
        allowed = set(project.state["labels"].values())
        seen: set[str] = set()
        for path in label_files(labels_dir):
            cid = label_case_id(path)
            if cid in seen:
                refused.append({"file": str(path), "reason": f"a second label file for case {cid!r}"})
                continue
            seen.add(cid)
            if cid not in by_id:
                refused.append({"file": str(path), "reason": f"{cid!r} is not a case of the pool"})
                continue
            problem = check_label(path, by_id[cid], allowed, allow_empty=project.settings.allow_empty_labels)
            if problem:
                refused.append({"file": str(path), "reason": problem})
                continue
            digest = _sha256(path)
            old = project.state["labelled"].get(cid)
            if old and old["sha256"] == digest:
                unchanged.append(cid)
                continue  # already in: ingesting a folder twice changes nothing
            suffix = ".nii.gz" if path.name.endswith(".nii.gz") else ".nii"
            dest = project.root / "labels" / f"{cid}{suffix}"
            versions = list(old.get("versions", [])) if old else []
            if old:  # the replaced label is kept beside it, as labels/CASE.vN.nii.gz
                kept = project.root / "labels" / f"{cid}.v{len(versions) + 1}{suffix}"
                src = project.root / old["file"]
                if src.is_file():
                    atomic_write(kept, lambda p, src=src: shutil.copyfile(src, p))
                    versions.append({"file": str(kept.relative_to(project.root)), "sha256": old["sha256"],
                                     "ingested": old.get("ingested")})
            atomic_write(dest, lambda p, path=path: shutil.copyfile(path, p))
            if old:
                replaced.append(cid)
                if old["file"] != str(dest.relative_to(project.root)):
                    (project.root / old["file"]).unlink(missing_ok=True)
            query_round = _query_round(project, cid)
            project.state["labelled"][cid] = {"file": str(dest.relative_to(project.root)), "sha256": digest,
                                              "ingested": _now(), "source": str(path.resolve()),
                                              "query_round": query_round,
                                              **({"versions": versions} if versions else {}),
                                              **_edit_record(project, cid, path, query_round)}
            project.save(f"label {'replaced' if old else 'ingested'}: {cid}")
            accepted.append(cid)
    return {"accepted": accepted, "refused": refused, "replaced": replaced, "unchanged": unchanged}


def _edit_record(project: Project, cid: str, label_path: Path, query_round: int | None) -> dict:
    """``{"edit": ...}``: how much the annotator changed the pre-segmentation `asfda next` wrote for this case
    (`asfda.annotation.edit_summary`), or nothing when there is none."""
    from asfda.annotation import edit_summary
    from asfda.io.nifti import read_nifti

    if query_round is None:
        return {}
    pre = project.root / "annotate" / f"round{query_round}" / "presegmentations" / f"{cid}.nii.gz"
    if not pre.is_file():
        return {}
    try:
        p, _ = read_nifti(pre)
        g, _ = read_nifti(label_path)
        return {"edit": edit_summary(p.round().astype(np.int64), g.round().astype(np.int64), project.state["labels"])}
    except (AsfdaError, ValueError):  # a pre-segmentation removed or damaged by hand: no statistic, not an error
        return {}


def _query_round(project: Project, cid: str) -> int | None:
    q = project.state.get("query")
    return q["round"] if q and cid in q["ids"] else None


# ---------------------------------------------------------------------------------------------- finetune
def finetune_project(root: str | Path, *, progress: bool = True, force: bool = False, device: str | None = None,
                     precision: str | None = None) -> dict:
    """One round of fine-tuning on every ingested label; writes ``weights/roundR.safetensors``, the adapted
    model as a MONAI bundle in ``model/``, then the state. Refuses a round without new labels (``force``).
    ``device`` and ``precision`` override the project's settings for this round.

    For the when-to-stop estimate (`asfda.stopping`) the round records its ``probe``: the predictions of the model
    before and after it on a few seeded unlabeled pool volumes (one forward pass each, before and after)."""
    from safetensors.torch import save_file

    from asfda import stopping

    project = Project(root)
    with project_lock(project.root, "finetune"):
        s = project.settings
        r = project.round
        ds = project.dataset()
        labelled = project.labelled_cases(ds)
        if not labelled:
            raise AsfdaError("no labels yet", project.root, "run `asfda next`, annotate, then `asfda ingest`")
        trained = set(project.state["rounds"][-1]["labelled_ids"]) if project.state["rounds"] else set()
        current = {c.case_id: project.state["labelled"][c.case_id]["sha256"] for c in labelled}
        before = project.state["rounds"][-1].get("label_sha256", {}) if project.state["rounds"] else {}
        if not force and current == before:
            raise AsfdaError(f"no new or changed labels since round {r - 1}", project.root,
                             "run `asfda next` and annotate its cases (or pass --force to train again)")
        if precision is not None:
            _check_settings(dataclasses.replace(s, train=dataclasses.replace(s.train, precision=precision)))
        adapter = project.adapter(progress, device)
        t0 = time.perf_counter()
        temp, _ = adapter.fit_temperature(labelled, s.temperature0, s.seed * 1000 + r)
        unlabelled = [c for c in ds.cases if c.case_id not in current]
        train = dataclasses.replace(s.train, seed=s.seed * 1000 + r, precision=precision or s.train.precision)
        held = held_back(sorted(current), _trained_history(project.state["rounds"])) if train.hold_back_discarded else []
        by_id = ds.by_id()
        probe = stopping.probe_ids(by_id, stopping.PROBE_VOLUMES, s.seed, exclude=current)

        def logits_of(cid: str):
            return adapter.engine_current.run(adapter.prepare(by_id[cid], with_label=False).image)[0]

        before = stopping.probe_outputs(probe, logits_of)  # the model as the round starts
        result = adapter.train_round([c for c in labelled if c.case_id not in held], unlabelled, train, s.semi,
                                     temp.temperature, desc=f"round {r}")
        hist, reliable = result.history, result.reliable
        after = before if result.guard and result.guard.reverted else stopping.probe_outputs(probe, logits_of)
        probe_rec = stopping.probe_record(before, after, len(ds.class_names), current)
        weights = f"weights/round{r}.safetensors"
        atomic_write(project.root / weights, lambda p: save_file(adapter.current_state(), str(p)))
        adapter.export_bundle(project.root / "model", {
            "project": str(project.root), "round": r, "labelled": sorted(current),
            "guard": result.guard.to_dict() if result.guard else None})  # guard["reverted"]: weights as before r
        record = {"round": r, "labelled_ids": sorted(current), "label_sha256": current,
                  "trained_ids": sorted(set(current) - set(held)), "held_back": held,
                  "new_ids": sorted(set(current) - trained), "temperature": temp.temperature,
                  "ece_before": temp.ece_before, "ece_after": temp.ece_after, "steps": train.steps,
                  "loss_final": float(np.mean(hist["loss"][-10:])), "reliable": reliable,
                  "guard": result.guard.to_dict() if result.guard else None, "weights": weights,
                  "precision": train.precision, "probe": probe_rec,
                  "seconds": round(time.perf_counter() - t0, 2), "finished": _now()}
        project.state["rounds"].append(record)
        project.state["weights"] = weights
        q = project.state.get("query")
        if q is not None:
            q_missing = [i for i in q["ids"] if i not in current]
            project.state["query"] = None  # answered (unlabelled picks go back to the pool)
            if q_missing:
                record["query_unanswered"] = q_missing
        project.save(f"round {r} fine-tuned on {len(current)} labelled cases")
        for old in (project.root / "weights").glob("round*.safetensors"):
            if old.name != Path(weights).name and old.name != f"round{r - 1}.safetensors":
                old.unlink(missing_ok=True)  # keep the last two rounds
        return record


# ---------------------------------------------------------------------------------------------- status
def project_status(root: str | Path) -> dict:
    """A summary of the project (read-only, no lock needed: the state file is replaced atomically): what is labelled
    and pending, the rounds the guard discarded with the volumes they blame, the annotation effort per query round,
    the when-to-stop estimate (`asfda.stopping`) and what to run next."""
    from asfda import stopping
    project = Project(root)
    st = project.state
    q = st.get("query")
    labelled = st["labelled"]
    trained = set(st["rounds"][-1]["labelled_ids"]) if st["rounds"] else set()
    out = {"project": str(project.root), "model": st["model"], "pool": st["pool"], "pool_cases": st["pool_cases"],
           "rounds_finished": len(st["rounds"]), "labelled": len(labelled),
           "labelled_not_trained": sorted(set(labelled) - trained), "pending_query": None}
    if q:
        out["pending_query"] = {"round": q["round"], "ids": q["ids"], "folder": q["folder"],
                                "missing_labels": [i for i in q["ids"] if i not in labelled]}
    if st["rounds"]:
        last = st["rounds"][-1]
        out["last_round"] = {k: last.get(k) for k in ("round", "seconds", "loss_final", "temperature", "finished")}
        # per discarded round: the volumes it blames (trained on for the first time then: the harmful ones) and the
        # guard's numbers; their labels are kept (held back from training under train.hold_back_discarded)
        out["discarded_rounds"] = [
            {"round": rec["round"], "new_ids": rec.get("new_ids", []), "harmful": harm, **(rec.get("guard") or {})}
            for rec, harm in zip(st["rounds"], blamed(_trained_history(st["rounds"])))
            if (rec.get("guard") or {}).get("reverted")]
        out["held_back"] = last.get("held_back", [])
        out["last_round_discarded"] = bool((last.get("guard") or {}).get("reverted"))
        out["hold_back_discarded"] = project.settings.train.hold_back_discarded
    effort: dict[int, list[dict]] = {}
    for rec in labelled.values():
        if rec.get("edit") and rec.get("query_round") is not None:
            effort.setdefault(int(rec["query_round"]), []).append(rec["edit"])
    # per query round: how close the pre-segmentations were to the final labels (1.0: accepted as they were)
    out["annotation_effort"] = [
        {"round": r, "cases": len(edits),
         "edit_dice_mean": float(np.nanmean([e["edit_dice_mean"] for e in edits])),
         "fraction_changed_mean": float(np.mean([e["fraction_changed"] for e in edits]))}
        for r, edits in sorted(effort.items())]
    # when to stop: the estimate after the last round (label-free), beside the curve of the edit Dice (the Dice of
    # each query's pre-segmentations against the annotators' labels)
    curve = {r: [e["edit_dice_mean"] for e in edits] for r, edits in effort.items()}
    out["when_to_stop"] = stopping.estimate_from_records(st["rounds"], curve).to_dict()
    if q and out["pending_query"]["missing_labels"]:
        out["next"] = f"annotate {q['folder']}, then `asfda ingest LABELS_DIR {project.root}`"
    elif out["labelled_not_trained"]:
        out["next"] = f"`asfda finetune {project.root}`"
    elif out.get("last_round_discarded"):
        out["next"] = f"`asfda next {project.root}` (a replacement query for the discarded round)"
    else:
        out["next"] = f"`asfda next {project.root}`"
    return out
