from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from asfda.errors import AsfdaError
from asfda.io import load_dataset
from asfda.models import (
    ClassMappedNetwork,
    build_class_map,
    load_model,
    parse_class_map_override,
    prepare_case,
    resample_to_native,
    save_bundle,
)
from asfda.models.loading import load_state_dict_file, unwrap_state_dict
from conftest import load_nifti, write_bundle, write_nnunet


def test_bundle_loads_with_declared_preprocessing(tiny_bundle: Path) -> None:
    m = load_model(tiny_bundle)
    assert m.class_names == ["background", "liver", "spleen"]
    assert m.preprocessing.axcodes == "RAS"
    assert m.preprocessing.pixdim_mm == (2.0, 2.0, 3.0)
    assert [type(t).__name__ for t in m.preprocessing.intensity] == ["ScaleIntensityRangePercentilesd"]
    assert m.roi_size == (16, 16, 8) and m.sw_batch_size == 2


@pytest.mark.parametrize("weights", ["model.pt", "model.safetensors"])
def test_bundle_round_trip_keeps_weights(tmp_path: Path, weights: str) -> None:
    src = write_bundle(tmp_path / "src", weights=weights, seed=3)
    m = load_model(src)
    with torch.no_grad():
        for p in m.network.parameters():
            p.add_(0.01)
    out = save_bundle(m, tmp_path / "adapted", extra_metadata={"note": "test"})
    assert (out / "models" / "model.pt").exists() and (out / "models" / "model.safetensors").exists()
    # model.pt is a plain state dict, as MONAI's CheckpointLoader expects
    plain = torch.load(out / "models" / "model.pt", weights_only=True)
    assert set(plain) == set(m.network.state_dict())
    again = load_model(out)
    assert again.weights_hash == m.weights_hash
    assert again.class_names == m.class_names
    assert again.preprocessing.description["axcodes"] == "RAS"


@pytest.mark.parametrize("wrap", ["plain", "state_dict", "model", "module_prefix", "nested"])
def test_state_dict_unwrapping(tmp_path: Path, wrap: str) -> None:
    sd = {"a.weight": torch.ones(2), "b.bias": torch.zeros(1)}
    obj = {
        "plain": sd,
        "state_dict": {"state_dict": sd, "epoch": 3},
        "model": {"model": sd},
        "module_prefix": {f"module.{k}": v for k, v in sd.items()},
        "nested": {"checkpoint": 1, "net": {"state_dict": sd}},
    }[wrap]
    if wrap == "nested":
        obj = {"net": {"state_dict": sd}}
    path = tmp_path / "ckpt.pt"
    torch.save(obj, path)
    out = load_state_dict_file(path)
    assert set(out) == set(sd)


def test_unwrap_rejects_non_state_dict(tmp_path: Path) -> None:
    with pytest.raises(AsfdaError, match="no state dict"):
        unwrap_state_dict({"epoch": 3}, tmp_path / "x.pt")


class _Evil:
    target = ""

    def __reduce__(self):
        import pathlib

        return (pathlib.Path.write_text, (pathlib.Path(_Evil.target), "pwned"))


def test_pickle_bearing_checkpoint_is_refused_and_never_executed(tmp_path: Path) -> None:
    marker = tmp_path / "pwned.txt"
    _Evil.target = str(marker)
    path = tmp_path / "evil.pt"
    torch.save({"state_dict": {"w": torch.ones(1)}, "payload": _Evil()}, path)
    with pytest.raises(AsfdaError, match="refused"):
        load_state_dict_file(path)
    assert not marker.exists()
    # sanity: loading it unsafely would have run the payload
    with open(path, "rb"):
        pass


def test_missing_keys_are_listed(tmp_path: Path) -> None:
    b = write_bundle(tmp_path / "b")
    sd = torch.load(b / "models" / "model.pt", weights_only=True)
    dropped = sorted(sd)[0]
    del sd[dropped]
    torch.save(sd, b / "models" / "model.pt")
    with pytest.raises(AsfdaError) as info:
        load_model(b)
    assert "missing keys" in str(info.value) and dropped in str(info.value)
    load_model(b, strict=False)  # the escape hatch


def test_bare_checkpoint_needs_config(tmp_path: Path) -> None:
    b = write_bundle(tmp_path / "b")
    with pytest.raises(AsfdaError, match="network config"):
        load_model(b / "models" / "model.pt")
    m = load_model(b / "models" / "model.pt", config=b / "configs" / "inference.json")
    assert m.class_names[0] == "background"


def test_class_map_by_name_and_override() -> None:
    src = ["background", "spleen", "kidney_right", "kidney_left", "liver", "stomach"]
    cm = build_class_map(src, ["background", "liver", "kidney_right", "kidney_left", "spleen"])
    assert cm.source_index == (0, 4, 2, 3, 1)
    assert cm.background_sources == (0, 5)
    cm2 = build_class_map(src, ["background", "organ_a", "liver"], parse_class_map_override("organ_a=stomach"))
    assert cm2.source_index == (0, 5, 4)
    with pytest.raises(AsfdaError, match="no dataset label"):
        build_class_map(src, ["background", "heart"])
    with pytest.raises(AsfdaError, match="not model classes"):
        build_class_map(src, ["background", "liver"], {"liver": "lung"})


def test_unmatched_source_classes_fold_into_background_by_logsumexp() -> None:
    cm = build_class_map(["background", "a", "b", "c"], ["background", "b"])

    class Fixed(torch.nn.Module):
        def forward(self, x):
            return torch.tensor([1.0, 2.0, 3.0, 0.5]).view(1, 4, 1, 1, 1).expand(x.shape[0], 4, 1, 1, 1)

    out = ClassMappedNetwork(Fixed(), cm)(torch.zeros(1, 1, 1, 1, 1))
    p_src = torch.softmax(torch.tensor([1.0, 2.0, 3.0, 0.5]), 0)
    p_tgt = torch.softmax(out[0, :, 0, 0, 0], 0)
    assert torch.allclose(p_tgt, torch.stack([p_src[0] + p_src[1] + p_src[3], p_src[2]]), atol=1e-6)


def test_new_target_class_gets_a_channel_with_warning(caplog: pytest.LogCaptureFixture) -> None:
    cm = build_class_map(["background", "liver"], ["background", "liver", "tumour"])
    assert cm.new_classes == ["tumour"]
    net = ClassMappedNetwork(torch.nn.Conv3d(1, 2, 1), cm)
    assert net(torch.zeros(1, 1, 2, 2, 2)).shape == (1, 3, 2, 2, 2)
    assert "tumour" in caplog.text


def test_inverse_puts_prediction_back_on_the_input_grid(tmp_path: Path, tiny_bundle: Path) -> None:
    # a LPS, anisotropic input grid, unlike the model's RAS 2 x 2 x 3 mm
    affine = np.array([[-1.5, 0, 0, 30.0], [0, -1.5, 0, 20.0], [0, 0, 4.0, -10.0], [0, 0, 0, 1]])
    root = write_nnunet(tmp_path / "lps", n=1, affine=affine, shape=(24, 22, 10))
    case = load_dataset(root).cases[0]
    m = load_model(tiny_bundle)
    vol = prepare_case(case, m.preprocessing, n_labels=3)
    assert vol.label is not None and vol.image.shape[1:] == vol.label.shape
    onehot = torch.nn.functional.one_hot(vol.label.long(), 3).permute(3, 0, 1, 2).float()
    back = resample_to_native(onehot, vol.affine, vol.native_affine, vol.native_shape)
    assert tuple(back.shape[1:]) == case.shape
    assert np.allclose(vol.native_affine, case.affine)

    original = np.asarray(load_nifti(str(case.label_path)).dataobj)
    agree = (back.argmax(0).numpy() == original).mean()
    assert agree > 0.95


@pytest.mark.parametrize("evil", ["expression", "target"])
def test_config_code_is_refused_and_never_run(tmp_path: Path, evil: str) -> None:
    import json

    marker = tmp_path / "pwned.txt"
    b = write_bundle(tmp_path / "b")
    cfg = json.loads((b / "configs" / "inference.json").read_text())
    if evil == "expression":
        cfg["network_def"]["channels"] = f"$__import__('pathlib').Path({str(marker)!r}).write_text('x') and [4, 8, 16]"
    else:
        cfg["network_def"] = {"_target_": "pathlib.Path.write_text", "self": str(marker), "data": "x"}
    (b / "configs" / "inference.json").write_text(json.dumps(cfg))
    with pytest.raises(AsfdaError, match="would run code"):
        load_model(b)
    assert not marker.exists()


def test_real_model_zoo_config_shape_loads_safely(tiny_bundle: Path) -> None:
    """A model-zoo inference.json has $-expressions outside network_def/preprocessing: those are never parsed."""
    import json

    cfg = json.loads((tiny_bundle / "configs" / "inference.json").read_text())
    cfg["imports"] = ["$import os"]
    cfg["device"] = "$torch.device('cpu')"
    cfg["network"] = "$@network_def.to(@device)"
    (tiny_bundle / "configs" / "inference.json").write_text(json.dumps(cfg))
    assert load_model(tiny_bundle).class_names[0] == "background"


def test_weights_hash_covers_batchnorm_counters(tmp_path: Path) -> None:
    """A BatchNorm network (its 0-d num_batches_tracked) hashes, and the counter is part of the hash."""
    from asfda.models.loading import state_dict_hash

    net = torch.nn.Sequential(torch.nn.Conv3d(1, 2, 1), torch.nn.BatchNorm3d(2))
    state = net.state_dict()
    h = state_dict_hash(state)
    state["1.num_batches_tracked"] = torch.tensor(7)
    assert state_dict_hash(state) != h
    b = write_bundle(tmp_path / "b", net={"_target_": "UNet", "spatial_dims": 3, "in_channels": 1, "out_channels": 3,
                                         "channels": [4, 8, 16], "strides": [2, 2], "num_res_units": 0,
                                         "norm": "batch"})
    assert len(load_model(b).weights_hash) == 16


@pytest.mark.parametrize("command", ["predict", "evaluate", "query"])
def test_a_multi_channel_model_is_refused_before_inference(tmp_path: Path, command: str, capsys) -> None:
    from asfda.cli import main
    from conftest import TINY_NET, write_nnunet

    b = write_bundle(tmp_path / "b", net={**TINY_NET, "in_channels": 4})
    assert load_model(b).in_channels == 4
    data = write_nnunet(tmp_path / "d", n=2)
    extra = {"predict": [], "evaluate": [], "query": ["--budget", "1"]}[command]
    rc = main([command, "--model", str(b), "--data", str(data), "--out", str(tmp_path / "o" / "x.json"), *extra])
    err = capsys.readouterr().err
    assert rc == 2 and "expects 4 input channels, the dataset has 1" in err and err.count("\n") == 1
