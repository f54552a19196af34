"""Loading a pretrained segmentation model safely.

Accepted sources:

* a MONAI bundle folder: ``configs/inference.json`` (or .yaml) with ``network_def`` and optionally
  ``preprocessing`` and ``inferer``; ``configs/metadata.json`` with the output ``channel_def``;
  weights in ``models/model.safetensors``, ``models/model.pt`` (plain state dict) or ``models/model.ts``.
* a checkpoint file (``.pt``/``.pth``/``.safetensors``) plus a network config (YAML/JSON with
  ``network_def`` and the same optional keys).
* a TorchScript file (recognised by its content, whatever its suffix: ``model.pt`` as shipped works too) plus an
  optional config for preprocessing and class names, with ``allow_code=True`` only (the CLI's
  ``--trust-model-code``): TorchScript is a program (its ``forward`` and ``__setstate__`` run whatever the file's
  author wrote, file writes included), so it is refused, before ``torch.jit.load``, unless the user trusts it.

``torch.load`` only ever runs with ``weights_only=True``: a checkpoint that needs pickle execution
is refused. Weights holding NaN or infinity are refused, naming the tensors.

The model type is `asfda.models.loaded.LoadedModel`, what its config declares is read by `asfda.models.declared`, and
saving an adapted model is `asfda.models.bundle.save_bundle`; their public names are importable from here too.
"""

from __future__ import annotations

import ast
import inspect
import logging
import pickle
from pathlib import Path
from typing import Any

import torch
from torch import nn

from asfda.errors import AsfdaError, missing_package_error
from asfda.models import nnunet
from asfda.models.bundle import save_bundle
from asfda.models.classmap import names_from_recorded_class_map
from asfda.models.declared import (
    _EXPRESSION_REF,
    _build_network,
    _build_preprocessing,
    _classes_and_activation,
    _inferer_settings,
    _read_config,
)
from asfda.models.loaded import (
    OUTPUT_ACTIVATIONS,
    LoadedModel,
    check_finite_weights,
    clone_module,
    is_torchscript,
    state_dict_hash,
    torchscript_refusal,
)
from asfda.models.preprocessing import Preprocessing
from asfda.models.safe_config import MAX_RESOLVED_VALUES, ConfigTooLarge, resolve_literal, too_large_error

__all__ = ["OUTPUT_ACTIVATIONS", "LoadedModel", "clone_module", "is_torchscript", "load_model", "load_state_dict_file",
           "save_bundle", "state_dict_hash", "torchscript_refusal", "unwrap_state_dict"]

log = logging.getLogger(__name__)
_CONTAINER_KEYS = ("state_dict", "model_state_dict", "model", "net", "network", "module")


def unwrap_state_dict(obj: object, path: Path) -> dict[str, torch.Tensor]:
    """Finds the tensor dict inside the usual containers and drops ``module.`` prefixes."""
    for _ in range(4):
        if isinstance(obj, dict) and obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
            break
        if isinstance(obj, dict):
            inner = next((obj[k] for k in _CONTAINER_KEYS if k in obj and isinstance(obj[k], dict)), None)
            if inner is None:
                raise AsfdaError(f"no state dict found (top-level keys: {sorted(obj)[:10]})", path,
                                 f"save the weights as a plain state dict or under one of {list(_CONTAINER_KEYS)}")
            obj = inner
        else:
            raise AsfdaError(f"expected a state dict, found {type(obj).__name__}", path, "save model.state_dict()")
    assert isinstance(obj, dict)  # each pass above leaves a dict or raises
    state: dict[str, torch.Tensor] = obj
    for prefix in ("module.", "_orig_mod.", "model.network.", "network."):
        if state and all(k.startswith(prefix) for k in state):
            state = {k[len(prefix):]: v for k, v in state.items()}
    return state


def load_state_dict_file(path: str | Path) -> dict[str, torch.Tensor]:
    """Reads weights from ``.safetensors`` or a ``torch.save`` file, never executing pickled code."""
    path = Path(path)
    if not path.is_file():
        raise AsfdaError("weights file not found", path)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return unwrap_state_dict(load_file(str(path)), path)
        except Exception as exc:
            raise AsfdaError(f"unreadable safetensors file ({exc})", path) from None
    if is_torchscript(path):  # a program, not a state dict (a .pt can be either)
        raise torchscript_refusal(path)
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise AsfdaError(
            "refused: the checkpoint needs pickle code execution to load (weights_only=True failed: "
            f"{str(exc).splitlines()[0][:160]})", path,
            "re-save it as a plain state dict (torch.save(model.state_dict(), f)) or as safetensors, "
            "from a trusted environment") from None
    except Exception as exc:
        if "TorchScript" in str(exc):  # torch.load's own check, with weights_only=True: never run
            raise torchscript_refusal(path) from None
        raise AsfdaError(f"unreadable checkpoint ({exc.__class__.__name__}: {str(exc)[:160]})", path) from None
    return unwrap_state_dict(obj, path)


def load_model(source: str | Path, *, config: str | Path | None = None, strict: bool = True,
               embedding_layer: str | None = None, allow_code: bool = False,
               output_activation: str | None = None) -> LoadedModel:
    """Loads a bundle folder, a checkpoint + network config, or a TorchScript file.

    ``allow_code`` lets the model's code run: the config's ``$`` expressions and arbitrary ``_target_`` (MONAI's
    full ConfigParser semantics), and a TorchScript model (a program; refused without it, before it is opened). The
    CLI's ``--trust-model-code``. By default the config is data, built from an allow-list of classes with literal
    arguments (`asfda.models.safe_config`), and the weights are tensors read with ``weights_only=True``.

    ``output_activation`` (``softmax``, ``sigmoid`` or ``none``; the CLI's ``--output-activation``) overrides what
    the model declares turns its output into probabilities: the config's ``asfda_output_activation``, else a
    ``multilabel`` output format in the metadata (sigmoid), else the ``Activationsd`` step of the bundle's
    ``postprocessing`` (read as data), else softmax (sigmoid for a single output channel). ``none`` is for networks
    whose output already is probabilities (a softmax or sigmoid inside a TorchScript graph): asfda then takes the
    logarithm instead of applying the activation again. When nothing declares it, a network whose channels already
    sum to 1 at every voxel of the start-up probe (a softmax inside it) is taken as probabilities, with a warning
    that says so: never softmaxed twice.
    """
    source = Path(source)
    if not source.exists():
        raise AsfdaError("model not found", source,
                         "give a bundle folder, a checkpoint with --model-config, or a .ts file")
    if config is None and nnunet.is_nnunet_source(source):  # an nnU-Net v2 results folder, fold folder or checkpoint
        return _with_recorded_class_map(nnunet.load_nnunet(source, strict=strict, embedding_layer=embedding_layer,
                                                           activation=output_activation))
    cfg_path, weights = _model_files(source, config)
    scripted = is_torchscript(weights)
    if scripted and not allow_code:  # before anything of the file is opened by torch: loading it runs its code
        raise torchscript_refusal(weights)
    metadata: dict = {}
    meta_path: Path | None = None
    if source.is_dir():
        meta_path = source / "configs" / "metadata.json"
        if meta_path.exists():
            metadata = _read_config(meta_path)
        else:
            meta_path = None
    elif cfg_path is None and not scripted:
        raise AsfdaError("a bare checkpoint needs a network config", weights,
                         "pass --model-config NET.yaml with a 'network_def' (MONAI bundle syntax)")
    raw_cfg = _read_config(cfg_path) if cfg_path else {}
    cfg = prepared_config(raw_cfg, cfg_path, allow_code)  # what asfda builds from; the model keeps the file's own
    if scripted:
        network = _load_torchscript(weights)
    else:
        if "network_def" not in cfg:
            raise AsfdaError("config has no 'network_def'", cfg_path,
                             "add the network definition (MONAI bundle syntax)")
        state = load_state_dict_file(weights)
        # the network may not ask for much more memory than its weights file holds (a config is a few kB): counted
        # in bytes of storage, which a tensor's shape cannot inflate (a stride-0 view of one number has any shape)
        stored = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in state.values()}
        network = _build_network(cfg, cfg_path, allow_code, sum(stored.values()) + (1 << 24))
        _load_weights(network, state, weights, strict)
    check_finite_weights(network.state_dict(), weights)
    network.eval()
    image_key = cfg.get("image_key", "image") if isinstance(cfg.get("image_key", "image"), str) else "image"
    if "preprocessing" in cfg:
        prep = _build_preprocessing(cfg, cfg_path, allow_code, image_key)
    else:
        prep = Preprocessing(axcodes=None, pixdim_mm=None, description={"config": None})
    roi, swb, overlap = _inferer_settings(cfg, cfg_path, allow_code)
    class_names, activation, probabilities = _classes_and_activation(metadata, cfg, network, roi, output_activation,
                                                                      cfg_path or weights, meta_path)
    return _with_recorded_class_map(LoadedModel(network, class_names, prep, roi, swb, overlap, activation, source,
                                                raw_cfg, metadata, embedding_layer or cfg.get("asfda_embedding_layer"),
                                                probabilities))


def _model_files(source: Path, config: str | Path | None) -> tuple[Path | None, Path]:
    """(config file, weights file) of a bundle folder (``configs/inference.*``, ``models/model.*``) or of a bare
    weights file with its ``config``; refuses a folder that is not a bundle and weights that are not a regular file."""
    if source.is_dir():
        cfg_path = next((source / "configs" / n for n in ("inference.json", "inference.yaml", "inference.yml")
                         if (source / "configs" / n).exists()), None)
        if cfg_path is None:
            raise AsfdaError("not a MONAI bundle: configs/inference.json is missing", source,
                             "point at the bundle root (the folder holding configs/ and models/)")
        weights = next((source / "models" / n for n in ("model.safetensors", "model.pt", "model.pth", "model.ts")
                        if (source / "models" / n).exists()), None)
        if weights is None:
            raise AsfdaError("bundle has no weights (models/model.safetensors, model.pt or model.ts)",
                             source / "models")
    else:
        weights, cfg_path = source, Path(config) if config else None
    if not weights.is_file():  # a FIFO or a device in an unpacked archive would block or never end
        raise AsfdaError("the model's weights are not a regular file", weights, "give the weights file itself")
    return cfg_path, weights


def _load_torchscript(weights: Path) -> nn.Module:
    """A TorchScript file, on the CPU (its code runs: the caller has checked that it may); a missing package or a
    file torch cannot read is one line."""
    try:
        return torch.jit.load(str(weights), map_location="cpu")
    except Exception as exc:
        err = missing_package_error(exc, "the TorchScript model", weights)
        if err is not None:
            raise err from None
        raise AsfdaError(f"cannot load TorchScript ({exc.__class__.__name__}: {str(exc)[:160]})", weights) from None


# arguments MONAI deprecated as unused and then removed (a bundle written for an older MONAI still passes them):
# SwinUNETR's img_size (deprecated in 1.3, "not required anymore", removed in 1.5; swin_unetr_btcv_segmentation)
_REMOVED_UNUSED_ARGS = {"SwinUNETR": ("img_size",)}


def prepared_config(cfg: dict, path: Path | None, allow_code: bool) -> dict:
    """``cfg`` as asfda builds from it: the arguments of ``network_def`` that the installed MONAI removed after
    deprecating them as unused are dropped (`_REMOVED_UNUSED_ARGS`), and, for an untrusted bundle, each ``$``
    expression made only of literals and ``@`` references is replaced by its value (`fold_literal_expressions`)."""
    net = cfg.get("network_def")
    name = str(net.get("_target_", "")) if isinstance(net, dict) else ""
    removed = _REMOVED_UNUSED_ARGS.get(name.rpartition(".")[2], ())
    if removed and name.rpartition(".")[0] in ("", "monai.networks.nets") and isinstance(net, dict):
        import monai.networks.nets as nets

        params = inspect.signature(getattr(nets, name.rpartition(".")[2])).parameters
        gone = [a for a in removed if a in net and a not in params]
        if gone:
            log.info("%s: network_def's %s dropped (unused, removed from this MONAI's %s)", path, gone, name)
            cfg = dict(cfg, network_def={k: v for k, v in net.items() if k not in gone})
    return cfg if allow_code else fold_literal_expressions(cfg, path)


def fold_literal_expressions(cfg: dict, path: Path | None = None) -> dict:
    """``cfg`` with each ``$`` expression of other config values that is only literals, ``@`` references to
    literals, ``x if c else y``, ``==`` / ``!=``, ``and`` / ``or`` / ``not`` and signs replaced by the value MONAI
    would give it, computed here on the literals, without running code (wholeBody_ct_segmentation's ``"pixdim":
    "$[1.5, 1.5, 1.5] if @displayable_configs#highres else [3.0, 3.0, 3.0]"``). Any other expression stays as it is
    (and is refused where asfda builds from it). The references of all the expressions share one
    `MAX_RESOLVED_VALUES` bound."""
    budget = [MAX_RESOLVED_VALUES]

    def walk(node: Any, at: tuple[str, ...]) -> Any:
        if isinstance(node, dict):
            return {k: walk(v, (*at, str(k))) for k, v in node.items()}
        if isinstance(node, list):
            return [walk(v, (*at, str(i))) for i, v in enumerate(node)]
        if not (isinstance(node, str) and node.startswith("$") and len(node) <= 1000):
            return node
        refs: dict[str, str] = {}
        source = _EXPRESSION_REF.sub(lambda m: refs.setdefault(m.group(0), f"_ref{len(refs)}"), node[1:])
        if not refs:  # a value that depends on nothing in the config is written as a literal, not as an expression
            return node
        try:
            tree = ast.parse(source.strip(), mode="eval").body
            env = {name: resolve_literal(cfg, ref, at=at, budget=budget) for ref, name in refs.items()}
            return _literal_value(tree, env)
        except ConfigTooLarge as exc:
            raise too_large_error("/".join(at), exc, path) from None
        except Exception:  # not literals only (a call, an attribute, a name), or a reference to an expression
            return node

    for _ in range(50):  # an expression that refers to one folded in this pass folds in the next
        folded = walk(cfg, ())
        if folded == cfg:
            return cfg
        cfg = folded
    return cfg


def _literal_value(node: ast.AST, env: dict[str, Any]) -> Any:
    """The value of an expression of literals and names bound in ``env``; ValueError for any other construct."""
    if isinstance(node, ast.Constant):
        if isinstance(node.value, str) and any(name in node.value for name in env):  # an @ inside a quoted string
            raise ValueError("a reference inside a string")
        return node.value
    if isinstance(node, ast.Name) and node.id in env:
        return env[node.id]
    if isinstance(node, (ast.List, ast.Tuple)):
        return [_literal_value(e, env) for e in node.elts]
    if isinstance(node, ast.IfExp):
        return _literal_value(node.body if _literal_value(node.test, env) else node.orelse, env)
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd, ast.Not)):
        value = _literal_value(node.operand, env)
        if isinstance(node.op, ast.Not):
            return not value
        if not isinstance(value, (int, float)):
            raise ValueError("a sign on a value that is not a number")
        return -value if isinstance(node.op, ast.USub) else value
    if isinstance(node, ast.BoolOp):  # Python's: the first value that decides, else the last
        for v in node.values:
            value = _literal_value(v, env)
            if bool(value) != isinstance(node.op, ast.And):
                break
        return value
    if isinstance(node, ast.Compare) and len(node.ops) == 1 and isinstance(node.ops[0], (ast.Eq, ast.NotEq)):
        equal = _literal_value(node.left, env) == _literal_value(node.comparators[0], env)
        return equal if isinstance(node.ops[0], ast.Eq) else not equal
    raise ValueError(f"{type(node).__name__} is not a literal expression")


def _with_recorded_class_map(model: LoadedModel) -> LoadedModel:
    """An adapted model (its metadata records the class map it was adapted under) with its channels named by the
    dataset classes they were adapted to (`names_from_recorded_class_map`): it runs on that dataset again without
    ``--class-map``."""
    model.class_names = names_from_recorded_class_map(model.class_names, model.metadata)
    return model


def _load_weights(network: nn.Module, state: dict[str, torch.Tensor], path: Path, strict: bool) -> None:
    own = network.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    mismatched = sorted(k for k in set(own) & set(state) if tuple(own[k].shape) != tuple(state[k].shape))
    if strict and (missing or unexpected or mismatched):
        def show(keys: list[str]) -> str:
            return ", ".join(keys[:6]) + (f" (+{len(keys) - 6} more)" if len(keys) > 6 else "")

        problems = []
        if missing:
            problems.append(f"missing keys: {show(missing)}")
        if unexpected:
            problems.append(f"unexpected keys: {show(unexpected)}")
        if mismatched:
            problems.append(f"shape mismatch: {show(mismatched)}")
        raise AsfdaError("weights do not fit the network (" + "; ".join(problems) + ")", path,
                         "check that network_def matches the checkpoint")
    network.load_state_dict({k: v for k, v in state.items() if k not in mismatched}, strict=False)
