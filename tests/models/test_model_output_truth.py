"""Every loaded model tells the truth about its output (issue 35, item 4): a network whose channels already sum to 1
is taken as probabilities (never softmaxed twice), an adapted bundle runs again with the class map recorded in it,
a TorchScript export runs under ``python -m monai.bundle run``, and a model with fewer organs than the dataset folds
the others into background."""

from __future__ import annotations

import csv
import importlib.util
import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from asfda.cli import main
from asfda.models import build_class_map, load_model
from conftest import load_nifti, write_bundle, write_nnunet


def _run(*args: object) -> int:
    return main([str(a) for a in args] + ["--no-progress"])


class _WithSoftmax(torch.nn.Module):
    """A network whose forward ends in a softmax, as TorchScript models are often shipped (deepbet's model.pt)."""

    def __init__(self, net: torch.nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.net(x), dim=1)


def _scripted_bundle(plain: Path, root: Path, *, softmax: bool) -> Path:
    """``plain``'s network (same weights) as TorchScript in ``root/models/model.pt`` (TorchScript, whatever the
    suffix), ending in a softmax when ``softmax``; the same configs, no declared output activation."""
    from monai.bundle import ConfigParser

    shutil.copytree(plain / "configs", root / "configs")
    (root / "models").mkdir(parents=True)
    net = ConfigParser(json.loads((plain / "configs" / "inference.json").read_text())).get_parsed_content(
        "network_def")
    net.load_state_dict(torch.load(plain / "models" / "model.pt", weights_only=True))
    net = net.eval()
    torch.jit.save(torch.jit.script(_WithSoftmax(net) if softmax else net), str(root / "models" / "model.pt"))
    return root


# the scores computed from the probabilities alone (the others read the volume embedding: a hooked bottleneck of a
# plain network, the volume-averaged output of a TorchScript one)
PROBABILITY_SCORES = ("asd", "enpy", "confidence", "tta_variance", "asfda_rank_asd", "anatomy_liver", "anatomy_spleen")


@pytest.fixture
def tiny_plain(tmp_path: Path) -> Path:
    return write_bundle(tmp_path / "plain", seed=3)


def test_a_network_ending_in_softmax_is_taken_as_probabilities_and_said_so(
        tiny_plain: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    """Scores and predictions of a scripted network ending in softmax equal those of the same network without it
    (a plain state-dict bundle and a scripted one without the softmax), and the warning says which was done."""
    monkeypatch.chdir(tmp_path)  # score's cache folder (.cache)
    ds = write_nnunet(tmp_path / "ds")
    ending = _scripted_bundle(tiny_plain, tmp_path / "ending", softmax=True)
    logits_ts = _scripted_bundle(tiny_plain, tmp_path / "logits_ts", softmax=False)
    with caplog.at_level(logging.WARNING):
        m = load_model(ending, allow_code=True)
    assert (m.activation, m.probabilities, m.output_activation) == ("softmax", True, "none")
    said = [r.getMessage() for r in caplog.records if "sums to 1" in r.getMessage()]
    assert len(said) == 1 and "taken as probabilities" in said[0] and "--output-activation softmax" in said[0]
    for source in (tiny_plain, logits_ts):  # logits: nothing changes, nothing is said
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            assert load_model(source, allow_code=True).output_activation == "softmax"
        assert not [r for r in caplog.records if "sums to 1" in r.getMessage()]
    # the command line still decides: --output-activation softmax softmaxes again, as asked
    assert not load_model(ending, allow_code=True, output_activation="softmax").probabilities

    scores, labels = {}, {}
    for name, bundle in (("plain", tiny_plain), ("logits_ts", logits_ts), ("ending", ending)):
        assert _run("score", "--model", bundle, "--data", ds, "--out", tmp_path / f"{name}.csv", "--device", "cpu",
                    "--trust-model-code") == 0
        with open(tmp_path / f"{name}.csv") as f:
            scores[name] = list(csv.DictReader(f))
        assert _run("predict", "--model", bundle, "--images", ds, "--out", tmp_path / f"pred_{name}", "--device",
                    "cpu", "--trust-model-code") == 0
        labels[name] = {p.name: np.asarray(load_nifti(str(p)).dataobj)
                        for p in sorted((tmp_path / f"pred_{name}").glob("*.nii.gz"))}
    assert len(labels["plain"]) == 3
    for name in ("logits_ts", "ending"):
        assert labels[name].keys() == labels["plain"].keys()
        for case, lab in labels["plain"].items():
            assert np.array_equal(labels[name][case], lab), (name, case)
        assert [r["case_id"] for r in scores[name]] == [r["case_id"] for r in scores["plain"]]
        for mine, ref in zip(scores[name], scores["plain"], strict=True):
            for key in PROBABILITY_SCORES:  # the embedding of a TorchScript network is its averaged output instead
                assert float(mine[key]) == pytest.approx(float(ref[key]), rel=1e-4, abs=1e-6), (name, key)


def test_a_network_whose_channels_do_not_sum_to_one_is_not_taken_as_probabilities() -> None:
    """The probe's test: in [0, 1] and summing to 1 at every voxel; logits, a sigmoid per channel, or one channel
    are not a distribution over channels."""
    from asfda.models.probe import output_sums_to_one

    class Fixed(torch.nn.Module):
        def __init__(self, fn) -> None:
            super().__init__()
            self.fn = fn

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fn(torch.cat([x, 2 * x - 0.7, -x], 1))

    roi = (8, 8, 8)
    assert output_sums_to_one(Fixed(lambda z: torch.softmax(z, 1)), roi)
    assert not output_sums_to_one(Fixed(lambda z: z), roi)
    assert not output_sums_to_one(Fixed(torch.sigmoid), roi)
    assert not output_sums_to_one(Fixed(lambda z: torch.softmax(z, 1)[:, :1]), roi)
    assert not output_sums_to_one(Fixed(lambda z: torch.softmax(z, 1)[:, :, :4]), roi)  # cannot run there: False


# ---------------------------------------------------------------------------------------------- recorded class map
PROJECT_LABELS = {"background": 0, "organ_a": 1, "organ_b": 2}  # the dataset names the model's liver and spleen so


def _adapted_export(tmp_path: Path) -> tuple[Path, Path]:
    """A tiny bundle (background, liver, spleen) adapted on a dataset naming its classes organ_a and organ_b, matched
    with --class-map, and exported; the dataset."""
    from asfda.adapter import Adapter
    from asfda.io import load_dataset
    from asfda.models import parse_class_map_override
    from asfda.training import TrainConfig

    ds_root = write_nnunet(tmp_path / "ds", labels=PROJECT_LABELS)
    ds = load_dataset(ds_root, require_labels=True)
    bundle = write_bundle(tmp_path / "bundle")
    with pytest.raises(Exception, match="no dataset label"):  # the names differ: the class map is needed once
        Adapter(load_model(bundle), ds.class_names, progress=False, device="cpu")
    adapter = Adapter(load_model(bundle), ds.class_names, progress=False, device="cpu",
                      class_map_override=parse_class_map_override("organ_a=liver,organ_b=spleen"))
    adapter.finetune(list(ds.cases[:2]), TrainConfig(steps=2, batch_size=1, augment=False))
    return adapter.export_bundle(tmp_path / "adapted"), ds_root


def test_an_adapted_bundle_runs_on_its_dataset_without_class_map_again(tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """The bundle's metadata records the class map: predict and evaluate reuse it, and give what --class-map gives;
    its channel_def still names the source's channels."""
    monkeypatch.chdir(tmp_path)  # evaluate's cache folder (.cache)
    adapted, ds = _adapted_export(tmp_path)
    meta = json.loads((adapted / "configs" / "metadata.json").read_text())
    assert meta["asfda"]["class_map"] == {"background": "background", "organ_a": "liver", "organ_b": "spleen"}
    assert meta["network_data_format"]["outputs"]["pred"]["channel_def"] == {"0": "background", "1": "liver",
                                                                             "2": "spleen"}
    loaded = load_model(adapted)
    assert loaded.class_names == ["background", "organ_a", "organ_b"]
    assert [getattr(n, "declared", n) for n in loaded.class_names] == ["background", "liver", "spleen"]
    out = {}
    for how, extra in (("recorded", []), ("given", ["--class-map", "organ_a=liver,organ_b=spleen"])):
        assert _run("predict", "--model", adapted, "--images", ds, "--out", tmp_path / f"pred_{how}", "--device",
                    "cpu", *extra) == 0
        assert _run("evaluate", "--model", adapted, "--data", ds, "--out", tmp_path / f"eval_{how}", "--device",
                    "cpu", *extra) == 0
        summary = json.loads((tmp_path / f"eval_{how}" / "summary.json").read_text())
        out[how] = (summary["class_map"], summary["mean"],
                    {p.name: np.asarray(load_nifti(p).dataobj) for p in (tmp_path / f"pred_{how}").glob("*.nii.gz")})
        assert json.loads((tmp_path / f"pred_{how}" / "labels.json").read_text()) == PROJECT_LABELS
    assert out["recorded"][0] == {"background": "background", "organ_a": "organ_a", "organ_b": "organ_b"}
    assert out["recorded"][1] == out["given"][1]
    assert out["recorded"][2].keys() == out["given"][2].keys() and len(out["given"][2]) == 3
    assert all(np.array_equal(out["recorded"][2][k], v) for k, v in out["given"][2].items())


def test_an_adapted_bundle_adapted_again_keeps_its_class_map_in_the_declared_names(tmp_path: Path) -> None:
    """Adapting the adapted bundle again records the map in the channel_def's names, so the second export also runs
    without --class-map; the declared name still matches a dataset that uses it."""
    from asfda.adapter import Adapter
    from asfda.io import load_dataset

    adapted, ds_root = _adapted_export(tmp_path)
    ds = load_dataset(ds_root, require_labels=True)
    again = Adapter(load_model(adapted), ds.class_names, progress=False, device="cpu").export_bundle(tmp_path / "2")
    meta = json.loads((again / "configs" / "metadata.json").read_text())
    assert meta["asfda"]["class_map"] == {"background": "background", "organ_a": "liver", "organ_b": "spleen"}
    assert load_model(again).class_names == ["background", "organ_a", "organ_b"]
    cmap = build_class_map(load_model(again).label_names, ["background", "liver", "spleen"])
    assert cmap.source_index == (0, 1, 2)


def test_a_recorded_class_map_that_would_name_two_channels_alike_is_not_applied(tmp_path: Path) -> None:
    from asfda.models.classmap import names_from_recorded_class_map

    names = ["background", "liver", "spleen"]
    clash = {"asfda": {"class_map": {"background": "background", "spleen": "liver"}}}
    assert names_from_recorded_class_map(names, clash) == names
    assert names_from_recorded_class_map(names, {}) == names
    swapped = {"asfda": {"class_map": {"background": "background", "a": "spleen", "b": "liver"}}}
    assert names_from_recorded_class_map(names, swapped) == ["background", "b", "a"]


# ---------------------------------------------------------------------------------------------- TorchScript export
@pytest.mark.slow
@pytest.mark.parametrize("softmax", [False, True], ids=["logits", "ending_in_softmax"])
def test_a_torchscript_export_runs_under_monai_bundle_run(softmax: bool, tiny_plain: Path, tmp_path: Path) -> None:
    """The export of a TorchScript model has an inference.json that ``python -m monai.bundle run`` runs: one label
    map per image, equal to asfda predict's (the model's own classes, a plain folder of images). A network ending in
    a softmax gets no second one; MONAI then blends the windows' probabilities where asfda blends their logarithms,
    so voxels where overlapping windows disagree may differ."""
    from asfda.adapter import Adapter
    from asfda.io import load_dataset

    ds = write_nnunet(tmp_path / "ds")
    scripted = _scripted_bundle(tiny_plain, tmp_path / "scripted", softmax=softmax)
    model = load_model(scripted, allow_code=True)
    out = Adapter(model, load_dataset(ds).class_names, progress=False, device="cpu").export_bundle(tmp_path / "exp")
    assert (out / "models" / "model.ts").is_file()
    cfg = json.loads((out / "configs" / "inference.json").read_text())
    assert "run" in cfg and "network_def" in cfg
    steps = [step["_target_"] for step in cfg["postprocessing"]["transforms"]]
    assert ("Activationsd" in steps) != softmax
    images = tmp_path / "images"
    images.mkdir()
    for p in sorted((ds / "imagesTr").glob("*.nii.gz")):
        shutil.copyfile(p, images / p.name.replace("_0000", ""))
    env = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    args = {"config_file": str(out / "configs" / "inference.json"), "bundle_root": str(out),
            "dataset_dir": str(images), "output_dir": str(tmp_path / "monai")}
    if importlib.util.find_spec("fire") is not None:  # the command line (MONAI's needs python-fire)
        command = ["-m", "monai.bundle", "run", *(x for k, v in args.items() for x in (f"--{k}", v))]
    else:  # what it calls
        command = ["-c", f"import monai.bundle; monai.bundle.run(**{args!r})"]
    res = subprocess.run([sys.executable, *command], env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    assert _run("predict", "--model", out, "--images", images, "--out", tmp_path / "asfda", "--device", "cpu",
                "--trust-model-code") == 0
    written = sorted((tmp_path / "monai").glob("*_seg.nii.gz"))
    assert [p.name for p in written] == [f"case{i:02d}_seg.nii.gz" for i in range(3)]
    for p in written:
        theirs = np.asarray(load_nifti(str(p)).dataobj).squeeze()
        ours = np.asarray(load_nifti(str(tmp_path / "asfda" / p.name.replace("_seg", ""))).dataobj)
        assert theirs.shape == ours.shape
        differ = float(np.mean(theirs != ours))
        assert differ < 0.02 if softmax else differ == 0, (p.name, differ)


# ---------------------------------------------------------------------------------------------- fewer organs
def test_a_model_with_fewer_organs_folds_the_others_into_background() -> None:
    """A one-organ model on a four-organ dataset: the class map says which dataset classes it covers, folds the
    others out of a label, and says so in one sentence."""
    targets = ["background", "liver", "spleen", "kidney", "pancreas"]
    cmap = build_class_map(["background", "spleen"], targets)
    assert cmap.covered == (2,) and cmap.uncovered == (1, 3, 4)
    label = torch.tensor([0, 1, 2, 3, 4, 2])
    assert cmap.fold_uncovered_label(label).tolist() == [0, 0, 2, 0, 0, 2]
    note = cmap.uncovered_note()
    assert note is not None and "['liver', 'kidney', 'pancreas']" in note and "['spleen']" in note
    full = build_class_map(["background", "liver", "spleen"], ["background", "liver", "spleen"])
    assert full.uncovered == () and full.uncovered_note() is None
    assert torch.equal(full.fold_uncovered_label(label), label)


def test_a_one_organ_model_runs_and_fine_tunes_on_a_dataset_of_more_organs(tmp_path: Path) -> None:
    """With fold_uncovered the spleen-only model gets no new output channel: the dataset's liver is never
    predicted, its label voxels train as background, and the adapted model exports as the source bundle."""
    from asfda.adapter import Adapter
    from asfda.errors import AsfdaError
    from asfda.io import load_dataset
    from asfda.training import TrainConfig

    ds = load_dataset(write_nnunet(tmp_path / "ds"), require_labels=True)  # background, liver, spleen
    model = load_model(write_bundle(tmp_path / "spleen", class_names=("background", "spleen")))
    adapter = Adapter(model, ds.class_names, progress=False, device="cpu", fold_uncovered=True)
    assert adapter.current.new_head is None and adapter.class_map.uncovered == (1,)
    adapter.class_map.refuse_new_classes()  # nothing to refuse: folded, not new
    case = ds.cases[0]
    vol = adapter.prepare(case)
    assert vol.label is not None and set(vol.label.unique().tolist()) == {0, 2}  # the liver counts as background
    logits, _ = adapter.forward(case)
    probs = torch.softmax(logits, 0)
    assert logits.shape[0] == 3 and int((logits.argmax(0) == 1).sum()) == 0 and float(probs[1].max()) < 1e-9
    adapter.finetune(list(ds.cases[:1]), TrainConfig(steps=2, batch_size=1, augment=False))
    assert load_model(adapter.export_bundle(tmp_path / "adapted")).class_names == ["background", "spleen"]
    # without folding the liver gets a new channel, which the source bundle cannot hold
    plain = Adapter(model, ds.class_names, progress=False, device="cpu")
    assert plain.current.new_head is not None
    with pytest.raises(AsfdaError, match="not classes of the model"):
        plain.class_map.refuse_new_classes()


def test_folding_changes_nothing_for_a_model_that_covers_every_class() -> None:
    """fold_uncovered is set only where a class is folded: a model covering the dataset keeps its class map (and
    the adapter's keys of stored outputs) as before."""
    full = build_class_map(["background", "liver", "spleen"], ["background", "liver", "spleen"], fold_uncovered=True)
    assert full == build_class_map(["background", "liver", "spleen"], ["background", "liver", "spleen"])
    assert build_class_map(["background", "spleen"], ["background", "liver", "spleen"], fold_uncovered=True
                           ).fold_uncovered
