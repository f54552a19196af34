"""Pretrains the shipped phantom model: a small MONAI UNet on the *source* (CT-like) phantom domain.

Writes a MONAI bundle to src/asfda/assets/phantom_unet (configs/inference.json, configs/metadata.json,
models/model.safetensors, models/model.pt, docs/README.md with the measured Dice).

    .venv/bin/python scripts/train_phantom_model.py [--steps 600] [--out src/asfda/assets/phantom_unet]
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from datetime import date
from pathlib import Path

import numpy as np
import torch

from asfda.io import load_dataset
from asfda.io.atomic import atomic_write_json, atomic_write_text
from asfda.loop import Adapter, mean_of
from asfda.models import load_model, save_bundle
from asfda.phantom import LABELS, generate_benchmark
from asfda.training import TrainConfig

NAMES = [n for n, _ in sorted(LABELS.items(), key=lambda kv: kv[1])]
ROI = [64, 64, 48]

INFERENCE = {
    "imports": ["$import glob", "$import numpy", "$import os"],
    "bundle_root": ".",
    "image_key": "image",
    "output_dir": "$@bundle_root + '/eval'",
    "dataset_dir": "/workspace/data/phantom",
    "datalist": "$list(sorted(glob.glob(@dataset_dir + '/imagesTs/*.nii.gz')))",
    "device": "$torch.device('cuda:0' if torch.cuda.is_available() else 'cpu')",
    "network_def": {"_target_": "UNet", "spatial_dims": 3, "in_channels": 1, "out_channels": len(NAMES),
                    "channels": [16, 32, 64, 128], "strides": [2, 2, 2], "num_res_units": 1,
                    "norm": "instance", "dropout": 0.1},
    "network": "$@network_def.to(@device)",
    "preprocessing": {"_target_": "Compose", "transforms": [
        {"_target_": "LoadImaged", "keys": "@image_key"},
        {"_target_": "EnsureChannelFirstd", "keys": "@image_key"},
        {"_target_": "Orientationd", "keys": "@image_key", "axcodes": "RAS"},
        {"_target_": "Spacingd", "keys": "@image_key", "pixdim": [5.0, 5.0, 5.0], "mode": "bilinear"},
        {"_target_": "ScaleIntensityRangePercentilesd", "keys": "@image_key", "lower": 0.5, "upper": 99.5,
         "b_min": 0.0, "b_max": 1.0, "clip": True},
        {"_target_": "EnsureTyped", "keys": "@image_key"}]},
    "dataset": {"_target_": "Dataset", "data": "$[{'image': i} for i in @datalist]", "transform": "@preprocessing"},
    "dataloader": {"_target_": "DataLoader", "dataset": "@dataset", "batch_size": 1, "shuffle": False,
                   "num_workers": 0},
    "inferer": {"_target_": "SlidingWindowInferer", "roi_size": ROI, "sw_batch_size": 1, "overlap": 0.25},
    "postprocessing": {"_target_": "Compose", "transforms": [
        {"_target_": "Activationsd", "keys": "pred", "softmax": True},
        {"_target_": "Invertd", "keys": "pred", "transform": "@preprocessing", "orig_keys": "@image_key",
         "nearest_interp": False, "to_tensor": True},
        {"_target_": "AsDiscreted", "keys": "pred", "argmax": True},
        {"_target_": "SaveImaged", "keys": "pred", "output_dir": "@output_dir", "output_ext": ".nii.gz",
         "output_dtype": "$numpy.uint8", "output_postfix": "seg", "separate_folder": False}]},
    "evaluator": {"_target_": "SupervisedEvaluator", "device": "@device", "val_data_loader": "@dataloader",
                  "network": "@network", "inferer": "@inferer", "postprocessing": "@postprocessing"},
    "checkpointloader": {"_target_": "CheckpointLoader", "load_path": "$@bundle_root + '/models/model.pt'",
                         "load_dict": {"model": "@network"}, "map_location": "@device"},
    "initialize": ["$monai.utils.set_determinism(seed=0)", "$@checkpointloader(@evaluator)"],
    "run": ["$@evaluator.run()"],
}


def metadata(extra: dict) -> dict:
    return {
        "version": "0.1.0", "name": "asfda phantom UNet (source domain, CT-like)",
        "task": "Segmentation of liver, kidneys and spleen in the asfda phantom benchmark",
        "description": "Small 3D UNet pretrained on the CT-like source domain of asfda's phantom benchmark; "
                       "the demo's stand-in for a pretrained medical vision foundation model.",
        "network_data_format": {
            "inputs": {"image": {"type": "image", "modality": "CT", "num_channels": 1, "spatial_shape": ROI,
                                 "channel_def": {"0": "image"}}},
            "outputs": {"pred": {"type": "image", "format": "segmentation", "num_channels": len(NAMES),
                                 "spatial_shape": ROI, "channel_def": {str(i): n for i, n in enumerate(NAMES)}}}},
        "training": extra, "license": "Apache-2.0 (synthetic data)",
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", default="src/asfda/assets/phantom_unet")
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--seed", type=int, default=1234, help="phantom seed (independent of the demo's)")
    args = ap.parse_args()
    torch.manual_seed(0)
    out = Path(args.out)
    with tempfile.TemporaryDirectory() as tmp:
        paths = generate_benchmark(Path(tmp) / "phantom", seed=args.seed, n_source=64, n_target=16)
        # an untrained bundle first, so that training goes through the same loader users get
        atomic_write_json(out / "configs" / "inference.json", INFERENCE)
        atomic_write_json(out / "configs" / "metadata.json", metadata({}))
        from monai.bundle import ConfigParser
        net = ConfigParser(INFERENCE).get_parsed_content("network_def")
        (out / "models").mkdir(parents=True, exist_ok=True)
        for old in (out / "models").iterdir():
            old.unlink()
        torch.save(net.state_dict(), out / "models" / "model.pt")
        model = load_model(out)
        src = load_dataset(paths["source"], require_labels=True)
        tgt = load_dataset(paths["target"], require_labels=True)
        train_cases, val_cases = list(src.cases[:56]), list(src.cases[56:])
        adapter = Adapter(model, src.class_names, cache_dir=str(Path(tmp) / "cache"))
        t0 = time.perf_counter()
        cfg = TrainConfig(steps=args.steps, batch_size=2, lr=3e-3, seed=0, fg_oversample=0.5)
        adapter.finetune(train_cases, cfg, desc="pretrain (source)")
        seconds = time.perf_counter() - t0
        src_rows = adapter.evaluate(val_cases)
        tgt_rows = adapter.evaluate(list(tgt.cases))
        model.network.load_state_dict(adapter.current.network.state_dict())
        figures = {
            "steps": args.steps, "phantom_seed": args.seed, "train_cases": len(train_cases),
            "source_val_dice": {k: round(mean_of(src_rows, k), 4) for k in src_rows[0] if k.startswith("dice_")},
            "target_dice_zero_shot": {k: round(mean_of(tgt_rows, k), 4) for k in tgt_rows[0] if k.startswith("dice_")},
            "train_seconds": round(seconds, 1), "machine": f"{platform.machine()}, {torch.get_num_threads()} threads",
            "date": date.today().isoformat(),
            "command": "python scripts/train_phantom_model.py " + f"--steps {args.steps} --seed {args.seed}",
        }
        model.metadata = metadata(figures)
        save_bundle(model, out)
        (out / "models" / "model.pt").unlink()  # safetensors only: smaller package, no pickle at all
        readme = ["# asfda phantom UNet", "", metadata({})["description"], "",
                  "Measured when trained (source validation = 8 held-out source phantoms; target = 16 target-domain "
                  "phantoms, zero-shot):", "", "```json", json.dumps(figures, indent=2), "```", ""]
        atomic_write_text(out / "docs" / "README.md", "\n".join(readme))
    print(json.dumps(figures, indent=2))


if __name__ == "__main__":
    np.seterr(all="ignore")
    main()
