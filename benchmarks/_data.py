"""Tiny synthetic inputs written to a folder: a NIfTI file and a MONAI bundle of an untrained small UNet.

The tests' fixtures (tests/conftest.py) and the load benchmark (load_1000.py) write theirs with these."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import torch

TINY_NET = {"_target_": "UNet", "spatial_dims": 3, "in_channels": 1, "out_channels": 3, "channels": [4, 8, 16],
            "strides": [2, 2], "num_res_units": 0, "norm": "instance", "dropout": 0.1}


def write_nifti(path: Path, data: np.ndarray, affine: np.ndarray | None = None) -> Path:
    """``data`` as a NIfTI file at ``path`` (its folders made), on ``affine`` (default: the identity)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(data, np.eye(4) if affine is None else affine), str(path))
    return path


def write_bundle(root: Path, class_names=("background", "liver", "spleen"), pixdim=(2.0, 2.0, 3.0),
                 net: dict | None = None, weights: str = "model.pt", seed: int = 0) -> Path:
    """A MONAI bundle at ``root`` of an untrained ``net`` (default `TINY_NET`) with one output channel per class,
    its weights drawn with torch seed ``seed`` and saved as ``models/WEIGHTS`` (.pt or .safetensors)."""
    from monai.bundle import ConfigParser

    net = dict(net or TINY_NET, out_channels=len(class_names))
    cfg = {
        "image_key": "image",
        "network_def": net,
        "preprocessing": {"_target_": "Compose", "transforms": [
            {"_target_": "LoadImaged", "keys": "@image_key"},
            {"_target_": "EnsureChannelFirstd", "keys": "@image_key"},
            {"_target_": "Orientationd", "keys": "@image_key", "axcodes": "RAS"},
            {"_target_": "Spacingd", "keys": "@image_key", "pixdim": list(pixdim), "mode": "bilinear"},
            {"_target_": "ScaleIntensityRangePercentilesd", "keys": "@image_key", "lower": 0.5, "upper": 99.5,
             "b_min": 0.0, "b_max": 1.0, "clip": True},
        ]},
        "inferer": {"_target_": "SlidingWindowInferer", "roi_size": [16, 16, 8], "sw_batch_size": 2, "overlap": 0.25},
    }
    channel_def = {str(i): n for i, n in enumerate(class_names)}
    pred = {"type": "image", "format": "segmentation", "num_channels": len(class_names), "channel_def": channel_def}
    meta = {"network_data_format": {"outputs": {"pred": pred}}}
    (root / "configs").mkdir(parents=True, exist_ok=True)
    (root / "models").mkdir(parents=True, exist_ok=True)
    (root / "configs" / "inference.json").write_text(json.dumps(cfg))
    (root / "configs" / "metadata.json").write_text(json.dumps(meta))
    torch.manual_seed(seed)
    network = ConfigParser(cfg).get_parsed_content("network_def")
    if weights.endswith(".safetensors"):
        from safetensors.torch import save_file

        save_file(network.state_dict(), str(root / "models" / weights))
    else:
        torch.save(network.state_dict(), root / "models" / weights)
    return root
