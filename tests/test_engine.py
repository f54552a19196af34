from __future__ import annotations

import pytest
import torch
from monai.inferers import sliding_window_inference
from monai.networks.nets import UNet

from asfda.engine import InferenceEngine, find_embedding_layer
from asfda.errors import AsfdaError


def _net(dropout: float = 0.1) -> torch.nn.Module:
    torch.manual_seed(0)
    return UNet(3, 1, 3, (4, 8, 16), (2, 2), num_res_units=1, dropout=dropout).eval()


def test_embedding_layer_is_the_deepest_block() -> None:
    net = _net()
    name = find_embedding_layer(net, (16, 16, 8))
    out = {}
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
