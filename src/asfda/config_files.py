"""The bounded reader of every YAML/JSON settings file asfda reads (run configs, bundle configs and metadata,
nnU-Net's plans): a file from elsewhere is input, so its size, YAML aliases and nesting are bounded before anything
is built from it. A leaf (yaml, numpy and `asfda.errors`)."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from asfda.errors import AsfdaError

__all__ = ["MAX_CONFIG_BYTES", "MAX_CONFIG_DEPTH", "MAX_CONFIG_NODES", "check_config_data", "read_config_file"]

# a config, metadata or plans file is a few kB; these bound what a hostile one can cost before anything reads it
MAX_CONFIG_BYTES = 16 << 20
MAX_CONFIG_NODES = 1_000_000  # values after YAML aliases are expanded (a "billion laughs" file expands to 10^9)
MAX_CONFIG_DEPTH = 100  # nesting of lists and mappings


def read_config_file(path: str | Path, *, max_bytes: int = MAX_CONFIG_BYTES, yaml_syntax: bool | None = None,
                     what: str = "config", raw_text: bool = False) -> Any:
    """The parsed content of a YAML (``.yaml``/``.yml``, or ``yaml_syntax=True``) or JSON file, read within bounds
    (``raw_text``: its text, unparsed).

    Refused (`AsfdaError`, one line, before any large allocation): a path that is not a regular file, a file over
    ``max_bytes``, text that is not UTF-8, invalid syntax, YAML tags outside the safe set, YAML aliases that expand
    past `MAX_CONFIG_NODES` values or refer to themselves, and nesting deeper than `MAX_CONFIG_DEPTH`."""
    path = Path(path)
    if yaml_syntax is None:
        yaml_syntax = path.suffix.lower() in (".yaml", ".yml")
    try:
        if not path.is_file():
            raise AsfdaError(f"the {what} file is missing or not a regular file", path)
        with path.open("rb") as f:
            raw = f.read(max_bytes + 1)
    except OSError as exc:
        raise AsfdaError(f"cannot read the {what} file ({exc.strerror or exc})", path) from None
    if len(raw) > max_bytes:
        raise AsfdaError(f"the {what} file is larger than {max_bytes >> 20} MiB; asfda refuses it unread", path,
                         "a config or metadata file is a few kB: check that this is the right file")
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise AsfdaError(f"the {what} file is not UTF-8 text ({exc.reason} at byte {exc.start})", path,
                         "save it as UTF-8") from None
    if raw_text:
        return text
    kind = "YAML" if yaml_syntax else "JSON"
    try:
        data = _bounded_yaml(text) if yaml_syntax else json.loads(text)
        _check_size(data)
    except _TooLarge as exc:
        raise AsfdaError(f"the {what} file {exc}; asfda refuses it before building anything from it", path,
                         "write the values out plainly (a model config is a few hundred values)") from None
    except RecursionError:
        raise AsfdaError(f"invalid {kind} (nested too deeply)", path, "fix the syntax") from None
    except (yaml.YAMLError, ValueError) as exc:
        message = " ".join(str(exc).split())[:200]
        raise AsfdaError(f"invalid {kind} ({exc.__class__.__name__}: {message})", path, f"fix the {kind} syntax") \
            from None
    return data


def check_config_data(data: Any, path: str | Path | None, what: str = "config",
                      fix: str = "write the values out plainly") -> None:
    """Refuses (`AsfdaError`) settings read from elsewhere than a file `read_config_file` reads (a checkpoint's
    pickled plans) that nest deeper than `MAX_CONFIG_DEPTH` or hold more than `MAX_CONFIG_NODES` values."""
    try:
        _check_size(data)
    except _TooLarge as exc:
        raise AsfdaError(f"the {what} {exc}; asfda refuses it", path, fix) from None


class _TooLarge(ValueError):
    pass


# one-line quoted strings and comments, whose brackets are text, not nesting
_YAML_TEXT = re.compile(r""""(?:[^"\\\n]|\\.)*"|'(?:[^'\n]|'')*'|#[^\n]*""")
_YAML_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # libyaml's parser when PyYAML has it: 10x faster


def _bounded_yaml(text: str) -> Any:
    """``yaml.safe_load`` after a pass over the parser's events that counts the values, each alias as many times as
    it is used, and the nesting, and stops at the first value past the bounds: a file of nested aliases ("billion
    laughs") is refused at its own size, never expanded, and a long one before it is all parsed. Flow nesting
    (``[[[``) is bounded before any parser (PyYAML's scanner costs the square of it)."""
    flow = np.frombuffer(_YAML_TEXT.sub("", text).encode("utf-8", "replace"), dtype=np.uint8)
    steps = np.isin(flow, (ord("["), ord("{"))).astype(np.int32) - np.isin(flow, (ord("]"), ord("}")))
    if steps.size and int(np.cumsum(steps).max()) > MAX_CONFIG_DEPTH:
        raise _TooLarge(f"nests values more than {MAX_CONFIG_DEPTH} levels deep")
    loader = _YAML_LOADER(text)
    try:
        count = 0
        sizes: dict[str, int] = {}  # anchor -> values under it, aliases expanded
        open_: list[tuple[str | None, int]] = []  # the collections being read: (anchor, count before them)
        while loader.check_event():
            event = loader.get_event()
            if isinstance(event, yaml.AliasEvent):
                if any(anchor == event.anchor for anchor, _ in open_):
                    raise _TooLarge("has a YAML alias that contains itself")
                count += sizes.get(event.anchor or "", 0)  # an undefined one: the loader below says so
            elif isinstance(event, yaml.ScalarEvent):
                count += 1
                if event.anchor:
                    sizes[event.anchor] = 1
            elif isinstance(event, yaml.CollectionStartEvent):
                open_.append((event.anchor, count))
                count += 1
                if len(open_) > MAX_CONFIG_DEPTH:
                    raise _TooLarge(f"nests values more than {MAX_CONFIG_DEPTH} levels deep")
            elif isinstance(event, yaml.CollectionEndEvent):
                anchor, before = open_.pop()
                if anchor:
                    sizes[anchor] = count - before
            if count > MAX_CONFIG_NODES:
                raise _TooLarge(f"holds more than {MAX_CONFIG_NODES:,} values (YAML aliases counted as often as "
                                "they are used)")
    finally:
        loader.dispose()
    return yaml.load(text, Loader=_YAML_LOADER)  # noqa: S506 -- a safe loader, bounded above


def _check_size(data: Any) -> None:
    """Depth and count of values of parsed data (JSON has no aliases: its size is bounded by the file's)."""
    count = 0
    stack: list[tuple[Any, int]] = [(data, 1)]
    while stack:
        node, depth = stack.pop()
        count += 1
        if depth > MAX_CONFIG_DEPTH:
            raise _TooLarge(f"nests values more than {MAX_CONFIG_DEPTH} levels deep")
        if count > MAX_CONFIG_NODES:
            raise _TooLarge(f"holds more than {MAX_CONFIG_NODES:,} values")
        if isinstance(node, dict):
            stack.extend((v, depth + 1) for v in node.values())
        elif isinstance(node, list):
            stack.extend((v, depth + 1) for v in node)
