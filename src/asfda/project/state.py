"""A project folder's state: its settings, ``project.json`` (read, checked, written atomically with its ``.bak``),
the lock that keeps two asfda processes apart, and the checks `init` and `set` share."""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import shlex
import shutil
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

from asfda.adapter import Adapter
from asfda.config import SEED, AdaptSettings, Problem, SettingError, TrainConfig, config_from_dict, setting
from asfda.engine import DEVICE_FORMS, check_device_name
from asfda.errors import AsfdaError
from asfda.io import atomic_write, atomic_write_json, load_dataset
from asfda.io.datasets import Case, Dataset, parse_labels
from asfda.models import load_model, parse_class_map_override
from asfda.rounds import PoolState
from asfda.selection import build_strategy

from .validation import check_ids_and_paths, check_setting_types, check_state_types

PROJECT_FILE = "project.json"
BACKUP_FILE = "project.json.bak"
LOCK_FILE = ".asfda.lock"
PROJECT_ENTRIES = ("labels", "annotate", "weights", "model", "cache", PROJECT_FILE, BACKUP_FILE, LOCK_FILE)
"""What a project folder holds (asfda's own names): `init_project` refuses a folder that has any of them."""
FORMAT = 1
COMMAND_LINE_ONLY = {"trust_model_code": "trust in a model's code is given on the command line, each time: pass "
                                         "--trust-model-code to asfda init, next and finetune"}
"""What a project never stores, and why: project.json cannot grant it, `asfda set` refuses it."""


PROJECT_STEPS = 200
"""Fine-tuning steps of a project's round when `asfda init` is not told (``--steps``): a run config's round trains
`asfda.config.TrainConfig.steps` (100). The one place a project's steps default is set."""


def _project_train() -> TrainConfig:
    return TrainConfig(steps=PROJECT_STEPS)


@dataclasses.dataclass(kw_only=True)
class ProjectSettings(AdaptSettings):
    """A project's settings: `asfda init` sets them, `asfda set` (`update_settings`) changes them. What a simulated
    run has too (budget, the query's settings, the recipe, the device...) is `asfda.config.AdaptSettings`, declared and
    checked there once; a project adds its strategy, its seed and whether empty labels are accepted, and trains
    `PROJECT_STEPS` per round by default."""

    strategy: str = "asfda"
    seed: int = setting(0, SEED)
    allow_empty_labels: bool = False
    train: TrainConfig = dataclasses.field(default_factory=_project_train)


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


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

    def pool_state(self) -> PoolState:
        """Who is labelled, as a `asfda.rounds.PoolState`: each ingested case with the round whose query asked for
        it (a label that answered no query: the round it was ingested in)."""
        state = PoolState()
        for cid, rec in self.state["labelled"].items():
            q = rec.get("query_round")
            state.labelled[cid] = int(q) if q is not None else self.round
        return state

    def uncovered_classes(self) -> list[str]:
        """The dataset classes the model has no output channel for (folded into background: never predicted, their
        label voxels count as background), from the class map ``init`` recorded."""
        return [t for t, src in (self.state.get("class_map") or {}).items() if src is None and t != "background"]

    @property
    def round(self) -> int:
        return len(self.state["rounds"])

    def adapter(self, progress: bool, device: str | None = None, precision: str = "fp32", *,
                trust_model_code: bool = False):
        """The pretrained model with the project's current weights; ``device`` overrides the setting for one command;
        ``precision`` is the inference precision (`InferenceEngine`); ``trust_model_code``: the command line's
        ``--trust-model-code`` (never a setting: `COMMAND_LINE_ONLY`)."""

        model = load_model(self.state["model"], allow_code=trust_model_code,
                           output_activation=self.settings.output_activation)
        if model.weights_hash != self.state["model_sha256_16"]:
            raise AsfdaError("the pretrained model's weights changed since `asfda init`", self.state["model"],
                             "point project.json 'model' back at the original weights, or start a new project")
        adapter = Adapter(model, self.dataset().class_names,
                          class_map_override=parse_class_map_override(self.settings.class_map),
                          cache_dir=str(self.root / "cache"), device=device or self.settings.device, progress=progress,
                          precision=precision, fold_uncovered=True)  # as init built its class map
        if self.state.get("weights"):
            adapter.load_current_state(self._weights(self.state["weights"]))
        return adapter

    def _weights(self, name: str) -> dict:
        """The adapted weights ``name`` (confined to the project by `_read_state`); a missing or damaged file is
        refused in one line."""
        from safetensors.torch import load_file

        path = self.root / name
        try:
            return load_file(str(path))
        except Exception as exc:  # missing, truncated, not safetensors
            raise AsfdaError(f"cannot read the adapted weights project.json names ({exc.__class__.__name__}: "
                             f"{' '.join(str(exc).split())[:120]})", path,
                             "restore the file, or point project.json 'weights' at the previous round's "
                             "weights/roundR.safetensors") from None


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
    except ValueError as exc:  # a number past Python's 4300 digits
        raise AsfdaError(f"{path.name} is not valid JSON ({str(exc)[:120]})", fix="fix the edit") from None
    except RecursionError:
        raise AsfdaError(f"{path.name} is not valid JSON (nested too deeply)", fix="fix the edit") from None
    if not isinstance(state, dict):
        raise AsfdaError(f"{path.name} must hold a JSON object, not a JSON {type(state).__name__}")
    if state.get("format") != FORMAT:
        raise AsfdaError(f"project format {state.get('format')!r} is not {FORMAT}")
    check_state_types(state)
    check_ids_and_paths(state, path.parent.resolve())
    _drop_command_line_only(state["settings"], path)
    check_setting_types(state["settings"], ProjectSettings, "settings.")

    try:
        parse_labels(state["labels"], path)
    except AsfdaError as exc:
        raise AsfdaError(f"labels: {exc.problem}", fix=exc.fix) from None
    # projects started before a setting existed go on as they were made: the embedding space, METHOD.md's rule, every
    # label trained on (the defaults changed later)
    state["settings"].setdefault("diversity", "embedding")
    state["settings"].setdefault("representativeness", "none")
    if isinstance(state["settings"].get("train"), dict):
        state["settings"]["train"].setdefault("hold_back_discarded", False)
    try:
        settings = config_from_dict(ProjectSettings, state["settings"], "settings")
    except AsfdaError as exc:
        raise AsfdaError(exc.problem, fix="correct the setting") from None
    try:
        _check_settings(settings, path)
    except AsfdaError as exc:
        raise AsfdaError(exc.problem, fix=exc.fix) from None
    return state, settings


def _drop_command_line_only(settings: dict, path: Path) -> None:
    """Removes `COMMAND_LINE_ONLY` keys from a project's settings: ``false`` (what projects made before this rule
    stored) silently, anything else with a warning, once per file; the next save drops them from project.json."""
    for key, why in COMMAND_LINE_ONLY.items():
        value = settings.pop(key, False)
        if value is not False and (path, key) not in _WARNED:
            _WARNED.add((path, key))
            logging.getLogger("asfda").warning(f"{path}: settings.{key} = {json.dumps(value)} is ignored: {why}")


_WARNED: set[tuple[Path, str]] = set()


def _is_device_name(name: object) -> bool:
    try:
        check_device_name(name)
    except AsfdaError:
        return False
    return True


def _check_settings(settings: ProjectSettings, path: Path | None = None) -> None:
    """Refuses settings out of range (``path``: the project.json they came from; None: from the command line) with
    the checks every settings dataclass declares (`asfda.config.Settings.check`), then the device and strategy names.
    `init`, `set` and every read of project.json run these same checks."""

    def fix(problem: Problem) -> str:
        return f"set settings.{problem.name} in project.json" if path else f"set {problem.name} to {problem.want}"

    settings.check(path, fix)
    if not _is_device_name(settings.device):
        device = Problem("device", settings.device, f"one of {DEVICE_FORMS}")
        raise SettingError(device.message(), path, fix(device))
    try:
        build_strategy(settings.strategy, settings=settings)
    except AsfdaError as exc:
        raise AsfdaError(f"settings: {exc.problem}", path,
                         "fix settings.strategy" + (" in project.json" if path else "")) from None


def _check_budget(settings: ProjectSettings, pool_cases: int, pool: str | Path, how: str = "pass --budget {n}") -> None:
    """Refuses a budget larger than the pool (``how``: how to give a smaller one, ``{n}`` the pool size)."""
    if settings.budget > pool_cases:
        raise AsfdaError(f"budget {settings.budget} is larger than the pool ({pool_cases} cases)", pool,
                         f"{how.format(n=pool_cases)} or less, or add cases to the pool")
