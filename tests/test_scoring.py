"""Tests for the per-volume metrics (entropy, ASD, KL, confidence, cosine) and temperature scaling.

Expected numbers are written out; each has a comment giving the hand computation
(natural logs; ln 2 = 0.693147, ln 3 = 1.098612).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from asfda.scoring import (
    ScoringNeeds,
    anatomical_segmentation_difficulty,
    anatomy_composition,
    badge_embedding,
    bald,
    cosine_distance,
    expected_calibration_error,
    fit_temperature,
    foreground_confidence,
    foreground_kl_divergence,
    gaussian_kl,
    grow_mask,
    mc_entropy,
    mc_scores_from_moments,
    mean_entropy,
    normalisation_stat_divergence,
    tta_variance,
    voxel_entropy,
)

# Normalised entropies used below (H / ln C):
# H(0.25, 0.75)/ln2     = (0.25*1.386294 + 0.75*0.287682) / 0.693147 = 0.562335 / 0.693147 = 0.811278
# H(0.1, 0.8, 0.1)/ln3  = (2*0.1*2.302585 + 0.8*0.223144) / 1.098612 = 0.639032 / 1.098612 = 0.581672
# H(0.2, 0.2, 0.6)/ln3  = (2*0.2*1.609438 + 0.6*0.510826) / 1.098612 = 0.950271 / 1.098612 = 0.864974
# H(0.9, 0.05, 0.05)/ln3 = (0.9*0.105361 + 2*0.05*2.995732) / 1.098612 = 0.394398 / 1.098612 = 0.358996
H_QUARTER = 0.811278
H_181 = 0.581672
H_226 = 0.864974
H_9_05 = 0.358996


def _prob(voxels: list[tuple[float, ...]]) -> torch.Tensor:
    """A ``[C, N, 1, 1]`` probability volume from a list of per-voxel class distributions."""
    return torch.tensor(voxels, dtype=torch.float64).T.reshape(len(voxels[0]), len(voxels), 1, 1)


def _volume(shape: tuple[int, int, int], background: tuple[float, ...]) -> torch.Tensor:
    """A ``[C, X, Y, Z]`` volume filled with one class distribution."""
    return torch.tensor(background, dtype=torch.float64)[:, None, None, None].expand(-1, *shape).clone()


def _set(prob: torch.Tensor, sl: tuple[slice, slice, slice], dist: tuple[float, ...]) -> None:
    prob[(slice(None), *sl)] = torch.tensor(dist, dtype=torch.float64)[:, None, None, None]


# ---------------------------------------------------------------------------------------------- entropy
@pytest.mark.parametrize(
    ("dist", "expected"),
    [
        ((0.5, 0.5), 1.0),  # uniform over C=2: ln2/ln2
        ((1 / 3,) * 3, 1.0),  # uniform over C=3
        ((0.2,) * 5, 1.0),  # uniform over C=5
        ((0.125,) * 8, 1.0),  # uniform over C=8
        ((1.0, 0.0), 0.0),  # one-hot: 1*ln1 = 0, and 0*log(eps) = 0
        ((0.0, 0.0, 1.0), 0.0),
        ((0.25, 0.75), H_QUARTER),  # hand value above
        ((0.75, 0.25), H_QUARTER),  # symmetric
        ((0.1, 0.8, 0.1), H_181),
        ((0.2, 0.2, 0.6), H_226),
    ],
)
def test_voxel_entropy_hand_values(dist: tuple[float, ...], expected: float) -> None:
    ent = voxel_entropy(_prob([dist]))
    assert ent.shape == (1, 1, 1)
    assert float(ent) == pytest.approx(expected, abs=1e-6)


def test_voxel_entropy_shape_and_range() -> None:
    g = torch.Generator().manual_seed(0)
    prob = torch.softmax(torch.randn(4, 3, 5, 6, generator=g) * 3, 0)
    ent = voxel_entropy(prob)
    assert ent.shape == (3, 5, 6)
    assert float(ent.min()) >= 0.0
    assert float(ent.max()) <= 1.0 + 1e-6


@pytest.mark.parametrize(
    ("voxels", "expected"),
    [
        ([(0.5, 0.5), (1.0, 0.0)], 0.5),  # (1 + 0) / 2
        ([(0.25, 0.75), (0.5, 0.5)], (H_QUARTER + 1.0) / 2),  # (0.811278 + 1) / 2 = 0.905639
        ([(0.0, 1.0)] * 3, 0.0),
    ],
)
def test_mean_entropy(voxels: list[tuple[float, ...]], expected: float) -> None:
    assert mean_entropy(_prob(voxels)) == pytest.approx(expected, abs=1e-6)


# ---------------------------------------------------------------------------------------------- grow_mask
@pytest.mark.parametrize(
    ("voxel", "grow", "expected_count"),
    [
        ((2, 2, 2), 1, 27),  # interior: full 3x3x3 cube
        ((0, 0, 0), 1, 8),  # corner: 2x2x2 survives the clip
        ((0, 2, 2), 1, 18),  # face: 2x3x3
        ((0, 0, 2), 1, 12),  # edge: 2x2x3
        ((4, 4, 4), 1, 8),  # opposite corner
        ((2, 2, 2), 2, 125),  # 5x5x5 = the whole 5^3 volume
        ((0, 0, 0), 2, 27),  # corner grown by 2: 3x3x3
        ((2, 2, 2), 0, 1),  # identity
        ((2, 2, 2), -1, 1),  # non-positive grow = identity
    ],
)
def test_grow_mask_single_voxel(voxel: tuple[int, int, int], grow: int, expected_count: int) -> None:
    mask = torch.zeros(5, 5, 5, dtype=torch.bool)
    mask[voxel] = True
    grown = grow_mask(mask, grow)
    assert grown.dtype == torch.bool
    assert grown.shape == mask.shape
    assert int(grown.sum()) == expected_count
    # exactly the clipped cube around the voxel (cubic structuring element)
    r = max(grow, 0)
    expected = torch.zeros_like(mask)
    x, y, z = voxel
    expected[max(x - r, 0) : x + r + 1, max(y - r, 0) : y + r + 1, max(z - r, 0) : z + r + 1] = True
    assert torch.equal(grown, expected)


def test_grow_mask_zero_is_identity_on_arbitrary_mask() -> None:
    g = torch.Generator().manual_seed(1)
    mask = torch.rand(6, 7, 8, generator=g) > 0.7
    assert torch.equal(grow_mask(mask, 0), mask)
    assert torch.equal(grow_mask(mask.float(), 0), mask)  # float input -> bool out


# ---------------------------------------------------------------------------------------------- ASD
BG = (1.0, 0.0, 0.0)  # confident background, entropy 0


def _two_class_volume() -> torch.Tensor:
    """12^3 volume, C=3: class 1 = 4x4x4 block at [1:5]^3 with p=(0.1, 0.8, 0.1) (entropy H_181),
    class 2 = one voxel at (9, 9, 9) with p=(0.2, 0.2, 0.6) (entropy H_226), the rest one-hot background."""
    prob = _volume((12, 12, 12), BG)
    _set(prob, (slice(1, 5), slice(1, 5), slice(1, 5)), (0.1, 0.8, 0.1))
    _set(prob, (slice(9, 10), slice(9, 10), slice(9, 10)), (0.2, 0.2, 0.6))
    return prob


@pytest.mark.parametrize(
    ("grow", "expected"),
    [
        # grow 0: class means are H_181 and H_226; ASD = (0.581672 + 0.864974) / 2 = 0.723323
        # (voxel-weighted would be (64*0.581672 + 0.864974) / 65 = 0.586030)
        (0, 0.723323),
        # grow 1: class 1 region [0:6]^3 = 216 voxels, 64 of them at H_181, rest 0 -> 64*0.581672/216 = 0.172347;
        # class 2 region 3^3 = 27 voxels, one at H_226 -> 0.864974/27 = 0.032036; ASD = (0.172347+0.032036)/2
        # = 0.102192 (voxel-weighted would be (64*0.581672 + 0.864974) / 243 = 0.156757)
        (1, 0.102192),
    ],
)
def test_asd_classes_count_equally(grow: int, expected: float) -> None:
    prob = _two_class_volume()
    assert anatomical_segmentation_difficulty(prob, grow_voxels=grow) == pytest.approx(expected, abs=1e-5)


def test_asd_is_not_voxel_weighted() -> None:
    prob = _two_class_volume()
    asd = anatomical_segmentation_difficulty(prob, grow_voxels=0)
    voxel_weighted = (64 * H_181 + H_226) / 65  # 0.586030
    assert abs(asd - voxel_weighted) > 0.1


def test_asd_ignores_high_entropy_background_far_from_anatomy() -> None:
    prob = _two_class_volume()
    base_asd = anatomical_segmentation_difficulty(prob, grow_voxels=1)
    base_enpy = mean_entropy(prob)
    noisy = prob.clone()
    # near-uniform (argmax still background) block at x 9..11, y 0..2, z 0..2: > 1 voxel from both grown regions
    _set(noisy, (slice(9, 12), slice(0, 3), slice(0, 3)), (0.34, 0.33, 0.33))
    assert anatomical_segmentation_difficulty(noisy, grow_voxels=1) == pytest.approx(base_asd, abs=1e-9)
    # ENPY (the whole-volume baseline) does see it: +27 voxels at entropy ~0.99991 over 1728 voxels
    assert mean_entropy(noisy) - base_enpy == pytest.approx(27 * 0.99991 / 1728, abs=1e-5)


def test_asd_counts_background_within_grown_boundary() -> None:
    # a high-entropy background voxel adjacent to the organ is inside the grown region and raises ASD
    prob = _volume((7, 7, 7), BG)
    _set(prob, (slice(3, 4), slice(3, 4), slice(3, 4)), (0.1, 0.8, 0.1))
    _set(prob, (slice(4, 5), slice(3, 4), slice(3, 4)), (0.8, 0.1, 0.1))  # neighbour, argmax background
    # grow 1: 27 voxels, entropies H_181 (organ) + H_181 (the neighbour has the same multiset) -> 2*0.581672/27
    assert anatomical_segmentation_difficulty(prob, grow_voxels=1) == pytest.approx(2 * H_181 / 27, abs=1e-5)
    # grow 0: only the organ voxel
    assert anatomical_segmentation_difficulty(prob, grow_voxels=0) == pytest.approx(H_181, abs=1e-5)


def test_asd_all_background_fallback_top_one_percent() -> None:
    # 10^3 = 1000 voxels all predicted background; top 1% = 10 voxels by foreground probability 1 - p0.
    prob = _volume((10, 10, 10), (0.9, 0.05, 0.05))  # fg prob 0.1, entropy H_9_05 = 0.358996
    _set(prob, (slice(0, 10), slice(4, 5), slice(4, 5)), (0.6, 0.2, 0.2))  # 10 voxels, fg prob 0.4, H = 0.864974
    assert not bool((prob.argmax(0) > 0).any())
    # fallback = mean entropy of exactly those 10 voxels = H(0.6, 0.2, 0.2)/ln3 = 0.864974
    assert anatomical_segmentation_difficulty(prob) == pytest.approx(H_226, abs=1e-5)
    # not the whole-volume mean (10*0.864974 + 990*0.358996) / 1000 = 0.364056
    assert mean_entropy(prob) == pytest.approx((10 * H_226 + 990 * H_9_05) / 1000, abs=1e-5)


def test_asd_fallback_small_volume_takes_at_least_one_voxel() -> None:
    # 3^3 = 27 voxels: round(0.27) = 0 -> max(1, 0) = 1 voxel, the most foreground-probable one
    prob = _volume((3, 3, 3), (0.9, 0.05, 0.05))
    _set(prob, (slice(1, 2), slice(1, 2), slice(1, 2)), (0.6, 0.2, 0.2))
    assert anatomical_segmentation_difficulty(prob) == pytest.approx(H_226, abs=1e-5)


def test_asd_all_confident_background_is_zero_not_nan() -> None:
    prob = _volume((4, 4, 4), BG)
    value = anatomical_segmentation_difficulty(prob)
    assert value == 0.0 and not math.isnan(value)


# ---------------------------------------------------------------------------------------------- KL
# KL(p||q) = sum p ln(p/q):
# KL((0.1,0.9) || (0.5,0.5)) = 0.1 ln 0.2 + 0.9 ln 1.8 = -0.160944 + 0.529008 = 0.368064
# KL((0.5,0.5) || (0.1,0.9)) = 0.5 ln 5 + 0.5 ln(0.5/0.9) = 0.804719 - 0.293893 = 0.510826
# KL((0.7,0.3) || (0.2,0.8)) = 0.7 ln 3.5 + 0.3 ln 0.375 = 0.876934 - 0.294249 = 0.582685
@pytest.mark.parametrize(
    ("p_t", "p_0", "expected"),
    [
        ([(0.1, 0.9)], [(0.5, 0.5)], 0.368064),  # p_t fg
        ([(0.5, 0.5)], [(0.1, 0.9)], 0.510826),  # reversed direction, p_0 fg (argmax of (0.5,0.5) is 0)
        # union = voxels 0 (p_t fg) and 1 (p_0 fg); voxel 2 is background for both and is ignored
        ([(0.1, 0.9), (0.7, 0.3), (0.6, 0.4)], [(0.5, 0.5), (0.2, 0.8), (0.99, 0.01)], (0.368064 + 0.582685) / 2),
        ([(0.1, 0.9), (0.3, 0.7)], [(0.1, 0.9), (0.3, 0.7)], 0.0),  # identical -> 0
        ([(0.9, 0.1), (0.6, 0.4)], [(0.99, 0.01), (0.7, 0.3)], 0.0),  # no foreground in either -> 0.0
    ],
)
def test_foreground_kl_hand_values(p_t: list, p_0: list, expected: float) -> None:
    assert foreground_kl_divergence(_prob(p_t), _prob(p_0)) == pytest.approx(expected, abs=1e-5)


def test_foreground_kl_direction_matters() -> None:
    # both voxels foreground for both models, so the union is the same in either direction
    p_t = _prob([(0.1, 0.9), (0.2, 0.8)])
    p_0 = _prob([(0.4, 0.6), (0.3, 0.7)])
    forward = foreground_kl_divergence(p_t, p_0)
    backward = foreground_kl_divergence(p_0, p_t)
    # voxel 0: KL((.1,.9)||(.4,.6)) = 0.1 ln .25 + 0.9 ln 1.5 = -0.138629 + 0.364920 = 0.226291
    # voxel 1: KL((.2,.8)||(.3,.7)) = 0.2 ln(2/3) + 0.8 ln(8/7) = -0.081093 + 0.106825 = 0.025732
    assert forward == pytest.approx((0.226291 + 0.025732) / 2, abs=1e-5)
    # voxel 0: KL((.4,.6)||(.1,.9)) = 0.4 ln 4 + 0.6 ln(2/3) = 0.554518 - 0.243279 = 0.311239
    # voxel 1: KL((.3,.7)||(.2,.8)) = 0.3 ln 1.5 + 0.7 ln(7/8) = 0.121640 - 0.093474 = 0.028166
    assert backward == pytest.approx((0.311239 + 0.028166) / 2, abs=1e-5)
    assert abs(forward - backward) > 0.03


def test_foreground_kl_zero_when_identical_random() -> None:
    g = torch.Generator().manual_seed(2)
    prob = torch.softmax(torch.randn(3, 4, 4, 4, generator=g) * 2, 0)
    assert foreground_kl_divergence(prob, prob.clone()) == pytest.approx(0.0, abs=1e-7)


# ---------------------------------------------------------------------------------------------- confidence
@pytest.mark.parametrize(
    ("voxels", "expected"),
    [
        ([(0.1, 0.9), (0.3, 0.7), (0.6, 0.4)], 0.8),  # fg voxels 0,1 -> (0.9 + 0.7) / 2; bg voxel ignored
        ([(0.2, 0.5, 0.3), (0.1, 0.1, 0.8)], 0.65),  # (0.5 + 0.8) / 2
        ([(0.9, 0.1), (0.6, 0.4)], 0.0),  # no foreground -> 0.0
        ([(0.0, 1.0)], 1.0),
    ],
)
def test_foreground_confidence(voxels: list, expected: float) -> None:
    assert foreground_confidence(_prob(voxels)) == pytest.approx(expected, abs=1e-9)


# ---------------------------------------------------------------------------------------------- cosine
@pytest.mark.parametrize(
    ("a", "b", "expected"),
    [
        ([1.0, 0.0], [0.0, 1.0], 1.0),  # orthogonal: 1 - 0
        ([1.0, 2.0], [1.0, 2.0], 0.0),  # same: 1 - 1
        ([1.0, 2.0], [3.0, 6.0], 0.0),  # same direction, other scale
        ([1.0, 0.0], [-1.0, 0.0], 2.0),  # opposite: 1 - (-1)
        ([1.0, 0.0], [0.5, math.sqrt(3) / 2], 0.5),  # 60 degrees: 1 - 0.5
        ([0.0, 0.0], [1.0, 0.0], 1.0),  # zero vector normalises to 0 -> cos 0, no NaN
    ],
)
def test_cosine_distance_pairs(a: list[float], b: list[float], expected: float) -> None:
    d = cosine_distance(torch.tensor([a], dtype=torch.float64), torch.tensor([b], dtype=torch.float64))
    assert d.shape == (1, 1)
    assert float(d) == pytest.approx(expected, abs=1e-9)


def test_cosine_distance_matrix_shape() -> None:
    a = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    b = torch.tensor([[1.0, 0.0], [-1.0, 0.0]])
    d = cosine_distance(a, b)
    # rows: (1,0): [0, 2]; (0,1): [1, 1]; (1,1)/sqrt2: [1 - 0.707107, 1 + 0.707107]
    expected = torch.tensor([[0.0, 2.0], [1.0, 1.0], [1 - 0.707107, 1.707107]], dtype=torch.float64)
    assert d.shape == (3, 2)
    assert torch.allclose(d, expected, atol=1e-6)


# ---------------------------------------------------------------------------------------------- temperature
def _synthetic(t_true: float, n: int = 50_000, c: int = 5, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Random logits z ~ 3*N(0, 1) and labels drawn from softmax(z / t_true)."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, c, generator=g) * 3.0
    y = torch.multinomial(torch.softmax(z / t_true, 1), 1, generator=g)[:, 0]
    return z, y


@pytest.mark.parametrize("t_true", [0.5, 2.0, 4.0])
def test_fit_temperature_recovers_known_temperature(t_true: float) -> None:
    z, y = _synthetic(t_true)
    t = fit_temperature(z, y)
    assert t == pytest.approx(t_true, rel=0.10)


def test_fit_temperature_respects_bounds() -> None:
    # labels always the argmax -> NLL keeps falling as T -> 0: the search stops at t_min
    g = torch.Generator().manual_seed(3)
    z = torch.randn(2000, 3, generator=g)
    t = fit_temperature(z, z.argmax(1), t_min=0.1, t_max=10.0)
    assert 0.1 <= t <= 0.1 * 1.01


def test_ece_hand_value() -> None:
    # two samples at confidence 0.9 (one right, one wrong): |0.9 - 0.5| * 2/4 = 0.2
    # two samples at confidence 0.6 (both right):            |0.6 - 1.0| * 2/4 = 0.2  -> ECE 0.4
    prob = torch.tensor([[0.9, 0.1], [0.9, 0.1], [0.6, 0.4], [0.6, 0.4]], dtype=torch.float64)
    labels = torch.tensor([0, 1, 0, 0])
    assert expected_calibration_error(prob, labels) == pytest.approx(0.4, abs=1e-9)


def test_ece_calibrated_near_zero_and_overconfident_larger() -> None:
    z, y = _synthetic(1.0)  # labels drawn from softmax(z): perfectly calibrated by construction
    calibrated = expected_calibration_error(torch.softmax(z, 1), y)
    overconfident = expected_calibration_error(torch.softmax(z * 3.0, 1), y)
    assert calibrated < 0.02
    assert overconfident > 0.1
    # and temperature scaling repairs the over-confident logits
    t = fit_temperature(z * 3.0, y)
    assert t == pytest.approx(3.0, rel=0.10)
    assert expected_calibration_error(torch.softmax(z * 3.0 / t, 1), y) < 0.02


# ---------------------------------------------------------------------------------------------- validation
@pytest.mark.parametrize(
    "call",
    [
        pytest.param(lambda: voxel_entropy(torch.ones(1, 2, 2, 2)), id="entropy-one-class"),
        pytest.param(lambda: mean_entropy(torch.ones(1, 2, 2, 2)), id="enpy-one-class"),
        pytest.param(lambda: anatomical_segmentation_difficulty(torch.ones(1, 2, 2, 2)), id="asd-one-class"),
        pytest.param(lambda: foreground_kl_divergence(torch.rand(2, 2, 2, 2), torch.rand(3, 2, 2, 2)),
                     id="kl-shape-mismatch"),
        pytest.param(lambda: fit_temperature(torch.randn(10), torch.zeros(10, dtype=torch.long)), id="temp-1d-logits"),
        pytest.param(lambda: fit_temperature(torch.randn(10, 3), torch.zeros(9, dtype=torch.long)),
                     id="temp-n-mismatch"),
        pytest.param(lambda: fit_temperature(torch.randn(10, 3), torch.zeros(10, 1, dtype=torch.long)),
                     id="temp-2d-labels"),
        pytest.param(lambda: expected_calibration_error(torch.rand(4, 2), torch.zeros(4, 1, dtype=torch.long)),
                     id="ece-2d-labels"),
        pytest.param(lambda: expected_calibration_error(torch.rand(4, 2), torch.zeros(3, dtype=torch.long)),
                     id="ece-n-mismatch"),
        pytest.param(lambda: expected_calibration_error(torch.rand(4), torch.zeros(4, dtype=torch.long)),
                     id="ece-1d-prob"),
    ],
)
def test_input_validation_raises_value_error(call) -> None:
    with pytest.raises(ValueError):
        call()


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
        ScoringNeeds(metrics={"entropy_typo"})
    with pytest.raises(ValueError, match="mc_dropout"):
        ScoringNeeds(metrics={"bald"})
    with pytest.raises(ValueError, match="axis 0"):
        ScoringNeeds(tta_flips=((0,),))
    with pytest.raises(ValueError, match="at least 2"):
        ScoringNeeds(metrics={"tta_variance"}, tta_flips=((),))
    a = ScoringNeeds(metrics={"bald"}, mc_dropout=5, tta_flips=((), (2, 1)))
    b = ScoringNeeds(metrics={"mc_entropy"}, mc_dropout=3, tta_flips=((1, 2), (1,)), feature_stats=True)
    u = a | b
    assert u.metrics == {"bald", "mc_entropy"} and u.mc_dropout == 5 and u.feature_stats and not u.divergence
    assert (a | ScoringNeeds(divergence=True)).divergence and (ScoringNeeds(divergence=True) | a).divergence
    assert (a | ScoringNeeds(norm_stats=True)).norm_stats and not u.norm_stats
    assert u.tta_flips == ((), (1, 2), (1,))  # normalised and de-duplicated, first-seen order


# ---------------------------------------------------------------------------------------------- the scoring stage
from types import SimpleNamespace  # noqa: E402

from torch import nn  # noqa: E402

from asfda.engine import InferenceEngine  # noqa: E402
from asfda.errors import AsfdaError  # noqa: E402
from asfda.scoring.pool import score_volumes  # noqa: E402


class _FakeEngine:
    """Records every call; logits depend on the image (not flip-symmetric) and, with mc_dropout, on the
    global torch RNG (which the scoring stage seeds per volume and pass)."""

    def __init__(self, n_classes: int = 3) -> None:
        self.network = nn.Identity()
        self.device = torch.device("cpu")
        self.calls: list[tuple[torch.Tensor, bool]] = []
        self.c = n_classes

    def run(self, image: torch.Tensor, *, mc_dropout: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
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
        (ScoringNeeds(metrics={"enpy"}), 0, {"asd", "enpy", "confidence"}),
        (ScoringNeeds(metrics={"bald"}, mc_dropout=5), 5, {"asd", "enpy", "confidence", "mc_entropy", "bald"}),
        (ScoringNeeds(metrics={"tta_variance"}, tta_flips=((), (1,), (2,), (1, 2))), 3,
         {"asd", "enpy", "confidence", "tta_variance"}),
        (ScoringNeeds(metrics={"bald", "tta_variance"}, mc_dropout=2, tta_flips=((), (2,))), 2 + 1,
         {"asd", "enpy", "confidence", "mc_entropy", "bald", "tta_variance"}),
        (ScoringNeeds(vectors={"badge"}), 0, {"asd", "enpy", "confidence"}),
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
    assert len(frz.calls) == 2 and "kd" in out.metrics and out.embeddings0.shape == (2, 3)
    assert np.allclose(out.metrics["kd"], 0.0)  # same fake model -> KL 0
    assert out.info["divergence_available"] == "kd"


def test_score_volumes_mc_passes_are_seeded_order_free_and_match_the_pure_functions() -> None:
    needs = ScoringNeeds(metrics={"bald"}, mc_dropout=4)
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
    out = score_volumes([vol], eng, 2.0, needs=ScoringNeeds(metrics={"tta_variance"}, tta_flips=flips))
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
    out = score_volumes([vol], _FakeEngine(), 0.7, needs=ScoringNeeds(vectors={"badge"}))
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


def test_score_volumes_anatomy_vector_only_when_asked_and_cached(tmp_path) -> None:
    from asfda.cache import EngineOutputCache

    vols = _volumes(2)
    assert "anatomy" not in score_volumes(vols, _FakeEngine(), 0.7).vectors
    cache = EngineOutputCache(tmp_path / "scores")
    key = lambda cid: cache.key(cid, "w", "p", False, "x")  # noqa: E731
    eng = _FakeEngine()
    out = score_volumes(vols, eng, 0.7, needs=ScoringNeeds(vectors={"anatomy"}), cache=cache, cache_key=key)
    assert len(eng.calls) == 2  # no pass of its own
    for i, vol in enumerate(vols):
        logits, _ = _FakeEngine().run(vol.image)
        expected = anatomy_composition(torch.softmax(logits / 0.7, 0))
        assert np.allclose(out.vectors["anatomy"][i], expected.numpy(), atol=1e-7)
    again = score_volumes(vols, eng, 0.7, needs=ScoringNeeds(vectors={"anatomy"}), cache=cache, cache_key=key)
    assert len(eng.calls) == 2 and np.array_equal(again.vectors["anatomy"], out.vectors["anatomy"])


def test_mc_dropout_without_dropout_layers_names_the_tta_alternative() -> None:
    net = nn.Sequential(nn.Conv3d(1, 4, 3, padding=1), nn.InstanceNorm3d(4), nn.Conv3d(4, 2, 1))
    eng = InferenceEngine(net, (4, 4, 4), device=torch.device("cpu"), embedding_layer="output")
    with pytest.raises(AsfdaError, match="tta"):
        score_volumes(_volumes(1, (4, 4, 4)), eng, 1.0, needs=ScoringNeeds(metrics={"bald"}, mc_dropout=5))


def _bn_network() -> nn.Module:
    """BatchNorm first (input = the image, 1 channel) with stored source statistics mean 0, var 1."""
    net = nn.Sequential(nn.BatchNorm3d(1, eps=1e-5), nn.Conv3d(1, 2, 1))
    with torch.no_grad():
        net[0].running_mean.fill_(0.0)
        net[0].running_var.fill_(1.0)
    return net.eval()


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


def test_grow_mask_separable_equals_cubic_dilation_and_asd_box_crop_changes_nothing() -> None:
    import torch.nn.functional as F

    from asfda.scoring.metrics import anatomical_segmentation_difficulty, grow_mask, voxel_entropy

    g = torch.Generator().manual_seed(0)
    mask = torch.rand(9, 11, 7, generator=g) > 0.93
    for v in (1, 2):
        cubic = F.max_pool3d(mask[None, None].float(), kernel_size=2 * v + 1, stride=1, padding=v)[0, 0] > 0
        assert torch.equal(grow_mask(mask, v), cubic)
    prob = torch.softmax(torch.randn(3, 12, 10, 8, generator=g) * 2, 0)
    ent, pred = voxel_entropy(prob), prob.argmax(0)
    # reference: the whole-volume dilation, no crop
    ref = []
    for c in (1, 2):
        region = pred == c
        full = F.max_pool3d(region[None, None].float(), kernel_size=5, stride=1, padding=2)[0, 0] > 0
        ref.append(ent[full].mean())
    expected = float(torch.stack(ref).mean())
    assert anatomical_segmentation_difficulty(prob, 2) == pytest.approx(expected, rel=1e-6)
    assert anatomical_segmentation_difficulty(prob, 2, entropy=ent, argmax=pred) == pytest.approx(expected, rel=1e-6)


def test_release_freed_memory_is_safe_to_call() -> None:
    from asfda.memory import release_freed_memory

    release_freed_memory()
    release_freed_memory()
