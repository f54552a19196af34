from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from monai.inferers import sliding_window_inference
from monai.networks.nets import UNet

from asfda.cache import EngineOutputCache
from asfda.engine import OUTPUT_EMBEDDING, InferenceEngine, find_embedding_layer
from asfda.errors import AsfdaError


def _net(dropout: float = 0.1) -> torch.nn.Module:
    torch.manual_seed(0)
    return UNet(3, 1, 3, (4, 8, 16), (2, 2), num_res_units=1, dropout=dropout).eval()


def test_embedding_layer_is_the_deepest_block() -> None:
    net = _net()
    name = find_embedding_layer(net, (16, 16, 8))
    out: dict[str, torch.Size] = {}
    h = dict(net.named_modules())[name].register_forward_hook(lambda m, i, o: out.update(shape=o.shape))
    net(torch.zeros(1, 1, 16, 16, 8))
    h.remove()
    assert out["shape"][2:] == (4, 4, 2)  # two stride-2 levels down


def test_engine_logits_equal_bare_sliding_window_and_embedding_is_pooled() -> None:
    net = _net()
    engine = InferenceEngine(net, (16, 16, 8), sw_batch_size=2, overlap=0.25)
    image = torch.rand(1, 24, 20, 10)
    logits, emb = engine.run(image)
    with torch.inference_mode():
        bare = sliding_window_inference(image[None], (16, 16, 8), 2, net, overlap=0.25, mode="constant")[0]
    assert torch.allclose(logits, bare, atol=1e-6)
    assert logits.shape == (3, 24, 20, 10)
    assert emb.ndim == 1 and emb.shape[0] > 0 and torch.isfinite(emb).all()
    logits2, emb2 = engine.run(image)
    assert torch.equal(logits, logits2) and torch.allclose(emb, emb2)


def test_mc_dropout_varies_and_requires_dropout() -> None:
    engine = InferenceEngine(_net(0.3), (16, 16, 8))
    image = torch.rand(1, 16, 16, 8)
    a, _ = engine.run(image, mc_dropout=True)
    b, _ = engine.run(image, mc_dropout=True)
    assert not torch.equal(a, b)
    assert not engine.network.training  # restored
    with pytest.raises(AsfdaError, match="dropout"):
        InferenceEngine(_net(0.0), (16, 16, 8)).run(image, mc_dropout=True)


# -- test-time augmentation -------------------------------------------------------------------------

def test_tta_averages_identity_and_flips_along_ap_and_si_only() -> None:
    net = _net(0.0)
    engine = InferenceEngine(net, (16, 16, 8), sw_batch_size=2, overlap=0.25)
    assert engine.tta_axes == (1, 2) and engine.n_passes == 3  # never the left-right axis 0
    image = torch.rand(1, 20, 18, 10)
    plain, emb = engine.run(image)
    logits, emb_tta = engine.run(image, tta=True)
    assert logits.shape == plain.shape == (3, 20, 18, 10)

    def bare(x: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            return sliding_window_inference(x[None], (16, 16, 8), 2, net, overlap=0.25, mode="constant")[0]

    expected = (bare(image) + bare(image.flip(2)).flip(2) + bare(image.flip(3)).flip(3)) / 3
    assert torch.allclose(logits, expected, atol=1e-5)
    assert not torch.allclose(logits, plain, atol=1e-4)
    assert torch.allclose(emb_tta, emb)  # embedding from the un-flipped pass only


def test_tta_with_no_axes_equals_no_tta() -> None:
    engine = InferenceEngine(_net(0.0), (16, 16, 8), tta_axes=())
    image = torch.rand(1, 16, 16, 8)
    assert engine.n_passes == 1
    a, ea = engine.run(image)
    b, eb = engine.run(image, tta=True)
    assert torch.equal(a, b) and torch.equal(ea, eb)


@pytest.mark.parametrize("axes", [(3,), (1, 1), (-1,)])
def test_bad_tta_axes_are_refused(axes: tuple) -> None:
    with pytest.raises(ValueError, match="tta_axes"):
        InferenceEngine(_net(), (16, 16, 8), tta_axes=axes)


def test_torchscript_network_falls_back_to_pooled_logits() -> None:
    scripted = torch.jit.script(_net(0.0))
    engine = InferenceEngine(scripted, (16, 16, 8))
    assert engine.embedding_layer == OUTPUT_EMBEDDING
    logits, emb = engine.run(torch.rand(1, 16, 16, 8), tta=True)
    assert logits.shape == (3, 16, 16, 8)
    assert emb.shape == (3,)


# -- cache of the small outputs ---------------------------------------------------------------------
def _get(cache: EngineOutputCache, key: str) -> dict[str, np.ndarray]:
    entry = cache.get(key)
    assert entry is not None, key
    return entry


def test_cache_miss_put_hit_and_keys(tmp_path: Path) -> None:
    cache = EngineOutputCache(tmp_path / "c")
    key = cache.key("case 01", "abc", "prep", tta=False)
    assert cache.get(key) is None
    emb = torch.arange(8, dtype=torch.float32)
    cache.put(key, {"embedding": emb, "asd": 0.25, "n": np.int64(3)})
    hit = cache.get(key)
    assert hit is not None
    assert set(hit) == {"embedding", "asd", "n"}
    np.testing.assert_array_equal(hit["embedding"], emb.numpy())
    assert float(hit["asd"]) == 0.25 and int(hit["n"]) == 3
    others = {cache.key("case 01", "abc", "prep", tta=True), cache.key("case 01", "abd", "prep", tta=False),
              cache.key("case 01", "abc", "prep2", tta=False), cache.key("case 02", "abc", "prep", tta=False)}
    assert key not in others and len(others) == 4
    assert all(cache.get(k) is None for k in others)
    assert EngineOutputCache(tmp_path / "c").get(key) is not None  # persists on disk


def test_cache_put_is_atomic_and_replaces(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cache = EngineOutputCache(tmp_path)
    key = cache.key("a", "w", "p", tta=False)
    cache.put(key, {"x": np.ones(3)})
    cache.put(key, {"x": np.zeros(3)})
    np.testing.assert_array_equal(_get(cache, key)["x"], np.zeros(3))

    def broken_savez(fh, **arrays):
        fh.write(b"PK\x03\x04 half a file")
        raise OSError("disk full")

    monkeypatch.setattr(np, "savez", broken_savez)
    with pytest.raises(OSError, match="disk full"):
        cache.put(key, {"x": np.full(3, 7.0)})
    monkeypatch.undo()
    np.testing.assert_array_equal(_get(cache, key)["x"], np.zeros(3))  # old entry intact
    assert [p.name for p in tmp_path.iterdir()] == [f"{key}.npz"]  # no temporary left behind


def test_cache_corrupt_entry_is_a_miss(tmp_path: Path) -> None:
    cache = EngineOutputCache(tmp_path)
    key = cache.key("a", "w", "p", tta=True)
    cache.put(key, {"x": np.ones(3)})
    cache.path(key).write_bytes(b"not an npz")
    assert cache.get(key) is None
    assert not cache.path(key).exists()
    cache.put(key, {"x": np.ones(3)})
    assert cache.get(key) is not None


def test_cache_refuses_logits_and_bad_keys(tmp_path: Path) -> None:
    cache = EngineOutputCache(tmp_path, max_elements=1000)
    with pytest.raises(ValueError, match="never logits"):
        cache.put("a", {"logits": torch.zeros(3, 16, 16, 8)})
    with pytest.raises(ValueError, match="key"):
        cache.get("../escape")
    with pytest.raises(ValueError, match="at least one"):
        cache.put("a", {})


def test_describe_device_names_what_computed() -> None:
    from asfda.engine import describe_device

    assert describe_device(torch.device("cpu")) == f"cpu ({torch.get_num_threads()} threads)"


# -- inference precision ------------------------------------------------------------------------------

def test_bf16_inference_runs_the_forward_in_bf16_and_returns_float32_close_to_fp32() -> None:
    net = _net(0.0)
    image = torch.rand(1, 24, 20, 10)
    fp32, emb32 = InferenceEngine(net, (16, 16, 8), sw_batch_size=2).run(image)
    engine = InferenceEngine(net, (16, 16, 8), sw_batch_size=2, precision="bf16")
    seen = []
    h = net.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    bf16, emb16 = engine.run(image)
    h.remove()
    assert set(seen) == {torch.bfloat16}  # every window ran under autocast
    assert bf16.dtype == torch.float32 and emb16.dtype == torch.float32
    assert not torch.equal(bf16, fp32)  # really another computation ...
    scale = float(fp32.abs().max())
    assert float((bf16 - fp32).abs().max()) < 0.05 * scale  # ... that agrees to bf16's ~3 significant digits
    assert (bf16.argmax(0) == fp32.argmax(0)).float().mean() > 0.95
    assert torch.allclose(emb16, emb32, rtol=0.05, atol=0.05 * float(emb32.abs().max()))


def test_an_unknown_inference_precision_is_refused() -> None:
    with pytest.raises(AsfdaError, match="inference precision must be one of fp32, bf16"):
        InferenceEngine(_net(0.0), (16, 16, 8), precision="fp16")
