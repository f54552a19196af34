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

import pickle
from pathlib import Path

import torch
from torch import nn

from asfda.errors import AsfdaError, missing_package_error
from asfda.models import nnunet
from asfda.models.bundle import save_bundle
from asfda.models.classmap import names_from_recorded_class_map
from asfda.models.declared import (
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

__all__ = ["OUTPUT_ACTIVATIONS", "LoadedModel", "clone_module", "is_torchscript", "load_model", "load_state_dict_file",
           "save_bundle", "state_dict_hash", "torchscript_refusal", "unwrap_state_dict"]

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
    metadata: dict = {}
    meta_path: Path | None = None
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
        weights = source
        cfg_path = Path(config) if config else None
    if not weights.is_file():  # a FIFO or a device in an unpacked archive would block or never end
        raise AsfdaError("the model's weights are not a regular file", weights, "give the weights file itself")
    scripted = is_torchscript(weights)
    if scripted and not allow_code:  # before anything of the file is opened by torch: loading it runs its code
        raise torchscript_refusal(weights)
    if source.is_dir():
        meta_path = source / "configs" / "metadata.json"
        if meta_path.exists():
            metadata = _read_config(meta_path)
        else:
            meta_path = None
    elif cfg_path is None and not scripted:
        raise AsfdaError("a bare checkpoint needs a network config", weights,
                         "pass --model-config NET.yaml with a 'network_def' (MONAI bundle syntax)")
    cfg = _read_config(cfg_path) if cfg_path else {}
    if scripted:
        try:
            network = torch.jit.load(str(weights), map_location="cpu")
        except Exception as exc:
            err = missing_package_error(exc, "the TorchScript model", weights)
            if err is not None:
                raise err from None
            raise AsfdaError(f"cannot load TorchScript ({exc.__class__.__name__}: {str(exc)[:160]})", weights) from None
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
                                                cfg, metadata, embedding_layer or cfg.get("asfda_embedding_layer"),
                                                probabilities))


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
