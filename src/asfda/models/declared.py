"""What a model's config and metadata declare, read safely: the config file, the network and preprocessing built from
it (as data, or through MONAI's ConfigParser for trusted bundles), the sliding-window settings, the output classes
and the output activation."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, TypeGuard

from torch import nn

from asfda.errors import AsfdaError, missing_package_error
from asfda.models.loaded import OUTPUT_ACTIVATIONS, LoadedModel
from asfda.models.preprocessing import Preprocessing
from asfda.models.probe import probe_network
from asfda.models.safe_config import DeclaredTransform, build_network, build_transforms, resolve_literal


def _read_config(path: Path) -> dict:
    try:
        if path.suffix in (".yaml", ".yml"):
            import yaml

            cfg = yaml.safe_load(path.read_text(encoding="utf-8"))
        else:
            cfg = json.loads(path.read_text(encoding="utf-8"))
    except Exception as exc:
        raise AsfdaError(f"cannot parse config ({exc.__class__.__name__}: {exc})", path) from None
    if not isinstance(cfg, dict):
        raise AsfdaError("config must be a mapping", path)
    return cfg


def _parse_trusted(cfg: dict, key: str, path: Path | None) -> object:
    """MONAI's full ConfigParser semantics (``$`` expressions, any ``_target_``): only for trusted bundles."""
    import warnings

    from monai.bundle import ConfigParser

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


def _build_network(cfg: dict, path: Path | None, allow_code: bool) -> nn.Module:
    network = _parse_trusted(cfg, "network_def", path) if allow_code else build_network(cfg, path)
    if not isinstance(network, nn.Module):
        raise AsfdaError("'network_def' did not build a torch module", path)
    return network


def _build_preprocessing(cfg: dict, path: Path | None, allow_code: bool, image_key: str) -> Preprocessing:
    if allow_code:
        compose: Any = _parse_trusted(cfg, "preprocessing", path)  # a Compose or a list of transforms
        steps = [DeclaredTransform(type(t).__name__, {}, t) for t in getattr(compose, "transforms", compose or [])]
    else:
        steps = build_transforms(cfg, path)
    return Preprocessing.from_steps(steps, image_key, cfg["preprocessing"])


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
        except Exception as exc:
            raise AsfdaError(f"the inferer's {key} {str(inferer[key])[:60]!r} is not a literal value "
                             f"({str(exc)[:120]})",
                             path, f"give {key} as a number (or an @ reference to one), or pass --trust-model-code "
                             "for a bundle you trust") from None
    return _check_inferer(settings.get("roi_size", roi), settings.get("sw_batch_size", swb),
                          settings.get("overlap", overlap), path)


def _is_number(v: object) -> TypeGuard[int | float]:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


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
    if not _is_number(swb) or swb < 1 or swb != int(swb):
        raise AsfdaError(f"the inferer's sw_batch_size {swb!r} is not a positive whole number", path,
                         "set sw_batch_size to 1 or more")
    if not _is_number(overlap) or not 0 <= overlap < 1:
        raise AsfdaError(f"the inferer's overlap {overlap!r} is not a number in [0, 1)", path,
                         "set overlap to e.g. 0.25 or 0.5")
    return (int(roi[0]), int(roi[1]), int(roi[2])), int(swb), float(overlap)  # 3 sides, checked above


def _postprocessing_activation(cfg: dict) -> str | None:
    """``sigmoid`` or ``softmax`` when the config's ``postprocessing`` has an ``Activations(d)`` step that says so
    with literal values (read as data, never built); None otherwise."""
    def literal(node: object) -> object:
        try:
            return resolve_literal(cfg, node)
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
                            override: str | None, where: Path | None) -> tuple[list[str], str, bool]:
    """The output classes (index = channel), the activation (``softmax`` or ``sigmoid``) and whether the network's
    output already is probabilities; see `load_model` for the order in which the declarations count."""
    outputs = metadata.get("network_data_format", {}) if isinstance(metadata, dict) else {}
    pred = outputs.get("outputs", {}).get("pred", {}) if isinstance(outputs, dict) and isinstance(
        outputs.get("outputs", {}), dict) else {}
    pred = pred if isinstance(pred, dict) else {}
    channel_def = pred.get("channel_def") or cfg.get("channel_def")
    names = None
    if channel_def:
        if not isinstance(channel_def, dict) or not all(str(k).strip().lstrip("-").isdigit() for k in channel_def):
            raise AsfdaError(f"channel_def {str(channel_def)[:80]} is not a mapping of channel index -> class name",
                             where, 'write e.g. "channel_def": {"0": "background", "1": "liver"}')
        keys = sorted(channel_def, key=lambda k: int(k))
        if [int(k) for k in keys] != list(range(len(keys))):
            raise AsfdaError(f"channel_def indices {[int(k) for k in keys]} are not 0..{len(keys) - 1}", where,
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
    activation = legacy or ("sigmoid" if multilabel else None) or _postprocessing_activation(cfg) or "softmax"
    if declared in ("softmax", "sigmoid"):
        activation = declared
    elif n_out == 1:
        activation = "sigmoid"  # one output channel: a foreground probability, never a softmax over one class
    if names is None:
        names = ([f"class_{i + 1}" for i in range(n_out)] if activation == "sigmoid"
                 else ["background"] + [f"class_{i}" for i in range(1, n_out)])
    if activation == "softmax" and len(names) < 2:
        raise AsfdaError(f"a softmax head needs at least 2 output classes, the model names {names}", where,
                         "set asfda_output_activation: sigmoid for a single foreground channel")
    return names, activation, declared == "none"
