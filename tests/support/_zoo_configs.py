"""The model-zoo bundles of tests/models/test_model_zoo_configs.py: their configs as shipped (only what a CPU needs
shrunk),
metadata, and the writers of a bundle and of a tiny dataset named by its channel_def."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
import yaml
from monai.bundle import ConfigParser

from conftest import write_nifti

_DEVICE = "$torch.device('cuda:0' if torch.cuda.is_available() else 'cpu')"


def _evaluation(extra_evaluator: dict | None = None, *, handlers: list | None = None) -> dict:
    """The dataset / dataloader / evaluator / checkpoint part that these inference.json files share (as shipped)."""
    return {
        "dataset": {"_target_": "Dataset", "data": "$[{'image': i} for i in @datalist]", "transform": "@preprocessing"},
        "dataloader": {"_target_": "DataLoader", "dataset": "@dataset", "batch_size": 1, "shuffle": False,
                       "num_workers": 4},
        "handlers": handlers or [{"_target_": "StatsHandler", "iteration_log": False}],
        "evaluator": {"_target_": "SupervisedEvaluator", "device": "@device", "val_data_loader": "@dataloader",
                      "network": "@network", "inferer": "@inferer", "postprocessing": "@postprocessing",
                      "val_handlers": "@handlers", **(extra_evaluator or {"amp": True})},
    }


def _save(output_dir: str = "@output_dir", **more: object) -> dict:
    return {"_target_": "SaveImaged", "keys": "pred", "output_dir": output_dir, **more}


_CHECKPOINT = {"_target_": "CheckpointLoader", "load_path": "$@bundle_root + '/models/model.pt'",
               "load_dict": {"model": "@network"}}
_SAVE_OUTPUT = {"output_ext": "@output_ext", "output_dtype": "@output_dtype", "output_postfix": "@output_postfix",
                "separate_folder": "@separate_folder"}
_OUTPUT_KEYS = {"output_ext": ".nii.gz", "output_dtype": "$numpy.float32", "output_postfix": "trans",
                "separate_folder": True, "load_pretrain": True}


def _invert(orig_keys: str, nearest: bool, **more: object) -> dict:
    return {"_target_": "Invertd", "keys": "pred", "transform": "@preprocessing", "orig_keys": orig_keys,
            "nearest_interp": nearest, "to_tensor": True, **more}


_SOFTMAX = {"_target_": "Activationsd", "keys": "pred", "softmax": True}
_ARGMAX = {"_target_": "AsDiscreted", "keys": "pred", "argmax": True}


def _ct_preprocessing(key: str, pixdim: object, a_min: float, a_max: float, reader: str | None = None) -> dict:
    load = {"_target_": "LoadImaged", "keys": key, **({"reader": reader} if reader else {})}
    return {"_target_": "Compose", "transforms": [
        load, {"_target_": "EnsureChannelFirstd", "keys": key},
        {"_target_": "Orientationd", "keys": key, "axcodes": "RAS"},
        {"_target_": "Spacingd", "keys": key, "pixdim": pixdim, "mode": "bilinear"},
        {"_target_": "ScaleIntensityRanged", "keys": key, "a_min": a_min, "a_max": a_max, "b_min": 0.0, "b_max": 1.0,
         "clip": True},
        {"_target_": "EnsureTyped", "keys": key}]}


# spleen_ct_segmentation 0.5.9 configs/inference.json: channels [16, 32, 64, 128, 256] -> [4, 8, 8, 8, 8],
# roi 96^3 -> 32^3
SPLEEN = {
    "imports": ["$import glob", "$import numpy", "$import os"],
    "bundle_root": ".", "image_key": "image", "output_dir": "$@bundle_root + '/eval'", **_OUTPUT_KEYS,
    "dataset_dir": "/workspace/data/Task09_Spleen",
    "datalist": "$list(sorted(glob.glob(@dataset_dir + '/imagesTs/*.nii.gz')))",
    "device": _DEVICE,
    "network_def": {"_target_": "UNet", "spatial_dims": 3, "in_channels": 1, "out_channels": 2,
                    "channels": [4, 8, 8, 8, 8], "strides": [2, 2, 2, 2], "num_res_units": 2, "norm": "batch"},
    "network": "$@network_def.to(@device)",
    "preprocessing": _ct_preprocessing("@image_key", [1.5, 1.5, 2.0], -57, 164),
    "inferer": {"_target_": "SlidingWindowInferer", "roi_size": [32, 32, 32], "sw_batch_size": 4, "overlap": 0.5},
    "postprocessing": {"_target_": "Compose", "transforms": [
        _SOFTMAX, _invert("@image_key", False), _ARGMAX, _save(**_SAVE_OUTPUT)]},
    **_evaluation(),
    "checkpointloader": _CHECKPOINT,
    "initialize": ["$monai.utils.set_determinism(seed=123)",
                   "$@checkpointloader(@evaluator) if @load_pretrain else None"],
    "run": ["$@evaluator.run()"],
}

# swin_unetr_btcv_segmentation 0.5.6 configs/inference.json: feature_size 48 -> 12, roi 96^3 -> 64^3
# (the smallest window it takes: at 32^3 its bottleneck is one voxel, which InstanceNorm refuses when training)
SWIN = {
    "imports": ["$import glob", "$import numpy", "$import os"],
    "bundle_root": ".", "checkpoint": "$@bundle_root + '/models/model.pt'", "image_key": "image",
    "output_dir": "$@bundle_root + '/eval'", **_OUTPUT_KEYS,
    "dataset_dir": "/workspace/data/RawData/",
    "datalist": "$list(sorted(glob.glob(@dataset_dir + '/imagesTs/*.nii.gz')))",
    "device": _DEVICE,
    "network_def": {"_target_": "SwinUNETR", "spatial_dims": 3, "img_size": 96, "in_channels": 1, "out_channels": 14,
                    "feature_size": 12, "use_checkpoint": False},
    "network": "$@network_def.to(@device)",
    "preprocessing": _ct_preprocessing("@image_key", [1.5, 1.5, 2.0], -175, 250, reader="ITKReader"),
    "inferer": {"_target_": "SlidingWindowInferer", "roi_size": [64, 64, 64], "sw_batch_size": 4, "overlap": 0.5},
    "postprocessing": {"_target_": "Compose", "transforms": [
        _SOFTMAX, _invert("@image_key", False), _ARGMAX, _save(**_SAVE_OUTPUT)]},
    **_evaluation(),
    "checkpointloader": dict(_CHECKPOINT, load_path="$@checkpoint"),
    "initialize": ["$monai.utils.set_determinism(seed=123)",
                   "$@checkpointloader(@evaluator) if @load_pretrain else None"],
    "run": ["$@evaluator.run()"],
}

# wholeBody_ct_segmentation 0.2.5 configs/inference.json: init_filters 32 -> 8, roi 96^3 -> 32^3
WHOLE_BODY = {
    "displayable_configs": {"highres": True, "sw_overlap": 0.25, "sw_batch_size": 1},
    "imports": ["$import glob", "$import numpy", "$import os"],
    "bundle_root": ".", "image_key": "image", "output_dir": "$@bundle_root + '/eval'", **_OUTPUT_KEYS,
    "dataset_dir": "sampledata",
    "datalist": "$list(sorted(glob.glob(@dataset_dir + '/imagesTs/*.nii.gz')))",
    "device": _DEVICE,
    "pixdim": "$[1.5, 1.5, 1.5] if @displayable_configs#highres else [3.0, 3.0, 3.0]",
    "modelname": "$'model.pt' if @displayable_configs#highres else 'model_lowres.pt'",
    "network_def": {"_target_": "SegResNet", "spatial_dims": 3, "in_channels": 1, "out_channels": 105,
                    "init_filters": 8, "blocks_down": [1, 2, 2, 4], "blocks_up": [1, 1, 1], "dropout_prob": 0.2},
    "network": "$@network_def.to(@device)",
    "preprocessing": {"_target_": "Compose", "transforms": [
        {"_target_": "LoadImaged", "keys": "@image_key"},
        {"_target_": "EnsureTyped", "keys": "@image_key"},
        {"_target_": "EnsureChannelFirstd", "keys": "@image_key"},
        {"_target_": "Orientationd", "keys": "@image_key", "axcodes": "RAS"},
        {"_target_": "Spacingd", "keys": "@image_key", "pixdim": "@pixdim", "mode": "bilinear"},
        {"_target_": "NormalizeIntensityd", "keys": "@image_key", "nonzero": True},
        {"_target_": "ScaleIntensityd", "keys": "@image_key", "minv": -1.0, "maxv": 1.0}]},
    "inferer": {"_target_": "SlidingWindowInferer", "roi_size": [32, 32, 32],
                "sw_batch_size": "@displayable_configs#sw_batch_size", "overlap": "@displayable_configs#sw_overlap",
                "padding_mode": "replicate", "mode": "gaussian", "device": _DEVICE},
    "postprocessing": {"_target_": "Compose", "transforms": [
        _SOFTMAX, _ARGMAX, _invert("@image_key", True), _save(**_SAVE_OUTPUT)]},
    **_evaluation(),
    "checkpointloader": dict(_CHECKPOINT, load_path="$@bundle_root + '/models/' + @modelname"),
    "initialize": ["$setattr(torch.backends.cudnn, 'benchmark', True)",
                   "$@checkpointloader(@evaluator) if @load_pretrain else None"],
    "run": ["$@evaluator.run()"],
}

# renalStructures_UNEST_segmentation 0.2.5 configs/inference.json, as shipped but for the window (96^3 -> 32^3)
RENAL = {
    "imports": ["$import glob", "$import os"],
    "bundle_root": "/models/renalStructures_UNEST_segmentation",
    "output_dir": "$@bundle_root + '/eval'",
    "dataset_dir": "$@bundle_root + './dataset/spleen'",
    "datalist": "$list(sorted(glob.glob(@dataset_dir + '/*.nii.gz')))",
    "device": _DEVICE,
    "network_def": {"_target_": "scripts.networks.unest.UNesT", "in_channels": 1, "out_channels": 4},
    "network": "$@network_def.to(@device)",
    "preprocessing": {"_target_": "Compose", "transforms": [
        {"_target_": "LoadImaged", "keys": "image"},
        {"_target_": "EnsureChannelFirstd", "keys": "image", "channel_dim": "no_channel"},
        {"_target_": "Orientationd", "keys": "image", "axcodes": "RAS"},
        {"_target_": "Spacingd", "keys": "image", "pixdim": [1.0, 1.0, 1.0], "mode": "bilinear"},
        {"_target_": "ScaleIntensityRanged", "keys": "image", "a_min": -175, "a_max": 250, "b_min": 0.0,
         "b_max": 1.0, "clip": True},
        {"_target_": "EnsureTyped", "keys": "image"}]},
    "inferer": {"_target_": "SlidingWindowInferer", "roi_size": [32, 32, 32], "sw_batch_size": 4, "overlap": 0.5},
    "postprocessing": {"_target_": "Compose", "transforms": [
        _SOFTMAX, _invert("image", False), _ARGMAX, _save()]},
    **_evaluation({"amp": False}, handlers=[dict(_CHECKPOINT, strict="True"),
                                            {"_target_": "StatsHandler", "iteration_log": False}]),
    "evaluating": ["$setattr(torch.backends.cudnn, 'benchmark', True)", "$@evaluator.run()"],
}

# a stand-in for the bundle's scripts/networks/unest.py (UNesT(in_channels, out_channels), a hierarchical transformer
# of 1,000 lines): a bundle-local module that only --trust-model-code may import
UNEST_STANDIN = '''
from monai.networks.nets import UNet


class UNesT(UNet):
    def __init__(self, in_channels, out_channels):
        super().__init__(3, in_channels, out_channels, channels=(4, 8, 8), strides=(2, 2), num_res_units=1)
'''

# prostate_mri_anatomy 0.3.4 configs/inference.json: channels [16 .. 512] -> [4, 4, 8, 8, 8, 8], roi 96^3 -> 32^3
PROSTATE = {
    "imports": ["$import pandas as pd", "$import os"],
    "bundle_root": ".", "output_dir": "$@bundle_root + '/eval'",
    "dataset_dir": "/workspace/data/prostate158/prostate158_test/",
    "datalist": "$list(@dataset_dir + pd.read_csv(@dataset_dir + 'test.csv').t2)",
    "device": _DEVICE,
    "network_def": {"_target_": "UNet", "spatial_dims": 3, "in_channels": 1, "out_channels": 3,
                    "channels": [4, 4, 8, 8, 8, 8], "strides": [2, 2, 2, 2, 2], "num_res_units": 4, "norm": "batch",
                    "act": "prelu", "dropout": 0.15},
    "network": "$@network_def.to(@device)",
    "preprocessing": {"_target_": "Compose", "transforms": [
        {"_target_": "LoadImaged", "keys": "image"},
        {"_target_": "EnsureChannelFirstd", "keys": "image"},
        {"_target_": "Orientationd", "keys": "image", "axcodes": "RAS"},
        {"_target_": "Spacingd", "keys": "image", "pixdim": [0.5, 0.5, 0.5], "mode": "bilinear"},
        {"_target_": "ScaleIntensityd", "keys": "image", "minv": 0, "maxv": 1},
        {"_target_": "NormalizeIntensityd", "keys": "image"},
        {"_target_": "EnsureTyped", "keys": "image"}]},
    "inferer": {"_target_": "SlidingWindowInferer", "roi_size": [32, 32, 32], "sw_batch_size": 4, "overlap": 0.5},
    "postprocessing": {"_target_": "Compose", "transforms": [
        _ARGMAX, {"_target_": "KeepLargestConnectedComponentd", "keys": "pred", "applied_labels": [1, 2]},
        _invert("image", False, meta_key_postfix="meta_dict"),
        _save(resample=False, meta_keys="pred_meta_dict")]},
    **_evaluation(handlers=[dict(_CHECKPOINT, map_location={"_target_": "torch.device", "device": "@device"}),
                            {"_target_": "StatsHandler", "iteration_log": False}]),
    "initialize": ["$setattr(torch.backends.cudnn, 'benchmark', True)"],
    "run": ["$@evaluator.run()"],
}

# pancreas_ct_dints_segmentation 0.5.0 configs/inference.yaml (its network part; the rest as the others)
DINTS = {
    "imports": ["$import glob", "$import numpy", "$import os"],
    "input_channels": 1, "output_classes": 3,
    "arch_ckpt_path": "$@bundle_root + '/models/search_code_18590.pt'",
    "arch_ckpt": "$torch.load(@arch_ckpt_path, map_location=torch.device('cuda'))",
    "bundle_root": ".", "image_key": "image", "output_dir": "$@bundle_root + '/eval'", **_OUTPUT_KEYS,
    "dataset_dir": "/workspace/data/msd/Task07_Pancreas",
    "data_list_file_path": "$@bundle_root + '/configs/dataset_0.json'",
    "datalist": "$monai.data.load_decathlon_datalist(@data_list_file_path, data_list_key='testing', "
                "base_dir=@dataset_dir)",
    "device": _DEVICE,
    "dints_space": {"_target_": "monai.networks.nets.TopologyInstance", "channel_mul": 1, "num_blocks": 12,
                    "num_depths": 4, "use_downsample": True,
                    "arch_code": ["$@arch_ckpt['arch_code_a']", "$@arch_ckpt['arch_code_c']"],
                    "device": "$torch.device('cuda')"},
    "network_def": {"_target_": "monai.networks.nets.DiNTS", "dints_space": "@dints_space",
                    "in_channels": "@input_channels", "num_classes": "@output_classes", "use_downsample": True,
                    "node_a": "$torch.from_numpy(@arch_ckpt['node_a'])"},
    "network": "$@network_def.to(@device)",
    "preprocessing": _ct_preprocessing("@image_key", [1, 1, 1], -87, 199),
    "inferer": {"_target_": "SlidingWindowInferer", "roi_size": [96, 96, 96], "sw_batch_size": 4,
                "overlap": 0.625},
    "postprocessing": {"_target_": "Compose", "transforms": [
        _SOFTMAX, _invert("@image_key", False, meta_key_postfix="meta_dict"), _ARGMAX,
        _save(meta_keys="pred_meta_dict", **_SAVE_OUTPUT)]},
    "checkpointloader": _CHECKPOINT,
}


def _metadata(version: str, modality: str, channel_def: dict[str, str], fmt: str = "segmentation") -> dict:
    """configs/metadata.json's network_data_format as the bundle ships it (the rest: version only)."""
    shape = {"num_channels": 1, "spatial_shape": [96, 96, 96], "dtype": "float32", "is_patch_data": True}
    return {"version": version, "network_data_format": {
        "inputs": {"image": {"type": "image", "format": "hounsfield" if modality == "CT" else "magnitude",
                             "modality": modality, "value_range": [0, 1], "channel_def": {"0": "image"}, **shape}},
        "outputs": {"pred": {"type": "image", "format": fmt, "value_range": [0, 1], "channel_def": channel_def,
                             **dict(shape, num_channels=len(channel_def))}}}}


_BTCV = ["background", "spleen", "Right Kidney", "Left Kideny", "Gallbladder", "Esophagus", "Liver", "Stomach",
         "Aorta", "IVC", "Portal and Splenic Veins", "Pancreas", "Right adrenal gland", "Left adrenal gland"]
# wholeBody_ct_segmentation's 105 TotalSegmentator classes: the first 13 by name, the rest as numbered here
_WHOLE_BODY = (["background", "spleen", "kidney_right", "kidney_left", "gallbladder", "liver", "stomach", "aorta",
                "inferior_vena_cava", "portal_vein_and_splenic_vein", "pancreas", "adrenal_gland_right",
                "adrenal_gland_left"] + [f"structure_{i}" for i in range(13, 105)])


def _names(names: list[str]) -> dict[str, str]:
    return {str(i): n for i, n in enumerate(names)}


# name: (config, metadata, config file name, voxel spacing of the test volumes (mm), the two organs they hold)
BUNDLES = {
    "spleen_ct_segmentation": (SPLEEN, _metadata("0.5.9", "CT", _names(["background", "spleen"])), "inference.json",
                               (2.0, 2.0, 3.0), ["spleen"]),
    "swin_unetr_btcv_segmentation": (SWIN, _metadata("0.5.6", "CT", _names(_BTCV)), "inference.json",
                                     (2.0, 2.0, 3.0), ["spleen", "Liver"]),
    "wholeBody_ct_segmentation": (WHOLE_BODY, _metadata("0.2.5", "CT", _names(_WHOLE_BODY)), "inference.json",
                                  (2.0, 2.0, 2.5), ["spleen", "liver"]),
    "renalStructures_UNEST_segmentation": (RENAL, _metadata("0.2.5", "CT", _names(
        ["background", "kidney cortex", "medulla", "pelvicalyceal system"])), "inference.json", (1.5, 1.5, 2.0),
        ["kidney cortex", "medulla"]),
    "prostate_mri_anatomy": (PROSTATE, _metadata("0.3.4", "MR", _names(
        ["background", "central gland", "peripheral zone"]), fmt="labels"), "inference.json", (0.8, 0.8, 1.2),
        ["central gland", "peripheral zone"]),
    "pancreas_ct_dints_segmentation": (DINTS, _metadata("0.5.0", "CT", _names(
        ["background", "pancreas", "pancreatic tumor"])), "inference.yaml", (2.0, 2.0, 3.0),
        ["pancreas", "pancreatic tumor"]),
}


def _write_bundle(root: Path, name: str) -> Path:
    """The bundle folder, its network built by MONAI's own parser (as `monai.bundle run` builds it) with random
    weights; renalStructures_UNEST_segmentation with its scripts/ package."""
    cfg, meta, cfg_name, _, _ = BUNDLES[name]
    bundle = root / name
    (bundle / "configs").mkdir(parents=True)
    (bundle / "models").mkdir()
    text = yaml.safe_dump(cfg, sort_keys=False) if cfg_name.endswith(".yaml") else json.dumps(cfg, indent=4)
    (bundle / "configs" / cfg_name).write_text(text)
    (bundle / "configs" / "metadata.json").write_text(json.dumps(meta, indent=4))
    torch.manual_seed(0)
    if name == "pancreas_ct_dints_segmentation":  # the searched architecture ships beside the weights
        torch.save({"arch_code_a": np.ones((12, 10)), "arch_code_c": np.zeros(12), "node_a": np.ones((13, 4))},
                   bundle / "models" / "search_code_18590.pt")
        torch.save({"weights": torch.zeros(1)}, bundle / "models" / "model.pt")
        return bundle
    if name == "renalStructures_UNEST_segmentation":
        (bundle / "scripts" / "networks").mkdir(parents=True)
        for init in (bundle / "scripts" / "__init__.py", bundle / "scripts" / "networks" / "__init__.py"):
            init.write_text("")
        (bundle / "scripts" / "networks" / "unest.py").write_text(UNEST_STANDIN)
        ns: dict = {}
        exec(UNEST_STANDIN, ns)  # noqa: S102 - the test's own stand-in
        network = ns["UNesT"](in_channels=1, out_channels=4)
    else:  # img_size: an argument of SwinUNETR that MONAI 1.3 deprecated (unused) and 1.5 removed
        net = {k: v for k, v in cfg["network_def"].items() if k != "img_size"}
        network = ConfigParser(dict(cfg, network_def=net)).get_parsed_content("network_def")
    torch.save(network.state_dict(), bundle / "models" / "model.pt")
    return bundle


def _write_dataset(root: Path, spacing: tuple[float, float, float], organs: list[str], n: int = 3) -> Path:
    """n volumes (nnU-Net raw layout) on ``spacing``, holding ``organs`` (named as the bundle names them) as
    labels 1, 2, with CT-like intensities (HU)."""
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    shape = (20, 18, 12)
    affine = np.diag([*spacing, 1.0])
    for i in range(n):
        rng = np.random.default_rng(i)
        label = np.zeros(shape, np.uint8)
        label[3:9, 4:10, 3:8] = 1
        if len(organs) > 1:
            label[12:17, 8:14, 4:9] = 2
        image = (rng.normal(-80, 20, shape) + label * 120.0).astype(np.float32)
        write_nifti(root / "imagesTr" / f"case{i:02d}_0000.nii.gz", image, affine)
        write_nifti(root / "labelsTr" / f"case{i:02d}.nii.gz", label, affine)
    labels = {"background": 0, **{o: k + 1 for k, o in enumerate(organs)}}
    (root / "dataset.json").write_text(json.dumps({"channel_names": {"0": "CT"}, "labels": labels, "numTraining": n,
                                                   "file_ending": ".nii.gz"}))
    return root
