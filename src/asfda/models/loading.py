"""Loading a pretrained segmentation model safely, and saving an adapted one as a MONAI bundle.

Accepted sources:

* a MONAI bundle folder: ``configs/inference.json`` (or .yaml) with ``network_def`` and optionally
  ``preprocessing`` and ``inferer``; ``configs/metadata.json`` with the output ``channel_def``;
  weights in ``models/model.safetensors``, ``models/model.pt`` (plain state dict) or ``models/model.ts``.
* a checkpoint file (``.pt``/``.pth``/``.safetensors``) plus a network config (YAML/JSON with
  ``network_def`` and the same optional keys).
* a TorchScript file (recognised by its content, whatever its suffix: ``model.pt`` as shipped works too) plus an
  optional config for preprocessing and class names.

``torch.load`` only ever runs with ``weights_only=True``: a checkpoint that needs pickle execution
is refused.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import pickle
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from asfda.errors import AsfdaError, missing_package_error
from asfda.io.atomic import atomic_write, atomic_write_folder, atomic_write_json
from asfda.models.preprocessing import Preprocessing
from asfda.models.safe_config import DeclaredTransform, build_network, build_transforms, resolve_literal

__all__ = ["OUTPUT_ACTIVATIONS", "LoadedModel", "clone_module", "is_torchscript", "load_model", "load_state_dict_file",
           "save_bundle", "state_dict_hash", "unwrap_state_dict"]

OUTPUT_ACTIVATIONS = ("softmax", "sigmoid", "none")
"""``output_activation`` values: what turns the network's output into probabilities (``none``: it already is)."""

_CONTAINER_KEYS = ("state_dict", "model_state_dict", "model", "net", "network", "module")


@dataclass
class LoadedModel:
    """A pretrained network and everything needed to run it on new volumes.

    Attributes:
        network: the source network (its own output channels), in eval mode.
        class_names: names of the network's output channels, index = channel.
        preprocessing: what the model declares of its input grid and intensities.
        roi_size, sw_batch_size, overlap: sliding-window settings.
        activation: ``"softmax"`` (single-label) or ``"sigmoid"`` (multi-label: one independent channel per class).
        source: where it was loaded from.
        config: the parsed config dict (``network_def``, ``preprocessing``, ...) to write bundles back.
        metadata: bundle metadata dict (may be empty).
        embedding_layer: module name whose output is the volume embedding (None: found automatically).
        probabilities: the network's output already went through ``activation`` (``output_activation: none``):
            asfda takes it as probabilities instead of applying the activation a second time.
        sw_mode: how overlapping sliding windows are blended (MONAI's ``mode``): ``constant``, or ``gaussian``
            (nnU-Net's, for nnU-Net models).
        tta_axes: model-grid axes that test-time augmentation flips (`asfda.engine.DEFAULT_TTA_AXES`: the RAS grid's
            anterior-posterior and superior-inferior axes; an nnU-Net grid's axes other than left-right).
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
    probabilities: bool = False
    sw_mode: str = "constant"
    tta_axes: tuple[int, ...] = (1, 2)

    @property
    def output_activation(self) -> str:
        """What turns the network's output into probabilities: ``softmax``, ``sigmoid`` or ``none``."""
        return "none" if self.probabilities else self.activation

    @property
    def adds_background(self) -> bool:
        """Whether asfda's single-label view of this model prepends a background class: a sigmoid head whose
        channel 0 is not a background channel (its channels are the foreground classes)."""
        return self.activation == "sigmoid" and _norm_name(self.class_names[0]) != "background"

    @property
    def label_names(self) -> list[str]:
        """The model's classes in asfda's single-label view (index = label value, 0 = background): the softmax
        channels as they are; for a sigmoid head, ``background`` (no channel on) and then its channels."""
        return ["background", *self.class_names] if self.adds_background else list(self.class_names)

    def check_usable(self, in_channels: int = 1, where: object = None) -> None:
        """Refuses, before any inference, a model that cannot run on asfda's inputs: another number of input
        channels, a sliding-window roi the network cannot take, or output channels its class names do not match.
        Runs the network once on an empty window (on its own device)."""
        self.check_input_channels(in_channels, where)
        from asfda.engine import probe_network

        shape = probe_network(self.network, self.roi_size, in_channels, where=where or self.source)
        if shape[1] != len(self.class_names):
            raise AsfdaError(f"the network outputs {shape[1]} channels but the model names {len(self.class_names)} "
                             f"classes {self.class_names}", where or self.source,
                             "make the metadata's channel_def (or the config's channel_def) name one class per output "
                             "channel")

    def mapped_network(self, class_map, network: nn.Module | None = None) -> nn.Module:
        """``network`` (default: this model's) wrapped to output softmax logits of ``class_map``'s target classes
        (`asfda.models.ClassMappedNetwork`, with this model's activation; ``class_map`` built on `label_names`)."""
        from asfda.models.classmap import ClassMappedNetwork

        return ClassMappedNetwork(self.network if network is None else network, class_map, self.activation,
                                  probabilities=self.probabilities, add_background=self.adds_background)

    @property
    def in_channels(self) -> int | None:
        """Input channels the network expects: its first convolution's (None when it has none to read)."""
        for m in self.network.modules():
            n = getattr(m, "in_channels", None)
            if isinstance(n, int) and hasattr(m, "weight"):
                return n
        return None

    def check_input_channels(self, have: int = 1, where: object = None) -> None:
        """Refuses, before any inference, a network that expects another number of input channels."""
        want = self.in_channels
        if want is not None and want != have:
            raise AsfdaError(f"the model expects {want} input channels, the dataset has {have} (a model of several "
                             "stacked sequences or modalities)", where or self.source,
                             "use a model trained on single-channel images; asfda reads one channel per case "
                             "(nnU-Net's _0000 file)")

    @property
    def weights_hash(self) -> str:
        return state_dict_hash(self.network.state_dict())

    def copy(self) -> LoadedModel:
        other = copy.copy(self)
        other.network = clone_module(self.network)
        return other


def _norm_name(name: str) -> str:
    return str(name).strip().lower().replace(" ", "_").replace("-", "_")


def clone_module(module: nn.Module) -> nn.Module:
    """A deep copy of ``module``. A TorchScript module is copied without autograd history: ``copy.deepcopy`` of a
    ScriptModule otherwise gives parameters that are not leaves, which can then be neither frozen nor trained."""
    if not any(isinstance(m, torch.jit.ScriptModule) for m in module.modules()):
        return copy.deepcopy(module)
    with torch.no_grad():
        other = copy.deepcopy(module)
    for p, q in zip(module.parameters(), other.parameters()):
        q.requires_grad_(p.requires_grad)
    return other


def state_dict_hash(state: dict[str, torch.Tensor]) -> str:
    """SHA-256 (first 16 hex digits) of a state dict's names and values."""
    h = hashlib.sha256()
    for k in sorted(state):
        v = state[k]
        h.update(k.encode())
        if isinstance(v, torch.Tensor):
            # reshape(-1): a 0-d tensor (BatchNorm's num_batches_tracked) cannot be viewed as bytes directly
            h.update(v.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes() if v.numel() else b"")
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
        compose = _parse_trusted(cfg, "preprocessing", path)
        steps = [DeclaredTransform(type(t).__name__, {}, t) for t in getattr(compose, "transforms", compose or [])]
    else:
        steps = build_transforms(cfg, path)
    return Preprocessing.from_steps(steps, image_key, cfg["preprocessing"])


def _inferer_settings(cfg: dict, path: Path | None, allow_code: bool = False) -> tuple[tuple[int, ...], int, float]:
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
            raise AsfdaError(f"the inferer's {key} {str(inferer[key])[:60]!r} is not a literal value ({str(exc)[:120]})",
                             path, f"give {key} as a number (or an @ reference to one), or pass --trust-model-code "
                             "for a bundle you trust") from None
    return _check_inferer(settings.get("roi_size", roi), settings.get("sw_batch_size", swb),
                          settings.get("overlap", overlap), path)


def _is_number(v: object) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _check_inferer(roi: object, swb: object, overlap: object, path: Path | None) -> tuple[tuple[int, ...], int, float]:
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
    return tuple(int(r) for r in roi), int(swb), float(overlap)


def load_model(source: str | Path, *, config: str | Path | None = None, strict: bool = True,
               embedding_layer: str | None = None, allow_code: bool = False,
               output_activation: str | None = None) -> LoadedModel:
    """Loads a bundle folder, a checkpoint + network config, or a TorchScript file.

    ``allow_code`` lets the config's ``$`` expressions and arbitrary ``_target_`` run (MONAI's full
    ConfigParser semantics; the CLI's ``--trust-model-code``); by default the config is data, built from an
    allow-list of classes with literal arguments (`asfda.models.safe_config`).

    ``output_activation`` (``softmax``, ``sigmoid`` or ``none``; the CLI's ``--output-activation``) overrides what
    the model declares turns its output into probabilities: the config's ``asfda_output_activation``, else a
    ``multilabel`` output format in the metadata (sigmoid), else the ``Activationsd`` step of the bundle's
    ``postprocessing`` (read as data), else softmax (sigmoid for a single output channel). ``none`` is for networks
    whose output already is probabilities (a softmax or sigmoid inside a TorchScript graph): asfda then takes the
    logarithm instead of applying the activation again.
    """
    source = Path(source)
    if not source.exists():
        raise AsfdaError("model not found", source, "give a bundle folder, a checkpoint with --model-config, or a .ts file")
    from asfda.models import nnunet  # an nnU-Net v2 results folder, fold folder or checkpoint_final.pth
    if config is None and nnunet.is_nnunet_source(source):
        return nnunet.load_nnunet(source, strict=strict, embedding_layer=embedding_layer, activation=output_activation)
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
        if cfg_path is None and not is_torchscript(weights):
            raise AsfdaError("a bare checkpoint needs a network config", weights,
                             "pass --model-config NET.yaml with a 'network_def' (MONAI bundle syntax)")
    cfg = _read_config(cfg_path) if cfg_path else {}
    if is_torchscript(weights):
        try:
            network = torch.jit.load(str(weights), map_location="cpu")
        except Exception as exc:
            err = missing_package_error(exc, "the TorchScript model", weights)
            if err is not None:
                raise err from None
            raise AsfdaError(f"cannot load TorchScript ({exc.__class__.__name__}: {str(exc)[:160]})", weights) from None
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
    roi, swb, overlap = _inferer_settings(cfg, cfg_path, allow_code)
    class_names, activation, probabilities = _classes_and_activation(metadata, cfg, network, roi, output_activation,
                                                                      cfg_path or weights)
    return LoadedModel(network, class_names, prep, roi, swb, overlap, activation, source, cfg, metadata,
                       embedding_layer or cfg.get("asfda_embedding_layer"), probabilities)


def is_torchscript(path: Path) -> bool:
    """Whether ``path`` is a TorchScript archive, by its content whatever its suffix: a zip holding compiled code
    (``<name>/code/__torch__/...``), unlike a ``torch.save`` state dict. A ``.ts`` file counts as TorchScript (a
    damaged one then gets TorchScript's error)."""
    import zipfile

    if path.suffix == ".ts":
        return True
    try:
        if not zipfile.is_zipfile(path):
            return False
        with zipfile.ZipFile(path) as z:
            return any("/code/__torch__/" in n for n in z.namelist())
    except (OSError, zipfile.BadZipFile):
        return False


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


def _classes_and_activation(metadata: dict, cfg: dict, network: nn.Module, roi: tuple[int, ...],
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
        from asfda.engine import probe_network  # a TorchScript network: count its output channels

        in_ch = LoadedModel(network, [], Preprocessing(), roi).in_channels or 1
        n_out = probe_network(network, roi, in_ch, where=where)[1]

    recorded = metadata.get("asfda", {}) if isinstance(metadata, dict) else {}
    declared = override if override is not None else cfg.get(
        "asfda_output_activation", cfg.get("output_activation",
                                           recorded.get("output_activation") if isinstance(recorded, dict) else None))
    if declared is not None and declared not in OUTPUT_ACTIVATIONS:
        raise AsfdaError(f"output_activation {declared!r} is not one of {list(OUTPUT_ACTIVATIONS)}", where,
                         "softmax or sigmoid for a network that outputs logits, none for one that outputs probabilities")
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


def save_bundle(model: LoadedModel, out_dir: str | Path, *, extra_metadata: dict | None = None) -> Path:
    """Writes ``model`` as a MONAI bundle that ``python -m monai.bundle run`` runs as is.

    Configs are copied from the source bundle when there is one (so its own pipeline keeps working);
    weights go to ``models/model.pt`` (plain state dict, what MONAI's CheckpointLoader reads) and
    ``models/model.safetensors`` (a TorchScript model: ``models/model.ts``, written with ``torch.jit.save``). The
    bundle is written as a whole (`asfda.io.atomic.atomic_write_folder`): a folder
    that held an earlier bundle is replaced in one step, so a reader (or a kill -9 in the middle) never sees a mix of
    the two models.
    """
    from safetensors.torch import save_file

    if model.metadata.get("format") == "nnunet_v2":  # loaded from an nnU-Net results folder: written back as one
        from asfda.models.nnunet import save_results_folder
        return save_results_folder(model, out_dir, extra_metadata=extra_metadata)
    out = Path(out_dir)
    src = model.source if model.source is not None and model.source.is_dir() else None
    state = {k: v.detach().cpu().contiguous() for k, v in model.network.state_dict().items()}
    meta = copy.deepcopy(model.metadata) or {}
    if not meta.get("network_data_format"):
        meta["network_data_format"] = {"outputs": {"pred": {"type": "image", "format": "segmentation",
                                                           "num_channels": len(model.class_names),
                                                           "channel_def": {str(i): n for i, n in enumerate(model.class_names)}}}}
    meta.setdefault("asfda", {}).update(extra_metadata or {})
    meta["asfda"]["weights_sha256_16"] = state_dict_hash(state)
    meta["asfda"]["output_activation"] = model.output_activation  # also when given on the command line
    scripted = isinstance(model.network, torch.jit.ScriptModule)

    def write(folder: Path) -> None:
        (folder / "configs").mkdir()
        (folder / "models").mkdir()
        if src is not None:
            for sub in ("configs", "docs"):
                if (src / sub).is_dir():
                    (folder / sub).mkdir(exist_ok=True)
                    for f in (src / sub).iterdir():
                        if f.is_file() and f.name != "metadata.json":
                            atomic_write(folder / sub / f.name, lambda p, f=f: shutil.copyfile(f, p))
        else:
            atomic_write_json(folder / "configs" / "inference.json", model.config)
        if scripted:  # no network_def to rebuild it from: the adapted TorchScript module itself
            atomic_write(folder / "models" / "model.ts", lambda p: torch.jit.save(model.network, str(p)))
        else:
            atomic_write(folder / "models" / "model.pt", lambda p: torch.save(state, p))
            atomic_write(folder / "models" / "model.safetensors", lambda p: save_file(state, str(p)))
        atomic_write_json(folder / "configs" / "metadata.json", meta)

    atomic_write_folder(out, write)
    return out
