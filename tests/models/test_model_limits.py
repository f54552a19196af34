"""A hostile model is bounded before anything is built (reference and YAML alias bombs, giant files, FIFOs, giant
ROIs and networks) and its declared values are checked (NaN weights, output channel names, pixdim, targets, keys,
the inferer)."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import pytest
import torch
import yaml

from _model_security_helpers import _markers, _tiny_net
from asfda.errors import AsfdaError
from asfda.models import load_model
from asfda.models.safe_config import build_network, build_transforms
from conftest import write_bundle


# ----------------------------------------------------------------------------- bounded before anything is resolved
def _bundle_with(tmp_path: Path, change) -> Path:
    b = write_bundle(tmp_path / "b")
    cfg_path = b / "configs" / "inference.json"
    cfg = json.loads(cfg_path.read_text())
    change(cfg)
    cfg_path.write_text(json.dumps(cfg))
    return b


def _refused_fast(capsys: pytest.CaptureFixture, model: Path, data: Path, out: Path, match: str,
                  seconds: float = 1.0) -> None:
    """`asfda predict` exits 2 with one line matching ``match`` within ``seconds`` (the model's loading included)."""
    from asfda.cli import main

    capsys.readouterr()
    start = time.perf_counter()
    assert main(["predict", "--model", str(model), "--images", str(data), "--out", str(out), "--no-progress"]) == 2
    took = time.perf_counter() - start
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and re.search(match, err), err
    assert took < seconds, f"refused after {took:.2f} s"


def _reference_bomb(cfg: dict, where: str) -> None:
    """Each level a list of 10 references to the previous one, 9 deep: 10^9 values once expanded."""
    cfg["level0"] = list(range(10))
    for i in range(1, 10):
        cfg[f"level{i}"] = [f"@level{i - 1}"] * 10
    if where == "network_def":
        cfg["network_def"]["channels"] = "@level9"
    elif where == "preprocessing":
        cfg["preprocessing"]["transforms"][2]["axcodes"] = "@level9"
    elif where == "inferer":
        cfg["inferer"]["roi_size"] = "@level9"
    else:
        cfg["postprocessing"] = {"transforms": [{"_target_": "Activationsd", "keys": "pred", "softmax": "@level9"}]}


@pytest.mark.parametrize("where", ["network_def", "preprocessing", "inferer", "postprocessing"])
def test_an_exponential_reference_config_is_refused_in_well_under_a_second(
        tmp_path: Path, where: str, capsys: pytest.CaptureFixture) -> None:
    from conftest import write_nnunet

    b = _bundle_with(tmp_path, lambda cfg: _reference_bomb(cfg, where))
    _refused_fast(capsys, b, write_nnunet(tmp_path / "ds", n=1), tmp_path / "out", r"more than 1,000,000 values")


@pytest.mark.parametrize("cycle", [{"a": ["@a", "@a"]}, {"a": "@b", "b": ["@a"]}])
def test_reference_cycles_are_refused_at_once(tmp_path: Path, cycle: dict) -> None:
    b = _bundle_with(tmp_path, lambda cfg: (cfg.update(cycle), cfg["network_def"].__setitem__("channels", "@a")))
    with pytest.raises(AsfdaError, match="cycle"):
        load_model(b)


def test_a_yaml_alias_bomb_is_refused_in_well_under_a_second(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """Billion laughs: nine levels of nine aliases each, as the bundle's inference.yaml and as a run config."""
    from asfda.config import load_config
    from conftest import write_nnunet

    lines = ['lol0: &lol0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    lines += [f"lol{i}: &lol{i} [" + ", ".join([f"*lol{i - 1}"] * 9) + "]" for i in range(1, 10)]
    b = write_bundle(tmp_path / "b")
    cfg = json.loads((b / "configs" / "inference.json").read_text())
    (b / "configs" / "inference.json").unlink()
    (b / "configs" / "inference.yaml").write_text("\n".join(lines) + "\n" + yaml.safe_dump(cfg))
    _refused_fast(capsys, b, write_nnunet(tmp_path / "ds", n=1), tmp_path / "out", r"more than 1,000,000 values")
    run = tmp_path / "run.yaml"
    run.write_text("\n".join(lines) + "\nmodel: m\n")
    start = time.perf_counter()
    with pytest.raises(AsfdaError, match="more than 1,000,000 values"):
        load_config(run)
    assert time.perf_counter() - start < 1.0
    (b / "configs" / "inference.yaml").write_text("a: &a [*a]\n" + yaml.safe_dump(cfg))
    with pytest.raises(AsfdaError, match="alias that contains itself"):
        load_model(b)


@pytest.mark.parametrize("content", ["deep_json", "deep_yaml", "huge", "latin1", "giant_int", "python_tag"])
def test_hostile_config_and_metadata_files_are_refused_cleanly(tmp_path: Path, content: str,
                                                               capsys: pytest.CaptureFixture) -> None:
    """As inference config and as metadata.json: 100k nested lists (no RecursionError traceback), a 200 MB file
    (refused unread: a sparse file), non-UTF-8 bytes, a 10,000-digit integer, a YAML python tag: one line, exit 2."""
    from conftest import write_nnunet

    data = write_nnunet(tmp_path / "ds", n=1)
    for target in ("inference", "metadata"):
        b = write_bundle(tmp_path / target)
        path = b / "configs" / ("metadata.json" if target == "metadata" else "inference.json")
        if content == "deep_yaml":
            if target == "metadata":
                continue
            path.unlink()
            path = path.with_suffix(".yaml")
            path.write_text("[" * 100_000 + "]" * 100_000)
        elif content == "deep_json":
            path.write_text("[" * 100_000 + "]" * 100_000)
        elif content == "huge":
            with path.open("wb") as f:
                f.truncate(200 << 20)
        elif content == "latin1":
            path.write_bytes(json.dumps({"image_key": "image", "x": "é"}, ensure_ascii=False).encode("latin-1"))
        elif content == "giant_int":
            path.write_text('{"x": ' + "9" * 10_000 + "}")
        else:
            path.unlink()
            path = path.with_suffix(".yaml")
            path.write_text("x: !!python/object/apply:os.system ['touch pwned']\n")
            if target == "metadata":
                continue
        _refused_fast(capsys, b, data, tmp_path / "out",
                      r"\b(invalid (JSON|YAML)|larger than 16 MiB|not UTF-8|levels deep)", seconds=3.0)
    assert _markers(tmp_path) == []


# ----------------------------------------------------------------------------------------- declared values checked
def test_nan_weights_are_refused_naming_the_tensor(tmp_path: Path) -> None:
    b = write_bundle(tmp_path / "b")
    state = torch.load(b / "models" / "model.pt", weights_only=True)
    name = sorted(k for k, v in state.items() if v.is_floating_point())[1]
    state[name] = state[name].clone().fill_(float("nan"))
    torch.save(state, b / "models" / "model.pt")
    with pytest.raises(AsfdaError, match=f"NaN or infinite values \\(in {re.escape(name)}\\)"):
        load_model(b)
    state[name] = state[name].clone().fill_(float("inf"))
    torch.save(state, b / "models" / "model.pt")
    with pytest.raises(AsfdaError, match=re.escape(name)):
        load_model(b)


@pytest.mark.parametrize("names", [("background", "liver", "liver"), ("background", "Liver", "liver")])
def test_two_output_channels_of_one_name_are_refused(tmp_path: Path, names: tuple[str, ...]) -> None:
    b = write_bundle(tmp_path / "b", class_names=names)
    with pytest.raises(AsfdaError, match="two output classes alike.*must be unique") as err:
        load_model(b)
    assert str(b / "configs" / "metadata.json") in str(err.value) and "channel_def" in str(err.value)


@pytest.mark.parametrize("pixdim", [[float("nan"), 1.0, 1.0], [1.0, float("inf"), 1.0], [0.0, 1.0, 1.0],
                                    [1.0, 1.0, -1.0]])
def test_a_declared_pixdim_that_is_no_spacing_is_refused(tmp_path: Path, pixdim: list[float]) -> None:
    b = write_bundle(tmp_path / "b")
    cfg_path = b / "configs" / "inference.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["preprocessing"]["transforms"][3]["pixdim"] = pixdim
    cfg_path.write_text(json.dumps(cfg))  # NaN and Infinity: Python's json writes and reads them
    with pytest.raises(AsfdaError, match="pixdim .* not positive, finite"):
        load_model(b)


@pytest.mark.parametrize("roi", [[10 ** 400, 16, 16], [100_000, 16, 16], [1024, 1024, 1024]])
def test_a_giant_roi_is_refused_before_any_allocation(tmp_path: Path, roi: list[int]) -> None:
    b = _bundle_with(tmp_path, lambda cfg: cfg["inferer"].__setitem__("roi_size", roi))
    with pytest.raises(AsfdaError, match="roi_size"):
        load_model(b)


def test_a_network_far_larger_than_its_weights_is_refused_before_the_memory_is_taken(tmp_path: Path) -> None:
    """``channels: [30000, 30000, 30000]`` asks a 1 kB config for 360 GiB: counted on the meta device, refused."""
    b = _bundle_with(tmp_path, lambda cfg: cfg["network_def"].__setitem__("channels", [30000, 30000, 30000]))
    start = time.perf_counter()
    with pytest.raises(AsfdaError, match="far more than the weights file holds"):
        load_model(b)
    assert time.perf_counter() - start < 5.0


@pytest.mark.parametrize("target", [
    "monai.networks.nets.os", "monai.networks.nets.__builtins__", "torch.nn.Module.load_state_dict",
    "monai.networks.nets.transchex.BertPreTrainedModel.from_pretrained", "monai.networks.nets.transchex.cached_file",
    "monai.networks.nets.torchvision_fc.models", "monai.networks.nets.UNet.__subclasses__", "torch.hub.load",
    "monai.networks.nets.swin_unetr.filter_swinunetr", "monai.networks.../os", "UNet\u200b", "type",
    "monai.networks.trt_compiler.TrtCompiler"])
def test_target_tricks_are_refused(tmp_path: Path, target: str) -> None:
    """A _target_ that is a module, a function, a method, a class outside the networks or a look-alike name."""
    with pytest.raises(AsfdaError, match="allow-list"):
        build_network({"network_def": {**_tiny_net(), "_target_": target}}, tmp_path / "inference.json")
    assert list(tmp_path.iterdir()) == []


def test_a_giant_string_or_number_is_harmless(tmp_path: Path) -> None:
    """A 10 MB description string and a 400-digit integer in an unused key load; the 400-digit one as roi is refused
    (see test_a_giant_roi_is_refused_before_any_allocation)."""
    b = _bundle_with(tmp_path, lambda cfg: cfg.update(description="x" * (10 << 20), big=10 ** 400))
    assert load_model(b).class_names[0] == "background"


def test_a_fifo_in_place_of_a_model_file_is_refused_without_blocking(tmp_path: Path) -> None:
    """An unpacked archive can hold a FIFO: opening one would block forever."""
    import os

    b = write_bundle(tmp_path / "b")
    (b / "models" / "model.pt").unlink()
    os.mkfifo(b / "models" / "model.pt")
    with pytest.raises(AsfdaError, match="not a regular file"):
        load_model(b)
    b2 = write_bundle(tmp_path / "b2")
    (b2 / "configs" / "metadata.json").unlink()
    os.mkfifo(b2 / "configs" / "metadata.json")
    with pytest.raises(AsfdaError, match="not a regular file"):
        load_model(b2)


def test_keys_that_are_not_names_are_refused(tmp_path: Path) -> None:
    """YAML allows numbers and lists as mapping keys; a component's arguments are names (no AttributeError)."""
    for cfg, key in (({"network_def": {**_tiny_net(), 1: 2}}, "network_def"),
                     ({"preprocessing": {"_target_": "Compose", "transforms": [], 3: 4}}, "preprocessing"),
                     ({"preprocessing": [{"_target_": "ScaleIntensityd", "keys": "image", (5,): 6}]}, "preprocessing")):
        with pytest.raises(AsfdaError, match="not a name"):
            (build_network if key == "network_def" else build_transforms)(cfg, tmp_path / "inference.yaml", key)


@pytest.mark.parametrize("inferer", [{"overlap": 0.99}, {"sw_batch_size": 10 ** 6}, {"sw_batch_size": 1e9}])
def test_an_inferer_that_would_run_forever_or_at_once_is_refused(tmp_path: Path, inferer: dict) -> None:
    b = _bundle_with(tmp_path, lambda cfg: cfg["inferer"].update(inferer))
    with pytest.raises(AsfdaError, match="overlap|sw_batch_size"):
        load_model(b)
