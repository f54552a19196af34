"""The checks of a ``project.json`` as read (`asfda.project.state`): every entry of the JSON type asfda writes,
case ids that are plain names, and file names that stay inside the project folder. A hand edit gone wrong (or a
hostile one) is refused here, before any of it is used."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import get_type_hints

from asfda.errors import AsfdaError

__all__ = ["case_id_problem", "check_ids_and_paths", "check_setting_types", "check_state_types"]


def _setting_kind(hint: object) -> str | None:
    """The JSON kind (`_is_kind`) a setting of type ``hint`` is stored as; None: not checked here."""
    text = hint.__name__ if isinstance(hint, type) else str(hint).replace("typing.", "")
    return {"int": "int", "float": "finite number", "bool": "bool", "str": "str", "str | None": "str or null",
            "Optional[str]": "str or null", "tuple[int, int, int] | None": "list of 3 int or null"}.get(text)


def check_setting_types(data: dict, cls: type, where: str) -> None:
    """Refuses a setting whose JSON type is not the one asfda writes (a budget of "3", 2.5 steps, a flag of "yes", a
    NaN rate): project.json is typed JSON, not command-line text that `asfda set` converts. Unknown keys are left to
    `config_from_dict`."""
    hints = get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.name not in data:
            continue
        value, hint = data[f.name], hints[f.name]
        if isinstance(hint, type) and dataclasses.is_dataclass(hint):
            _check_fields(data, {f.name: "object"}, where)
            check_setting_types(value, hint, f"{where}{f.name}.")
            continue
        kind = _setting_kind(hint)
        if kind is not None:
            _check_fields(data, {f.name: kind}, where)


def case_id_problem(cid: object) -> str | None:
    """Why ``cid`` cannot be a case id (an id names files: ``labels/CASE.nii.gz``), or None."""
    if not isinstance(cid, str) or not cid.strip():
        return "is not a case id"
    if any(c in cid for c in "/\\\0") or cid in (".", "..") or cid.startswith("."):
        return "is not a case id (it holds a path separator, or names a hidden file or a parent folder)"
    return None


def check_ids_and_paths(state: dict, root: Path) -> None:
    """Refuses case ids that are not plain names, and file and folder names that leave the project folder once
    resolved (``weights: ../../../etc/passwd``, a link out of it): asfda reads and writes only inside its project."""
    ids: list[tuple[str, object]] = [(f"labelled key {cid!r}", cid) for cid in state["labelled"]]
    paths: list[tuple[str, object]] = [("weights", state["weights"])]
    for cid, rec in state["labelled"].items():
        paths.append((f"labelled[{cid!r}].file", rec["file"]))
        paths += [(f"labelled[{cid!r}].versions[{j}].file", v["file"]) for j, v in enumerate(rec.get("versions", []))]
    for i, rec in enumerate(state["rounds"]):
        paths.append((f"rounds[{i}].weights", rec["weights"]))
        for key in ("labelled_ids", "new_ids", "trained_ids", "held_back"):
            ids += [(f"rounds[{i}].{key}", v) for v in rec.get(key, [])]
    if state["query"] is not None:
        ids += [("query.ids", v) for v in state["query"]["ids"]]
        paths.append(("query.folder", state["query"]["folder"]))
    for where, cid in ids:
        problem = case_id_problem(cid)
        if problem:
            raise AsfdaError(f"{where}: {json.dumps(cid)[:60]} {problem}", fix=f"correct {where.split(' ')[0]}")
    for where, name in paths:
        if name is None and where == "weights":
            continue
        if not isinstance(name, str) or not name or not _inside_project(root, name):
            raise AsfdaError(f"{where} is {json.dumps(name)[:80]}, not a file inside the project folder {root}",
                             fix=f"correct {where} (a path relative to the project folder, e.g. "
                                 f"{'weights/round0.safetensors' if 'weights' in where else 'labels/CASE.nii.gz'})")


def _inside_project(root: Path, name: str) -> bool:
    try:
        resolved = (root / name).resolve()
    except (OSError, RuntimeError, ValueError):  # a loop of links, a NUL byte
        return False
    return resolved != root and root in resolved.parents


_STATE_TYPES = {"model": "str", "model_sha256_16": "str", "pool": "str", "pool_cases": "int", "labels": "object",
                "settings": "object", "query": "object or null", "labelled": "object", "rounds": "list",
                "weights": "str or null", "events": "list?", "class_map": "object?", "created": "str?"}
_LABELLED_TYPES = {"file": "str", "sha256": "str", "ingested": "str", "source": "str?", "query_round": "int or null?",
                   "edit": "object?", "versions": "list?"}
_EDIT_TYPES = {"edit_dice_mean": "number", "fraction_changed": "number"}
_VERSION_TYPES = {"file": "str", "sha256": "str?"}
_ROUND_TYPES = {"round": "int", "labelled_ids": "list of str", "weights": "str", "label_sha256": "object?",
                "new_ids": "list of str?", "trained_ids": "list of str?", "held_back": "list of str?",
                "seconds": "number?", "loss_final": "number?", "temperature": "number?", "finished": "str?",
                "guard": "object or null?", "probe": "object or null?", "forward_passes": "object?"}
_GUARD_TYPES = {"reverted": "bool?", "plausibility_pretrained": "number?", "plausibility_adapted": "number?",
                "cases": "list of str?"}
_PROBE_TYPES = {"change": "number or null?", "entropy_change": "number or null?"}
_QUERY_TYPES = {"round": "int", "ids": "list of str", "folder": "str", "strategy": "str", "temperature": "number",
                "components": "object"}


def _is_kind(value: object, kind: str) -> bool:
    return any({
        "str": lambda v: isinstance(v, str),
        "int": lambda v: isinstance(v, int) and not isinstance(v, bool),
        "number": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
        "finite number": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v),
        "bool": lambda v: isinstance(v, bool),
        "list of 3 int": lambda v: isinstance(v, list) and len(v) == 3 and all(
            isinstance(x, int) and not isinstance(x, bool) for x in v),
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


def _check_inner(rec: dict, key: str, types: dict[str, str], where: str, index: str = "") -> None:
    """`_check_fields` of the object ``rec[key]`` (absent or null: nothing to check)."""
    inner = rec.get(key)
    if inner is None:
        return
    if not isinstance(inner, dict):
        raise AsfdaError(f"{where}{key}{index} must be an object, got {json.dumps(inner)[:60]}",
                         fix=f"correct {where}{key}{index}")
    _check_fields(inner, types, f"{where}{key}{index}.")


def check_state_types(state: dict) -> None:
    """Refuses a project state whose entries have the wrong JSON types (a hand edit gone wrong)."""
    _check_fields(state, _STATE_TYPES, "")
    for cid, rec in state["labelled"].items():
        if not isinstance(rec, dict):
            raise AsfdaError(f"labelled[{cid!r}] must be an object, got {json.dumps(rec)[:60]}",
                             fix=f"correct labelled[{cid!r}]")
        _check_fields(rec, _LABELLED_TYPES, f"labelled[{cid!r}].")
        _check_inner(rec, "edit", _EDIT_TYPES, f"labelled[{cid!r}].")
        for j, version in enumerate(rec.get("versions", [])):
            _check_inner({"versions": version}, "versions", _VERSION_TYPES, f"labelled[{cid!r}].", f"[{j}]")
    for i, rec in enumerate(state["rounds"]):
        if not isinstance(rec, dict):
            raise AsfdaError(f"rounds[{i}] must be an object, got {json.dumps(rec)[:60]}", fix=f"correct rounds[{i}]")
        _check_fields(rec, _ROUND_TYPES, f"rounds[{i}].")
        _check_inner(rec, "guard", _GUARD_TYPES, f"rounds[{i}].")
        _check_inner(rec, "probe", _PROBE_TYPES, f"rounds[{i}].")
    if state["query"] is not None:
        _check_fields(state["query"], _QUERY_TYPES, "query.")
