"""Models as the MONAI model zoo ships them: every command runs on them, or refuses in one line.

The bundles are built from the configs of real model-zoo bundles (Project-MONAI/model-zoo) in ``_zoo_bundles.py``,
with random weights, fewer filters and a smaller window so that they run in seconds on tiny volumes:

* ``spleen_ct_segmentation``: a UNet with ``norm: batch`` (BatchNorm running statistics, 0-d counters), 4 stride-2
  levels, the bundle's own preprocessing, and the rest of its inference.json ($ expressions, SaveImaged ...).
* ``brats_mri_segmentation``: a SegResNet (GroupNorm) with 4 input channels and a sigmoid head (3 overlapping tumour
  regions, declared by the ``Activationsd(sigmoid=True)`` of its postprocessing).
* the same SegResNet on one input channel: GroupNorm + a sigmoid head that asfda adapts.

TorchScript models, output activations and deep supervision: test_real_models_torchscript.py."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from _zoo_bundles import _every_command, _metadata, _one_line_error, _run, _variant
from asfda.errors import AsfdaError
from asfda.models import load_model


@pytest.fixture(autouse=True)
def _in_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """score, query and simulate cache under ./.cache: each test in its own folder."""
    monkeypatch.chdir(tmp_path)


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
