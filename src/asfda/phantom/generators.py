"""The phantom's volumes: contrast protocols, image formation (blur, slice profile, bias field, noise) and
`make_case`, which renders one case from one seed; plus the case seeds and the target subgroup assignment."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from asfda.phantom.anatomy import _render_anatomy
from asfda.phantom.spec import _GRIDS, _T, _TISSUES, DOMAINS, SUBGROUPS_ALL, SUBGROUPS_TARGET, PhantomError, _Grid

_CT_WINDOW = (-160.0, 240.0)  # HU window the CT-like source is saved in
_DOMAIN_INDEX = {"source": 0, "target": 1}
_ASSIGN_STREAM = 7  # SeedSequence key used for the subgroup permutation.

# ---------------------------------------------------------------------------
# Contrast protocols
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class _Protocol:
    """Intensity model of one acquisition protocol."""

    name: str
    modality: str  # nnU-Net channel name
    values: Mapping[str, float]
    texture: float  # relative amplitude of smooth intra-tissue texture
    jitter: float  # per-case per-tissue jitter (additive HU for CT, relative for MR)
    blur_mm: float
    noise: float  # noise sigma (HU for CT, fraction of scale for MR)
    bias: float  # max |log bias|; 0 disables the bias field
    rician: bool
    integer: bool  # round and clip to int16 range


_CT = _Protocol(
    name="ct", modality="CT",
    # portal-venous contrast CT; saved clipped to an abdominal window (see _CT_WINDOW), as the
    # 8-bit windowed CT that real abdominal models are often trained on
    values={"air": -1000, "fat": -100, "muscle": 45, "bone": 700, "disc": 90,
            "vessel": 180, "liver": 130, "spleen": 100, "cortex": 200, "medulla": 150,
            "lesion_dark": 40, "lesion_bright": 170},
    texture=4.0, jitter=5.0, blur_mm=2.5, noise=12.0, bias=0.0, rician=False,
    integer=False,
)
# T2-like: spleen/kidney brighter than liver, fat bright-ish, bone and flow dark.
_T2 = _Protocol(
    name="t2", modality="MR",
    values={"air": 0, "fat": 850, "muscle": 280, "bone": 120, "disc": 900,
            "vessel": 60, "liver": 330, "spleen": 720, "cortex": 650, "medulla": 850,
            "lesion_dark": 130, "lesion_bright": 1150},
    texture=0.04, jitter=0.06, blur_mm=4.0, noise=0.025, bias=0.3, rician=True,
    integer=True,
)
# T1-like "rare protocol": liver brighter than spleen, very bright fat,
# dark-ish medulla, stronger and differently shaped bias field.
_T1 = _Protocol(
    name="t1", modality="MR",
    values={"air": 0, "fat": 1250, "muscle": 450, "bone": 300, "disc": 350,
            "vessel": 150, "liver": 800, "spleen": 520, "cortex": 600, "medulla": 330,
            "lesion_dark": 250, "lesion_bright": 1050},
    texture=0.05, jitter=0.06, blur_mm=5.0, noise=0.035, bias=0.5, rician=True,
    integer=True,
)


def _protocol_for(domain: str, subgroup: str) -> _Protocol:
    """Return the intensity protocol of a (domain, subgroup) pair."""
    if domain == "source":
        return _CT
    return _T1 if subgroup == "rare_protocol" else _T2


# ---------------------------------------------------------------------------
# Image formation
# ---------------------------------------------------------------------------


def _bias_field(rng: np.random.Generator, grid: _Grid, strength: float,
                protocol: str) -> np.ndarray:
    """Smooth multiplicative bias field (quadratic polynomial in log space)."""
    axes = [ax / 160.0 for ax in grid.world_axes()]
    x, y, z = np.meshgrid(*axes, indexing="ij")
    terms = [x, y, z, x * y, x * z, y * z, x * x, y * y, z * z]
    coef = rng.normal(0.0, 1.0, len(terms))
    if protocol == "t1":
        coef[1] = 3.0 + abs(coef[1])  # surface-coil-like anterior brightening
    log_bias = sum(c * t for c, t in zip(coef, terms))
    log_bias = log_bias - log_bias.mean()
    log_bias *= strength / (np.abs(log_bias).max() + 1e-12)
    return np.exp(log_bias).astype(np.float32)


def _form_image(rng: np.random.Generator, grid: _Grid, protocol: _Protocol,
                tissue: np.ndarray, texture: np.ndarray) -> np.ndarray:
    """Turn a tissue map on ``grid.fine()`` into an image on ``grid``."""
    base = np.array([protocol.values[name] for name in _TISSUES], dtype=np.float64)
    if protocol.integer:  # MR: arbitrary global scale, relative jitter
        base = base * rng.uniform(0.85, 1.15) * (1.0 + rng.normal(0.0, protocol.jitter, base.shape))
        tex_amp = protocol.texture * base
        noise_sd = protocol.noise * float(base[_T["liver"]] + base[_T["spleen"]])
    else:  # CT: additive HU jitter
        base = base + rng.normal(0.0, protocol.jitter, base.shape)
        base[_T["air"]] = protocol.values["air"]
        tex_amp = np.full(base.shape, protocol.texture)
        noise_sd = protocol.noise
    tex_amp[_T["air"]] = 0.0
    image = base.astype(np.float32)[tissue] + tex_amp.astype(np.float32)[tissue] * texture
    fine = grid.fine()
    image = ndimage.gaussian_filter(image, [protocol.blur_mm / 2.355 / s for s in fine.spacing])
    if grid.slab > 1:  # slice-profile averaging of the sub-slices
        image = image.reshape(*grid.shape, grid.slab).mean(axis=-1)
    if protocol.bias > 0:
        image = image * _bias_field(rng, grid, protocol.bias, protocol.name)
    noise = rng.standard_normal((2, *grid.shape), dtype=np.float32) * np.float32(noise_sd)
    if protocol.rician:
        image = np.sqrt((image + noise[0]) ** 2 + noise[1] ** 2)
    else:
        image = image + noise[0]
    if protocol.integer:
        image = np.clip(np.rint(image), 0, np.iinfo(np.int16).max)
    else:
        image = np.clip(image, *_CT_WINDOW)
    return image.astype(np.float32)


def make_case(rng: np.random.Generator, domain: str,
              subgroup: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Generate one phantom volume.

    Args:
        rng: Random generator; all randomness of the case is drawn from it.
        domain: ``"source"`` (CT-like, RAS, 5 mm) or ``"target"`` (MR-like,
            LPS, 4 x 4 x 8 mm).
        subgroup: One of ``SUBGROUPS_ALL``. ``"rare_protocol"`` is only
            valid for the target domain; anatomical subgroups
            (``enlarged_liver``, ``missing_kidney``, ``lesions``) work in both.

    Returns:
        ``(image, label, affine)``: image float32 ``[X, Y, Z]`` (target images
        hold integral values within int16 range), label uint8 ``[X, Y, Z]``
        with values from ``LABELS``, and the 4x4 voxel-to-RAS-world affine of
        the returned array orientation.

    Raises:
        PhantomError: (a ``ValueError``) if ``domain`` or ``subgroup`` is
            unknown or incompatible.
    """
    if domain not in _GRIDS:
        raise PhantomError(f"domain must be one of {DOMAINS}, got {domain!r}")
    if subgroup not in SUBGROUPS_ALL:
        raise PhantomError(f"subgroup must be one of {SUBGROUPS_ALL}, got {subgroup!r}")
    if domain == "source" and subgroup == "rare_protocol":
        raise PhantomError("subgroup 'rare_protocol' is only defined for the target domain")
    grid = _GRIDS[domain]
    tissue, label, texture = _render_anatomy(rng, grid.fine(), subgroup)
    image = _form_image(rng, grid, _protocol_for(domain, subgroup), tissue, texture)
    label = label[:, :, grid.slab // 2 :: grid.slab]  # label of the slice centre
    if grid.flip_axes:
        image = np.flip(image, grid.flip_axes)
        label = np.flip(label, grid.flip_axes)
    return np.ascontiguousarray(image), np.ascontiguousarray(label), grid.affine


# ---------------------------------------------------------------------------
# Seeds and subgroup assignment
# ---------------------------------------------------------------------------


def case_seed(seed: int, domain: str, index: int) -> int:
    """Deterministic 32-bit seed of case ``index`` of ``domain``."""
    seq = np.random.SeedSequence([seed, _DOMAIN_INDEX[domain], index])
    return int(seq.generate_state(1, dtype=np.uint32)[0])


def _subgroup_counts(n: int) -> dict[str, int]:
    """Largest-remainder counts; every subgroup >= 1 when ``n`` allows it."""
    names = list(SUBGROUPS_TARGET)
    expected = [round(SUBGROUPS_TARGET[k] * n, 9) for k in names]
    counts = [int(np.floor(e)) for e in expected]
    order = sorted(range(len(names)), key=lambda i: (-(expected[i] - counts[i]), i))
    for i in order[: n - sum(counts)]:
        counts[i] += 1
    if n >= len(names):
        for i in range(len(names)):
            if counts[i] == 0:  # take from the currently largest group
                counts[int(np.argmax(counts))] -= 1
                counts[i] = 1
    return dict(zip(names, counts))


def assign_subgroups(n: int, seed: int) -> list[str]:
    """Deterministically assign ``n`` target cases to subgroups.

    Counts follow ``SUBGROUPS_TARGET`` (largest-remainder rounding, at least
    one case per subgroup when ``n >= len(SUBGROUPS_TARGET)``); their order is
    a seed-dependent permutation.

    Args:
        n: Number of target cases.
        seed: Benchmark seed.

    Returns:
        List of subgroup names, one per case index.
    """
    counts = _subgroup_counts(n)
    names = [name for name, c in counts.items() for _ in range(c)]
    rng = np.random.default_rng(np.random.SeedSequence([seed, _ASSIGN_STREAM]))
    return [names[i] for i in rng.permutation(n)]
