"""nnU-Net v2 results folders as asfda models: loaded safely, and written back as results folders.

A results folder (``nnUNet_results/DatasetXXX_Name/TRAINER__PLANS__CONFIGURATION``) holds ``dataset.json``,
``plans.json`` and ``fold_X/checkpoint_final.pth``. asfda loads:

* the results folder: every ``fold_N`` with a final checkpoint (``fold_all`` when there is none), as one network that
  averages the folds' logits, as nnU-Net's predictor does (`NnUNetEnsemble`); fine-tuning it trains every fold;
* one fold folder (``fold_0``) or one checkpoint inside a results folder: that fold alone;
* a bare ``checkpoint_final.pth`` (plans and dataset.json from the checkpoint's own ``init_args``).

Safety: checkpoints are read with ``torch.load(weights_only=True)`` and an explicit allow-list of the few non-tensor
types nnU-Net's checkpoints hold besides builtins (numpy scalars and their dtypes, in the training log); anything
else (a pickle that calls code) is refused. The network is built from ``plans.json``'s ``architecture`` with
``dynamic-network-architectures`` (nnU-Net's own network package; nnunetv2 itself is not imported), from an allow-list
of network classes and ``torch.nn`` building blocks: plans.json never names code that runs.

The preprocessing and its inverse are `asfda.models.nnunet_preprocessing.NnUNetPreprocessing` (equal to nnU-Net's,
value for value, anisotropic resampling included); the sliding window is the configuration's patch size with nnU-Net's
step of half a patch. nnU-Net's own tiling (window positions, Gaussian weight, per-window mirroring) is
`asfda.models.nnunet_window` (mode `NNUNET_MODE`); test-time augmentation mirrors the axes nnU-Net's trainer allowed
(``inference_allowed_mirroring_axes``, usually all three, left-right included: nnU-Net trains with those mirrorings).

`save_results_folder` writes the adapted model back as a results folder that ``nnUNetv2_predict`` runs: ``plans.json``
and ``dataset.json`` copied, each fold's checkpoint with the same keys as the source's (``network_weights`` replaced,
everything else kept), and asfda's record of the adaptation in ``asfda.json``.
"""

from __future__ import annotations

import copy
import pickle
import re
import zipfile
from pathlib import Path

import numpy as np
import torch
from torch import nn

from asfda.config import check_config_data, read_config_file
from asfda.errors import AsfdaError
from asfda.models.loaded import (
    LoadedModel,
    check_finite_weights,
    check_unique_class_names,
    is_torchscript,
    torchscript_refusal,
)
from asfda.models.nnunet_preprocessing import NnUNetPreprocessing
from asfda.models.nnunet_window import NNUNET_MODE

__all__ = ["CHECKPOINT_NAMES", "NnUNetEnsemble", "build_network", "is_nnunet_source", "load_checkpoint",
           "load_nnunet"]

CHECKPOINT_NAMES = ("checkpoint_final.pth", "checkpoint_best.pth", "checkpoint_latest.pth")
FORMAT = "nnunet_v2"
INSTALL = (f"pip install 'asfda[nnunet]' torch=={torch.__version__.split('+')[0]} "
           "(dynamic-network-architectures; the torch "
           "pin stops pip from replacing torch for timm's torchvision)")
SW_MODE = NNUNET_MODE
"""The sliding-window mode nnU-Net models run with: nnU-Net's own tiling (`asfda.models.nnunet_window`: window
positions, Gaussian, padding, per-window mirroring), which `asfda.engine` runs for this mode."""
_FOLD = re.compile(r"^fold_(\d+|all)$")
_MAX_JSON_BYTES = 64 << 20

# -- checkpoints ---------------------------------------------------------------------------------------------------


def _safe_globals() -> list:
    """The non-builtin types an nnU-Net v2 checkpoint holds (its training log keeps numpy float32 values): numpy's
    scalar constructor and dtypes, under both numpy 2 (``numpy._core``) and numpy 1 (``numpy.core``) names.
    Reconstructing them runs no code of the file's choosing."""
    core = getattr(np, "_core", None) or np.core
    scalar = core.multiarray.scalar
    out: list = [scalar, (scalar, "numpy.core.multiarray.scalar"), (scalar, "numpy._core.multiarray.scalar"), np.dtype]
    for t in (np.bool_, np.int8, np.int16, np.int32, np.int64, np.uint8, np.uint16, np.uint32, np.uint64,
              np.float16, np.float32, np.float64):
        out.append(type(np.dtype(t)))
    return out


def load_checkpoint(path: str | Path) -> dict:
    """An nnU-Net checkpoint, read with ``torch.load(weights_only=True)`` and `_safe_globals` only.

    Refuses (`AsfdaError`) a file that needs any other global to unpickle, naming it: the payload never runs."""
    path = Path(path)
    if is_torchscript(path):  # a program, not a checkpoint: never opened by torch
        raise torchscript_refusal(path)
    try:
        with torch.serialization.safe_globals(_safe_globals()):
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        found = re.search(r"(?:Unsupported global|unsupported|GLOBAL)[^\n]*?([\w.]+\.[\w]+)", str(exc))
        what = f" ({found.group(1)})" if found else ""
        raise AsfdaError(f"the nnU-Net checkpoint needs code to load{what}; asfda reads checkpoints with "
                         "torch.load(weights_only=True) and allows only tensors, builtins and numpy scalars",
                         path, "use a checkpoint written by nnU-Net's trainer (or re-save its network_weights "
                         "with torch.save)") from None
    except Exception as exc:  # noqa: BLE001 -- zip, EOF, storage errors of a damaged file: one message
        raise AsfdaError(f"cannot read the nnU-Net checkpoint ({exc.__class__.__name__}: {str(exc)[:160]})", path,
                         "the file is truncated or not a torch checkpoint; copy it again") from None
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("network_weights"), dict):
        keys = sorted(ckpt)[:10] if isinstance(ckpt, dict) else type(ckpt).__name__
        raise AsfdaError(f"not an nnU-Net checkpoint: no 'network_weights' (found {keys})", path,
                         "give fold_X/checkpoint_final.pth of an nnU-Net v2 results folder")
    bad = [k for k, v in ckpt["network_weights"].items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise AsfdaError(f"the checkpoint's network_weights hold non-tensors ({bad[:5]})", path,
                         "give a checkpoint written by nnU-Net's trainer")
    check_finite_weights(ckpt["network_weights"], path)
    return ckpt


def _looks_like_nnunet_checkpoint(path: Path) -> bool:
    """A ``torch.save`` zip whose pickle names ``network_weights`` and ``init_args`` (read as bytes, never
    unpickled)."""
    try:
        if not zipfile.is_zipfile(path):
            return False
        with zipfile.ZipFile(path) as z:
            pkl = next((n for n in z.namelist() if n.endswith("/data.pkl")), None)
            if pkl is None or z.getinfo(pkl).file_size > 64 << 20:
                return False
            data = z.read(pkl)
        return b"network_weights" in data and b"init_args" in data
    except (OSError, zipfile.BadZipFile, KeyError):
        return False


def _is_results_folder(path: Path) -> bool:
    return path.is_dir() and (path / "plans.json").is_file() and (path / "dataset.json").is_file()


def is_nnunet_source(path: str | Path) -> bool:
    """Whether ``path`` is an nnU-Net v2 results folder, one of its fold folders, or an nnU-Net checkpoint file."""
    path = Path(path)
    if path.is_dir():
        if _is_results_folder(path):
            return any(_FOLD.match(p.name) for p in path.iterdir() if p.is_dir()) or not (path / "configs").is_dir()
        return bool(_FOLD.match(path.name)) and _is_results_folder(path.parent)
    if path.is_file() and path.suffix == ".pth":
        if _FOLD.match(path.parent.name) and _is_results_folder(path.parent.parent):
            return True
        return _looks_like_nnunet_checkpoint(path)
    return False


def _layout(source: Path) -> tuple[Path | None, list[tuple[str, Path]]]:
    """The results folder (None for a bare checkpoint) and the (fold, checkpoint) pairs to load."""
    if source.is_file():
        root = source.parent.parent if _FOLD.match(source.parent.name) and _is_results_folder(source.parent.parent) \
            else None
        fold = source.parent.name[5:] if root is not None else "0"
        return root, [(fold, source)]
    if _FOLD.match(source.name) and not _is_results_folder(source):
        ckpt = source / CHECKPOINT_NAMES[0]
        if not ckpt.is_file():
            raise AsfdaError(f"the fold folder has no {CHECKPOINT_NAMES[0]}", source,
                             "give a fold whose training finished, or its checkpoint file (e.g. checkpoint_best.pth)")
        return source.parent, [(source.name[5:], ckpt)]
    folds = sorted(((p.name[5:], p / CHECKPOINT_NAMES[0]) for p in source.iterdir()
                    if p.is_dir() and _FOLD.match(p.name) and (p / CHECKPOINT_NAMES[0]).is_file()),
                   key=lambda f: (f[0] == "all", int(f[0]) if f[0].isdigit() else 0))
    numbered = [f for f in folds if f[0] != "all"]
    folds = numbered or folds  # as nnU-Net's predictor: fold_all only when no numbered fold exists
    if not folds:
        raise AsfdaError(f"the nnU-Net results folder has no fold_X/{CHECKPOINT_NAMES[0]}", source,
                         "train at least one fold to the end, or point at a checkpoint file")
    return source, folds


def _read_json(path: Path) -> dict:
    data = read_config_file(path, max_bytes=_MAX_JSON_BYTES, yaml_syntax=False, what="nnU-Net")
    if not isinstance(data, dict):
        raise AsfdaError("expected a JSON object", path, "use the file nnU-Net wrote")
    return data


# -- the network ---------------------------------------------------------------------------------------------------


def _allowed_network_classes() -> dict[str, type]:
    try:
        from dynamic_network_architectures.architectures import unet
    except ImportError:
        raise AsfdaError("loading an nnU-Net model needs the package dynamic-network-architectures", None,
                         INSTALL) from None
    out = {n: getattr(unet, n) for n in ("PlainConvUNet", "ResidualEncoderUNet", "ResidualUNet") if hasattr(unet, n)}
    return out


def _allowed_blocks() -> dict[str, type]:
    blocks: dict[str, type] = {}
    for n in ("Conv1d", "Conv2d", "Conv3d", "ConvTranspose1d", "ConvTranspose2d", "ConvTranspose3d",
              "InstanceNorm1d", "InstanceNorm2d", "InstanceNorm3d", "BatchNorm1d", "BatchNorm2d", "BatchNorm3d",
              "GroupNorm", "LayerNorm", "Dropout", "Dropout1d", "Dropout2d", "Dropout3d", "AlphaDropout",
              "LeakyReLU", "ReLU", "PReLU", "ELU", "GELU", "SiLU", "Mish", "Tanh", "Sigmoid", "Identity"):
        blocks[n] = getattr(nn, n)
    try:
        from dynamic_network_architectures.building_blocks import residual
        for n in ("BasicBlockD", "BottleneckD"):
            if hasattr(residual, n):
                blocks[n] = getattr(residual, n)
    except ImportError:
        pass
    return blocks


def _resolve(name: object, allowed: dict[str, type], prefixes: tuple[str, ...], what: str,
             where: str | Path | None) -> type:
    """A dotted class name of plans.json -> the class, only from ``allowed`` under one of ``prefixes``."""
    if isinstance(name, str):
        module, _, cls = name.rpartition(".")
        if cls in allowed and (module == "" or module.startswith(prefixes)):
            return allowed[cls]
    raise AsfdaError(f"plans.json names {what} {name!r}, which asfda does not build (allowed: "
                     f"{', '.join(sorted(allowed))})", where,
                     "use a model with nnU-Net's standard U-Nets (PlainConvUNet, ResidualEncoderUNet)")


def build_network(architecture: object, in_channels: int, out_channels: int,
                  where: str | Path | None = None) -> nn.Module:
    """The network of a plans configuration's ``architecture`` entry (``network_class_name``, ``arch_kwargs``,
    ``_kw_requires_import``), without deep supervision (inference), built from allow-listed classes only."""
    if not isinstance(architecture, dict) or not isinstance(architecture.get("arch_kwargs"), dict):
        raise AsfdaError("plans.json's configuration has no 'architecture' with 'arch_kwargs' (plans of nnU-Net "
                         "before 2.4)", where, "re-run nnUNetv2_plan_experiment with a current nnU-Net, or "
                         "use nnU-Net's own predictor")
    net_cls = _resolve(architecture.get("network_class_name"), _allowed_network_classes(),
                       ("dynamic_network_architectures.architectures",), "the network class", where)
    kwargs = copy.deepcopy(architecture["arch_kwargs"])
    blocks = _allowed_blocks()
    for key in architecture.get("_kw_requires_import", ()):
        if kwargs.get(key) is not None:
            kwargs[key] = _resolve(kwargs[key], blocks, ("torch.nn", "dynamic_network_architectures.building_blocks"),
                                   f"{key} =", where)
    for key, value in kwargs.items():
        if isinstance(value, str) and "." in value and key not in architecture.get("_kw_requires_import", ()):
            raise AsfdaError(f"plans.json's arch_kwargs {key!r} = {value!r} names code asfda would not import", where,
                             "use the plans.json nnU-Net wrote")
    kwargs["deep_supervision"] = False
    try:
        return net_cls(input_channels=in_channels, num_classes=out_channels, **kwargs)
    except Exception as exc:  # noqa: BLE001 -- whatever the constructor raises on arguments it does not take
        raise AsfdaError(f"cannot build {net_cls.__name__} from plans.json ({exc.__class__.__name__}: "
                         f"{str(exc)[:160]})", where, "use the plans.json nnU-Net wrote for this model") from None


class NnUNetEnsemble(nn.Module):
    """The folds of an nnU-Net model as one network: the mean of their logits, as ``nnUNetPredictor`` averages the
    folds' sliding-window logits."""

    def __init__(self, networks: list[nn.Module]) -> None:
        super().__init__()
        self.folds = nn.ModuleList(networks)
        self.out_channels = getattr(networks[0], "num_classes", None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.folds[0](x)
        for net in self.folds[1:]:
            out = out + net(x)
        return out / len(self.folds)


def _check_weights(network: nn.Module, state: dict, path: Path, strict: bool) -> None:
    own = network.state_dict()
    missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    mismatched = sorted(k for k in set(own) & set(state) if tuple(own[k].shape) != tuple(state[k].shape))
    if strict and (missing or unexpected or mismatched):
        parts = [f"{n}: {', '.join(ks[:4])}{f' (+{len(ks) - 4} more)' if len(ks) > 4 else ''}"
                 for n, ks in (("missing keys", missing), ("unexpected keys", unexpected),
                               ("shape mismatch", mismatched)) if ks]
        raise AsfdaError("the checkpoint's weights do not fit the network of plans.json (" + "; ".join(parts) + ")",
                         path, "use the plans.json of the same training (a custom trainer's network is not built "
                         "from plans.json)")
    network.load_state_dict({k: v for k, v in state.items() if k not in mismatched}, strict=False)


# -- loading -------------------------------------------------------------------------------------------------------


def _configuration(plans: dict, name: object, where: str | Path | None) -> dict:
    """A plans configuration with ``inherits_from`` resolved (nnU-Net's PlansManager)."""
    configs = plans.get("configurations")
    if not isinstance(configs, dict) or name not in configs:
        raise AsfdaError(f"the checkpoint's configuration {name!r} is not in plans.json "
                         f"({sorted(configs) if isinstance(configs, dict) else 'no configurations'})", where,
                         "use the plans.json of the same training")
    seen: list[str] = []
    config = copy.deepcopy(configs[name])
    while "inherits_from" in config:
        parent = config.pop("inherits_from")
        if parent in seen or parent not in configs:
            raise AsfdaError(f"plans.json's configuration {name!r} inherits from {parent!r}, which is missing or "
                             "circular", where, "use the plans.json nnU-Net wrote")
        seen.append(parent)
        config = {**copy.deepcopy(configs[parent]), **config}
    return config


def _class_names(dataset: dict, where: str | Path | None) -> list[str]:
    labels = dataset.get("labels")
    if not isinstance(labels, dict) or not labels:
        raise AsfdaError("dataset.json has no 'labels'", where, "use the dataset.json nnU-Net wrote")
    if "regions_class_order" in dataset or any(isinstance(v, (list, tuple)) for v in labels.values()):
        raise AsfdaError("the nnU-Net model is region-based (overlapping sigmoid outputs); asfda adapts single-label "
                         "(softmax) models", where, "use nnU-Net's own predictor for region-based models")
    names = {}
    for name, value in labels.items():
        if name == "ignore":
            continue
        if not isinstance(value, int) or isinstance(value, bool):
            raise AsfdaError(f"dataset.json's label {name!r} has the value {value!r}, not an integer", where,
                             "use the dataset.json nnU-Net wrote")
        names[value] = str(name)
    if sorted(names) != list(range(len(names))):
        raise AsfdaError(f"dataset.json's labels are not consecutive from 0 ({sorted(names)})", where,
                         "nnU-Net requires labels 0, 1, 2, ...")
    out = [names[i] for i in range(len(names))]
    check_unique_class_names(out, "softmax", where)
    return out


def load_nnunet(source: str | Path, *, strict: bool = True, embedding_layer: str | None = None,
                activation: str | None = None):
    """Loads an nnU-Net v2 results folder, fold folder or checkpoint (`is_nnunet_source`) as a `LoadedModel`.

    ``activation``: None or ``"softmax"`` (an nnU-Net label model's output is softmax logits; region-based models
    are refused)."""

    source = Path(source)
    if activation not in (None, "softmax"):
        raise AsfdaError(f"an nnU-Net label model's outputs are softmax logits; --output-activation {activation} "
                         "does not apply", source, "leave --output-activation out for nnU-Net models")
    root, folds = _layout(source)
    ckpts = [load_checkpoint(p) for _, p in folds]
    first = ckpts[0]
    raw_init_args = first.get("init_args")
    init_args = raw_init_args if isinstance(raw_init_args, dict) else {}
    if root is not None:
        plans, dataset = _read_json(root / "plans.json"), _read_json(root / "dataset.json")
        where = root / "plans.json"
    else:
        init_plans, init_dataset, where = init_args.get("plans"), init_args.get("dataset_json"), folds[0][1]
        if not isinstance(init_plans, dict) or not isinstance(init_dataset, dict):
            raise AsfdaError("a bare nnU-Net checkpoint without plans and dataset.json in its init_args", source,
                             "give the results folder (with plans.json and dataset.json) instead")
        plans, dataset = init_plans, init_dataset
        check_config_data(init_args, where, "checkpoint's init_args", "give the results folder instead")
    config_name = init_args.get("configuration")
    if config_name is None:
        configs = plans.get("configurations", {})
        config_name = "3d_fullres" if "3d_fullres" in configs else next(iter(configs), None)
    config = _configuration(plans, config_name, where)
    patch = config.get("patch_size")
    if not isinstance(patch, (list, tuple)) or len(patch) != 3:
        raise AsfdaError(f"the nnU-Net configuration {config_name!r} is not 3D (patch size {patch}); asfda segments "
                         "volumes with 3D networks", where, "use the model's 3d_fullres or 3d_lowres configuration")
    if config.get("previous_stage"):
        raise AsfdaError(f"the nnU-Net configuration {config_name!r} is a cascade stage: it needs the previous "
                         f"stage's segmentation as input", where, "use the 3d_fullres or 3d_lowres configuration")
    channels = dataset.get("channel_names", dataset.get("modality", {"0": ""}))
    in_channels = len(channels) if isinstance(channels, dict) and channels else 1
    class_names = _class_names(dataset, root / "dataset.json" if root is not None else source)
    networks = []
    for (_fold, path), ckpt in zip(folds, ckpts):
        net = build_network(config.get("architecture"), in_channels, len(class_names), where)
        _check_weights(net, ckpt["network_weights"], path, strict)
        networks.append(net)
    network = networks[0] if len(networks) == 1 else NnUNetEnsemble(networks)
    network.eval()
    prep = NnUNetPreprocessing.from_plans(plans, config, dataset, where)
    info = {"configuration": config_name, "trainer_name": first.get("trainer_name"),
            "plans_name": plans.get("plans_name"), "dataset_name": plans.get("dataset_name"),
            "folds": [f for f, _ in folds], "checkpoints": [str(p.resolve()) for _, p in folds],
            "root": str(root.resolve()) if root is not None else None,
            "inference_allowed_mirroring_axes": _jsonable(first.get("inference_allowed_mirroring_axes")),
            "plans": plans, "dataset": dataset}
    metadata = {"format": FORMAT, "nnunet": {k: v for k, v in info.items() if k not in ("plans", "dataset")}}
    if root is not None and (root / "asfda.json").is_file():
        metadata["asfda"] = _read_json(root / "asfda.json").get("asfda", {})
    roi = (int(patch[0]), int(patch[1]), int(patch[2]))  # 3 sides, checked above
    return LoadedModel(network, class_names, prep, roi, sw_batch_size=2, overlap=0.5, activation="softmax",
                       source=source, config={"nnunet": info}, metadata=metadata, embedding_layer=embedding_layer,
                       sw_mode=SW_MODE, tta_axes=_tta_axes(first.get("inference_allowed_mirroring_axes")))


def _tta_axes(allowed: object) -> tuple[int, ...]:
    """Model-grid axes asfda's TTA mirrors: those nnU-Net's trainer allowed (``inference_allowed_mirroring_axes``;
    ``None``: none), as nnU-Net's predictor mirrors by default, left-right included (the network was trained with
    those mirrorings)."""
    axes = allowed if isinstance(allowed, (list, tuple)) else ()
    return tuple(dict.fromkeys(int(m) for m in axes if int(m) in (0, 1, 2)))


def _jsonable(value: object) -> object:
    if isinstance(value, (tuple, list)):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    return value
