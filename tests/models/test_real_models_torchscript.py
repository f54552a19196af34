"""Model-zoo style models, continued: a TorchScript model saved as ``models/model.pt`` whose graph ends in a
softmax (``output_activation: none``) through predict, score, query and fine-tuning; output activation declarations;
deep-supervision outputs; a preprocessing step that fails."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import pytest
import torch

from _zoo_bundles import SPLEEN_INFERENCE, _metadata, _one_line_error, _run, _variant
from asfda.errors import AsfdaError
from asfda.models import load_model


@pytest.fixture(autouse=True)
def _in_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """score, query and simulate cache under ./.cache: each test in its own folder."""
    monkeypatch.chdir(tmp_path)


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
    cfg: dict[str, Any] = {k: SPLEEN_INFERENCE[k] for k in ("preprocessing", "inferer")}
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
        stacked = Stacked(as_list)
        net = ClassMappedNetwork(stacked, cmap).train()
        torch.testing.assert_close(net(x), stacked.conv(x))


def test_a_preprocessing_step_that_fails_is_named_with_the_image(zoo: dict[str, Path], tmp_path: Path,
                                                                 capsys: pytest.CaptureFixture) -> None:
    """A step whose keys miss the image key (a typo in a bundle): one line naming the step and the image."""
    bundle = _variant(zoo, tmp_path, lambda cfg: cfg["preprocessing"]["transforms"][4].update(keys="img"))
    assert _run("predict", "--model", bundle, "--images", zoo["data"], "--out", tmp_path / "out") == 2
    line = _one_line_error(capsys)
    assert "case00_0000.nii.gz: the model's preprocessing step ScaleIntensityRanged failed on this image" in line
    assert "KeyError" in line and "'image'" in line
