"""A model config is data: every route by which a bundle could run code or touch files is refused, and the
payload never runs. Each case plants a payload that would create ``marker`` and asserts it never appears."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from asfda.errors import AsfdaError
from asfda.models import load_model
from asfda.models.safe_config import build_network, build_transforms
from conftest import write_bundle


def _write_cmd(marker: Path) -> str:
    return f"touch {marker}"


def _payloads(marker: Path) -> dict[str, tuple[str, object]]:
    """name -> (which config key it poisons, how): a callable(cfg) that plants the payload."""
    m = str(marker)
    open_call = {"_target_": "open", "file": m, "mode": "w"}

    def prep(step):
        def plant(cfg):
            cfg["preprocessing"]["transforms"].insert(0, step)
        return plant

    def net_arg(key, value):
        def plant(cfg):
            cfg["network_def"][key] = value
        return plant

    def net(node):
        def plant(cfg):
            cfg["network_def"] = node
        return plant

    return {
        # the review's two findings
        "builtin open in preprocessing": prep(open_call),
        "LoadImaged reader os.system": prep({"_target_": "LoadImaged", "keys": "image", "reader": "os.system",
                                             "command": _write_cmd(marker)}),
        # targets outside the allow-list
        "builtins.open as network": net({"_target_": "builtins.open", "file": m, "mode": "w"}),
        "os.system as network": net({"_target_": "os.system", "command": _write_cmd(marker)}),
        "subprocess.run": net({"_target_": "subprocess.run", "args": ["touch", m]}),
        "pathlib write_text": net({"_target_": "pathlib.Path.write_text", "self": m, "data": "x"}),
        "monai instantiate helper": net({"_target_": "monai.utils.module.instantiate", "__path": "os.system",
                                         "command": _write_cmd(marker)}),
        "monai ConfigParser": net({"_target_": "monai.bundle.ConfigParser",
                                   "config": {"x": f"$open({m!r}, 'w')"}}),
        "SaveImaged in preprocessing": prep({"_target_": "SaveImaged", "keys": "image", "output_dir": m}),
        "Lambdad in preprocessing": prep({"_target_": "Lambdad", "keys": "image",
                                          "func": {"_target_": "os.system", "_mode_": "callable"}}),
        # expressions, macros, special keys
        "expression argument": net_arg("channels", f"$__import__('os').system('touch {m}') and [4, 8, 16]"),
        "macro": net_arg("channels", f"%{m}#x"),
        "_mode_ callable": net_arg("act", {"_target_": "os.system", "_mode_": "callable"}),
        "_mode_ debug": net({**_tiny_net(), "_mode_": "debug"}),
        "_requires_ expression": net({**_tiny_net(), "_requires_": f"$open({m!r}, 'w')"}),
        "_requires_ reference": lambda cfg: (cfg.__setitem__("evil", open_call),
                                             cfg["network_def"].__setitem__("_requires_", "@evil")),
        "_disabled_ expression": net({**_tiny_net(), "_disabled_": f"$open({m!r}, 'w') is None"}),
        "reference to a payload": lambda cfg: (cfg.__setitem__("evil", open_call),
                                               cfg["network_def"].__setitem__("act", "@evil")),
        "nested payload in a list": prep({"_target_": "ScaleIntensityd", "keys": ["image", open_call]}),
        # strings MONAI or the class would resolve to code, and arguments that fetch or write files
        "dotted code string argument": net_arg("act", "os.system"),
        "url argument": net_arg("pretrained_url", f"file://{m}"),
        "pretrained download": net({"_target_": "DenseNet121", "spatial_dims": 3, "in_channels": 1,
                                    "out_channels": 3, "pretrained": True}),
        "writer argument": prep({"_target_": "ScaleIntensityd", "keys": "image", "writer": "os.system"}),
        "Compose with a callable argument": lambda cfg: cfg["preprocessing"].__setitem__(
            "map_items", {"_target_": "os.system", "_mode_": "callable"}),
    }


def _tiny_net() -> dict:
    from conftest import TINY_NET

    return copy.deepcopy(TINY_NET)


PAYLOAD_NAMES = sorted(_payloads(Path("/x")))


@pytest.mark.parametrize("name", PAYLOAD_NAMES)
def test_config_payload_is_refused_and_never_runs(tmp_path: Path, name: str) -> None:
    marker = tmp_path / "pwned.txt"
    b = write_bundle(tmp_path / "b")
    cfg_path = b / "configs" / "inference.json"
    cfg = json.loads(cfg_path.read_text())
    _payloads(marker)[name](cfg)
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(AsfdaError) as err:
        load_model(b)
    assert "--trust-model-code" in str(err.value) or "cannot build" in str(err.value)
    assert str(cfg_path) in str(err.value)
    assert not marker.exists()


def test_payload_through_the_cli_is_a_one_line_refusal(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from asfda.cli import main
    from conftest import write_nnunet

    marker = tmp_path / "pwned.txt"
    b = write_bundle(tmp_path / "b")
    cfg_path = b / "configs" / "inference.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["preprocessing"]["transforms"].insert(0, {"_target_": "open", "file": str(marker), "mode": "w"})
    cfg_path.write_text(json.dumps(cfg))
    data = write_nnunet(tmp_path / "d", n=2)
    rc = main(["evaluate", "--model", str(b), "--data", str(data), "--out", str(tmp_path / "ev")])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and "'open'" in err and "--trust-model-code" in err
    assert not marker.exists()


def test_trusted_bundle_may_use_expressions(tmp_path: Path) -> None:
    b = write_bundle(tmp_path / "b")
    cfg_path = b / "configs" / "inference.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["network_def"]["channels"] = "$[4, 8, 16]"
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(AsfdaError, match="expression"):
        load_model(b)
    assert load_model(b, allow_code=True).class_names[0] == "background"


def test_model_zoo_style_configs_still_load(tmp_path: Path) -> None:
    """What real model-zoo bundles write: references (@image_key, @a#b), disabled steps, a reader name,
    full dotted class paths, a ScaleIntensityRanged step, descriptions."""
    b = write_bundle(tmp_path / "b")
    cfg_path = b / "configs" / "inference.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["displayable_configs"] = {"sw_batch_size": 2, "roi": [16, 16, 16]}
    cfg["inferer"] = {"_target_": "SlidingWindowInferer", "roi_size": "@displayable_configs#roi",
                      "sw_batch_size": "@displayable_configs::sw_batch_size", "overlap": 0.5}
    cfg["network_def"]["_target_"] = "monai.networks.nets.UNet"
    cfg["network_def"]["_desc_"] = "a small UNet"
    steps = cfg["preprocessing"]["transforms"]
    steps.insert(0, {"_target_": "LoadImaged", "keys": "@image_key", "reader": "ITKReader"})
    steps.append({"_target_": "monai.transforms.ScaleIntensityRanged", "keys": "@image_key", "a_min": -1.0,
                  "a_max": 1.0, "b_min": 0.0, "b_max": 1.0, "clip": True})
    steps.append({"_target_": "NormalizeIntensityd", "keys": "@image_key", "_disabled_": True})
    cfg_path.write_text(json.dumps(cfg))
    m = load_model(b)
    assert m.roi_size == (16, 16, 16) and m.sw_batch_size == 2
    names = m.preprocessing.description["transforms"]
    assert names[0] == "LoadImaged" and "ScaleIntensityRanged" in names and "NormalizeIntensityd" not in names
    assert type(m.preprocessing.intensity[-1]).__name__ == "ScaleIntensityRanged"


def test_real_bundles_build_the_same_way(tmp_path: Path) -> None:
    """The allow-list builder and MONAI's parser agree on a real bundle's network and preprocessing."""
    b = write_bundle(tmp_path / "b")
    safe, trusted = load_model(b), load_model(b, allow_code=True)
    assert safe.weights_hash == trusted.weights_hash
    assert safe.preprocessing.cache_key() == trusted.preprocessing.cache_key()
    assert safe.preprocessing.axcodes == trusted.preprocessing.axcodes
    assert safe.preprocessing.pixdim_mm == trusted.preprocessing.pixdim_mm


_json = st.recursive(
    st.none() | st.booleans() | st.integers(-5, 5) | st.floats(allow_nan=False, width=16)
    | st.sampled_from(["$x", "@network_def", "@missing", "%f#k", "os.system", "RAS", "image", "open", "a.b"]),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(
        st.sampled_from(["_target_", "_mode_", "_requires_", "_disabled_", "keys", "reader", "func", "x"]),
        inner, max_size=3),
    max_leaves=12)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(network=_json, preprocessing=_json)
def test_fuzzed_configs_refuse_cleanly(tmp_path: Path, network: object, preprocessing: object) -> None:
    """Any JSON in network_def / preprocessing builds or raises AsfdaError: no other exception, no file."""
    cfg = {"network_def": network, "preprocessing": preprocessing}
    for build, key in ((build_network, "network_def"), (build_transforms, "preprocessing")):
        try:
            build(cfg, tmp_path / "inference.json", key)
        except AsfdaError:
            pass
    assert list(tmp_path.iterdir()) == []
