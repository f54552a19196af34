"""A model config is data: every route by which a bundle could run code or touch files is refused, and the
payload never runs. Each case plants a payload that would create ``marker`` and asserts it never appears. A model
file is code only with trust; no allow-listed network downloads while a config is built."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from _model_security_helpers import _markers, _tiny_net
from asfda.errors import AsfdaError
from asfda.models import load_model
from asfda.models.safe_config import build_network, build_transforms
from conftest import write_bundle


def _write_cmd(marker: Path) -> str:
    return f"touch {marker}"


def _payloads(marker: Path) -> dict[str, Callable[[dict], None]]:
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


# ------------------------------------------------------------------------------ a model file is code unless proven data
class _FileWritingModule(torch.nn.Module):
    """A TorchScript payload: ``torch.from_file(shared=True)`` creates ``<marker>.load`` when the archive is loaded
    (``__setstate__``) and ``<marker>.forward`` at every inference; otherwise a valid 2-class segmentation net."""

    def __init__(self, marker: str) -> None:
        super().__init__()
        self.marker = marker
        self.weight = torch.ones(2, 1, 1, 1, 1)
        self.touched = torch.zeros(1, dtype=torch.uint8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.touched = torch.from_file(self.marker + ".forward", shared=True, size=1, dtype=torch.uint8)
        return torch.nn.functional.conv3d(x, self.weight)

    @torch.jit.export
    def __getstate__(self) -> tuple[str, torch.Tensor, torch.Tensor, bool]:
        return (self.marker, self.weight, self.touched, self.training)

    @torch.jit.export
    def __setstate__(self, state: tuple[str, torch.Tensor, torch.Tensor, bool]) -> None:
        self.marker = state[0]
        self.weight = state[1]
        self.training = state[3]
        self.touched = torch.from_file(self.marker + ".load", shared=True, size=1, dtype=torch.uint8)


def _payload_script(path: Path, marker: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.jit.save(torch.jit.script(_FileWritingModule(str(marker))), str(path))
    return path


@pytest.mark.parametrize("name", ["model.ts", "model.pt", "model.pth", "model", "weights.safetensors"])
def test_torchscript_runs_only_with_trust_and_nothing_of_it_runs_before(tmp_path: Path, name: str,
                                                                       capsys: pytest.CaptureFixture) -> None:
    """A TorchScript file (whatever its name: a .pt that is secretly TorchScript too) is a program: load_model and
    `asfda predict` refuse it in one line before torch.jit.load, naming --trust-model-code, and the file it writes at
    load and at inference never appears; with the flag it loads (and its code runs: the payload is real)."""
    from asfda.cli import main
    from asfda.models.loading import load_state_dict_file
    from conftest import write_nnunet

    marker = tmp_path / "pwned"
    ts = _payload_script(tmp_path / "m" / name, marker)
    with pytest.raises(AsfdaError, match="TorchScript model.*--trust-model-code"):
        load_model(ts)
    cfg = tmp_path / "net.json"
    cfg.write_text(json.dumps({"network_def": _tiny_net()}))
    with pytest.raises(AsfdaError, match="TorchScript model.*--trust-model-code"):
        load_model(ts, config=cfg)
    with pytest.raises(AsfdaError, match="TorchScript model|unreadable"):
        load_state_dict_file(ts)
    data = write_nnunet(tmp_path / "ds", n=1)
    capsys.readouterr()
    assert main(["predict", "--model", str(ts), "--images", str(data), "--out", str(tmp_path / "out"),
                 "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--trust-model-code" in err and "TorchScript" in err
    assert _markers(tmp_path) == []
    trusted = load_model(ts, allow_code=True)  # the user's choice: its code runs
    assert isinstance(trusted.network, torch.jit.ScriptModule)
    assert _markers(tmp_path) == ["pwned.forward", "pwned.load"]


def test_a_bundle_whose_model_file_is_torchscript_needs_trust(tmp_path: Path) -> None:
    """A bundle's models/model.pt that is TorchScript, and an adapted bundle's models/model.ts: refused untrusted."""
    marker = tmp_path / "pwned"
    for weights in ("model.pt", "model.ts"):
        b = write_bundle(tmp_path / weights)
        (b / "models" / "model.pt").unlink()
        _payload_script(b / "models" / weights, marker)
        with pytest.raises(AsfdaError, match="TorchScript model.*--trust-model-code"):
            load_model(b)
    assert _markers(tmp_path) == []


def test_trust_is_never_read_from_a_run_config(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """``trust_model_code: true`` in `simulate --config` is refused in one line (trust is given on the command line
    only); ``false`` grants nothing and is accepted; the flag still reaches the config."""
    from asfda.cli import main
    from asfda.config import load_config

    run = tmp_path / "run.yaml"
    run.write_text("model: m\npool: p\ntrust_model_code: true\n")
    with pytest.raises(AsfdaError, match="command line only.*--trust-model-code"):
        load_config(run)
    assert main(["simulate", "--config", str(run), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--trust-model-code" in err
    run.write_text("model: m\npool: p\ntrust_model_code: false\n")
    assert load_config(run).trust_model_code is False
    assert load_config(run, {"trust_model_code": True}).trust_model_code is True


# ---------------------------------------------------------------------------------- no download while a class is built
_DOWNLOAD_LIKE = re.compile(r"pretrain|download|url|hub|repo|checkpoint|ckpt|weights|file|path|dir", re.IGNORECASE)
_NOT_A_DOWNLOAD = {"use_checkpoint", "use_checkpointing", "gradient_checkpointing", "drop_path"}


def _allow_listed_classes() -> list[type]:
    import importlib
    import pkgutil
    import warnings

    import monai.networks
    import monai.transforms
    import torch.nn

    from asfda.models.safe_config import _network_class, _transform_class

    found: dict[str, type] = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for pkg in (monai.networks, torch.nn, monai.transforms):
            for info in pkgutil.walk_packages(pkg.__path__, pkg.__name__ + "."):
                try:
                    module = importlib.import_module(info.name)
                except Exception:  # noqa: BLE001 -- an optional dependency missing: asfda cannot build it either
                    continue
                for cls in vars(module).values():
                    if isinstance(cls, type):
                        dotted = f"{cls.__module__}.{cls.__name__}"
                        if _network_class(dotted) is not None or _transform_class(dotted) is not None:
                            found[dotted] = cls
    return list(found.values())


def test_no_allow_listed_class_is_built_with_a_download_default_on() -> None:
    """Every class the allow-list builds (every MONAI network, block, layer, torch.nn module and allowed transform):
    each constructor parameter that sounds like a download or a file and defaults to something truthy is either
    passed as False by the builder or the class is refused. Generic, not a list of names."""
    import inspect

    from asfda.models.safe_config import _io_defaults

    classes = _allow_listed_classes()
    assert len(classes) > 300  # the walk found the allow-list
    left_on = []
    for cls in classes:
        try:
            params = inspect.signature(cls).parameters.values()
        except (TypeError, ValueError):
            continue
        off, refused = _io_defaults(cls)
        for p in params:
            risky = (_DOWNLOAD_LIKE.search(p.name) and p.name not in _NOT_A_DOWNLOAD and p.default is not p.empty
                     and p.default is not None and not (isinstance(p.default, (bool, int, float, str))
                                                       and not p.default))
            if risky and not refused and off.get(p.name) is not False:
                left_on.append(f"{cls.__module__}.{cls.__name__}({p.name}={p.default!r})")
    assert left_on == []


def test_pretrained_by_default_networks_build_without_the_network(monkeypatch: pytest.MonkeyPatch) -> None:
    """EfficientNetBN (2D, ``pretrained`` true by default) and TextEncoder build with no connection attempted;
    an explicit download flag, a class that fetches whatever its arguments (Transchex) and torchvision weights are
    refused."""
    import socket

    def no_network(*args, **kwargs):
        raise AssertionError("a network connection was attempted while building the network")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)
    monkeypatch.setattr(socket, "getaddrinfo", no_network)
    effnet = {"_target_": "EfficientNetBN", "model_name": "efficientnet-b0", "spatial_dims": 2, "in_channels": 1,
              "num_classes": 2}
    text = {"_target_": "monai.networks.blocks.text_embedding.TextEncoder", "out_channels": 2}
    for node in (effnet, text):
        assert build_network({"network_def": node}, None) is not None
    refused: list[tuple[dict[str, object], str]] = [
        ({**effnet, "pretrained": True}, "pretrained=True"),
        ({"_target_": "Transchex", "in_channels": 1, "img_size": 32, "patch_size": 16, "num_classes": 2,
          "num_language_layers": 1, "num_vision_layers": 1, "num_mixed_layers": 1}, "path_or_repo_id"),
        ({"_target_": "monai.networks.nets.TorchVisionFCModel", "weights": "DEFAULT"}, "weights"),
        ({**_tiny_net(), "path_or_repo_id": "someone/model"}, "path_or_repo_id")]
    for node, match in refused:
        with pytest.raises(AsfdaError, match=match):
            build_network({"network_def": node}, None)
