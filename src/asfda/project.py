"""The annotate-and-resume workflow of a hospital team: a project folder that asfda and the annotators share.

    asfda init --model M --pool P OUT   # once: the pretrained model, the unlabeled pool, the settings
    asfda next OUT                      # score + query; OUT/annotate/roundR/ holds what to label
    asfda ingest LABELS_DIR OUT         # check each label against its image; keep the good ones
    asfda finetune OUT                  # one round of fine-tuning on every label so far
    asfda status OUT                    # where the project stands and what to do next

Everything the project knows is in ``OUT/project.json`` (human-readable, rewritten atomically after each
step that changes it; ``project.json.bak`` is a copy of the last state asfda wrote, so restoring it after a
hand edit gone wrong never loses a finished step). Files are written before the state that names them, so after ``kill -9`` at any
point the project is at the last completed step: an accepted label is never lost (its file is kept before
it is recorded, and a re-run of ``ingest`` records it), and a round of fine-tuning is either finished
(weights, bundle and state) or redone from the previous round's weights. A lock file stops two asfda
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

__all__ = ["PROJECT_FILE", "Project", "ProjectSettings", "finetune_project", "ingest_labels", "init_project",
           "next_query", "project_lock", "project_status"]

PROJECT_FILE = "project.json"
BACKUP_FILE = "project.json.bak"
LOCK_FILE = ".asfda.lock"
PROJECT_ENTRIES = ("labels", "annotate", "weights", "model", "cache", PROJECT_FILE, BACKUP_FILE, LOCK_FILE)
"""What a project folder holds (asfda's own names): `init_project` refuses a folder that has any of them."""
FORMAT = 1


@dataclasses.dataclass
class ProjectSettings:
    """What `asfda init` fixes for the life of a project (edit ``project.json`` to change it)."""

    strategy: str = "asfda"
    budget: int = 2
    seed: int = 0
    alpha: float = 0.5
    round0_gap: str = "feature_gap"
    diversity: str = DEFAULT_DIVERSITY
    temperature0: float = 1.0
    grow_voxels: int = 2
    class_map: str | None = None
    allow_empty_labels: bool = False
    device: str = "auto"
    # build the model config with MONAI's full ConfigParser ($ expressions, any _target_): trusted bundles only
    trust_model_code: bool = False
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

    def adapter(self, progress: bool):
        from asfda.loop import Adapter
        from asfda.models import load_model, parse_class_map_override

        model = load_model(self.state["model"], allow_code=self.settings.trust_model_code)
        if model.weights_hash != self.state["model_sha256_16"]:
            raise AsfdaError("the pretrained model's weights changed since `asfda init`", self.state["model"],
                             "point project.json 'model' back at the original weights, or start a new project")
        adapter = Adapter(model, self.dataset().class_names,
                          class_map_override=parse_class_map_override(self.settings.class_map),
                          cache_dir=str(self.root / "cache"), device=self.settings.device, progress=progress)
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
                "finished": "str?", "guard": "object or null?"}
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
    from asfda.selection import build_strategy

    try:
        build_strategy(settings.strategy, settings.alpha, settings.round0_gap, settings.diversity)
    except (AsfdaError, ValueError) as exc:
        problem = exc.problem if isinstance(exc, AsfdaError) else str(exc)
        raise AsfdaError(f"settings: {problem}", path, "fix settings.strategy / alpha / round0_gap / diversity"
                         + (" in project.json" if path else "")) from None
    if settings.budget < 1:
        raise AsfdaError(f"budget must be >= 1, got {settings.budget}", path,
                         "set settings.budget to 1 or more" if path else "pass --budget 1 or more")
    if settings.train.guard_volumes < 1:
        raise AsfdaError(f"train.guard_volumes must be >= 1, got {settings.train.guard_volumes}", path,
                         "set settings.train.guard_volumes to 1 or more (settings.train.guard: false turns the "
                         "guard off)")


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
    loaded = load_model(model, allow_code=settings.trust_model_code)
    ds = load_dataset(pool)
    refuse_output_inside_inputs(root, {"the pool": dataset_input_folders(ds)}, flag="project folder")
    if labels_json:
        from asfda.io.datasets import parse_labels

        labels = parse_labels(json.loads(Path(labels_json).read_text()), Path(labels_json))
    elif (Path(pool) / "dataset.json").exists():
        labels = ds.labels
    else:  # a plain folder: the model's own classes
        labels = {name: i for i, name in enumerate(loaded.class_names)}
    names = [n for n, _ in sorted(labels.items(), key=lambda kv: kv[1])]
    cmap = build_class_map(loaded.class_names, names, parse_class_map_override(settings.class_map))
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


# ---------------------------------------------------------------------------------------------- next
def next_query(root: str | Path, *, progress: bool = True, force: bool = False) -> dict:
    """Scores the unlabeled pool with the current model and picks the next batch to annotate.

    Writes ``annotate/roundR/``: ``cases.txt`` (ids), ``images/`` (links to the pool images),
    ``previews/CASE.png`` (image and current prediction), ``query.json`` (scores and why) and
    ``README.txt``. A pending query whose labels are not all in is shown again, not replaced (``force``
    replaces it).
    """
    project = Project(root)
    with project_lock(project.root, "next"):
        pending = project.state.get("query")
        if pending and not force:
            missing = [i for i in pending["ids"] if i not in project.state["labelled"]]
            if missing:
                return pending
            raise AsfdaError(f"every case of round {pending['round']}'s query is labelled, and that round is not "
                             "fine-tuned yet", project.root, "run `asfda finetune` first")
        return _new_query(project, progress)


def _new_query(project: Project, progress: bool) -> dict:
    from asfda.selection import build_strategy

    s = project.settings
    r = project.round
    ds = project.dataset()
    adapter = project.adapter(progress)
    labelled = project.labelled_cases(ds)
    unlabelled = [c for c in ds.cases if c.case_id not in project.state["labelled"]]
    if len(unlabelled) < s.budget:
        raise AsfdaError(f"only {len(unlabelled)} unlabeled cases are left, fewer than the budget {s.budget}",
                         project.root, "lower settings.budget in project.json, or add cases to the pool")
    t0 = time.perf_counter()
    strategy = build_strategy(s.strategy, s.alpha, s.round0_gap, s.diversity)
    temp, scores = adapter.round_scores(strategy, labelled, unlabelled, s.temperature0, r, s.seed * 1000 + r,
                                        s.grow_voxels)
    query = strategy.select(scores, s.budget, s.seed * 1000 + r)
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
    _write_previews(adapter, [by_id[i] for i in query.ids], folder / "previews", ds.class_names)
    record = {"round": r, "strategy": query.strategy, "ids": query.ids, "scores": query.scores,
              "components": query.components, "strategy_settings": strategy.settings(),
              "temperature": temp.temperature, "ece_before": temp.ece_before, "ece_after": temp.ece_after, "seconds": round(time.perf_counter() - t0, 2),
              "folder": str(folder.relative_to(project.root)), "created": _now()}
    atomic_write_json(folder / "query.json", record)
    atomic_write_text(folder / "cases.txt", "\n".join(query.ids) + "\n")
    values = ", ".join(f"{v} = {n}" for n, v in sorted(project.state["labels"].items(), key=lambda kv: kv[1]))
    atomic_write_text(folder / "README.txt", (
        f"Round {r}: please annotate these {len(query.ids)} cases (ids in cases.txt, images in images/).\n"
        f"Save each label map on its image's grid as CASE.nii.gz with the values {values}.\n"
        f"Then: asfda ingest LABELS_FOLDER {project.root}\n"))
    project.state["query"] = record
    project.save(f"round {r}: queried {', '.join(query.ids)}")
    return record


def _write_previews(adapter, cases: list[Case], folder: Path, class_names: list[str]) -> None:
    from asfda.report.previews import preview_png

    for case in cases:
        vol = adapter.prepare(case, with_label=False)
        logits, _ = adapter.engine_current.run(vol.image)
        pred = logits.argmax(0).numpy().astype(np.uint8)
        preview_png(vol.image[0].numpy(), {"current prediction": pred}, folder / f"{case.case_id}.png",
                    title=case.case_id, class_names=class_names)


# ---------------------------------------------------------------------------------------------- ingest
def ingest_labels(root: str | Path, labels_dir: str | Path) -> dict:
    """Checks each label file of ``labels_dir`` against its pool image and keeps the good ones.

    Each accepted file is copied to ``labels/`` (atomically) before the state records it. Returns
    ``{"accepted": [ids], "refused": [{"file", "reason"}], "replaced": [ids]}``.
    """
    project = Project(root)
    accepted, refused, replaced = [], [], []
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
                continue  # already in: ingesting a folder twice changes nothing
            suffix = ".nii.gz" if path.name.endswith(".nii.gz") else ".nii"
            dest = project.root / "labels" / f"{cid}{suffix}"
            atomic_write(dest, lambda p, path=path: shutil.copyfile(path, p))
            if old:
                replaced.append(cid)
                if old["file"] != str(dest.relative_to(project.root)):
                    (project.root / old["file"]).unlink(missing_ok=True)
            project.state["labelled"][cid] = {"file": str(dest.relative_to(project.root)), "sha256": digest,
                                              "ingested": _now(), "source": str(path.resolve()),
                                              "query_round": _query_round(project, cid)}
            project.save(f"label {'replaced' if old else 'ingested'}: {cid}")
            accepted.append(cid)
    return {"accepted": accepted, "refused": refused, "replaced": replaced}


def _query_round(project: Project, cid: str) -> int | None:
    q = project.state.get("query")
    return q["round"] if q and cid in q["ids"] else None


# ---------------------------------------------------------------------------------------------- finetune
def finetune_project(root: str | Path, *, progress: bool = True, force: bool = False) -> dict:
    """One round of fine-tuning on every ingested label; writes ``weights/roundR.safetensors``, the adapted
    model as a MONAI bundle in ``model/``, then the state. Refuses a round without new labels (``force``)."""
    from safetensors.torch import save_file

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
        adapter = project.adapter(progress)
        t0 = time.perf_counter()
        temp, _ = adapter.fit_temperature(labelled, s.temperature0, s.seed * 1000 + r)
        unlabelled = [c for c in ds.cases if c.case_id not in current]
        train = dataclasses.replace(s.train, seed=s.seed * 1000 + r)
        result = adapter.train_round(labelled, unlabelled, train, s.semi, temp.temperature, desc=f"round {r}")
        hist, reliable = result.history, result.reliable
        weights = f"weights/round{r}.safetensors"
        atomic_write(project.root / weights, lambda p: save_file(adapter.current_state(), str(p)))
        adapter.export_bundle(project.root / "model", {
            "project": str(project.root), "round": r, "labelled": sorted(current),
            "guard": result.guard.to_dict() if result.guard else None})  # guard["reverted"]: weights as before r
        record = {"round": r, "labelled_ids": sorted(current), "label_sha256": current,
                  "new_ids": sorted(set(current) - trained), "temperature": temp.temperature,
                  "ece_before": temp.ece_before, "ece_after": temp.ece_after, "steps": train.steps,
                  "loss_final": float(np.mean(hist["loss"][-10:])), "reliable": reliable,
                  "guard": result.guard.to_dict() if result.guard else None, "weights": weights,
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
    """A summary of the project (read-only, no lock needed: the state file is replaced atomically)."""
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
    if q and out["pending_query"]["missing_labels"]:
        out["next"] = f"annotate {q['folder']}, then `asfda ingest LABELS_DIR {project.root}`"
    elif out["labelled_not_trained"]:
        out["next"] = f"`asfda finetune {project.root}`"
    else:
        out["next"] = f"`asfda next {project.root}`"
    return out
