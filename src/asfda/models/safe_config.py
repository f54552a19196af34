"""A model config is data, not code: building ``network_def`` and ``preprocessing`` from an allow-list.

MONAI's ``ConfigParser`` evaluates ``$`` expressions, instantiates any importable ``_target_`` (builtins such as
``open`` included), honours ``_mode_`` / ``_requires_`` / ``_disabled_``, and several MONAI classes resolve a
string argument to any importable callable (``LoadImage(reader="os.system")``). A bundle downloaded from a
colleague or a hub is untrusted input, so asfda never hands it to the parser. Instead:

* ``@`` references are resolved by copying the referred *literal* value (``@a#b`` and ``@a::b`` as MONAI
  spells them); ``$`` expressions and ``%`` macros are refused;
* a ``_target_`` must name a class on the allow-list: MONAI networks, blocks and layers and ``torch.nn``
  modules for ``network_def``; ``Compose`` and the transforms asfda applies (orientation, spacing, intensity,
  type/channel steps) for ``preprocessing``. Functions, builtins and every other class are refused;
* every argument is a plain value (number, string, bool, null, list, mapping, or an allowed nested
  component); a string that names importable code (``os.system``, a URL) is refused, and arguments that MONAI
  resolves to callables (``reader``, ``func``, ...) or that download or write files (``pretrained``,
  ``*_url``, ``output_dir``, ...) are refused unless their value is on a short allow-list; a download flag that a
  class turns on by default (``EfficientNetBN``'s ``pretrained=True``) is passed as False, and a class that fetches
  files whatever its arguments (a default hub repository or file name) is refused;
* ``@`` references expand to at most `MAX_RESOLVED_VALUES` values (lists of references to lists of references grow
  exponentially);
* ``_mode_`` other than ``default`` and ``_requires_`` are refused; ``_disabled_`` must be a literal bool.

``asfda ... --trust-model-code`` (``load_model(..., allow_code=True)``) uses MONAI's full parser instead, for a
bundle the user trusts.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from asfda.errors import AsfdaError, missing_package, missing_package_error

__all__ = ["DECLARED_ONLY", "MAX_RESOLVED_VALUES", "ConfigTooLarge", "DeclaredTransform", "build_network",
           "build_transforms", "resolve_literal", "too_large_error"]

TRUST_HINT = ("if you trust this bundle, pass --trust-model-code to each command that loads it (predict, evaluate, "
              "score, query, simulate; init, next, finetune; Python: load_model(..., allow_code=True)); otherwise "
              "rewrite the config with literal values")

# MONAI's image readers, by the names LoadImage accepts (case-insensitive); any other reader string is refused
_READERS = {"nibabelreader", "itkreader", "pydicomreader", "numpyreader", "pilreader", "nrrdreader",
            "nibabel", "itk", "pydicom", "numpy", "pil", "nrrd"}
# arguments MONAI (or the class) turns into code: a callable, a class, a handler
_CODE_ARGS = {"func", "lambda_func", "inv_func", "function", "fn", "callable", "select_fn", "writer",
              "logger_handler", "merger_cls", "collate_fn", "transform", "transforms_fn", "post_func", "filter_fn",
              "converter", "hook", "hooks", "callback", "callbacks", "module", "_requires_"}
# arguments that fetch or write files when truthy (refused when the config sets them; turned off, or the class
# refused, when the class's own default is on: `_io_defaults`)
_IO_ARG = re.compile(r"pretrain|url|download|checkpoint|ckpt|weights?_?(path|dir|file)|^weights$|_path$|_dir$|^path$"
                     r"|file|repo|hub", re.IGNORECASE)
# names _IO_ARG matches that touch no file: gradient checkpointing (recomputing activations), stochastic depth
_NOT_IO_ARGS = {"use_checkpoint", "use_checkpointing", "gradient_checkpointing", "drop_path"}
# the most values a config's @ references may expand to (a real network_def or preprocessing has a few hundred)
MAX_RESOLVED_VALUES = 1_000_000
_DOTTED = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)+$")
# preprocessing steps asfda reads but does not run (loading is asfda's own, validated reader)
DECLARED_ONLY = {"LoadImaged", "LoadImage", "EnsureChannelFirstd", "EnsureChannelFirst", "EnsureTyped",
                  "EnsureType", "ToTensord", "ToTensor", "CastToTyped", "CastToType", "Identityd", "Identity"}
_SPATIAL = {"Orientationd", "Orientation", "Spacingd", "Spacing"}


@dataclass
class DeclaredTransform:
    """A preprocessing step the config declares; ``transform`` is None for the steps asfda only records."""

    name: str
    args: dict = field(default_factory=dict)
    transform: Any = None


class _Refused(Exception):
    pass


def _is_code_string(s: str) -> bool:
    if s.startswith(("$", "%")) or "://" in s:
        return True
    if _DOTTED.match(s):
        try:
            return importlib.util.find_spec(s.split(".")[0]) is not None
        except (ImportError, ValueError):
            return False
    return False


class ConfigTooLarge(Exception):
    """The ``@`` references of a config expand to more than `MAX_RESOLVED_VALUES` values."""


def resolve_literal(cfg: dict, node: Any, *, at: tuple[str, ...] | None = None, _depth: int = 0,
                    budget: list[int] | None = None) -> Any:
    """``node`` with every ``@id`` replaced by a copy of the literal it refers to (MONAI's ``#`` / ``::``
    id separators); refuses expressions, macros and references to missing keys or cycles.

    ``at`` is ``node``'s own id in ``cfg`` (``("inferer", "roi_size")``): MONAI's relative references resolve against
    it (``@#key``: ``key`` beside the value, ``@##key``: one level up). Without it a relative reference is refused.

    Raises `ConfigTooLarge`, before building anything, when the result would hold more than `MAX_RESOLVED_VALUES`
    values: references of lists of references expand exponentially (10 wide and 9 deep is 10^9 values from a 1 kB
    file); the size is counted first, each referenced id once. ``budget`` (``[values left]``) shares one bound
    between several calls."""
    if budget is None:
        budget = [MAX_RESOLVED_VALUES]
    if _depth == 0:
        size = _expanded_size(cfg, node, at, 0, {})
        if size > budget[0]:
            raise ConfigTooLarge(f"expands to more than {MAX_RESOLVED_VALUES:,} values through its @ references "
                                 f"(lists of references to lists of references: {size:,})")
        budget[0] -= size
    if _depth > 50:
        raise _Refused("references nested more than 50 deep (a cycle?)")
    if isinstance(node, dict):
        if not all(isinstance(k, str) for k in node):  # YAML allows numbers, lists as keys; MONAI names only
            raise _Refused(f"a key {next(k for k in node if not isinstance(k, str))!r} that is not a name")
        return {k: resolve_literal(cfg, v, at=None if at is None else (*at, str(k)), _depth=_depth + 1)
                for k, v in node.items()}
    if isinstance(node, list):
        return [resolve_literal(cfg, v, at=None if at is None else (*at, str(i)), _depth=_depth + 1)
                for i, v in enumerate(node)]
    if isinstance(node, str):
        if node.startswith("$"):
            raise _Refused(f"the expression {node[:60]!r}")
        if node.startswith("%"):
            raise _Refused(f"the macro {node[:60]!r} (it reads another file)")
        if node.startswith("@"):
            target, parts = _referred(cfg, node, at)
            # no copy needed: every list and mapping of the result is built anew, and the rest is immutable
            return resolve_literal(cfg, target, at=parts, _depth=_depth + 1)
        return node
    if node is None or isinstance(node, (bool, int, float)):
        return node
    raise _Refused(f"a value of type {type(node).__name__}")


def _referred(cfg: dict, node: str, at: tuple[str, ...] | None) -> tuple[Any, tuple[str, ...]]:
    """The value a ``@`` reference names, and its id."""
    ref = node[1:].replace("::", "#")
    up = len(ref) - len(ref.lstrip("#"))
    parts = ref.lstrip("#").split("#") if ref.lstrip("#") else []
    if up:  # a relative reference (MONAI's "@#key"): against the value's own id
        if at is None or up > len(at):
            raise _Refused(f"a relative reference {node!r} that leaves the config")
        parts = [*at[:len(at) - up], *parts]
    target: Any = cfg
    for part in parts:
        if isinstance(target, dict) and part in target:
            target = target[part]
        elif (isinstance(target, list) and part.lstrip("-").isdigit()
              and -len(target) <= int(part) < len(target)):
            target = target[int(part)]
        else:
            raise _Refused(f"a reference {node!r} to a missing key")
    return target, tuple(parts)


def _expanded_size(cfg: dict, node: Any, at: tuple[str, ...] | None, depth: int,
                   sizes: dict[tuple[str, ...], int]) -> int:
    """How many values `resolve_literal` would build from ``node``, without building them: each referenced id is
    counted once (``sizes``), so a file of nested references costs its own size, not its expansion's."""
    if depth > 50:
        raise _Refused("references nested more than 50 deep (a cycle?)")
    if isinstance(node, dict):
        return 1 + sum(_expanded_size(cfg, v, None if at is None else (*at, str(k)), depth + 1, sizes)
                       for k, v in node.items())
    if isinstance(node, list):
        return 1 + sum(_expanded_size(cfg, v, None if at is None else (*at, str(i)), depth + 1, sizes)
                       for i, v in enumerate(node))
    if isinstance(node, str) and node.startswith("@"):
        target, parts = _referred(cfg, node, at)
        if sizes.get(parts) == -1:  # still being counted: the reference refers to itself
            raise _Refused(f"references that form a cycle (through {node!r})")
        if parts not in sizes:
            sizes[parts] = -1
            sizes[parts] = _expanded_size(cfg, target, parts, depth + 1, sizes)
        return sizes[parts]
    return 1


def _network_class(name: str) -> type | None:
    if "." not in name:
        for mod in ("monai.networks.nets", "monai.networks.blocks", "monai.networks.layers", "torch.nn"):
            cls = getattr(importlib.import_module(mod), name, None)
            if isinstance(cls, type) and issubclass(cls, nn.Module):
                return cls
        return None
    return _dotted_class(name, ("monai.networks.", "torch.nn."), lambda c: issubclass(c, nn.Module))


def _transform_class(name: str) -> type | None:
    from monai.transforms import Compose, Transform

    def allowed(cls: type) -> bool:
        if cls is Compose:
            return True
        if not issubclass(cls, Transform):
            return False
        return (cls.__name__ in DECLARED_ONLY or cls.__name__ in _SPATIAL
                or cls.__module__.startswith("monai.transforms.intensity."))

    if "." not in name:
        import monai.transforms as mt

        cls = getattr(mt, name, None)
        return cls if isinstance(cls, type) and allowed(cls) else None
    return _dotted_class(name, ("monai.transforms.",), allowed)


def _dotted_class(name: str, prefixes: tuple[str, ...], allowed) -> type | None:
    if not name.startswith(prefixes) or not _DOTTED.match(name):
        return None
    module, _, attr = name.rpartition(".")
    try:  # only modules inside monai.* / torch.nn.* are imported here
        cls = getattr(importlib.import_module(module), attr, None)
    except ImportError:
        return None
    return cls if isinstance(cls, type) and allowed(cls) else None


class _Builder:
    def __init__(self, lookup, what: str, declared_only: frozenset[str] = frozenset()) -> None:
        self.lookup = lookup
        self.what = what
        self.declared_only = declared_only  # classes checked and recorded, never built

    def value(self, node: Any, where: str) -> Any:
        if isinstance(node, dict):
            if "_target_" in node:
                return self.component(node, where)
            return {k: self.value(v, f"{where}.{k}") for k, v in node.items()}
        if isinstance(node, list):
            built = [self.value(v, f"{where}[{i}]") for i, v in enumerate(node)]
            return [b for b in built if b is not _DISABLED]
        if isinstance(node, str) and _is_code_string(node):
            raise _Refused(f"the string {node[:60]!r} at {where}, which names code or a URL")
        return node

    def check_args(self, name: str, args: dict, where: str) -> None:
        for key, val in args.items():
            if key == "reader":
                if val is None or (isinstance(val, str) and val.lower() in _READERS):
                    continue
                raise _Refused(f"reader={val!r} in {name} at {where} (MONAI would import and call it; "
                               f"allowed: MONAI's readers {sorted(r for r in _READERS if r.endswith('reader'))})")
            if key in _CODE_ARGS:
                raise _Refused(f"the argument {key!r} of {name} at {where}, which MONAI turns into code")
            if _IO_ARG.search(key) and key not in _NOT_IO_ARGS and val not in (None, False, "", 0):
                raise _Refused(f"{key}={val!r} in {name} at {where}, which would read, download or write files "
                               "(asfda loads the weights from the bundle itself)")

    def component(self, node: dict, where: str) -> Any:
        name = node["_target_"]
        if not isinstance(name, str):
            raise _Refused(f"a _target_ that is not a name at {where}")
        mode = node.get("_mode_", "default")
        if mode != "default":
            raise _Refused(f"_mode_ {mode!r} of {name} at {where} (only 'default' is built)")
        if "_requires_" in node:
            raise _Refused(f"_requires_ of {name} at {where}")
        disabled = node.get("_disabled_", False)
        if not isinstance(disabled, bool):
            raise _Refused(f"_disabled_ {disabled!r} of {name} at {where} (must be true or false)")
        if disabled:
            return _DISABLED
        cls = self.lookup(name)
        if cls is None:
            raise _Refused(f"_target_ {name!r} at {where}, which is not on asfda's allow-list of {self.what}")
        args = {k: v for k, v in node.items() if not (k.startswith("_") and k.endswith("_"))}
        self.check_args(name, args, where)
        kwargs = {k: self.value(v, f"{where}.{k}") for k, v in args.items()}
        if cls.__name__ in self.declared_only:
            return DeclaredTransform(cls.__name__, kwargs)  # checked, never built
        off, refused = _io_defaults(cls)
        if refused:
            raise _Refused(f"{name} at {where}, whose {', '.join(refused)} by default reads or downloads files "
                           "when it is built")
        return self.make(cls, {**{k: v for k, v in off.items() if k not in kwargs}, **kwargs}, where)

    def make(self, cls: type, kwargs: dict, where: str) -> Any:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)  # MONAI's notes on deprecated defaults
                return cls(**kwargs)
        except Exception as exc:
            if missing_package(exc) is not None:
                raise _MissingPackage(f"{cls.__name__} at {where}", exc) from None
            raise _BuildError(f"{cls.__name__} at {where}: {exc.__class__.__name__}: {str(exc)[:200]}") from None


def _io_defaults(cls: type) -> tuple[dict[str, bool], list[str]]:
    """What building ``cls`` without an argument would fetch or read, from its signature's defaults: ``(off,
    refused)``, the download flags on by default (``pretrained=True``: EfficientNetBN, MILModel, TextEncoder, ...)
    mapped to False, which asfda passes unless the config gives a value (a true one is refused by `check_args`), and
    the parameters whose default is a truthy non-bool (a file name, a hub repository) that no value turns off: such
    a class is refused."""
    try:
        params = inspect.signature(cls).parameters.values()
    except (TypeError, ValueError):  # no inspectable signature: nothing defaults on
        return {}, []
    off: dict[str, bool] = {}
    refused: list[str] = []
    for p in params:
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) or p.default is p.empty or p.name in _NOT_IO_ARGS:
            continue
        if not _IO_ARG.search(p.name) or p.default is None or (
                isinstance(p.default, (bool, int, float, str)) and not p.default):
            continue
        if p.default is True:
            off[p.name] = False
        else:  # a file name, a hub repository: no value of it turns the fetch off
            refused.append(f"{p.name}={p.default!r}")
    return off, refused


class _BuildError(Exception):
    pass


class _MissingPackage(Exception):
    """Building a class failed because an optional package it needs is not installed."""

    def __init__(self, what: str, exc: BaseException) -> None:
        super().__init__(what)
        self.what, self.exc = what, exc

    def error(self, key: str, path: Path | None) -> AsfdaError:

        err = missing_package_error(self.exc, f"'{key}' in the model config ({self.what})", path)
        assert err is not None  # raised only where missing_package(exc) named the package
        return err


_DISABLED = object()


def too_large_error(key: str, exc: ConfigTooLarge, path: Path | None) -> AsfdaError:
    """The refusal of a config whose ``@`` references expand past `MAX_RESOLVED_VALUES` values."""
    return AsfdaError(f"'{key}' in the model config {exc}; asfda refuses it before building anything", path,
                      "write the values out plainly (a network or preprocessing config has a few hundred values)")


def _refusal(key: str, what: str, path: Path | None) -> AsfdaError:
    return AsfdaError(f"'{key}' in the model config contains {what}, which would run code or touch files when "
                      "loaded; asfda builds model configs only from MONAI networks and transforms and torch.nn "
                      "layers with literal arguments", path, TRUST_HINT)


def build_network(cfg: dict, path: Path | None, key: str = "network_def") -> nn.Module:
    """``cfg[key]`` built from the allow-list (MONAI networks, blocks, layers; torch.nn modules)."""
    try:
        node = resolve_literal(cfg, cfg[key], at=(key,))
        if not isinstance(node, dict) or "_target_" not in node:
            raise _Refused("no _target_ (it must name the network class)")
        network = _Builder(_network_class, "networks (MONAI networks, blocks, layers; torch.nn)").component(
            node, key)
    except _Refused as exc:
        raise _refusal(key, str(exc), path) from None
    except ConfigTooLarge as exc:
        raise too_large_error(key, exc, path) from None
    except _MissingPackage as exc:
        raise exc.error(key, path) from None
    except _BuildError as exc:
        raise AsfdaError(f"cannot build '{key}' from the config ({exc})", path,
                         "check the _target_ names and arguments") from None
    if not isinstance(network, nn.Module):
        raise AsfdaError(f"'{key}' did not build a torch module", path)
    return network


def build_transforms(cfg: dict, path: Path | None, key: str = "preprocessing") -> list[DeclaredTransform]:
    """The steps of ``cfg[key]`` (a ``Compose`` or a list of transforms), built from the allow-list."""
    try:
        node = resolve_literal(cfg, cfg[key], at=(key,))
        if isinstance(node, dict) and str(node.get("_target_", "")).rpartition(".")[2] == "Compose":
            if _transform_class(node["_target_"]) is None:
                raise _Refused(f"_target_ {node['_target_']!r}")
            extra = sorted(k for k in node if k not in ("_target_", "_desc_", "transforms", "map_items",
                                                          "unpack_items", "log_stats", "lazy", "overrides"))
            if extra:
                raise _Refused(f"Compose arguments {extra}")
            odd = sorted(k for k in ("map_items", "unpack_items", "log_stats", "lazy", "overrides")
                         if k in node and not (node[k] is None or isinstance(node[k], (bool, int, str))
                                               and not (isinstance(node[k], str) and _is_code_string(node[k]))))
            if odd:
                raise _Refused(f"Compose arguments {odd} that are not plain values")
            node = node.get("transforms", [])
        if not isinstance(node, list):
            raise _Refused("a preprocessing that is neither a Compose nor a list of transforms")
        builder = _Builder(_transform_class, "preprocessing transforms (Compose; orientation, spacing, "
                           "intensity and type steps of monai.transforms)", frozenset(DECLARED_ONLY))
        steps = []
        for i, item in enumerate(node):
            if not isinstance(item, dict) or "_target_" not in item:
                raise _Refused(f"step {i}, which is not a component with a _target_")
            built = builder.component(item, f"{key}.transforms[{i}]")
            if built is _DISABLED:
                continue
            if isinstance(built, DeclaredTransform):
                steps.append(built)
            else:
                steps.append(DeclaredTransform(type(built).__name__, {}, built))
        return steps
    except _Refused as exc:
        raise _refusal(key, str(exc), path) from None
    except ConfigTooLarge as exc:
        raise too_large_error(key, exc, path) from None
    except _MissingPackage as exc:
        raise exc.error(key, path) from None
    except _BuildError as exc:
        raise AsfdaError(f"cannot build '{key}' from the config ({exc})", path,
                         "check the _target_ names and arguments") from None
