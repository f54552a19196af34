"""What a model's config and metadata declare, read safely: the config file, the network and preprocessing built from
it (as data, or through MONAI's ConfigParser for trusted bundles), the sliding-window settings, the output classes
and the output activation."""

from __future__ import annotations

import logging
import math
import re
from pathlib import Path
from typing import Any, TypeGuard

import torch
from torch import nn

from asfda.config import read_config_file
from asfda.errors import AsfdaError, missing_package_error
from asfda.models.loaded import OUTPUT_ACTIVATIONS, LoadedModel, check_unique_class_names
from asfda.models.preprocessing import Preprocessing
from asfda.models.probe import output_sums_to_one, probe_network
from asfda.models.safe_config import (
    MAX_RESOLVED_VALUES,
    ConfigTooLarge,
    DeclaredTransform,
    build_network,
    build_transforms,
    resolve_literal,
    too_large_error,
)

log = logging.getLogger(__name__)


def _read_config(path: Path) -> dict:
    """A model config or metadata file (YAML or JSON), read within `asfda.config.read_config_file`'s bounds (size,
    YAML alias expansion, nesting): a file from elsewhere is input."""
    cfg = read_config_file(path, what="model config" if path.name != "metadata.json" else "model metadata")
    if not isinstance(cfg, dict):
        raise AsfdaError("config must be a mapping", path)
    return cfg


_EXPRESSION_REF = re.compile(r"@[\w#:]+")  # an @ reference inside a $ expression, as MONAI finds them


def _parse_trusted(cfg: dict, key: str, path: Path | None) -> object:
    """MONAI's full ConfigParser semantics (``$`` expressions, any ``_target_``): only for trusted bundles. As
    ``monai.bundle run`` does, the bundle's root (the folder above ``configs/``) is on the import path while the
    config is parsed, so that code the bundle ships (``scripts.networks.unest.UNesT``) is found; a ``scripts``
    package imported from another bundle is forgotten first."""
    import os
    import sys
    import warnings

    from monai.bundle import ConfigParser

    root = None if path is None else str(path.parent.parent if path.parent.name == "configs" else path.parent)
    if root is not None:
        for name in [m for m in sys.modules if m == "scripts" or m.startswith("scripts.")]:
            if not str(getattr(sys.modules[name], "__file__", "") or "").startswith(root + os.sep):
                del sys.modules[name]
        sys.path.insert(1, root)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # MONAI's deprecation notes on default arguments
            return ConfigParser(cfg).get_parsed_content(key, instantiate=True)
    except Exception as exc:
        err = missing_package_error(exc, f"'{key}' in the model config", path)
        if err is not None:
            raise err from None
        raise AsfdaError(f"cannot build '{key}' from the config ({exc.__class__.__name__}: {str(exc)[:200]})",
                         path, "check the _target_ names and arguments") from None
    finally:
        if root is not None:
            sys.path.remove(root)


def _build_network(cfg: dict, path: Path | None, allow_code: bool, max_values: int | None = None) -> nn.Module:
    """The config's ``network_def``; untrusted, with at most ``max_values`` weights (`_check_network_size`)."""
    arch = _architecture_file(cfg)
    if allow_code:
        try:
            network = _parse_trusted(cfg, "network_def", path)
        except AsfdaError as exc:
            raise exc if arch is None else _architecture_file_error(arch, path, exc.problem) from None
    else:
        if arch is not None:
            raise _architecture_file_error(arch, path)
        if max_values is not None:
            _check_network_size(cfg, path, max_values)
        network = build_network(cfg, path)
    if not isinstance(network, nn.Module):
        raise AsfdaError("'network_def' did not build a torch module", path)
    return network


_FILE_LOAD = re.compile(r"\b(torch|np|numpy|pickle)\.load\s*\(")


def _architecture_file(cfg: dict) -> tuple[str, str] | None:
    """The ``(id, expression)`` of a ``$`` expression that loads a file and that ``network_def`` depends on through
    its ``@`` references and theirs (DiNTS: ``arch_ckpt: "$torch.load(@arch_ckpt_path, ...)"``, the searched
    architecture saved beside the weights); None when there is none."""
    seen: set[str] = set()
    todo: list[tuple[str, Any]] = [("network_def", cfg.get("network_def"))]
    for _ in range(MAX_RESOLVED_VALUES):  # bounded: past it, building the network meets resolve_literal's bound
        if not todo:
            break
        key, node = todo.pop()
        if isinstance(node, dict):
            todo += [(key, v) for v in node.values()]
        elif isinstance(node, list):
            todo += [(key, v) for v in node]
        elif isinstance(node, str) and node.startswith(("@", "$")):
            if node.startswith("$") and _FILE_LOAD.search(node):
                return key, node
            for ref in _EXPRESSION_REF.findall(node):
                ref_id = ref[1:].replace("::", "#")
                target: Any = cfg
                for part in ref_id.split("#"):
                    target = target.get(part) if isinstance(target, dict) else None
                if ref_id not in seen:
                    seen.add(ref_id)
                    todo.append((ref_id, target))
    return None


def _architecture_file_error(arch: tuple[str, str], path: Path | None, cause: str = "") -> AsfdaError:
    """The refusal of a network whose architecture is loaded from a file (`_architecture_file`): asfda builds a
    network from its config alone (untrusted), and such a file is a pickle of numpy arrays, which ``torch.load``
    refuses by default (trusted: MONAI's parser fails on it)."""
    because = f"; trusted, MONAI's parser fails on it too ({cause[:140]})" if cause else (
        "; asfda builds a network from its config alone")
    return AsfdaError(f"'network_def' reads its architecture from a file of the bundle ({arch[0]}: {arch[1][:80]!r}), "
                      f"as a DiNTS searched network does{because}", path,
                      "save the network as TorchScript in the bundle (torch.jit.save(torch.jit.script(network), "
                      "'models/model.ts'), without models/model.pt) and pass --trust-model-code")


def _check_network_size(cfg: dict, path: Path | None, max_values: int) -> None:
    """Refuses a ``network_def`` whose weights outnumber ``max_values`` (the bytes the weights file holds, and a
    margin), counted on PyTorch's meta device, before any memory is taken: a 1 kB config can ask for a network of
    hundreds of gigabytes (``channels: [30000, 30000]``). A network that cannot be built on the meta device
    (SwinUNETR reads a tensor's value in its constructor) is built without this count."""
    try:
        with torch.device("meta"):
            probe = build_network(cfg, path)
    except AsfdaError:  # refused, or not buildable without memory: the real build says which
        return
    n = sum(t.numel() for t in probe.state_dict().values())
    if n > max_values:
        raise AsfdaError(f"'network_def' builds a network of {n:,} weights ({n * 4 / 2 ** 30:.1f} GiB), far more than "
                         "the weights file holds; asfda refuses it before taking the memory", path,
                         "use the network_def the weights were trained with")


def _build_preprocessing(cfg: dict, path: Path | None, allow_code: bool, image_key: str) -> Preprocessing:
    if allow_code:
        compose: Any = _parse_trusted(cfg, "preprocessing", path)  # a Compose or a list of transforms
        steps = [DeclaredTransform(type(t).__name__, {}, t) for t in getattr(compose, "transforms", compose or [])]
    else:
        steps = build_transforms(cfg, path)
    prep = Preprocessing.from_steps(steps, image_key, cfg["preprocessing"])
    _check_pixdim(prep.pixdim_mm, path)
    return prep


def _check_pixdim(pixdim: tuple[float, ...] | None, path: Path | None) -> None:
    """Refuses a declared ``Spacing`` pixdim that is not positive and finite, before any image is resampled: NaN or
    infinity is no grid, and MONAI reads a side <= 0 as "keep the image's own spacing", which asfda does not (the
    model's grid is one grid for every volume)."""
    if pixdim is None:
        return
    bad = [p for p in pixdim if not (math.isfinite(p) and p > 0)]
    if not pixdim or bad:
        raise AsfdaError(f"the preprocessing's Spacing pixdim {list(pixdim)} has values that are not positive, finite "
                         "millimetres", path, "set pixdim to the voxel spacing the model was trained at, in mm "
                         "(e.g. [1.5, 1.5, 2.0])")


def _inferer_settings(cfg: dict, path: Path | None, allow_code: bool = False
                      ) -> tuple[tuple[int, int, int], int, float]:
    """roi_size, sw_batch_size and overlap of the config's ``inferer``: ``@`` references resolved as MONAI resolves
    them (to the literal they name, ``@a#b`` / ``@a::b``), never by running code (``$`` expressions only with
    ``allow_code``, through MONAI's parser); each checked (three positive sides, a positive batch, 0 <= overlap < 1)."""
    roi, swb, overlap = (96, 96, 96), 4, 0.25
    inferer = cfg.get("inferer")
    if not isinstance(inferer, dict):
        return roi, swb, overlap
    settings = {}
    for key in ("roi_size", "sw_batch_size", "overlap"):
        if key not in inferer:
            continue
        try:
            settings[key] = (_parse_trusted(cfg, f"inferer#{key}", path) if allow_code
                             else resolve_literal(cfg, inferer[key], at=("inferer", key)))
        except AsfdaError:
            raise
        except ConfigTooLarge as exc:
            raise too_large_error(f"inferer#{key}", exc, path) from None
        except Exception as exc:
            raise AsfdaError(f"the inferer's {key} {str(inferer[key])[:60]!r} is not a literal value "
                             f"({str(exc)[:120]})",
                             path, f"give {key} as a number (or an @ reference to one), or pass --trust-model-code "
                             "for a bundle you trust") from None
    return _check_inferer(settings.get("roi_size", roi), settings.get("sw_batch_size", swb),
                          settings.get("overlap", overlap), path)


# the largest sliding window asfda runs (one window of 512^3 voxels is 512 MiB per channel in float32), the most
# voxels of one batch of windows, and the largest overlap (its cost grows as 1 / (1 - overlap)^3: 1,000x at 0.9)
_MAX_ROI_SIDE, _MAX_ROI_VOXELS, _MAX_BATCH_VOXELS, _MAX_OVERLAP = 4096, 512 ** 3, 1 << 28, 0.9


def _is_number(v: object) -> TypeGuard[int | float]:
    if not isinstance(v, (int, float)) or isinstance(v, bool):
        return False
    try:
        return math.isfinite(v)
    except OverflowError:  # an int too large for a float (10**400)
        return False


def _check_inferer(roi: object, swb: object, overlap: object, path: Path | None
                   ) -> tuple[tuple[int, int, int], int, float]:
    fix = "set the inferer's roi_size to three positive whole numbers the network takes (e.g. [96, 96, 96])"
    if _is_number(roi):
        roi = [roi] * 3
    if hasattr(roi, "tolist"):
        roi = roi.tolist()
    if not isinstance(roi, (list, tuple)) or not all(_is_number(r) for r in roi):
        raise AsfdaError(f"the inferer's roi_size {roi!r} is not a list of numbers", path, fix)
    if len(roi) != 3:
        raise AsfdaError(f"the inferer's roi_size {list(roi)} has {len(roi)} sides; asfda runs 3D models (3 sides)",
                         path, fix)
    if any(r < 1 or r != int(r) for r in roi):
        raise AsfdaError(f"the inferer's roi_size {list(roi)} has sides that are not positive whole numbers (MONAI "
                         "reads a side <= 0 as the whole image, which asfda does not)", path, fix)
    if max(roi) > _MAX_ROI_SIDE or math.prod(int(r) for r in roi) > _MAX_ROI_VOXELS:
        raise AsfdaError(f"the inferer's roi_size {list(roi)} is larger than asfda runs (sides up to {_MAX_ROI_SIDE}, "
                         f"{_MAX_ROI_VOXELS:,} voxels in all: one window would need gigabytes)", path, fix)
    if not _is_number(swb) or swb < 1 or swb != int(swb):
        raise AsfdaError(f"the inferer's sw_batch_size {swb!r} is not a positive whole number", path,
                         "set sw_batch_size to 1 or more")
    if int(swb) * math.prod(int(r) for r in roi) > _MAX_BATCH_VOXELS:
        raise AsfdaError(f"the inferer's sw_batch_size {int(swb)} of windows of {list(roi)} voxels is more than "
                         f"asfda runs at once ({_MAX_BATCH_VOXELS:,} voxels)", path,
                         "set sw_batch_size to a few windows (e.g. 4)")
    if not _is_number(overlap) or not 0 <= overlap <= _MAX_OVERLAP:
        raise AsfdaError(f"the inferer's overlap {overlap!r} is not a number in [0, {_MAX_OVERLAP}] (an overlap of "
                         "0.99 runs a window at every voxel)", path, "set overlap to e.g. 0.25 or 0.5")
    return (int(roi[0]), int(roi[1]), int(roi[2])), int(swb), float(overlap)  # 3 sides, checked above


def _postprocessing_activation(cfg: dict, where: Path | None = None) -> str | None:
    """``sigmoid`` or ``softmax`` when the config's ``postprocessing`` has an ``Activations(d)`` step that says so
    with literal values (read as data, never built); None otherwise."""
    budget = [MAX_RESOLVED_VALUES]  # one bound for all the steps' references together

    def literal(node: object) -> object:
        try:
            return resolve_literal(cfg, node, budget=budget)
        except ConfigTooLarge as exc:
            raise too_large_error("postprocessing", exc, where) from None
        except Exception:  # a $ expression (a Lambdad's func ...) or a dangling reference: nothing to read there
            return None

    post = cfg.get("postprocessing")
    post = literal(post) if isinstance(post, str) else post
    steps = post.get("transforms") if isinstance(post, dict) else post
    steps = literal(steps) if isinstance(steps, str) else steps
    found = None
    for step in steps if isinstance(steps, list) else []:
        step = literal(step) if isinstance(step, str) else step
        if not isinstance(step, dict) or str(step.get("_target_", "")).rpartition(".")[2] not in (
                "Activationsd", "Activations"):
            continue
        step = literal({k: v for k, v in step.items() if k in ("sigmoid", "softmax", "_disabled_")})
        if not isinstance(step, dict) or step.get("_disabled_") is True:
            continue
        if step.get("sigmoid") is True:
            found = "sigmoid"
        elif step.get("softmax") is True:
            found = "softmax"
    return found


def _classes_and_activation(metadata: dict, cfg: dict, network: nn.Module, roi: tuple[int, int, int],
                            override: str | None, where: Path | None, metadata_path: Path | None = None
                            ) -> tuple[list[str], str, bool]:
    """The output classes (index = channel), the activation (``softmax`` or ``sigmoid``) and whether the network's
    output already is probabilities; see `load_model` for the order in which the declarations count. ``where``: the
    config (or weights) file, ``metadata_path``: the metadata file, named by the refusals of what each declares."""
    outputs = metadata.get("network_data_format", {}) if isinstance(metadata, dict) else {}
    pred = outputs.get("outputs", {}).get("pred", {}) if isinstance(outputs, dict) and isinstance(
        outputs.get("outputs", {}), dict) else {}
    pred = pred if isinstance(pred, dict) else {}
    channel_def = pred.get("channel_def") or cfg.get("channel_def")
    names_from = metadata_path if pred.get("channel_def") and metadata_path is not None else where
    names = None
    if channel_def:
        if not isinstance(channel_def, dict) or not all(str(k).strip().lstrip("-").isdigit() for k in channel_def):
            raise AsfdaError(f"channel_def {str(channel_def)[:80]} is not a mapping of channel index -> class name",
                             names_from, 'write e.g. "channel_def": {"0": "background", "1": "liver"}')
        keys = sorted(channel_def, key=lambda k: int(k))
        if [int(k) for k in keys] != list(range(len(keys))):
            raise AsfdaError(f"channel_def indices {[int(k) for k in keys]} are not 0..{len(keys) - 1}", names_from,
                             "name every output channel once, from 0")
        names = [str(channel_def[k]) for k in keys]
    n_out = len(names) if names else (pred.get("num_channels") or getattr(network, "out_channels", None))
    if not isinstance(n_out, int) or isinstance(n_out, bool) or n_out < 1:

        in_ch = LoadedModel(network, [], Preprocessing(), roi).in_channels or 1
        n_out = probe_network(network, roi, in_ch, where=where)[1]

    recorded = metadata.get("asfda", {}) if isinstance(metadata, dict) else {}
    declared = override if override is not None else cfg.get(
        "asfda_output_activation", cfg.get("output_activation",
                                           recorded.get("output_activation") if isinstance(recorded, dict) else None))
    if declared is not None and declared not in OUTPUT_ACTIVATIONS:
        raise AsfdaError(f"output_activation {declared!r} is not one of {list(OUTPUT_ACTIVATIONS)}", where,
                         "softmax or sigmoid for a network that outputs logits, none for one that outputs "
                         "probabilities")
    legacy = cfg.get("asfda_activation")
    if legacy is not None and legacy not in ("softmax", "sigmoid"):
        raise AsfdaError(f"asfda_activation {legacy!r} is not 'softmax' or 'sigmoid'", where,
                         "set asfda_output_activation to softmax, sigmoid or none")
    multilabel = str(pred.get("format", "")).lower() in ("multilabel", "multi-label")
    post = _postprocessing_activation(cfg, where)
    activation = legacy or ("sigmoid" if multilabel else None) or post or "softmax"
    if declared in ("softmax", "sigmoid"):
        activation = declared
    elif n_out == 1:
        activation = "sigmoid"  # one output channel: a foreground probability, never a softmax over one class
    probabilities = declared == "none"
    if declared is None and legacy is None and not multilabel and post is None and n_out >= 2:  # nothing declares it
        probabilities = _probabilities_on_probe(network, roi, n_out, where)
    if names is None:
        names = ([f"class_{i + 1}" for i in range(n_out)] if activation == "sigmoid"
                 else ["background"] + [f"class_{i}" for i in range(1, n_out)])
    check_unique_class_names(names, activation, names_from)
    if activation == "softmax" and len(names) < 2:
        raise AsfdaError(f"a softmax head needs at least 2 output classes, the model names {names}", where,
                         "set asfda_output_activation: sigmoid for a single foreground channel")
    return names, activation, probabilities


def _probabilities_on_probe(network: nn.Module, roi: tuple[int, int, int], n_out: int, where: Path | None) -> bool:
    """Whether a network of which nothing declares the output activation already outputs probabilities: its
    channels sum to 1 at every voxel of the start-up probe (`output_sums_to_one`), a softmax inside it (TorchScript
    models often end in one). Then it is taken as probabilities, never softmaxed a second time, and said so."""
    in_ch = LoadedModel(network, [], Preprocessing(), roi).in_channels or 1
    if not output_sums_to_one(network, roi, in_ch, where=where):
        return False
    log.warning("%s: the network's output already sums to 1 over its %d channels at every voxel of the start-up "
                "probe: it is taken as probabilities (output_activation none: no second softmax); if it outputs "
                "logits, pass --output-activation softmax", where, n_out)
    return True
