"""Saving an adapted model: as a MONAI bundle, or (a model loaded from an nnU-Net results folder) as a results
folder."""

from __future__ import annotations

import copy
import functools
import shutil
from pathlib import Path

import torch

from asfda.io.atomic import atomic_write, atomic_write_folder, atomic_write_json
from asfda.models.classmap import declared_class_map
from asfda.models.loaded import LoadedModel, state_dict_hash
from asfda.models.nnunet_export import save_results_folder

__all__ = ["save_bundle", "torchscript_inference_config"]


def save_bundle(model: LoadedModel, out_dir: str | Path, *, extra_metadata: dict | None = None) -> Path:
    """Writes ``model`` as a MONAI bundle that ``python -m monai.bundle run`` runs as is.

    Configs (and the ``scripts/`` package a trusted config may import) are copied from the source bundle when there
    is one (so its own pipeline keeps working);
    weights go to ``models/model.pt`` (plain state dict, what MONAI's CheckpointLoader reads) and
    ``models/model.safetensors`` (a TorchScript model: ``models/model.ts``, written with ``torch.jit.save``, and a
    ``configs/inference.json`` that loads it: `torchscript_inference_config`). The class map in ``extra_metadata``
    names the model's channels as its channel_def does (`declared_class_map`). The
    bundle is written as a whole (`asfda.io.atomic.atomic_write_folder`): a folder
    that held an earlier bundle is replaced in one step, so a reader (or a kill -9 in the middle) never sees a mix of
    the two models.
    """
    from safetensors.torch import save_file

    if model.metadata.get("format") == "nnunet_v2":  # loaded from an nnU-Net results folder: written back as one
        return save_results_folder(model, out_dir, extra_metadata=_declared_names(extra_metadata))
    out = Path(out_dir)
    src = model.source if model.source is not None and model.source.is_dir() else None
    state = {k: v.detach().cpu().contiguous() for k, v in model.network.state_dict().items()}
    meta = copy.deepcopy(model.metadata) or {}
    if not meta.get("network_data_format"):
        meta["network_data_format"] = {"outputs": {"pred": {"type": "image", "format": "segmentation",
                                                           "num_channels": len(model.class_names),
                                                           "channel_def": {str(i): n for i, n
                                                                           in enumerate(model.class_names)}}}}
    meta.setdefault("asfda", {}).update(_declared_names(extra_metadata))
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
                        if f.is_file() and f.name != "metadata.json" and not (scripted and f.stem == "inference"):
                            atomic_write(folder / sub / f.name, functools.partial(shutil.copyfile, f))
        if src is not None and not scripted and (src / "scripts").is_dir():  # code the config imports (a trusted
            # bundle's network_def: scripts.networks.unest.UNesT), as `monai.bundle run` finds it beside configs/
            shutil.copytree(src / "scripts", folder / "scripts", symlinks=True,
                            ignore=shutil.ignore_patterns("__pycache__"))
        if scripted:  # the source's config cannot load model.ts: one that `monai.bundle run` runs
            atomic_write_json(folder / "configs" / "inference.json", torchscript_inference_config(model))
        elif src is None:
            atomic_write_json(folder / "configs" / "inference.json", model.config)
        if scripted:  # no network_def to rebuild it from: the adapted TorchScript module itself
            atomic_write(folder / "models" / "model.ts", lambda p: torch.jit.save(model.network, str(p)))
        else:
            atomic_write(folder / "models" / "model.pt", lambda p: torch.save(state, p))
            atomic_write(folder / "models" / "model.safetensors", lambda p: save_file(state, str(p)))
        atomic_write_json(folder / "configs" / "metadata.json", meta)

    atomic_write_folder(out, write)
    return out


def _declared_names(extra_metadata: dict | None) -> dict:
    extra = dict(extra_metadata or {})
    if isinstance(extra.get("class_map"), dict):
        extra["class_map"] = declared_class_map(extra["class_map"])
    return extra


_DEFAULT_PREPROCESSING = {"_target_": "Compose", "transforms": [
    {"_target_": "LoadImaged", "keys": "@image_key"},
    {"_target_": "EnsureChannelFirstd", "keys": "@image_key"},
    {"_target_": "EnsureTyped", "keys": "@image_key"}]}


def torchscript_inference_config(model: LoadedModel) -> dict:
    """An ``inference.json`` that ``python -m monai.bundle run --bundle_root B --dataset_dir D --output_dir O`` runs
    on every NIfTI image of ``D``: the TorchScript network ``models/model.ts``, the model's own preprocessing and
    sliding window (its config's, else loading the image as it is), its output activation (none when the network
    already outputs probabilities), the inverse of the preprocessing, and one label map per image (argmax; a sigmoid
    head: each channel thresholded at 0.5) written to ``O`` as ``CASE_seg.nii.gz``. The model's config's other entries
    are kept."""
    cfg = copy.deepcopy(model.config) if isinstance(model.config, dict) else {}
    key = cfg.get("image_key") if isinstance(cfg.get("image_key"), str) else "image"
    activation = {"softmax": {"softmax": True}, "sigmoid": {"sigmoid": True}}.get(model.output_activation)
    post: list[dict] = [{"_target_": "Activationsd", "keys": "pred", **activation}] if activation else []
    post += [{"_target_": "Invertd", "keys": "pred", "transform": "@preprocessing", "orig_keys": "@image_key",
              "nearest_interp": False, "to_tensor": True},
             {"_target_": "AsDiscreted", "keys": "pred",
              **({"threshold": 0.5} if model.activation == "sigmoid" else {"argmax": True})},
             {"_target_": "SaveImaged", "keys": "pred", "output_dir": "@output_dir", "output_postfix": "seg",
              "output_dtype": "$numpy.uint8", "separate_folder": False, "resample": False}]
    imports = [i for i in cfg.get("imports", []) if isinstance(i, str)] if isinstance(cfg.get("imports"), list) else []
    cfg.update({
        "imports": list(dict.fromkeys([*imports, "$import glob", "$import os", "$import numpy", "$import torch"])),
        "bundle_root": cfg.get("bundle_root", "."), "image_key": key,
        "device": "$torch.device('cuda:0' if torch.cuda.is_available() else 'cpu')",
        "dataset_dir": cfg.get("dataset_dir", "."), "output_dir": "$os.path.join(@bundle_root, 'eval')",
        "datalist": "$sorted(glob.glob(os.path.join(@dataset_dir, '*.nii*')))",
        "network_def": "$torch.jit.load(os.path.join(@bundle_root, 'models', 'model.ts'), map_location='cpu')",
        "network": "$@network_def.to(@device).eval()",
        "preprocessing": cfg.get("preprocessing") or _DEFAULT_PREPROCESSING,
        "dataset": {"_target_": "Dataset", "data": "$[{@image_key: i} for i in @datalist]",
                    "transform": "@preprocessing"},
        "inferer": {"_target_": "SlidingWindowInferer", "roi_size": list(model.roi_size),
                    "sw_batch_size": model.sw_batch_size, "overlap": model.overlap, "mode": model.sw_mode},
        "postprocessing": {"_target_": "Compose", "transforms": post},
        # one image at a time, without an ignite evaluator (MONAI's optional pytorch-ignite is not needed)
        "predict": "$lambda d: dict(d, pred=@inferer(d[@image_key][None].to(@device), @network)[0])",
        "initialize": ["$torch.set_grad_enabled(False)"],
        "run": ["$[@postprocessing(@predict(d)) for d in @dataset]"]})
    return cfg
