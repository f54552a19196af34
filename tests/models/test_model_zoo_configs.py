"""Six 3D segmentation bundles of the MONAI model zoo (Project-MONAI/model-zoo, ``models/<name>/configs``), their
``inference.json`` / ``inference.yaml`` and ``metadata.json`` as shipped, with only what a CPU needs shrunk (channels
or feature sizes, the sliding window) and random weights: predict, evaluate, score, query and init run on each, on a
tiny NIfTI dataset named by the bundle's own channel_def (its voxel spacing chosen so the bundle's own Spacingd pixdim
gives a small grid), or the command refuses in one line naming the file and the fix.

* ``spleen_ct_segmentation``: UNet (norm: batch), ``@image_key`` references, ScaleIntensityRanged.
* ``swin_unetr_btcv_segmentation``: SwinUNETR (``img_size``, ``use_checkpoint``), ``reader: ITKReader``.
* ``wholeBody_ct_segmentation``: SegResNet with 105 classes; its ``pixdim`` is a ``$`` expression of a
  ``displayable_configs`` switch, its inferer reads ``@displayable_configs#...``; NormalizeIntensityd(nonzero) then
  ScaleIntensityd.
* ``renalStructures_UNEST_segmentation``: ``network_def`` is ``scripts.networks.unest.UNesT``, code that ships in
  the bundle's ``scripts/`` folder: refused without ``--trust-model-code``, run with it (the test writes a small
  stand-in ``scripts/networks/unest.py``; the real one is a 1,000-line transformer).
  (``multi_organ_segmentation`` is a DiNTS like pancreas_ct_dints_segmentation.)
* ``prostate_mri_anatomy``: UNet with PReLU and dropout, ScaleIntensityd then NormalizeIntensityd, no Activationsd
  (argmax of the logits only).
* ``pancreas_ct_dints_segmentation``: DiNTS, whose architecture (``arch_ckpt``) is a second file loaded with
  ``torch.load`` by a ``$`` expression: refused in one line.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import monai.networks.nets as nets
import pytest
import torch
from monai.bundle import ConfigParser

from _zoo_bundles import _one_line_error, _run
from _zoo_configs import BUNDLES, UNEST_STANDIN, _write_bundle, _write_dataset
from asfda.errors import AsfdaError
from asfda.models import load_model, save_bundle
from asfda.models.loading import fold_literal_expressions
from asfda.models.safe_config import build_network


@pytest.fixture(autouse=True)
def _in_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """score and query cache under ./.cache: each test in its own folder."""
    monkeypatch.chdir(tmp_path)


def _five_commands(model: Path, data: Path, out: Path, *flags: str) -> dict[str, int]:
    """predict, evaluate, score, query, init: their exit codes."""
    argv = {"predict": ["predict", "--model", model, "--images", data, "--out", out / "pred"],
            "evaluate": ["evaluate", "--model", model, "--data", data, "--out", out / "eval"],
            "score": ["score", "--model", model, "--data", data, "--out", out / "score.csv", "--strategies",
                      "asfda,random"],
            "query": ["query", "--model", model, "--data", data, "--budget", 1, "--out", out / "q.json"],
            "init": ["init", out / "project", "--model", model, "--pool", data, "--budget", 1, "--steps", 2,
                     "--device", "cpu"]}
    return {command: _run(*args, *flags) for command, args in argv.items()}


# the bundles that run every command (swin_unetr_btcv_segmentation: 2.4 s a window on one CPU thread, a minute in
# all: slow); pancreas_ct_dints_segmentation is refused (test_dints_is_refused_in_one_line)
RUNS = ["spleen_ct_segmentation", pytest.param("swin_unetr_btcv_segmentation", marks=pytest.mark.slow),
        "wholeBody_ct_segmentation", "renalStructures_UNEST_segmentation", "prostate_mri_anatomy"]
TRUSTED = {"renalStructures_UNEST_segmentation"}  # its network is code the bundle ships (scripts/)


@pytest.mark.parametrize("name", RUNS)
def test_model_zoo_bundle_runs_predict_evaluate_score_query_and_init(name: str, tmp_path: Path) -> None:
    """The bundle's own configs (shrunk for a CPU): the five commands exit 0, and each output names the dataset's
    classes as the bundle's channel_def names them."""
    bundle = _write_bundle(tmp_path / "zoo", name)
    _, _, _, spacing, organs = BUNDLES[name]
    data = _write_dataset(tmp_path / "data", spacing, organs)
    out = tmp_path / "out"
    codes = _five_commands(bundle, data, out, *(["--trust-model-code"] if name in TRUSTED else []))
    assert codes == dict.fromkeys(codes, 0), codes
    labels = {"background": 0, **{o: k + 1 for k, o in enumerate(organs)}}
    assert json.loads((out / "pred" / "labels.json").read_text()) == labels
    assert len(list((out / "pred").glob("case*.nii.gz"))) == 3
    summary = json.loads((out / "eval" / "summary.json").read_text())
    assert summary["class_map"] == {c: c for c in labels} and summary["n_cases"] == 3
    assert len(json.loads((out / "q.json").read_text())["ids"]) == 1
    assert json.loads((out / "project" / "project.json").read_text())["model"] == str(bundle)


def test_wholebody_pixdim_switch_is_evaluated_as_monai_evaluates_it(tmp_path: Path) -> None:
    """wholeBody_ct_segmentation's ``"pixdim": "$[1.5, 1.5, 1.5] if @displayable_configs#highres else [3.0, 3.0,
    3.0]"``: read without running code, to the value MONAI's parser gives (both switch positions)."""
    for highres, pixdim in ((True, (1.5, 1.5, 1.5)), (False, (3.0, 3.0, 3.0))):
        bundle = _write_bundle(tmp_path / str(highres), "wholeBody_ct_segmentation")
        cfg_file = bundle / "configs" / "inference.json"
        cfg = json.loads(cfg_file.read_text())
        cfg["displayable_configs"]["highres"] = highres
        cfg_file.write_text(json.dumps(cfg))
        assert ConfigParser(cfg).get_parsed_content("pixdim") == list(pixdim)
        assert load_model(bundle).preprocessing.pixdim_mm == pixdim
        assert load_model(bundle, allow_code=True).preprocessing.pixdim_mm == pixdim


@pytest.mark.parametrize("expression", [
    "$[1.5, 1.5, 1.5] if @a#on else [3.0, 3.0, 3.0]", "$@a#on and @a#n", "$@a#off or [1, 2]", "$not @a#on",
    "$-@a#n", "$@a#n == 2", "$@a#name != 'x'", "$(@a#n, -1.5)", "$'s' if @a#off else 't'",
    "$@a#on and @a#off or 3"])
def test_literal_expressions_fold_to_monais_value(expression: str) -> None:
    cfg = {"a": {"on": True, "off": False, "n": 2, "name": "y"}, "v": expression}
    expected = ConfigParser(cfg).get_parsed_content("v")
    folded = fold_literal_expressions(cfg)["v"]
    assert folded == (list(expected) if isinstance(expected, tuple) else expected)


@pytest.mark.parametrize("expression", [
    "$torch.device('cpu')", "$__import__('os').system('true')", "$[1.5] * 3", "$@a#n + 1", "$open('x')",
    "$@missing if 1 else 2", "$@a#l[0]", "$(lambda: 1)()", "$[x for x in @a#l]", "$@b", "$[4, 8, 16]", "$None",
    "$'@a#n' if @a#n else 1"])
def test_other_expressions_are_left_as_written(expression: str, tmp_path: Path) -> None:
    """Anything but literals, references, conditionals, ==/!= and and/or/not, and an expression that refers to
    nothing in the config (a literal to write as one), is left as written (the network is then refused, with the
    --trust-model-code hint), never run."""
    cfg = {"a": {"n": 2, "l": [1]}, "b": "$torch.zeros(1)", "v": expression,
           "network_def": {"_target_": "UNet", "spatial_dims": 3, "in_channels": 1, "out_channels": 2,
                           "channels": [4, 8], "strides": [2], "dropout": "@v"}}
    folded = fold_literal_expressions(cfg)
    assert folded["v"] == expression
    with pytest.raises(AsfdaError, match="pass --trust-model-code to each command"):
        build_network(folded, None)


def test_swin_unetr_img_size_that_monai_removed_is_dropped(tmp_path: Path) -> None:
    """swin_unetr_btcv_segmentation passes ``img_size: 96``, which MONAI 1.3 deprecated as unused and 1.5 removed:
    the network builds without it (untrusted and trusted), and the model keeps the config as the file has it."""
    bundle = _write_bundle(tmp_path, "swin_unetr_btcv_segmentation")
    for trusted in (False, True):
        if trusted:  # MONAI's parser builds LoadImaged(reader="ITKReader"), which needs itk (not installed here)
            cfg_file = bundle / "configs" / "inference.json"
            cfg = json.loads(cfg_file.read_text())
            del cfg["preprocessing"]["transforms"][0]["reader"]
            cfg_file.write_text(json.dumps(cfg))
        model = load_model(bundle, allow_code=trusted)
        assert isinstance(model.network, nets.SwinUNETR) and model.roi_size == (64, 64, 64)
        assert model.config["network_def"]["img_size"] == 96


def test_renal_unest_code_runs_only_when_trusted_and_travels_with_the_adapted_bundle(
        tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """renalStructures_UNEST_segmentation's network is scripts.networks.unest.UNesT, code shipped in the bundle:
    refused in one line without --trust-model-code; with it, found beside configs/ (as `monai.bundle run` finds
    it), and an adapted bundle carries scripts/ so it loads again."""
    name = "renalStructures_UNEST_segmentation"
    bundle = _write_bundle(tmp_path / "zoo", name)
    data = _write_dataset(tmp_path / "data", *BUNDLES[name][3:])
    assert _run("predict", "--model", bundle, "--images", data, "--out", tmp_path / "out") == 2
    line = _one_line_error(capsys)
    assert "scripts.networks.unest.UNesT" in line and "--trust-model-code" in line and str(bundle) in line
    model = load_model(bundle, allow_code=True)
    assert type(model.network).__name__ == "UNesT"
    adapted = save_bundle(model, tmp_path / "adapted")
    assert (adapted / "scripts" / "networks" / "unest.py").read_text() == UNEST_STANDIN
    again = load_model(adapted, allow_code=True)
    assert type(again.network).__name__ == "UNesT" and again.class_names == model.class_names


COMMANDS = ["predict", "evaluate", "score", "query", "init"]


@pytest.mark.parametrize("trusted", [False, True])
@pytest.mark.parametrize("command", COMMANDS)
def test_dints_is_refused_in_one_line(command: str, trusted: bool, tmp_path: Path,
                                      capsys: pytest.CaptureFixture) -> None:
    """pancreas_ct_dints_segmentation (and multi_organ_segmentation, the same DiNTS) reads its architecture with
    ``$torch.load`` from models/search_code_18590.pt: every command refuses it in one line that names the config
    and the fix (TorchScript), trusted or not, before writing anything."""
    name = "pancreas_ct_dints_segmentation"
    bundle = _write_bundle(tmp_path / "zoo", name)
    data = _write_dataset(tmp_path / "data", *BUNDLES[name][3:])
    out = tmp_path / "out"
    argv = {"predict": ["predict", "--model", bundle, "--images", data, "--out", out],
            "evaluate": ["evaluate", "--model", bundle, "--data", data, "--out", out],
            "score": ["score", "--model", bundle, "--data", data, "--out", out / "s.csv"],
            "query": ["query", "--model", bundle, "--data", data, "--budget", 1, "--out", out / "q.json"],
            "init": ["init", out, "--model", bundle, "--pool", data]}[command]
    assert _run(*argv, *(["--trust-model-code"] if trusted else [])) == 2
    line = _one_line_error(capsys)
    assert str(bundle / "configs" / "inference.yaml") in line and "arch_ckpt" in line and "DiNTS" in line
    assert "fix: save the network as TorchScript" in line
    assert not out.exists()


class _EndsInSoftmax(torch.nn.Module):
    """deepbet's model.pt contract (wwu-mmll/deepbet, bet.py: ``model(x)[0, 1]`` thresholded at 0.5): a 3D network
    with 2 output channels, background and brain, ending in a softmax; shipped as TorchScript, no config."""

    def __init__(self, net: torch.nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.net(x), dim=1)


def test_a_bare_torchscript_model_pt_ending_in_softmax_runs_every_command_without_a_second_softmax(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """deepbet's model.pt as shipped (a bare TorchScript file; its architecture is not published, so the test scripts
    a UNet with the same contract): with --trust-model-code the five commands run, the start-up probe takes its
    output as probabilities and says so, and its labels equal those of the same network without the softmax
    (scored as logits): no second softmax. (Bundles: tests/models/test_model_output_truth.py.)"""
    torch.manual_seed(1)
    net = nets.UNet(3, 1, 2, channels=(4, 8, 8), strides=(2, 2), num_res_units=1).eval()
    ending, logits = tmp_path / "deepbet" / "model.pt", tmp_path / "logits" / "model.pt"
    for path, module in ((ending, _EndsInSoftmax(net)), (logits, net)):
        path.parent.mkdir()
        torch.jit.save(torch.jit.script(module), str(path))
    data = _write_dataset(tmp_path / "data", (2.0, 2.0, 2.0), ["brain"])
    flags = ["--trust-model-code", "--class-map", "brain=class_1"]
    with caplog.at_level("WARNING"):
        codes = _five_commands(ending, data, tmp_path / "out", *flags)
    assert codes == dict.fromkeys(codes, 0), codes
    assert any("taken as probabilities" in r.getMessage() for r in caplog.records)
    # argmax cannot tell (softmax is monotone): the probabilities' own scores can (a second softmax flattens them)
    assert _run("score", "--model", logits, "--data", data, "--out", tmp_path / "logits.csv", "--strategies",
                "asfda,random", *flags) == 0
    rows = {}
    for name, f in (("ending", tmp_path / "out" / "score.csv"), ("logits", tmp_path / "logits.csv")):
        with open(f) as fh:
            rows[name] = list(csv.DictReader(fh))
    assert len(rows["ending"]) == 3
    for mine, ref in zip(rows["ending"], rows["logits"], strict=True):
        assert mine["case_id"] == ref["case_id"]
        for key in ("asd", "enpy", "confidence"):
            assert float(mine[key]) == pytest.approx(float(ref[key]), rel=1e-4, abs=1e-6), key
