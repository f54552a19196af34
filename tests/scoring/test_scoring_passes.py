"""Metrics over several passes or of the network's statistics (MC dropout entropy and BALD, TTA variance, the
BADGE embedding, the BatchNorm statistics gap) and the ScoringNeeds a strategy declares.

Expected numbers are written out with their hand computation (natural logs)."""

from __future__ import annotations

import pytest
import torch

from _scoring_helpers import H_181, H_QUARTER, _prob
from asfda.scoring import (
    ScoringNeeds,
    badge_embedding,
    bald,
    gaussian_kl,
    mc_entropy,
    mc_scores_from_moments,
    normalisation_stat_divergence,
    tta_variance,
    voxel_entropy,
)


# ------------------------------------------------------------------------------------------ MC dropout: entropy, BALD
def _stack(*passes: list[tuple[float, ...]]) -> torch.Tensor:
    """``[K, C, N, 1, 1]`` from K passes, each a list of per-voxel distributions."""
    return torch.stack([_prob(p) for p in passes])


@pytest.mark.parametrize(
    ("passes", "mc_ent", "mi"),
    [
        # passes disagree completely: mean (0.5, 0.5) -> H = 1; each pass one-hot -> mean H 0; MI = 1 - 0
        ([[(1.0, 0.0)], [(0.0, 1.0)]], 1.0, 1.0),
        # passes agree on (0.5, 0.5): H(mean) = 1, mean H = 1 -> MI 0 (aleatoric, not epistemic)
        ([[(0.5, 0.5)], [(0.5, 0.5)]], 1.0, 0.0),
        # (0.25, 0.75) and (0.75, 0.25): mean (0.5, 0.5) -> 1; mean H = 0.811278 -> MI = 0.188722
        ([[(0.25, 0.75)], [(0.75, 0.25)]], 1.0, 1.0 - H_QUARTER),
        # the two voxels above in one volume: whole-volume means (1 + 1)/2 = 1 and (1 + 0)/2 = 0.5
        ([[(1.0, 0.0), (0.5, 0.5)], [(0.0, 1.0), (0.5, 0.5)]], 1.0, 0.5),
        # C=3, identical passes (0.1, 0.8, 0.1): MC entropy = H_181 = 0.581672, MI 0
        ([[(0.1, 0.8, 0.1)], [(0.1, 0.8, 0.1)], [(0.1, 0.8, 0.1)]], H_181, 0.0),
        # one-hot and agreeing: everything 0
        ([[(0.0, 1.0)], [(0.0, 1.0)]], 0.0, 0.0),
    ],
)
def test_mc_entropy_and_bald_hand_values(passes: list, mc_ent: float, mi: float) -> None:
    probs = _stack(*passes)
    assert mc_entropy(probs) == pytest.approx(mc_ent, abs=1e-6)
    assert bald(probs) == pytest.approx(mi, abs=1e-6)
    # the streaming form the scoring stage uses gives the same numbers
    streamed = mc_scores_from_moments(probs.mean(0), torch.stack([voxel_entropy(p) for p in probs]).mean(0))
    assert streamed == pytest.approx((mc_ent, mi), abs=1e-6)


def test_bald_is_nonnegative_and_at_most_mc_entropy() -> None:
    g = torch.Generator().manual_seed(4)
    probs = torch.softmax(torch.randn(5, 4, 3, 3, 3, generator=g) * 2, 1)
    assert 0.0 <= bald(probs) <= mc_entropy(probs) <= 1.0


def test_mc_functions_reject_a_single_volume() -> None:
    with pytest.raises(ValueError, match="stack"):
        bald(torch.rand(2))


# ---------------------------------------------------------------------------------------------- TTA variance
@pytest.mark.parametrize(
    ("passes", "expected"),
    [
        # fg class 1: 0.5, 0.1 -> mean 0.3, population variance (0.2^2 + 0.2^2)/2 = 0.04;
        # fg class 2: 0.0, 0.4 -> 0.04; background is ignored; mean over the 2 classes = 0.04
        ([[(0.5, 0.5, 0.0)], [(0.5, 0.1, 0.4)]], 0.04),
        # add an agreeing voxel (variance 0): whole-volume mean (0.04 + 0) / 2 = 0.02
        ([[(0.5, 0.5, 0.0), (0.2, 0.3, 0.5)], [(0.5, 0.1, 0.4), (0.2, 0.3, 0.5)]], 0.02),
        # K=4, class 1: 0, 0, 1, 1 -> mean 0.5, variance 0.25; class 2 always 0 -> (0.25 + 0)/2 = 0.125
        ([[(1.0, 0.0, 0.0)], [(1.0, 0.0, 0.0)], [(0.0, 1.0, 0.0)], [(0.0, 1.0, 0.0)]], 0.125),
        ([[(0.3, 0.7)], [(0.3, 0.7)]], 0.0),  # full agreement
    ],
)
def test_tta_variance_hand_values(passes: list, expected: float) -> None:
    assert tta_variance(_stack(*passes)) == pytest.approx(expected, abs=1e-9)


# ---------------------------------------------------------------------------------------------- BADGE embedding
def test_badge_embedding_hand_value_over_predicted_foreground() -> None:
    # C=2: v0 (0.2, 0.8) -> pred 1, p - y = (0.2, -0.2); v1 (0.4, 0.6) -> pred 1, (0.4, -0.4);
    # v2 (0.9, 0.1) -> background, left out. g = mean = (0.3, -0.3); h = (1, 2)
    # -> [g0 * h, g1 * h] = [0.3, 0.6, -0.3, -0.6]
    prob = _prob([(0.2, 0.8), (0.4, 0.6), (0.9, 0.1)])
    out = badge_embedding(prob, torch.tensor([1.0, 2.0]))
    assert out.shape == (4,)
    assert torch.allclose(out, torch.tensor([0.3, 0.6, -0.3, -0.6], dtype=torch.float64), atol=1e-12)


def test_badge_embedding_all_background_uses_every_voxel() -> None:
    # v0 (0.9, 0.1) -> (-0.1, 0.1); v1 (0.7, 0.3) -> (-0.3, 0.3); g = (-0.2, 0.2); h = (1, 2)
    prob = _prob([(0.9, 0.1), (0.7, 0.3)])
    out = badge_embedding(prob, torch.tensor([1.0, 2.0]))
    assert torch.allclose(out, torch.tensor([-0.2, -0.4, 0.2, 0.4], dtype=torch.float64), atol=1e-12)


def test_badge_embedding_confident_prediction_is_zero_and_c3_layout() -> None:
    assert torch.count_nonzero(badge_embedding(_prob([(0.0, 1.0, 0.0)]), torch.ones(5))) == 0
    # C=3, one fg voxel (0.1, 0.8, 0.1): g = (0.1, -0.2, 0.1); h = (2,) -> [0.2, -0.4, 0.2]
    out = badge_embedding(_prob([(0.1, 0.8, 0.1)]), torch.tensor([2.0]))
    assert torch.allclose(out, torch.tensor([0.2, -0.4, 0.2], dtype=torch.float64), atol=1e-12)


# ---------------------------------------------------------------------------------------------- BN statistics gap
@pytest.mark.parametrize(
    ("m1", "v1", "m0", "v0", "expected"),
    [
        (1.0, 4.0, 0.0, 1.0, 1.306853),  # 0.5 (ln(1/4) + (4 + 1)/1 - 1) = 0.5 (-1.386294 + 4)
        (0.0, 1.0, 1.0, 4.0, 0.443147),  # 0.5 (ln 4 + (1 + 1)/4 - 1) = 0.5 (1.386294 - 0.5)
        (2.0, 3.0, 2.0, 3.0, 0.0),
        (0.0, 1.0, 2.0, 1.0, 2.0),  # 0.5 (0 + (1 + 4) - 1)
    ],
)
def test_gaussian_kl_hand_values(m1: float, v1: float, m0: float, v0: float, expected: float) -> None:
    t = lambda v: torch.tensor([v])  # noqa: E731
    assert float(gaussian_kl(t(m1), t(v1), t(m0), t(v0))) == pytest.approx(expected, abs=1e-6)


def test_normalisation_stat_divergence_layers_count_equally() -> None:
    # layer A, 2 channels: KLs 1.306853 and 0 -> 0.653426; layer B, 1 channel: 0.443147
    # -> (0.653426 + 0.443147) / 2 = 0.548287 (channel-weighted would be 1.75 / 3 = 0.583333)
    a = (torch.tensor([1.0, 0.0]), torch.tensor([4.0, 1.0]), torch.tensor([0.0, 0.0]), torch.tensor([1.0, 1.0]))
    b = (torch.tensor([0.0]), torch.tensor([1.0]), torch.tensor([1.0]), torch.tensor([4.0]))
    assert normalisation_stat_divergence([a, b]) == pytest.approx(0.548287, abs=1e-6)
    with pytest.raises(ValueError):
        normalisation_stat_divergence([])


# ---------------------------------------------------------------------------------------------- needs
def test_scoring_needs_validation_and_union() -> None:
    with pytest.raises(ValueError, match="unknown metrics"):
        ScoringNeeds(metrics=frozenset({"entropy_typo"}))
    with pytest.raises(ValueError, match="mc_dropout"):
        ScoringNeeds(metrics=frozenset({"bald"}))
    with pytest.raises(ValueError, match="axis 0"):
        ScoringNeeds(tta_flips=((0,),))
    with pytest.raises(ValueError, match="at least 2"):
        ScoringNeeds(metrics=frozenset({"tta_variance"}), tta_flips=((),))
    a = ScoringNeeds(metrics=frozenset({"bald"}), mc_dropout=5, tta_flips=((), (2, 1)))
    b = ScoringNeeds(metrics=frozenset({"mc_entropy"}), mc_dropout=3, tta_flips=((1, 2), (1,)), feature_stats=True)
    u = a | b
    assert u.metrics == {"bald", "mc_entropy"} and u.mc_dropout == 5 and u.feature_stats and not u.divergence
    assert (a | ScoringNeeds(divergence=True)).divergence and (ScoringNeeds(divergence=True) | a).divergence
    assert (a | ScoringNeeds(norm_stats=True)).norm_stats and not u.norm_stats
    assert u.tta_flips == ((), (1, 2), (1,))  # normalised and de-duplicated, first-seen order
