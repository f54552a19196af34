"""Bundles built from the configs of real MONAI model-zoo bundles (random weights, fewer filters, a 32^3 window), the
dataset they run on, and the helpers that run every command on them (test_real_models.py,
test_real_models_torchscript.py)."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import pytest
import torch

from asfda.cli import main
from conftest import write_nnunet

# spleen_ct_segmentation/configs/inference.json (model zoo), with fewer filters and a 32^3 window
SPLEEN_INFERENCE = {
    "imports": ["$import glob", "$import os"],
    "bundle_root": ".",
    "output_dir": "$@bundle_root + '/eval'",
    "output_ext": ".nii.gz",
    "output_dtype": "$numpy.float32",
    "dataset_dir": "/workspace/data/Task09_Spleen",
    "datalist": "$list(sorted(glob.glob(@dataset_dir + '/imagesTs/*.nii.gz')))",
    "device": "$torch.device('cuda:0' if torch.cuda.is_available() else 'cpu')",
    "network_def": {"_target_": "UNet", "spatial_dims": 3, "in_channels": 1, "out_channels": 3,
                    "channels": [4, 8, 8, 8, 8], "strides": [2, 2, 2, 2], "num_res_units": 2, "norm": "batch"},
    "network": "$@network_def.to(@device)",
    "preprocessing": {"_target_": "Compose", "transforms": [
        {"_target_": "LoadImaged", "keys": "image"},
        {"_target_": "EnsureChannelFirstd", "keys": "image"},
        {"_target_": "Orientationd", "keys": "image", "axcodes": "RAS"},
        {"_target_": "Spacingd", "keys": "image", "pixdim": [2.0, 2.0, 3.0], "mode": "bilinear"},
        {"_target_": "ScaleIntensityRanged", "keys": "image", "a_min": -0.2, "a_max": 0.6, "b_min": 0, "b_max": 1,
         "clip": True},
        {"_target_": "EnsureTyped", "keys": "image"}]},
    "dataset": {"_target_": "Dataset", "data": "$[{'image': i} for i in @datalist]", "transform": "@preprocessing"},
    "inferer": {"_target_": "SlidingWindowInferer", "roi_size": [32, 32, 32], "sw_batch_size": 4, "overlap": 0.5},
    "postprocessing": {"_target_": "Compose", "transforms": [
        {"_target_": "Activationsd", "keys": "pred", "softmax": True},
        {"_target_": "Invertd", "keys": "pred", "transform": "@preprocessing", "orig_keys": "image",
         "nearest_interp": False, "to_tensor": True},
        {"_target_": "AsDiscreted", "keys": "pred", "argmax": True},
        {"_target_": "SaveImaged", "keys": "pred", "output_dir": "@output_dir", "output_ext": "@output_ext",
         "output_dtype": "@output_dtype"}]},
    "evaluator": {"_target_": "SupervisedEvaluator", "device": "@device", "network": "@network",
                  "inferer": "@inferer", "postprocessing": "@postprocessing"},
    "checkpointloader": {"_target_": "CheckpointLoader", "load_path": "$@bundle_root + '/models/model.pt'",
                         "load_dict": {"model": "@network"}},
    "initialize": ["$monai.utils.set_determinism(seed=123)", "$@checkpointloader(@evaluator)"],
    "run": ["$@evaluator.run()"],
}

# brats_mri_segmentation/configs/inference.json (model zoo), with 8 initial filters and a 16^3 window
BRATS_INFERENCE = {
    "imports": ["$import glob", "$import os"],
    "bundle_root": ".",
    "ckpt_dir": "$@bundle_root + '/models'",
    "device": "$torch.device('cuda:0' if torch.cuda.is_available() else 'cpu')",
    "amp": True,
    "network_def": {"_target_": "SegResNet", "blocks_down": [1, 2, 2, 4], "blocks_up": [1, 1, 1], "init_filters": 8,
                    "in_channels": 4, "out_channels": 3, "dropout_prob": 0.2},
    "network": "$@network_def.to(@device)",
    "preprocessing": {"_target_": "Compose", "transforms": [
        {"_target_": "LoadImaged", "keys": "image"},
        {"_target_": "NormalizeIntensityd", "keys": "image", "nonzero": True, "channel_wise": True}]},
    "inferer": {"_target_": "SlidingWindowInferer", "roi_size": [16, 16, 16], "sw_batch_size": 1, "overlap": 0.5},
    "postprocessing": {"_target_": "Compose", "transforms": [
        {"_target_": "Activationsd", "keys": "pred", "sigmoid": True},
        {"_target_": "Invertd", "keys": "pred", "transform": "@preprocessing", "orig_keys": "image",
         "meta_keys": "pred_meta_dict", "nearest_interp": False, "to_tensor": True},
        {"_target_": "AsDiscreted", "keys": "pred", "threshold": 0.5},
        {"_target_": "Lambdad", "keys": "pred", "func": "$lambda x: torch.where(x[[2]] > 0, 4, torch.where(x[[0]] > 0, "
                                                            "1, torch.where(x[[1]] > 0, 2, 0)))"}]},
    "evaluating": ["$setattr(torch.backends.cudnn, 'benchmark', True)", "$@evaluator.run()"],
}


def _metadata(channel_def: dict[str, str], in_channels: int = 1) -> dict:
    return {"version": "0.3.0", "network_data_format": {
        "inputs": {"image": {"type": "image", "format": "magnitude", "num_channels": in_channels}},
        "outputs": {"pred": {"type": "image", "format": "segmentation", "num_channels": len(channel_def),
                             "channel_def": channel_def}}}}


def _write_bundle(root: Path, inference: dict, metadata: dict, *, batchnorm_stats: bool = False,
                  seed: int = 0) -> Path:
    """A bundle folder from ``inference`` (network built by MONAI's parser, as the bundle's own code would) with
    random weights; ``batchnorm_stats``: running statistics moved away from their initial values."""
    from monai.bundle import ConfigParser

    (root / "configs").mkdir(parents=True)
    (root / "models").mkdir()
    (root / "configs" / "inference.json").write_text(json.dumps(inference, indent=1))
    (root / "configs" / "metadata.json").write_text(json.dumps(metadata, indent=1))
    torch.manual_seed(seed)
    network = ConfigParser(inference).get_parsed_content("network_def")
    if batchnorm_stats:  # as a trained model has them: not the (0, 1) they start at
        network.train()
        with torch.no_grad():
            for _ in range(3):
                network(torch.randn(2, network_in_channels(inference), 32, 32, 32) * 0.3 + 0.2)
    torch.save(network.state_dict(), root / "models" / "model.pt")
    return root


def network_in_channels(inference: dict) -> int:
    return int(inference["network_def"]["in_channels"])


def build_zoo(root: Path) -> dict[str, Path]:
    """The dataset (nnU-Net raw and as a plain folder) and the bundles, under ``root`` (each test module's ``zoo``
    fixture builds them once for the module)."""
    data = write_nnunet(root / "data", n=3)
    plain = root / "plain"
    plain.mkdir()
    for f in (data / "imagesTr").iterdir():
        shutil.copy(f, plain / f.name.replace("_0000", ""))
    names = {"0": "background", "1": "liver", "2": "spleen"}
    spleen = _write_bundle(root / "spleen_ct_segmentation", SPLEEN_INFERENCE, _metadata(names), batchnorm_stats=True)
    brats = _write_bundle(root / "brats_mri_segmentation", BRATS_INFERENCE,
                          _metadata({"0": "Tumor core", "1": "Whole tumor", "2": "Enhancing tumor"}, 4))
    one = json.loads(json.dumps(BRATS_INFERENCE))
    one["network_def"].update(in_channels=1, out_channels=2)
    sigmoid = _write_bundle(root / "segresnet_sigmoid", one, _metadata({"0": "liver", "1": "spleen"}))
    return {"data": data, "plain": plain, "spleen": spleen, "brats": brats, "sigmoid": sigmoid, "root": root}


def _run(*args: object) -> int:
    return main([str(a) for a in args] + ["--no-progress"])


def _one_line_error(capsys: pytest.CaptureFixture) -> str:
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip() and "WARNING" not in ln]
    assert len(lines) == 1 and lines[0].startswith("asfda: error:") and "Traceback" not in err, err
    return lines[0]


def _annotate_project(project: Path, data: Path, labels: Path) -> None:
    """Copies the reference labels of the pending query, as an annotator would save them."""
    state = json.loads((project / "project.json").read_text())
    labels.mkdir(parents=True, exist_ok=True)
    for cid in state["query"]["ids"]:
        shutil.copy(data / "labelsTr" / f"{cid}.nii.gz", labels / f"{cid}.nii.gz")


def _every_command(model: Path, zoo: dict[str, Path], out: Path) -> dict:
    """predict, score (nnU-Net and plain folder), query, evaluate, init/next/ingest/finetune, simulate: all exit 0."""
    data = zoo["data"]
    assert _run("predict", "--model", model, "--images", data, "--out", out / "pred") == 0
    assert _run("score", "--model", model, "--data", data, "--out", out / "score.csv", "--strategies",
                "asfda,random") == 0
    assert _run("score", "--model", model, "--data", zoo["plain"], "--out", out / "plain.csv", "--strategies",
                "asfda") == 0
    assert _run("query", "--model", model, "--data", data, "--budget", 1, "--out", out / "q.json") == 0
    assert _run("query", "--model", model, "--data", zoo["plain"], "--budget", 1, "--out", out / "qp.json") == 0
    assert _run("evaluate", "--model", model, "--data", data, "--out", out / "eval") == 0
    project = out / "project"
    assert _run("init", project, "--model", model, "--pool", data, "--budget", 1, "--steps", 2, "--device",
                "cpu") == 0
    assert _run("next", project) == 0
    _annotate_project(project, data, out / "labels")
    assert _run("ingest", out / "labels", project) == 0
    assert _run("finetune", project) == 0
    assert (project / "model" / "configs" / "metadata.json").is_file()
    assert _run("simulate", "--model", model, "--pool", data, "--budget", 1, "--rounds", 1, "--steps", 2,
                "--strategies", "asfda", "--no-upper-bound", "--out", out / "sim", "--device", "cpu") == 0
    with open(out / "score.csv") as f:
        rows = list(csv.DictReader(f))
    return {"score_rows": rows, "score_json": json.loads((out / "score.json").read_text()),
            "query": json.loads((out / "q.json").read_text()), "plain_query": json.loads((out / "qp.json").read_text())}


def _variant(zoo: dict[str, Path], tmp_path: Path, edit) -> Path:
    bundle = tmp_path / "variant"
    shutil.copytree(zoo["spleen"], bundle)
    cfg_path = bundle / "configs" / "inference.json"
    cfg = json.loads(cfg_path.read_text())
    edit(cfg)
    cfg_path.write_text(json.dumps(cfg))
    return bundle
