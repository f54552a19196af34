"""The scoring stage (asfda.scoring.pool.score_volumes): the passes it runs for the declared needs, MC dropout and TTA
passes, the BADGE and anatomy vectors, the BatchNorm and InstanceNorm statistics gaps."""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn

from asfda.engine import InferenceEngine
from asfda.errors import AsfdaError
from asfda.scoring import (
    ScoringNeeds,
    anatomy_composition,
    badge_embedding,
    bald,
    cosine_distance,
    mc_entropy,
    organ_extent,
    tta_variance,
)
from asfda.scoring.pool import score_volumes


# ---------------------------------------------------------------------------------------------- the scoring stage
class _FakeEngine(InferenceEngine):
    """Records every call; logits depend on the image (not flip-symmetric) and, with mc_dropout, on the
    global torch RNG (which the scoring stage seeds per volume and pass)."""

    def __init__(self, n_classes: int = 3) -> None:
        self.network = nn.Identity()
        self.device = torch.device("cpu")
        self.calls: list[tuple[torch.Tensor, bool]] = []
        self.c = n_classes

    def run(self, image: torch.Tensor, *, mc_dropout: bool = False, tta: bool = False
            ) -> tuple[torch.Tensor, torch.Tensor]:
        self.calls.append((image.clone(), mc_dropout))
        x = image[0]
        ramp = torch.arange(x.numel(), dtype=torch.float32).reshape(x.shape) / x.numel()
        logits = torch.stack([-x, x + ramp, 0.5 * x * ramp][: self.c]) * 4
        if mc_dropout:
            logits = logits + torch.randn(logits.shape)
        return logits, torch.stack([x.mean(), x.std(), ramp.mean()])


def _volumes(n: int = 3, shape=(4, 5, 3)) -> list[SimpleNamespace]:
    g = torch.Generator().manual_seed(7)
    return [SimpleNamespace(case_id=f"v{i}", image=torch.randn(1, *shape, generator=g)) for i in range(n)]


@pytest.mark.parametrize(
    ("needs", "extra_calls", "metrics"),
    [
        (None, 0, {"asd", "enpy", "confidence"}),
        (ScoringNeeds(metrics=frozenset({"enpy"})), 0, {"asd", "enpy", "confidence"}),
        (ScoringNeeds(metrics=frozenset({"bald"}), mc_dropout=5), 5,
         {"asd", "enpy", "confidence", "mc_entropy", "bald"}),
        (ScoringNeeds(metrics=frozenset({"tta_variance"}), tta_flips=((), (1,), (2,), (1, 2))), 3,
         {"asd", "enpy", "confidence", "tta_variance"}),
        (ScoringNeeds(metrics=frozenset({"bald", "tta_variance"}), mc_dropout=2, tta_flips=((), (2,))), 2 + 1,
         {"asd", "enpy", "confidence", "mc_entropy", "bald", "tta_variance"}),
        (ScoringNeeds(vectors=frozenset({"badge"})), 0, {"asd", "enpy", "confidence"}),
        (ScoringNeeds(feature_stats=True), 0, {"asd", "enpy", "confidence"}),  # no BatchNorm here
    ],
)
def test_score_volumes_runs_only_the_passes_the_needs_declare(needs, extra_calls: int, metrics: set) -> None:
    eng = _FakeEngine()
    out = score_volumes(_volumes(), eng, 1.0, needs=needs)
    assert len(eng.calls) == 3 * (1 + extra_calls)
    assert set(out.metrics) == metrics
    assert out.ids == ["v0", "v1", "v2"]
    assert out.info["forward_passes_per_volume"] == 1 + extra_calls
    assert out.info["divergence_available"] == "feature_gap"
    assert all(len(v) == 3 for v in out.metrics.values())
    if needs is not None and needs.head_gradient:
        assert out.vectors["badge"].shape == (3, 3 * 3)  # C=3 x D=3
    else:
        assert out.vectors == {}
    assert out.embeddings.shape == (3, 3) and out.embeddings0 is None


def test_score_volumes_frozen_adds_kd_from_one_more_pass() -> None:
    cur, frz = _FakeEngine(), _FakeEngine()
    out = score_volumes(_volumes(2), cur, 1.0, frozen=frz, needs=ScoringNeeds(feature_stats=True))
    assert out.embeddings0 is not None
    assert len(frz.calls) == 2 and "kd" in out.metrics and out.embeddings0.shape == (2, 3)
    assert np.allclose(out.metrics["kd"], 0.0)  # same fake model -> KL 0
    assert out.info["divergence_available"] == "kd"


def test_score_volumes_mc_passes_are_seeded_order_free_and_match_the_pure_functions() -> None:
    needs = ScoringNeeds(metrics=frozenset({"bald"}), mc_dropout=4)
    vols = _volumes(3)
    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    a = score_volumes(vols, _FakeEngine(), 1.5, needs=needs, seed=11)
    assert torch.equal(torch.rand(1), before)  # the global RNG is untouched
    b = score_volumes(vols[::-1], _FakeEngine(), 1.5, needs=needs, seed=11)
    c = score_volumes(vols, _FakeEngine(), 1.5, needs=needs, seed=12)
    for m in ("bald", "mc_entropy"):
        assert np.allclose(a.metrics[m], b.metrics[m][::-1], atol=1e-12)
        assert not np.allclose(a.metrics[m], c.metrics[m])
    # re-run the stage's seeded stochastic passes of volume 0 by hand and use the stacked pure functions
    from asfda.scoring.pool import _seeded, _volume_seed

    stacked = []
    for k in range(4):
        with _seeded(_volume_seed(11, "v0", k), torch.device("cpu")):
            logits, _ = _FakeEngine().run(vols[0].image, mc_dropout=True)
        stacked.append(torch.softmax(logits / 1.5, 0))
    probs = torch.stack(stacked)
    assert a.metrics["bald"][0] == pytest.approx(bald(probs), abs=1e-6)
    assert a.metrics["mc_entropy"][0] == pytest.approx(mc_entropy(probs), abs=1e-6)


def test_score_volumes_tta_flips_axes_1_2_only_and_flips_logits_back() -> None:
    eng = _FakeEngine()
    flips = ((), (1,), (2,), (1, 2))
    vol = _volumes(1)[0]
    out = score_volumes([vol], eng, 2.0, needs=ScoringNeeds(metrics=frozenset({"tta_variance"}), tta_flips=flips))
    images = [img for img, _ in eng.calls]
    # main pass, then y-flip, z-flip, yz-flip of the [1, X, Y, Z] image (tensor dims 2, 3); never x (dim 1)
    assert torch.equal(images[0], vol.image)
    assert torch.equal(images[1], torch.flip(vol.image, [2]))
    assert torch.equal(images[2], torch.flip(vol.image, [3]))
    assert torch.equal(images[3], torch.flip(vol.image, [2, 3]))
    # expected: each flipped prediction mapped back to the original grid, then the pure function
    ref = _FakeEngine()
    probs = []
    for f in flips:
        dims = [a + 1 for a in f]
        logits, _ = ref.run(torch.flip(vol.image, dims) if dims else vol.image)
        probs.append(torch.softmax((torch.flip(logits, dims) if dims else logits) / 2.0, 0))
    assert out.metrics["tta_variance"][0] == pytest.approx(tta_variance(torch.stack(probs)), rel=1e-5)


def test_score_volumes_badge_vector_matches_pure_function() -> None:
    vol = _volumes(1)[0]
    out = score_volumes([vol], _FakeEngine(), 0.7, needs=ScoringNeeds(vectors=frozenset({"badge"})))
    logits, emb = _FakeEngine().run(vol.image)
    expected = badge_embedding(torch.softmax(logits / 0.7, 0), emb)
    assert np.allclose(out.vectors["badge"][0], expected.numpy(), atol=1e-6)


def test_anatomy_composition_hand_values_and_direction() -> None:
    # 4 voxels, 3 classes: foreground fractions are the per-class means of p_1 and p_2
    prob = torch.tensor([[1.0, 0.5, 0.0, 0.2],
                         [0.0, 0.5, 1.0, 0.0],
                         [0.0, 0.0, 0.0, 0.8]]).reshape(3, 2, 2, 1)
    assert anatomy_composition(prob).tolist() == pytest.approx([1.5 / 4, 0.8 / 4])
    assert anatomy_composition(prob).dtype == torch.float64
    # same organs in a field of view with twice the background: same direction, cosine distance 0
    wider = torch.cat([prob, torch.tensor([1.0, 0.0, 0.0]).reshape(3, 1, 1, 1).expand(3, 2, 2, 1)], dim=3)
    d = cosine_distance(anatomy_composition(prob)[None], anatomy_composition(wider)[None])
    assert float(d) == pytest.approx(0.0, abs=1e-12)
    # a missing class 2 ("kidney") is far from the same anatomy with it
    no2 = prob.clone()
    no2[0] += no2[2]
    no2[2] = 0
    assert float(cosine_distance(anatomy_composition(prob)[None], anatomy_composition(no2)[None])) > 0.1
    with pytest.raises(ValueError):
        anatomy_composition(torch.ones(1, 2, 2))


@pytest.mark.parametrize(("vector", "expected"), [
    ("anatomy", lambda logits: anatomy_composition(torch.softmax(logits / 0.7, 0)).numpy()),
    ("extent", lambda logits: organ_extent(logits.argmax(0), 3)),
])
def test_score_volumes_vector_only_when_asked_and_cached(tmp_path, vector: str, expected) -> None:
    """The anatomy composition and the organ extents come out of the scoring pass (no pass of their own), only when
    a strategy asks for them, and are read back from the score cache."""
    from asfda.cache import EngineOutputCache

    vols = _volumes(2)
    assert vector not in score_volumes(vols, _FakeEngine(), 0.7).vectors
    cache = EngineOutputCache(tmp_path / "scores")
    key = lambda cid: cache.key(cid, "w", "p", False, "x")  # noqa: E731
    eng = _FakeEngine()
    needs = ScoringNeeds(vectors=frozenset({vector}))
    out = score_volumes(vols, eng, 0.7, needs=needs, cache=cache, cache_key=key)
    assert len(eng.calls) == 2  # no pass of its own
    for i, vol in enumerate(vols):
        logits, _ = _FakeEngine().run(vol.image)
        assert np.allclose(out.vectors[vector][i], expected(logits), atol=1e-7)
    again = score_volumes(vols, eng, 0.7, needs=needs, cache=cache, cache_key=key)
    assert len(eng.calls) == 2 and np.array_equal(again.vectors[vector], out.vectors[vector])


def test_mc_dropout_without_dropout_layers_names_the_tta_alternative() -> None:
    net = nn.Sequential(nn.Conv3d(1, 4, 3, padding=1), nn.InstanceNorm3d(4), nn.Conv3d(4, 2, 1))
    eng = InferenceEngine(net, (4, 4, 4), device=torch.device("cpu"), embedding_layer="output")
    with pytest.raises(AsfdaError, match="tta"):
        score_volumes(_volumes(1, (4, 4, 4)), eng, 1.0, needs=ScoringNeeds(metrics=frozenset({"bald"}), mc_dropout=5))


def _bn_network() -> nn.Module:
    """BatchNorm first (input = the image, 1 channel) with stored source statistics mean 0, var 1."""
    bn = nn.BatchNorm3d(1, eps=1e-5)
    bn.reset_running_stats()  # running mean 0, running variance 1
    return nn.Sequential(bn, nn.Conv3d(1, 2, 1)).eval()


def test_batchnorm_statistics_gap_on_a_tiny_network() -> None:
    # image values alternate -1 and 3: channel mean 1, population variance 4 (one window = the whole image)
    image = torch.tensor([-1.0, 3.0]).repeat(16).reshape(1, 4, 4, 2)
    vol = SimpleNamespace(case_id="bn0", image=image)
    eng = InferenceEngine(_bn_network(), (4, 4, 2), device=torch.device("cpu"), embedding_layer="output")
    out = score_volumes([vol], eng, 1.0, needs=ScoringNeeds(feature_stats=True))
    # KL(N(1, 4 + eps) || N(0, 1 + eps)) = 0.5 (ln(1/4) + 5 - 1) = 1.306853 (eps 1e-5 moves it < 1e-4)
    assert out.metrics["bn_kl"][0] == pytest.approx(1.306853, abs=1e-4)
    assert out.info["divergence_available"] == "bn_kl" and out.info["batchnorm_layers"] == 1
    # a volume with the source statistics scores lower; not asked for -> not computed
    same = SimpleNamespace(case_id="bn1", image=torch.tensor([-1.0, 1.0]).repeat(16).reshape(1, 4, 4, 2))
    assert score_volumes([same], eng, 1.0, needs=ScoringNeeds(feature_stats=True)).metrics["bn_kl"][0] < 1e-4
    assert "bn_kl" not in score_volumes([vol], eng, 1.0).metrics
    # once adapted (the frozen engine is given), kd is the divergence and bn_kl is not computed
    adapted = score_volumes([vol], eng, 1.0, frozen=eng, needs=ScoringNeeds(feature_stats=True))
    assert "bn_kl" not in adapted.metrics and "kd" in adapted.metrics


def test_batchnorm_gap_reaches_the_asfda_query_components() -> None:
    from asfda.selection import PoolScores, get_strategy

    eng = InferenceEngine(_bn_network(), (4, 4, 2), device=torch.device("cpu"), embedding_layer="output")
    g = torch.Generator().manual_seed(0)
    vols = [SimpleNamespace(case_id=f"c{i}", image=torch.randn(1, 4, 4, 2, generator=g) * (1 + i)) for i in range(4)]
    strategy = get_strategy("asfda")
    out = score_volumes(vols, eng, 1.0, needs=strategy.needs)
    pool = PoolScores(out.ids, out.metrics, out.embeddings, vectors=out.vectors)
    q = strategy.select(pool, 2, 0)
    assert all("bn_kl" in c and "feature_gap" not in c for c in q.components.values())


# ------------------------------------------------------------------ round-0 gap of InstanceNorm networks
def test_pool_normalisation_divergence_hand_computed() -> None:
    from asfda.scoring import pool_normalisation_divergence

    # layer 1, one channel: volume means 0 and 2, variances 1 and 1 -> pool reference mean 1,
    # var = mean(1 + 0, 1 + 4) - 1 = 2; KL(N(0, 1) || N(1, 2)) = 0.5 (ln 2 + (1 + 1) / 2 - 1) = 0.5 ln 2,
    # the same for N(2, 1) by symmetry
    m1, v1 = torch.tensor([[0.0], [2.0]]), torch.tensor([[1.0], [1.0]])
    out = pool_normalisation_divergence([m1], [v1])
    assert out.tolist() == pytest.approx([0.5 * math.log(2)] * 2)
    # layer 2 where both volumes equal the reference: KL 0, and layers count equally -> half
    m2, v2 = torch.zeros(2, 3), torch.ones(2, 3)
    assert pool_normalisation_divergence([m1, m2], [v1, v2]).tolist() == pytest.approx([0.25 * math.log(2)] * 2)
    # an atypical volume scores highest
    m3 = torch.tensor([[0.0], [0.1], [-0.1], [3.0]])
    out = pool_normalisation_divergence([m3], [torch.ones(4, 1)])
    assert int(torch.argmax(out)) == 3
    with pytest.raises(ValueError):
        pool_normalisation_divergence([], [])


def test_norm_kl_from_stats_layout() -> None:
    from asfda.scoring.pool import norm_kl_from_stats

    # per layer: means then variances; layer 1 (1 channel) as above, layer 2 (2 channels) at the reference
    stats = np.array([[0.0, 1.0, 5.0, 5.0, 1.0, 1.0], [2.0, 1.0, 5.0, 5.0, 1.0, 1.0]])
    assert norm_kl_from_stats(stats, [1, 2]).tolist() == pytest.approx([0.25 * math.log(2)] * 2)
    with pytest.raises(ValueError, match="columns"):
        norm_kl_from_stats(stats, [1, 1])


def _instance_norm_network() -> nn.Module:
    """InstanceNorm on the input image (1 channel, no running statistics), then a 1x1 conv to 2 classes."""
    return nn.Sequential(nn.InstanceNorm3d(1), nn.Conv3d(1, 2, 1)).eval()


def test_instance_norm_gap_is_computed_on_the_one_pass_and_cached(tmp_path) -> None:
    from asfda.cache import EngineOutputCache

    eng = InferenceEngine(_instance_norm_network(), (4, 4, 2), device=torch.device("cpu"), embedding_layer="output")
    # image values alternate m - 1 and m + 1: channel mean m, variance 1 (one window = the whole image)
    vols = [SimpleNamespace(case_id=f"in{i}", image=(torch.tensor([-1.0, 1.0]).repeat(16) + m).reshape(1, 4, 4, 2))
            for i, m in enumerate([0.0, 2.0])]
    needs = ScoringNeeds(feature_stats=True, norm_stats=True)
    cache = EngineOutputCache(tmp_path / "scores")
    key = lambda cid: cache.key(cid, "w", "p", False, "x")  # noqa: E731
    out = score_volumes(vols, eng, 1.0, needs=needs, cache=cache, cache_key=key)
    assert out.metrics["norm_kl"].tolist() == pytest.approx([0.5 * math.log(2)] * 2, abs=1e-6)
    assert out.vectors["norm_stats"].shape == (2, 2)
    assert out.info["divergence_available"] == "norm_kl" and out.info["instance_norm_layers"] == 1
    calls = []
    eng.network.register_forward_hook(lambda *a: calls.append(1))
    again = score_volumes(vols, eng, 1.0, needs=needs, cache=cache, cache_key=key)
    assert calls == []  # both volumes came from the cache, statistics included
    assert np.array_equal(again.metrics["norm_kl"], out.metrics["norm_kl"])
    # not asked for -> not computed (asfda's default needs do not ask); once adapted kd replaces it
    assert "norm_kl" not in score_volumes(vols, eng, 1.0).metrics
    assert "norm_kl" not in score_volumes(vols, eng, 1.0, needs=ScoringNeeds(feature_stats=True)).metrics
    adapted = score_volumes(vols, eng, 1.0, frozen=eng, needs=needs)
    assert "norm_kl" not in adapted.metrics and "kd" in adapted.metrics


def test_organ_extent_hand_values() -> None:
    lab = np.zeros((6, 6, 8), dtype=np.int64)
    lab[1:3, 1:3, 0:3] = 1  # organ 1: 12 voxels reaching the first slice: cut by the field of view
    lab[3:5, 3:5, 3:6] = 2  # organ 2: 12 voxels inside
    lab[0, 5, 7] = 2  # a stray voxel of organ 2 on the last slice: not its largest component, not a cut
    ext = organ_extent(torch.from_numpy(lab), 4)  # organ 3 predicted nowhere
    assert ext.tolist() == [[12.0, 1.0], [12.0, 0.0], [0.0, 0.0]] and ext.dtype == np.float64
    with pytest.raises(ValueError, match=r"\[X, Y, Z\]"):
        organ_extent(lab[0], 4)
