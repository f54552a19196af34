"""The per-volume metrics of asfda.scoring.metrics (entropy, grow_mask, ASD, KL, confidence, cosine) and their
input checks.

Expected numbers are written out; each has a comment giving the hand computation
(natural logs; ln 2 = 0.693147, ln 3 = 1.098612)."""

from __future__ import annotations

import math

import pytest
import torch

from _scoring_helpers import H_9_05, H_181, H_226, H_QUARTER, _prob, _set, _volume
from asfda.scoring import (
    anatomical_segmentation_difficulty,
    cosine_distance,
    expected_calibration_error,
    fit_temperature,
    foreground_confidence,
    foreground_kl_divergence,
    grow_mask,
    mean_entropy,
    voxel_entropy,
)


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
