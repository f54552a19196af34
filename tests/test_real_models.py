"""Models as the MONAI model zoo ships them: every command runs on them, or refuses in one line.

The bundles are built here from the configs of real model-zoo bundles (Project-MONAI/model-zoo), with random
weights, fewer filters and a smaller window so that they run in seconds on tiny volumes:

* ``spleen_ct_segmentation``: a UNet with ``norm: batch`` (BatchNorm running statistics, 0-d counters), 4 stride-2
  levels, the bundle's own preprocessing, and the rest of its inference.json ($ expressions, SaveImaged ...).
* ``brats_mri_segmentation``: a SegResNet (GroupNorm) with 4 input channels and a sigmoid head (3 overlapping tumour
  regions, declared by the ``Activationsd(sigmoid=True)`` of its postprocessing).
* the same SegResNet on one input channel: GroupNorm + a sigmoid head that asfda adapts.
* a TorchScript model saved as ``models/model.pt`` whose graph ends in a softmax (``output_activation: none``).
"""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from asfda.cli import main
from asfda.errors import AsfdaError
from asfda.models import load_model
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


@pytest.fixture(scope="module")
def zoo(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The dataset (nnU-Net raw and as a plain folder) and the bundles, built once for the module."""
    root = tmp_path_factory.mktemp("zoo")
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


@pytest.fixture(autouse=True)
def _in_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """score, query and simulate cache under ./.cache: each test in its own folder."""
    monkeypatch.chdir(tmp_path)


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


def test_batchnorm_unet_of_spleen_ct_runs_every_command_with_the_batchnorm_gap(zoo: dict[str, Path],
                                                                              tmp_path: Path) -> None:
    """spleen_ct_segmentation's UNet (norm: batch): every command runs; its first asfda query uses METHOD.md's
    BatchNorm-statistics gap (bn_kl: the volume's channel statistics against the stored running statistics)."""
    model = load_model(zoo["spleen"])
    assert any(isinstance(m, torch.nn.BatchNorm3d) for m in model.network.modules())
    assert len(model.weights_hash) == 16 and model.activation == "softmax"
    out = _every_command(zoo["spleen"], zoo, tmp_path)
    gaps = [float(r["bn_kl"]) for r in out["score_rows"]]
    assert len(gaps) == 3 and all(np.isfinite(g) and g > 0 for g in gaps)
    assert len(set(gaps)) == 3  # a per-volume number
    assert out["score_json"]["scoring"]["divergence_available"] == "bn_kl"
    assert out["score_json"]["scoring"]["batchnorm_layers"] > 0
    picked = out["query"]["ids"][0]
    assert "bn_kl" in out["query"]["components"][picked]
    assert out["plain_query"]["class_map"] == {"background": "background", "liver": "liver", "spleen": "spleen"}


def test_groupnorm_sigmoid_segresnet_runs_every_command(zoo: dict[str, Path], tmp_path: Path) -> None:
    """brats_mri_segmentation's SegResNet on one input channel: GroupNorm, and a sigmoid head (declared by its
    postprocessing's Activationsd) without a background channel, adapted as [background, liver, spleen]."""
    model = load_model(zoo["sigmoid"])
    assert model.activation == "sigmoid" and model.label_names == ["background", "liver", "spleen"]
    assert any(isinstance(m, torch.nn.GroupNorm) for m in model.network.modules())
    out = _every_command(zoo["sigmoid"], zoo, tmp_path)
    assert out["score_json"]["class_map"] == {"background": "background", "liver": "liver", "spleen": "spleen"}
    assert "norm_kl" in out["score_rows"][0]  # asfda's pool-referenced gap for GroupNorm networks
    labels = json.loads((tmp_path / "pred" / "labels.json").read_text())
    assert labels == {"background": 0, "liver": 1, "spleen": 2}


@pytest.mark.parametrize("command", ["predict", "score", "query", "evaluate", "init", "simulate"])
def test_four_channel_brats_model_is_refused_in_one_line(zoo: dict[str, Path], tmp_path: Path, command: str,
                                                         capsys: pytest.CaptureFixture) -> None:
    """brats_mri_segmentation as shipped (4 MR sequences in, 3 sigmoid regions out) on single-channel data: every
    command refuses it before inference, with both numbers."""
    model, data, out = zoo["brats"], zoo["data"], tmp_path / "out"
    loaded = load_model(model)
    assert loaded.in_channels == 4 and loaded.activation == "sigmoid"
    argv = {"predict": ["predict", "--model", model, "--images", data, "--out", out],
            "score": ["score", "--model", model, "--data", data, "--out", out / "s.csv"],
            "query": ["query", "--model", model, "--data", data, "--budget", 1, "--out", out / "q.json"],
            "evaluate": ["evaluate", "--model", model, "--data", data, "--out", out],
            "init": ["init", out, "--model", model, "--pool", data],
            "simulate": ["simulate", "--model", model, "--pool", data, "--budget", 1, "--rounds", 1, "--out", out]
            }[command]
    assert _run(*argv) == 2
    assert "the model expects 4 input channels, the dataset has 1" in _one_line_error(capsys)
    assert not out.exists()


# ---------------------------------------------------------------------------------------------- roi, channels
def _variant(zoo: dict[str, Path], tmp_path: Path, edit) -> Path:
    bundle = tmp_path / "variant"
    shutil.copytree(zoo["spleen"], bundle)
    cfg_path = bundle / "configs" / "inference.json"
    cfg = json.loads(cfg_path.read_text())
    edit(cfg)
    cfg_path.write_text(json.dumps(cfg))
    return bundle


@pytest.mark.parametrize("command", ["predict", "score", "init"])
def test_a_roi_the_network_cannot_take_is_refused_with_a_size_it_takes(zoo: dict[str, Path], tmp_path: Path,
                                                                      command: str,
                                                                      capsys: pytest.CaptureFixture) -> None:
    """A UNet with 4 stride-2 levels on 36^3 windows: refused before inference, naming the roi and a size it takes."""
    bundle = _variant(zoo, tmp_path, lambda cfg: cfg["inferer"].update(roi_size=[36, 36, 36]))
    out, data = tmp_path / "out", zoo["data"]
    argv = {"predict": ["predict", "--model", bundle, "--images", data, "--out", out],
            "score": ["score", "--model", bundle, "--data", data, "--out", out / "s.csv"],
            "init": ["init", out, "--model", bundle, "--pool", data]}[command]
    assert _run(*argv) == 2
    line = _one_line_error(capsys)
    assert "cannot run on a window of roi_size [36, 36, 36]" in line
    assert "[48, 48, 48] (each side a multiple of 16)" in line
    assert not out.exists() or not any(out.iterdir())


@pytest.mark.parametrize("roi, problem", [([32, 32], "has 2 sides"), ([32, 0, 32], "not positive whole numbers"),
                                          ("$[32] * 3", "not a literal value"),
                                          ([32, "a", 32], "not a list of numbers")])
def test_unusable_roi_settings_are_refused_at_load(zoo: dict[str, Path], tmp_path: Path, roi: object,
                                                   problem: str) -> None:
    bundle = _variant(zoo, tmp_path, lambda cfg: cfg["inferer"].update(roi_size=roi))
    with pytest.raises(AsfdaError, match=problem):
        load_model(bundle)


def test_inferer_references_resolve_as_monai_resolves_them(zoo: dict[str, Path], tmp_path: Path) -> None:
    """wholeBody_ct_segmentation's inferer: sw_batch_size and overlap are @ references into displayable_configs,
    and its device an expression asfda never reads. Expressions in the three settings need --trust-model-code."""
    def edit(cfg: dict) -> None:
        cfg["displayable_configs"] = {"highres": True, "sw_overlap": 0.25, "sw_batch_size": 1, "roi": [32, 32, 32]}
        cfg["inferer"] = {"_target_": "SlidingWindowInferer", "roi_size": "@displayable_configs::roi",
                          "sw_batch_size": "@displayable_configs#sw_batch_size",
                          "overlap": "@displayable_configs#sw_overlap", "padding_mode": "replicate",
                          "mode": "gaussian",
                          "device": "$torch.device('cuda:0' if torch.cuda.is_available() else 'cpu')"}

    bundle = _variant(zoo, tmp_path, edit)
    m = load_model(bundle)
    assert (m.roi_size, m.sw_batch_size, m.overlap) == ((32, 32, 32), 1, 0.25)
    # MONAI's relative references: "@#key" is key beside the value, "@##key" one level up
    cfg = json.loads((bundle / "configs" / "inference.json").read_text())
    cfg["inferer"].update(window=[16, 16, 16], roi_size="@#window", overlap="@##displayable_configs#sw_overlap")
    cfg["network_def"]["out_channels"] = "@#spatial_dims"
    (bundle / "configs" / "inference.json").write_text(json.dumps(cfg))
    m = load_model(bundle, strict=False)
    assert (m.roi_size, m.overlap, m.network.out_channels) == ((16, 16, 16), 0.25, 3)
    cfg = json.loads((bundle / "configs" / "inference.json").read_text())
    cfg["inferer"]["sw_batch_size"] = "$@displayable_configs#sw_batch_size * 2"
    (bundle / "configs" / "inference.json").write_text(json.dumps(cfg))
    with pytest.raises(AsfdaError, match="--trust-model-code"):
        load_model(bundle)
    assert load_model(bundle, allow_code=True).sw_batch_size == 2


def test_output_channels_that_the_metadata_does_not_name_are_refused(zoo: dict[str, Path], tmp_path: Path,
                                                                    capsys: pytest.CaptureFixture) -> None:
    bundle = _variant(zoo, tmp_path, lambda cfg: None)
    (bundle / "configs" / "metadata.json").write_text(json.dumps(_metadata({"0": "background", "1": "spleen"})))
    assert _run("predict", "--model", bundle, "--images", zoo["data"], "--out", tmp_path / "out") == 2
    assert "the network outputs 3 channels but the model names 2 classes" in _one_line_error(capsys)


# ---------------------------------------------------------------------------------------------- missing packages
def test_a_missing_optional_package_is_named_with_its_install_command(zoo: dict[str, Path], tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch,
                                                                      capsys: pytest.CaptureFixture) -> None:
    """A network that needs einops (SwinUNETR, UNETR ... in some MONAI versions) on a machine without it."""
    from monai.networks.nets import UNet
    from monai.utils import OptionalImportError

    def needs_einops(self, x):
        raise OptionalImportError("required package `einops` is not installed or the version doesn't match "
                                  "requirement.")

    monkeypatch.setattr(UNet, "forward", needs_einops)
    assert _run("predict", "--model", zoo["spleen"], "--images", zoo["data"], "--out", tmp_path / "out") == 2
    line = _one_line_error(capsys)
    assert "needs the optional package 'einops'" in line and "pip install -U einops" in line

    def missing_at_build(self, *a, **k):
        raise ModuleNotFoundError("No module named 'einops'", name="einops")

    monkeypatch.setattr(UNet, "__init__", missing_at_build)
    with pytest.raises(AsfdaError, match=r"'network_def' in the model config \(UNet at network_def\) needs the "
                                         r"optional package 'einops'.*fix: pip install einops"):
        load_model(zoo["spleen"])


def test_a_trusted_bundles_reader_without_itk_names_the_package(zoo: dict[str, Path], tmp_path: Path) -> None:
    """LoadImaged(reader="ITKReader") needs itk when MONAI's parser builds it (--trust-model-code); asfda's own loader
    never builds it."""
    pytest.importorskip("monai")
    try:
        import itk  # noqa: F401
        pytest.skip("itk is installed here")
    except ImportError:
        pass
    bundle = _variant(zoo, tmp_path, lambda cfg: cfg["preprocessing"]["transforms"][0].update(reader="ITKReader"))
    assert load_model(bundle).preprocessing.description["transforms"][0] == "LoadImaged"
    with pytest.raises(AsfdaError, match=r"needs the optional package 'itk'.*pip install (-U )?itk"):
        load_model(bundle, allow_code=True)


# ---------------------------------------------------------------------------------------------- TorchScript
class _ProbabilityNet(torch.nn.Module):
    """A small segmentation network whose forward ends in a softmax, as many exported TorchScript models do."""

    def __init__(self) -> None:
        super().__init__()
        self.enc = torch.nn.Conv3d(1, 6, 3, padding=1)
        self.down = torch.nn.Conv3d(6, 6, 3, stride=2, padding=1)
        self.up = torch.nn.ConvTranspose3d(6, 6, 2, stride=2)
        self.head = torch.nn.Conv3d(12, 3, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        e = torch.relu(self.enc(x))
        d = torch.relu(self.up(torch.relu(self.down(e))))
        return torch.softmax(self.head(torch.cat([e, d], 1)), dim=1)


def _torchscript_bundle(root: Path, *, declared: bool, frozen: bool = False) -> Path:
    """A bundle whose models/model.pt is TorchScript (no .ts suffix); ``declared``: its config says
    ``asfda_output_activation: none``."""
    (root / "configs").mkdir(parents=True)
    (root / "models").mkdir()
    cfg = {k: SPLEEN_INFERENCE[k] for k in ("preprocessing", "inferer")}
    cfg["inferer"] = dict(cfg["inferer"], roi_size=[16, 16, 16])
    if declared:
        cfg["asfda_output_activation"] = "none"
    (root / "configs" / "inference.json").write_text(json.dumps(cfg))
    (root / "configs" / "metadata.json").write_text(json.dumps(_metadata({"0": "background", "1": "liver",
                                                                          "2": "spleen"})))
    torch.manual_seed(0)
    scripted = torch.jit.script(_ProbabilityNet().eval())
    torch.jit.save(torch.jit.freeze(scripted) if frozen else scripted, str(root / "models" / "model.pt"))
    return root


def test_torchscript_model_pt_that_outputs_probabilities_runs_predict_score_and_query(
        zoo: dict[str, Path], tmp_path: Path) -> None:
    """A TorchScript model.pt whose graph already applies the softmax: with output_activation none (config or CLI)
    asfda reads its probabilities as they are (no second softmax), and predict, score and query run."""
    from asfda.adapter import Adapter
    from asfda.engine import OUTPUT_EMBEDDING
    from asfda.io import load_dataset
    from asfda.models.loading import is_torchscript

    bundle = _torchscript_bundle(tmp_path / "ts", declared=True)
    assert is_torchscript(bundle / "models" / "model.pt")
    model = load_model(bundle, allow_code=True)
    assert isinstance(model.network, torch.jit.ScriptModule)
    assert model.output_activation == "none" and model.activation == "softmax" and model.probabilities
    data = zoo["data"]
    # the probabilities asfda computes are the network's own
    adapter = Adapter(model, load_dataset(data).class_names, progress=False, device="cpu")
    x = torch.rand(1, 1, 16, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(torch.softmax(adapter.frozen(x), 1), model.network(x), atol=1e-5, rtol=1e-4)
    assert adapter.engine_frozen.embedding_layer == OUTPUT_EMBEDDING  # a ScriptModule's inside cannot be hooked
    trust = "--trust-model-code"  # TorchScript is a program: loaded only when trusted
    assert _run("predict", "--model", bundle, "--images", data, "--out", tmp_path / "pred", trust) == 0
    assert sorted(p.name for p in (tmp_path / "pred").glob("*.nii.gz")) == [f"case0{i}.nii.gz" for i in range(3)]
    assert _run("score", "--model", bundle, "--data", data, "--out", tmp_path / "s.csv", trust) == 0
    assert _run("query", "--model", bundle, "--data", data, "--budget", 2, "--out", tmp_path / "q.json", trust) == 0
    assert len(json.loads((tmp_path / "q.json").read_text())["ids"]) == 2
    # the same file without the declaration: --output-activation none on the command line gives the same numbers
    plain = _torchscript_bundle(tmp_path / "ts2", declared=False)
    assert load_model(plain, allow_code=True).output_activation == "none"  # its channels sum to 1: probabilities
    assert _run("score", "--model", plain, "--data", data, "--out", tmp_path / "s2.csv",
                "--output-activation", "none", trust) == 0
    with open(tmp_path / "s.csv") as a, open(tmp_path / "s2.csv") as b:
        assert list(csv.DictReader(a)) == list(csv.DictReader(b))
    assert _run("query", "--model", plain, "--data", zoo["plain"], "--budget", 1, "--out", tmp_path / "q2.json",
                "--output-activation", "none", trust) == 0


def test_torchscript_fine_tunes_and_exports_as_torchscript(zoo: dict[str, Path], tmp_path: Path) -> None:
    """A scripted module keeps its parameters: it fine-tunes (its copies are leaves, so they can be frozen and
    trained) and the adapted bundle holds models/model.ts, which loads back with the same weights."""
    from asfda.adapter import Adapter
    from asfda.io import load_dataset
    from asfda.models import state_dict_hash
    from asfda.training import TrainConfig

    model = load_model(_torchscript_bundle(tmp_path / "ts", declared=True), allow_code=True)
    ds = load_dataset(zoo["data"], require_labels=True)
    adapter = Adapter(model, ds.class_names, progress=False, device="cpu")
    assert all(p.is_leaf and not p.requires_grad for p in adapter.frozen.parameters())
    adapter.finetune(list(ds.cases[:1]), TrainConfig(steps=2, batch_size=1, lr=1e-2, augment=False))
    trained = adapter.current.network.state_dict()
    assert any(not torch.equal(v, adapter.frozen.network.state_dict()[k]) for k, v in trained.items())
    assert model.weights_hash == state_dict_hash(adapter.frozen.network.state_dict())  # the source is untouched
    out = adapter.export_bundle(tmp_path / "adapted")
    assert (out / "models" / "model.ts").is_file() and not (out / "models" / "model.pt").exists()
    again = load_model(out, allow_code=True)
    assert isinstance(again.network, torch.jit.ScriptModule) and again.output_activation == "none"
    assert again.weights_hash == state_dict_hash(trained)


def test_a_frozen_torchscript_model_scores_but_refuses_fine_tuning(zoo: dict[str, Path], tmp_path: Path) -> None:
    """torch.jit.freeze turns the weights into constants: nothing to train, said before any step."""
    from asfda.adapter import Adapter
    from asfda.io import load_dataset
    from asfda.training import TrainConfig

    model = load_model(_torchscript_bundle(tmp_path / "ts", declared=True, frozen=True), allow_code=True)
    ds = load_dataset(zoo["data"], require_labels=True)
    adapter = Adapter(model, ds.class_names, progress=False, device="cpu")
    assert len(adapter.score_pool(list(ds.cases), 1.0).ids) == 3
    with pytest.raises(AsfdaError, match="no trainable parameters.*cannot be fine-tuned"):
        adapter.finetune(list(ds.cases[:1]), TrainConfig(steps=2, batch_size=1))


# ---------------------------------------------------------------------------------------------- output activation
def test_output_activation_declarations_and_their_order(zoo: dict[str, Path], tmp_path: Path) -> None:
    """The CLI/argument first, then the config's asfda_output_activation, then the metadata's multilabel format, then
    the postprocessing's Activationsd; a single output channel is a sigmoid; a bad value is refused."""
    assert load_model(zoo["spleen"]).activation == "softmax"  # Activationsd(softmax=True)
    assert load_model(zoo["sigmoid"]).activation == "sigmoid"  # Activationsd(sigmoid=True)
    m = load_model(zoo["spleen"], output_activation="none")
    assert (m.activation, m.probabilities) == ("softmax", True)
    assert load_model(zoo["sigmoid"], output_activation="softmax").activation == "softmax"
    single = _variant(zoo, tmp_path, lambda cfg: cfg["network_def"].update(out_channels=1))
    (single / "configs" / "metadata.json").write_text(json.dumps(_metadata({"0": "spleen"})))
    m = load_model(single, strict=False)
    assert m.activation == "sigmoid" and m.label_names == ["background", "spleen"]
    with pytest.raises(AsfdaError, match="output_activation 'probs' is not one of"):
        load_model(zoo["spleen"], output_activation="probs")


@pytest.mark.parametrize("name", ["evaluate", "predict", "score", "query", "simulate", "init"])
def test_output_activation_reaches_load_model_from_every_command(name: str, zoo: dict[str, Path], tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch,
                                                                 capsys: pytest.CaptureFixture) -> None:
    seen: list[object] = []

    def fake_load_model(*args, output_activation=None, **kwargs):
        seen.append(output_activation)
        raise AsfdaError("stop here")

    for where in ("asfda.predict.load_model", "asfda.query.load_model", "asfda.simulate.load_model",
                  "asfda.evaluate.load_model", "asfda.project.setup.load_model", "asfda.project.state.load_model",
                  "asfda.models.load_model"):  # the package last: a module imported by the patching binds the real one
        monkeypatch.setattr(where, fake_load_model)
    model, data, out = zoo["spleen"], zoo["data"], tmp_path / "out"
    argv = {"evaluate": ["evaluate", "--model", model, "--data", data, "--out", out],
            "predict": ["predict", "--model", model, "--images", data, "--out", out],
            "score": ["score", "--model", model, "--data", data, "--out", out / "s.csv"],
            "query": ["query", "--model", model, "--data", data, "--budget", 1, "--out", out / "q.json"],
            "simulate": ["simulate", "--model", model, "--pool", data, "--out", out],
            "init": ["init", out, "--model", model, "--pool", data]}[name]
    assert _run(*argv, "--output-activation", "none") == 2
    assert "stop here" in capsys.readouterr().err
    assert _run(*argv) == 2
    assert seen == ["none", None]


def test_deep_supervision_outputs_train_on_the_full_resolution_head() -> None:
    """MONAI's DynUNet stacks its deep-supervision outputs on dim 1 in training mode: the class-mapped network reads
    the first (full-resolution) one, as it reads the first of a list."""
    from asfda.models import ClassMappedNetwork, build_class_map

    class Stacked(torch.nn.Module):
        def __init__(self, as_list: bool) -> None:
            super().__init__()
            self.conv, self.as_list = torch.nn.Conv3d(1, 3, 1), as_list

        def forward(self, x: torch.Tensor):
            z = self.conv(x)
            if not self.training:
                return z
            return [z, z * 0.5] if self.as_list else torch.stack([z, z * 0.5], dim=1)

    cmap = build_class_map(["background", "liver", "spleen"], ["background", "liver", "spleen"])
    x = torch.randn(2, 1, 4, 4, 4)
    for as_list in (False, True):
        net = ClassMappedNetwork(Stacked(as_list), cmap).train()
        torch.testing.assert_close(net(x), net.network.conv(x))


def test_a_preprocessing_step_that_fails_is_named_with_the_image(zoo: dict[str, Path], tmp_path: Path,
                                                                 capsys: pytest.CaptureFixture) -> None:
    """A step whose keys miss the image key (a typo in a bundle): one line naming the step and the image."""
    bundle = _variant(zoo, tmp_path, lambda cfg: cfg["preprocessing"]["transforms"][4].update(keys="img"))
    assert _run("predict", "--model", bundle, "--images", zoo["data"], "--out", tmp_path / "out") == 2
    line = _one_line_error(capsys)
    assert "case00_0000.nii.gz: the model's preprocessing step ScaleIntensityRanged failed on this image" in line
    assert "KeyError" in line and "'image'" in line
