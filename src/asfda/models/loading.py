"""Loading a pretrained segmentation model safely, and saving an adapted one as a MONAI bundle.

Accepted sources:

* a MONAI bundle folder: ``configs/inference.json`` (or .yaml) with ``network_def`` and optionally
  ``preprocessing`` and ``inferer``; ``configs/metadata.json`` with the output ``channel_def``;
  weights in ``models/model.safetensors``, ``models/model.pt`` (plain state dict) or ``models/model.ts``.
* a checkpoint file (``.pt``/``.pth``/``.safetensors``) plus a network config (YAML/JSON with
  ``network_def`` and the same optional keys).
* a TorchScript file (``.ts``) plus an optional config for preprocessing and class names.

``torch.load`` only ever runs with ``weights_only=True``: a checkpoint that needs pickle execution
is refused.
"""

from __future__ import annotations

import copy
import hashlib
import json
import pickle
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from asfda.errors import AsfdaError
from asfda.io.atomic import atomic_write, atomic_write_json
from asfda.models.preprocessing import Preprocessing
from asfda.models.safe_config import DeclaredTransform, build_network, build_transforms, resolve_literal

__all__ = ["LoadedModel", "load_model", "load_state_dict_file", "save_bundle", "state_dict_hash", "unwrap_state_dict"]

_CONTAINER_KEYS = ("state_dict", "model_state_dict", "model", "net", "network", "module")


@dataclass
class LoadedModel:
    """A pretrained network and everything needed to run it on new volumes.

    Attributes:
        network: the source network (its own output channels), in eval mode.
        class_names: names of the network's output channels, index = channel.
        preprocessing: what the model declares of its input grid and intensities.
        roi_size, sw_batch_size, overlap: sliding-window settings.
        activation: ``"softmax"`` (single-label) or ``"sigmoid"`` (multi-label).
        source: where it was loaded from.
        config: the parsed config dict (``network_def``, ``preprocessing``, ...) to write bundles back.
        metadata: bundle metadata dict (may be empty).
        embedding_layer: module name whose output is the volume embedding (None: found automatically).
    """

    network: nn.Module
    class_names: list[str]
    preprocessing: Preprocessing
    roi_size: tuple[int, int, int]
    sw_batch_size: int = 4
    overlap: float = 0.25
    activation: str = "softmax"
    source: Path | None = None
    config: dict = field(default_factory=dict)
    metadata: dict = field(default_factory=dict)
    embedding_layer: str | None = None

    @property
    def weights_hash(self) -> str:
        return state_dict_hash(self.network.state_dict())

    def copy(self) -> LoadedModel:
        other = copy.copy(self)
        other.network = copy.deepcopy(self.network)
        return other


def state_dict_hash(state: dict[str, torch.Tensor]) -> str:
    """SHA-256 (first 16 hex digits) of a state dict's names and values."""
    h = hashlib.sha256()
    for k in sorted(state):
        v = state[k]
        h.update(k.encode())
        if isinstance(v, torch.Tensor):
            h.update(v.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes() if v.numel() else b"")
    return h.hexdigest()[:16]


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
    state = obj  # type: ignore[assignment]
    for prefix in ("module.", "_orig_mod.", "model.network.", "network."):
        if state and all(k.startswith(prefix) for k in state):
            state = {k[len(prefix):]: v for k, v in state.items()}
    return state  # type: ignore[return-value]


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
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise AsfdaError(
            "refused: the checkpoint needs pickle code execution to load (weights_only=True failed: "
            f"{str(exc).splitlines()[0][:160]})", path,
            "re-save it as a plain state dict (torch.save(model.state_dict(), f)) or as safetensors, "
            "from a trusted environment") from None
    except Exception as exc:
        raise AsfdaError(f"unreadable checkpoint ({exc.__class__.__name__}: {str(exc)[:160]})", path) from None
    return unwrap_state_dict(obj, path)


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
        raise AsfdaError(f"cannot build '{key}' from the config ({exc.__class__.__name__}: {str(exc)[:200]})",
                         path, "check the _target_ names and arguments") from None


def _build_network(cfg: dict, path: Path | None, allow_code: bool) -> nn.Module:
    network = _parse_trusted(cfg, "network_def", path) if allow_code else build_network(cfg, path)
    if not isinstance(network, nn.Module):
        raise AsfdaError("'network_def' did not build a torch module", path)
    return network


def _build_preprocessing(cfg: dict, path: Path | None, allow_code: bool, image_key: str) -> Preprocessing:
    if allow_code:
        compose = _parse_trusted(cfg, "preprocessing", path)
        steps = [DeclaredTransform(type(t).__name__, {}, t) for t in getattr(compose, "transforms", compose or [])]
    else:
        steps = build_transforms(cfg, path)
    return Preprocessing.from_steps(steps, image_key, cfg["preprocessing"])


def _inferer_settings(cfg: dict, path: Path | None) -> tuple[tuple[int, ...], int, float]:
    """roi_size, sw_batch_size and overlap of the config's ``inferer``, ``@`` references resolved as literals."""
    roi, swb, overlap = (96, 96, 96), 4, 0.25
    inferer = cfg.get("inferer")
    if not isinstance(inferer, dict):
        return roi, swb, overlap
    try:
        settings = {k: resolve_literal(cfg, inferer[k]) for k in ("roi_size", "sw_batch_size", "overlap") if k in inferer}
        roi = tuple(int(r) for r in settings.get("roi_size", roi))
        return roi, int(settings.get("sw_batch_size", swb)), float(settings.get("overlap", overlap))
    except Exception as exc:
        raise AsfdaError(f"the config's inferer settings are not literal numbers ({str(exc)[:120]})", path,
                         "give roi_size, sw_batch_size and overlap as numbers (or @ references to numbers)") from None


def load_model(source: str | Path, *, config: str | Path | None = None, strict: bool = True,
               embedding_layer: str | None = None, allow_code: bool = False) -> LoadedModel:
    """Loads a bundle folder, a checkpoint + network config, or a TorchScript file.

    ``allow_code`` lets the config's ``$`` expressions and arbitrary ``_target_`` run (MONAI's full
    ConfigParser semantics; the CLI's ``--trust-model-code``); by default the config is data, built from an
    allow-list of classes with literal arguments (`asfda.models.safe_config`).
    """
    source = Path(source)
    if not source.exists():
        raise AsfdaError("model not found", source, "give a bundle folder, a checkpoint with --model-config, or a .ts file")
    metadata: dict = {}
    if source.is_dir():
        cfg_path = next((source / "configs" / n for n in ("inference.json", "inference.yaml", "inference.yml")
                         if (source / "configs" / n).exists()), None)
        if cfg_path is None:
            raise AsfdaError("not a MONAI bundle: configs/inference.json is missing", source,
                             "point at the bundle root (the folder holding configs/ and models/)")
        meta_path = source / "configs" / "metadata.json"
        if meta_path.exists():
            metadata = _read_config(meta_path)
        weights = next((source / "models" / n for n in ("model.safetensors", "model.pt", "model.pth", "model.ts")
                        if (source / "models" / n).exists()), None)
        if weights is None:
            raise AsfdaError("bundle has no weights (models/model.safetensors, model.pt or model.ts)", source / "models")
    else:
        weights = source
        cfg_path = Path(config) if config else None
        if cfg_path is None and weights.suffix != ".ts":
            raise AsfdaError("a bare checkpoint needs a network config", weights,
                             "pass --model-config NET.yaml with a 'network_def' (MONAI bundle syntax)")
    cfg = _read_config(cfg_path) if cfg_path else {}
    if weights.suffix == ".ts":
        try:
            network = torch.jit.load(str(weights), map_location="cpu")
        except Exception as exc:
            raise AsfdaError(f"cannot load TorchScript ({exc.__class__.__name__})", weights) from None
    else:
        if "network_def" not in cfg:
            raise AsfdaError("config has no 'network_def'", cfg_path, "add the network definition (MONAI bundle syntax)")
        network = _build_network(cfg, cfg_path, allow_code)
        state = load_state_dict_file(weights)
        _load_weights(network, state, weights, strict)
    network.eval()
    image_key = cfg.get("image_key", "image") if isinstance(cfg.get("image_key", "image"), str) else "image"
    if "preprocessing" in cfg:
        prep = _build_preprocessing(cfg, cfg_path, allow_code, image_key)
    else:
        prep = Preprocessing(axcodes=None, pixdim_mm=None, description={"config": None})
    roi, swb, overlap = _inferer_settings(cfg, cfg_path)
    class_names, activation = _class_names(metadata, cfg, network)
    return LoadedModel(network, class_names, prep, roi, swb, overlap, activation, source, cfg, metadata,
                       embedding_layer or cfg.get("asfda_embedding_layer"))


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


def _class_names(metadata: dict, cfg: dict, network: nn.Module) -> tuple[list[str], str]:
    pred = (metadata.get("network_data_format", {}).get("outputs", {}).get("pred", {}) if metadata else {})
    channel_def = pred.get("channel_def") or cfg.get("channel_def")
    activation = "sigmoid" if str(pred.get("format", "")).lower() in ("multilabel", "multi-label") else "softmax"
    activation = cfg.get("asfda_activation", activation)
    if channel_def:
        names = [str(channel_def[k]) for k in sorted(channel_def, key=lambda s: int(s))]
        return names, activation
    n_out = pred.get("num_channels") or getattr(network, "out_channels", None)
    if n_out is None:
        raise AsfdaError("the model does not name its output classes", None,
                         "add network_data_format.outputs.pred.channel_def to metadata.json or channel_def to the config")
    return ["background"] + [f"class_{i}" for i in range(1, int(n_out))], activation


def save_bundle(model: LoadedModel, out_dir: str | Path, *, extra_metadata: dict | None = None) -> Path:
    """Writes ``model`` as a MONAI bundle that ``python -m monai.bundle run`` runs as is.

    Configs are copied from the source bundle when there is one (so its own pipeline keeps working);
    weights go to ``models/model.pt`` (plain state dict, what MONAI's CheckpointLoader reads) and
    ``models/model.safetensors``.
    """
    from safetensors.torch import save_file

    out = Path(out_dir)
    (out / "configs").mkdir(parents=True, exist_ok=True)
    (out / "models").mkdir(parents=True, exist_ok=True)
    src = model.source if model.source is not None and model.source.is_dir() else None
    if src is not None and src.resolve() != out.resolve():
        for sub in ("configs", "docs"):
            if (src / sub).is_dir():
                for f in (src / sub).iterdir():
                    if f.is_file() and f.name != "metadata.json":
                        atomic_write(out / sub / f.name, lambda p, f=f: shutil.copyfile(f, p))
    elif src is None:
        atomic_write_json(out / "configs" / "inference.json", model.config)
    state = {k: v.detach().cpu().contiguous() for k, v in model.network.state_dict().items()}
    atomic_write(out / "models" / "model.pt", lambda p: torch.save(state, p))
    atomic_write(out / "models" / "model.safetensors", lambda p: save_file(state, str(p)))
    meta = copy.deepcopy(model.metadata) or {}
    if not meta.get("network_data_format"):
        meta["network_data_format"] = {"outputs": {"pred": {"type": "image", "format": "segmentation",
                                                           "num_channels": len(model.class_names),
                                                           "channel_def": {str(i): n for i, n in enumerate(model.class_names)}}}}
    meta.setdefault("asfda", {}).update(extra_metadata or {})
    meta["asfda"]["weights_sha256_16"] = state_dict_hash(state)
    atomic_write_json(out / "configs" / "metadata.json", meta)
    return out
