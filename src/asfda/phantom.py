"""Deterministic two-domain 3D abdominal phantom benchmark.

Generates a *source* domain (CT-like, RAS, isotropic 5 mm) and a heterogeneous
*target* domain (MR-like, LPS, anisotropic 4 x 4 x 8 mm, different contrast,
bias field, blur, Rician noise) as two nnU-Net v2 raw datasets.

Coordinate conventions (NIfTI / nibabel world space is RAS+): the x axis
increases towards the patient's *Right*, y towards *Anterior* and z towards
*Superior* (the DICOM/LPS convention is the one where +x points Left).  Hence
the liver (patient's right) has **larger** world x than the spleen (patient's
left), the right kidney has larger x than the left one and sits slightly lower
(smaller z), and posterior structures (kidneys, spine) have smaller y.

All anatomy is defined in physical millimetres, so after reorienting any case
to RAS (e.g. ``nibabel.as_closest_canonical``) both domains place the organs
in the same physical location.

Every case is fully determined by an integer seed stored in
``phantom_meta.json``: ``make_case(np.random.default_rng(seed), domain,
subgroup)`` reproduces the saved arrays exactly.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage

from asfda.errors import AsfdaError

__all__ = [
    "GENERATOR_VERSION",
    "LABELS",
    "PhantomError",
    "SUBGROUPS_TARGET",
    "SUBGROUPS_ALL",
    "MISLEADING",
    "DOMAINS",
    "assign_subgroups",
    "case_seed",
    "generate_benchmark",
    "make_case",
]

logger = logging.getLogger(__name__)

GENERATOR_VERSION = "2"
_CT_WINDOW = (-160.0, 240.0)  # HU window the CT-like source is saved in
"""Bump whenever the generated data changes; invalidates cached benchmarks."""

LABELS: dict[str, int] = {
    "background": 0,
    "liver": 1,
    "kidney_right": 2,
    "kidney_left": 3,
    "spleen": 4,
}

SUBGROUPS_TARGET: dict[str, float] = {
    "common": 0.60,
    "rare_protocol": 0.15,
    "enlarged_liver": 0.10,
    "missing_kidney": 0.08,
    "lesions": 0.07,
}
"""Target-pool subgroups (ordered) and their sampling proportions."""

MISLEADING = "cystic_liver"
"""Opt-in target sub-population modelled on the real pool's cystic outlier (CHAOS chaos_036): an enlarged liver
filled with large fluid cysts, some with spleen-like signal, labelled liver. Its labels are correct, but a model
fine-tuned on such volumes alone learns that fluid / spleen-like signal is liver and segments typical volumes worse;
and it is the pool's most atypical volume, which METHOD.md's rule ranks first. ``generate_benchmark(...,
n_misleading=k)`` appends k such cases after the ``n_target`` regular ones (the regular cases stay identical)."""

SUBGROUPS_ALL: tuple[str, ...] = (*SUBGROUPS_TARGET, MISLEADING)

DOMAINS: tuple[str, str] = ("source", "target")


class PhantomError(AsfdaError, ValueError):
    """Invalid phantom request (a ``ValueError`` the CLI prints on one line)."""


META_FILENAME = "phantom_meta.json"
_CASE_PREFIX = {"source": "src", "target": "tgt"}
_DOMAIN_INDEX = {"source": 0, "target": 1}
_ASSIGN_STREAM = 7  # SeedSequence key used for the subgroup permutation.

# ---------------------------------------------------------------------------
# Acquisition grids
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class _Grid:
    """A RAS-aligned sampling grid centred on the world origin."""

    shape: tuple[int, int, int]
    spacing: tuple[float, float, float]
    flip_axes: tuple[int, ...] = ()  # axes flipped when saving (orientation code)
    slab: int = 1  # odd number of sub-slices along z averaged into one slice

    def fine(self) -> _Grid:
        """Grid with ``slab`` sub-slices per slice (same centre, same x/y)."""
        nx, ny, nz = self.shape
        sx, sy, sz = self.spacing
        return _Grid(shape=(nx, ny, nz * self.slab), spacing=(sx, sy, sz / self.slab))

    @property
    def ras_affine(self) -> np.ndarray:
        """Affine of the un-flipped (RAS) array."""
        aff = np.diag([*self.spacing, 1.0])
        aff[:3, 3] = [-(n - 1) * s / 2.0 for n, s in zip(self.shape, self.spacing)]
        return aff

    @property
    def affine(self) -> np.ndarray:
        """Affine of the saved array (after flipping ``flip_axes``)."""
        flip = np.eye(4)
        for ax in self.flip_axes:
            flip[ax, ax] = -1.0
            flip[ax, 3] = self.shape[ax] - 1
        return self.ras_affine @ flip

    def world_axes(self) -> list[np.ndarray]:
        """World coordinates (mm) of voxel centres along each RAS axis."""
        aff = self.ras_affine
        return [aff[i, 3] + aff[i, i] * np.arange(n, dtype=np.float32)
                for i, n in enumerate(self.shape)]


_GRIDS: dict[str, _Grid] = {
    # CT-like: RAS, isotropic 5 mm, 320 x 260 x 200 mm field of view.
    "source": _Grid(shape=(64, 52, 40), spacing=(5.0, 5.0, 5.0)),
    # MR-like: LPS (axes 0 and 1 flipped), anisotropic 4 x 4 x 8 mm.
    # Thick slices: each voxel averages 3 sub-slices (slice profile / partial volume).
    "target": _Grid(shape=(80, 65, 25), spacing=(4.0, 4.0, 8.0), flip_axes=(0, 1), slab=3),
}

# ---------------------------------------------------------------------------
# Tissues and contrast protocols
# ---------------------------------------------------------------------------

_TISSUES = ("air", "fat", "muscle", "bone", "disc", "vessel", "liver", "spleen",
            "cortex", "medulla", "lesion_dark", "lesion_bright")
_T = {name: i for i, name in enumerate(_TISSUES)}


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
# Anatomy parameters
# ---------------------------------------------------------------------------


@dataclass
class _Organ:
    """Superquadric-like implicit organ in world (RAS, mm) coordinates."""

    center: np.ndarray
    semi_axes: np.ndarray
    rotation: np.ndarray = field(default_factory=lambda: np.eye(3))
    exponent: float = 2.0
    taper: float = 0.0  # y/z semi-axes scale with (1 + taper * local_x / a_x)


@dataclass
class _Anatomy:
    """All per-case anatomical parameters."""

    body_axes: np.ndarray  # (rx, ry)
    body_center: np.ndarray  # (cx, cy)
    fat_mm: float
    spine_center: np.ndarray  # (x, y)
    spine_radius: float
    disc_phase: float
    aorta: np.ndarray  # (x, y, r)
    ivc: np.ndarray
    liver: _Organ
    spleen: _Organ
    kidneys: dict[str, _Organ]  # "kidney_right"/"kidney_left"


def _rotation(rx_deg: float, ry_deg: float, rz_deg: float) -> np.ndarray:
    """Rotation matrix (local -> world) from XYZ Euler angles in degrees."""
    ax, ay, az = np.deg2rad([rx_deg, ry_deg, rz_deg])
    rot_x = np.array([[1, 0, 0], [0, np.cos(ax), -np.sin(ax)], [0, np.sin(ax), np.cos(ax)]])
    rot_y = np.array([[np.cos(ay), 0, np.sin(ay)], [0, 1, 0], [-np.sin(ay), 0, np.cos(ay)]])
    rot_z = np.array([[np.cos(az), -np.sin(az), 0], [np.sin(az), np.cos(az), 0], [0, 0, 1]])
    return rot_z @ rot_y @ rot_x


def _jitter(rng: np.random.Generator, base: Sequence[float],
            sd: Sequence[float] | float) -> np.ndarray:
    """Return ``base`` plus gaussian jitter."""
    base_arr = np.asarray(base, dtype=float)
    return base_arr + rng.normal(0.0, 1.0, base_arr.shape) * np.asarray(sd, dtype=float)


def _sample_liver(rng: np.random.Generator, enlarged: bool) -> _Organ:
    """Liver: big tapered wedge in the right upper quadrant (+x in RAS)."""
    center = _jitter(rng, (58.0, 8.0, 22.0), (5.0, 5.0, 5.0))
    axes = np.asarray((82.0, 72.0, 52.0)) * rng.uniform(0.9, 1.1) * _jitter(rng, (1, 1, 1), 0.04)
    if enlarged:
        scale = rng.uniform(1.35, 1.45)
        # Grow towards the patient's left (-x) and inferiorly (-z), less in AP.
        center = center + np.array([-(scale - 1) * 45.0, (scale - 1) * 15.0, -(scale - 1) * 40.0])
        axes = axes * np.array([scale, np.sqrt(scale), scale])
    rot = _rotation(*rng.normal(0.0, 4.0, 3))
    return _Organ(center, axes, rot, exponent=rng.uniform(2.0, 2.4), taper=rng.uniform(0.3, 0.4))


def _sample_spleen(rng: np.random.Generator) -> _Organ:
    """Spleen: elongated posterolateral organ on the patient's left (-x)."""
    center = _jitter(rng, (-88.0, -38.0, 38.0), (4.0, 4.0, 5.0))
    axes = np.asarray((20.0, 50.0, 42.0)) * rng.uniform(0.85, 1.15)
    rot = _rotation(rng.normal(0, 5), rng.normal(0, 5), 35.0 + rng.normal(0, 5))
    return _Organ(center, axes, rot, exponent=2.0)


def _sample_kidney(rng: np.random.Generator, side: str) -> _Organ:
    """Kidney beside the spine; ``side`` is 'right' (+x) or 'left' (-x)."""
    sign = 1.0 if side == "right" else -1.0
    z0 = -40.0 if side == "right" else -22.0  # right kidney sits lower
    center = _jitter(rng, (sign * 58.0, -62.0, z0), (3.0, 3.0, 4.0))
    axes = np.asarray((26.0, 18.0, 52.0)) * rng.uniform(0.88, 1.12)
    # Upper pole tilted medially, hilum rotated anteromedially.
    rot = _rotation(rng.normal(0, 4), sign * (-12.0 + rng.normal(0, 4)),
                    sign * (-25.0 + rng.normal(0, 5)))
    return _Organ(center, axes, rot, exponent=2.0)


def _sample_anatomy(rng: np.random.Generator, subgroup: str) -> tuple[_Anatomy, str | None]:
    """Draw per-case anatomy; returns it and the removed kidney label (if any)."""
    anatomy = _Anatomy(
        body_axes=_jitter(rng, (148.0, 108.0), (5.0, 4.0)),
        body_center=_jitter(rng, (0.0, 2.0), (3.0, 3.0)),
        fat_mm=float(rng.uniform(10.0, 22.0)),
        spine_center=_jitter(rng, (0.0, -70.0), (2.0, 2.0)),
        spine_radius=float(rng.uniform(16.0, 19.0)),
        disc_phase=float(rng.uniform(0.0, 32.0)),
        aorta=np.array([*_jitter(rng, (-18.0, -43.0), 2.0), rng.uniform(9.0, 12.0)]),
        ivc=np.array([*_jitter(rng, (22.0, -38.0), 2.0), rng.uniform(9.0, 13.0)]),
        liver=_sample_liver(rng, enlarged=subgroup in ("enlarged_liver", MISLEADING)),
        spleen=_sample_spleen(rng),
        kidneys={"kidney_right": _sample_kidney(rng, "right"),
                 "kidney_left": _sample_kidney(rng, "left")},
    )
    missing = None
    if subgroup == "missing_kidney":
        missing = str(rng.choice(["kidney_right", "kidney_left"]))
    return anatomy, missing


# ---------------------------------------------------------------------------
# Smooth random fields
# ---------------------------------------------------------------------------

_LATTICE_MM = 10.0
_LATTICE_ORIGIN = np.array([-190.0, -160.0, -130.0])
_LATTICE_SHAPE = (39, 33, 27)


def _smooth_noise(rng: np.random.Generator, sigma_mm: float) -> np.ndarray:
    """Unit-std gaussian-filtered white noise on the coarse world lattice."""
    noise = rng.standard_normal(_LATTICE_SHAPE)
    smooth = ndimage.gaussian_filter(noise, sigma_mm / _LATTICE_MM, mode="reflect")
    return smooth / (smooth.std() + 1e-12)


def _random_fields(rng: np.random.Generator, grid: _Grid) -> tuple[np.ndarray, np.ndarray]:
    """Sample a smooth displacement field (mm) and a texture field on ``grid``.

    Returns:
        ``(disp, texture)`` with shapes ``(3, X, Y, Z)`` and ``(X, Y, Z)``.
    """
    channels = []
    for _ in range(3):
        channels.append(7.0 * _smooth_noise(rng, 40.0) + 2.5 * _smooth_noise(rng, 14.0))
    channels.append(_smooth_noise(rng, 12.0))
    idx = [(ax - o) / _LATTICE_MM for ax, o in zip(grid.world_axes(), _LATTICE_ORIGIN)]
    coords = np.stack(np.meshgrid(*idx, indexing="ij"))
    fields = [ndimage.map_coordinates(c, coords, order=1, mode="nearest").astype(np.float32)
              for c in channels]
    return np.stack(fields[:3]), fields[3]


# ---------------------------------------------------------------------------
# Implicit shapes and rendering
# ---------------------------------------------------------------------------


def _organ_field(organ: _Organ, pts: np.ndarray) -> np.ndarray:
    """Implicit function (<= 1 inside) of ``organ`` at warped points ``(3, ...)``."""
    rel = pts - organ.center.reshape(3, 1, 1, 1).astype(np.float32)
    local = np.einsum("ji,j...->i...", organ.rotation.astype(np.float32), rel)
    a, b, c = organ.semi_axes
    scale = np.clip(1.0 + organ.taper * local[0] / a, 0.3, None) if organ.taper else 1.0
    e = organ.exponent
    return (np.abs(local[0] / a) ** e + np.abs(local[1] / (b * scale)) ** e
            + np.abs(local[2] / (c * scale)) ** e)


def _offset_organ(organ: _Organ, local_offset: Sequence[float],
                  axes_scale: Sequence[float]) -> _Organ:
    """Return a copy of ``organ`` shifted in its local frame and rescaled."""
    shift = organ.rotation @ (np.asarray(local_offset) * organ.semi_axes)
    return _Organ(organ.center + shift, organ.semi_axes * np.asarray(axes_scale), organ.rotation)


class _Canvas:
    """Tissue and label volumes painted in a fixed order (later wins)."""

    def __init__(self, shape: tuple[int, int, int]) -> None:
        self.tissue = np.zeros(shape, dtype=np.uint8)
        self.label = np.zeros(shape, dtype=np.uint8)

    def paint(self, mask: np.ndarray, tissue: str, label: int) -> None:
        """Assign ``tissue`` and ``label`` inside ``mask``."""
        self.tissue[mask] = _T[tissue]
        self.label[mask] = label


def _paint_body(canvas: _Canvas, anat: _Anatomy, pts: np.ndarray) -> np.ndarray:
    """Paint subcutaneous fat and inner soft tissue; return the inner mask."""
    x = pts[0] - anat.body_center[0]
    y = pts[1] - anat.body_center[1]
    rx, ry = anat.body_axes
    z_scale = 1.0 + 0.06 * pts[2] / 100.0
    outer = (np.abs(x / (rx * z_scale)) ** 2.3 + np.abs(y / (ry * z_scale)) ** 2.3) <= 1.0
    fat = anat.fat_mm
    inner = (np.abs(x / (rx * z_scale - fat)) ** 2.3
             + np.abs(y / (ry * z_scale - fat * 0.8)) ** 2.3) <= 1.0
    canvas.paint(outer, "fat", 0)
    canvas.paint(inner, "muscle", 0)
    return inner


def _paint_organs(canvas: _Canvas, anat: _Anatomy, pts: np.ndarray, inner: np.ndarray,
                  missing: str | None) -> np.ndarray:
    """Paint liver, spleen and kidneys; return the liver implicit field."""
    liver_f = _organ_field(anat.liver, pts)
    # Keep the liver out of the medial retroperitoneum (behind IVC/aorta).
    retro = (pts[1] < anat.spine_center[1] + anat.spine_radius + 8.0) & (pts[0] < 45.0)
    canvas.paint((liver_f <= 1.0) & inner & ~retro, "liver", LABELS["liver"])

    spleen = anat.spleen
    notch = _offset_organ(spleen, (1.5, 0.0, 0.0), (1.0, 0.75, 0.7))  # concave hilum side
    spleen_mask = (_organ_field(spleen, pts) <= 1.0) & (_organ_field(notch, pts) > 1.0)
    canvas.paint(spleen_mask & inner, "spleen", LABELS["spleen"])

    for name, kidney in anat.kidneys.items():
        if name == missing:
            continue
        medial = -1.0 if name == "kidney_right" else 1.0
        kf = _organ_field(kidney, pts)
        hilum = _offset_organ(kidney, (medial * 1.0, 0.0, 0.0), (0.45, 0.6, 0.35))
        kmask = (kf <= 1.0) & (_organ_field(hilum, pts) > 1.0) & inner
        canvas.paint((kf <= 1.7) & ~kmask & inner, "fat", 0)  # perirenal fat
        canvas.paint(kmask, "cortex", LABELS[name])
        canvas.paint(kmask & (kf <= 0.45), "medulla", LABELS[name])
    return liver_f


def _paint_spheres(canvas: _Canvas, rng: np.random.Generator, world: np.ndarray, candidates: np.ndarray,
                   count: int, radius_mm: tuple[float, float], kind) -> None:
    """Paint ``count`` balls of tissue ``kind()`` inside the liver, centred on random ``candidates`` voxels (flat
    indices); the label stays liver. Draws, per ball: centre, radius, then whatever ``kind`` draws."""
    liver = canvas.label == LABELS["liver"]
    for _ in range(count):
        voxel = np.unravel_index(candidates[rng.integers(candidates.size)], liver.shape)
        centre = world[(slice(None), *voxel)]
        radius = rng.uniform(*radius_mm)
        dist2 = sum((world[i] - centre[i]) ** 2 for i in range(3))
        canvas.paint((dist2 <= radius**2) & liver, kind(), LABELS["liver"])


def _paint_lesions(canvas: _Canvas, rng: np.random.Generator, pts: np.ndarray,
                   world: np.ndarray, liver_f: np.ndarray) -> None:
    """Paint 2-4 round dark/bright lesions inside the liver (label stays liver)."""
    liver = canvas.label == LABELS["liver"]
    candidates = np.flatnonzero((liver_f <= 0.45) & liver)
    if candidates.size == 0:
        candidates = np.flatnonzero(liver)
    _paint_spheres(canvas, rng, world, candidates, int(rng.integers(2, 5)), (10.0, 18.0),
                   lambda: "lesion_dark" if rng.random() < 0.5 else "lesion_bright")


def _paint_cysts(canvas: _Canvas, rng: np.random.Generator, world: np.ndarray) -> None:
    """Polycystic liver: 26-33 large fluid cysts that fill most of it; the label stays liver. Learned alone, such a
    volume teaches that bright fluid signal is liver, the opposite of a typical liver's dark T2 signal."""
    candidates = np.flatnonzero(canvas.label == LABELS["liver"])
    if candidates.size:
        _paint_spheres(canvas, rng, world, candidates, int(rng.integers(26, 34)), (30.0, 44.0),
                       lambda: "lesion_bright")


def _paint_spine_and_vessels(canvas: _Canvas, anat: _Anatomy, pts: np.ndarray,
                             inner: np.ndarray) -> None:
    """Paint vertebral bodies, discs, spinous process, aorta and IVC."""
    sx, sy = anat.spine_center
    r = anat.spine_radius
    body = ((pts[0] - sx) ** 2 + (pts[1] - sy) ** 2 <= r**2) & inner
    process = ((pts[0] - sx) ** 2 / 7.0**2
               + (pts[1] - (sy - r - 12.0)) ** 2 / 14.0**2 <= 1.0) & inner
    disc = np.mod(pts[2] + anat.disc_phase, 32.0) < 7.0
    canvas.paint(body | process, "bone", 0)
    canvas.paint(body & disc, "disc", 0)
    for vx, vy, vr in (anat.aorta, anat.ivc):
        canvas.paint(((pts[0] - vx) ** 2 + (pts[1] - vy) ** 2 <= vr**2) & inner, "vessel", 0)


def _render_anatomy(rng: np.random.Generator, grid: _Grid,
                    subgroup: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Render tissue and label maps on the (RAS, un-flipped) fine grid.

    Returns:
        ``(tissue, label, texture)`` arrays on ``grid`` (pass ``grid.fine()``).
    """
    anat, missing = _sample_anatomy(rng, subgroup)
    disp, texture = _random_fields(rng, grid)
    world = np.stack(np.meshgrid(*grid.world_axes(), indexing="ij"))
    pts = world + disp  # warped coordinates -> non-ellipsoidal shapes
    canvas = _Canvas(grid.shape)
    inner = _paint_body(canvas, anat, pts)
    liver_f = _paint_organs(canvas, anat, pts, inner, missing)
    if subgroup == "lesions":
        _paint_lesions(canvas, rng, pts, world, liver_f)
    elif subgroup == MISLEADING:
        _paint_cysts(canvas, rng, world)
    _paint_spine_and_vessels(canvas, anat, pts, inner)
    return canvas.tissue, canvas.label, texture


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


# ---------------------------------------------------------------------------
# Writing datasets
# ---------------------------------------------------------------------------


def _save_nifti(array: np.ndarray, affine: np.ndarray, path: Path, dtype: type) -> None:
    """Save ``array`` as NIfTI with qform/sform set to ``affine``."""
    img = nib.Nifti1Image(array.astype(dtype), affine)
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    img.header.set_xyzt_units("mm")
    img.header.set_data_dtype(dtype)
    nib.save(img, str(path))


def _dataset_json(domain: str, n: int) -> dict:
    """nnU-Net v2 raw ``dataset.json`` content."""
    modality = "CT" if domain == "source" else "MR"
    description = (
        "asfda phantom source domain: CT-like HU intensities, RAS, 5 mm isotropic."
        if domain == "source" else
        "asfda phantom target domain: MR-like (T2-like, rare T1-like protocol), LPS, "
        "4x4x8 mm, bias field, blur, Rician noise; heterogeneous subgroups in phantom_meta.json."
    )
    return {
        "name": f"asfda_phantom_{domain}",
        "description": description,
        "channel_names": {"0": modality},
        "labels": dict(LABELS),
        "numTraining": n,
        "file_ending": ".nii.gz",
        "generator_version": GENERATOR_VERSION,
    }


def _write_json(path: Path, data: dict) -> None:
    """Write pretty, key-stable JSON."""
    path.write_text(json.dumps(data, indent=2) + "\n")


def _write_dataset(folder: Path, domain: str, seed: int, subgroups: Sequence[str]) -> None:
    """Generate and write one nnU-Net raw dataset into ``folder``."""
    (folder / "imagesTr").mkdir(parents=True)
    (folder / "labelsTr").mkdir()
    meta: dict[str, dict] = {}
    image_dtype = np.float32 if domain == "source" else np.int16
    for i, subgroup in enumerate(subgroups):
        case_id = f"{_CASE_PREFIX[domain]}_{i:03d}"
        cseed = case_seed(seed, domain, i)
        image, label, affine = make_case(np.random.default_rng(cseed), domain, subgroup)
        _save_nifti(image, affine, folder / "imagesTr" / f"{case_id}_0000.nii.gz", image_dtype)
        _save_nifti(label, affine, folder / "labelsTr" / f"{case_id}.nii.gz", np.uint8)
        meta[case_id] = {"subgroup": subgroup, "seed": cseed}
    _write_json(folder / "dataset.json", _dataset_json(domain, len(subgroups)))
    _write_json(folder / META_FILENAME, meta)


def _params(seed: int, n_source: int, n_target: int, n_misleading: int = 0) -> dict:
    """Generation parameters recorded in the root ``phantom_meta.json`` (``n_misleading`` only when used, so
    benchmarks generated before it existed stay valid cache hits)."""
    params = {"generator_version": GENERATOR_VERSION, "seed": seed, "n_source": n_source, "n_target": n_target}
    if n_misleading:
        params["n_misleading"] = n_misleading
    return params


def _result_paths(out_dir: Path) -> dict[str, Path]:
    return {domain: out_dir / domain for domain in DOMAINS}


def _check_existing(out_dir: Path, params: dict) -> bool:
    """Return True on a valid cache hit; raise PhantomError otherwise."""
    meta_path = out_dir / META_FILENAME
    fix = "pass overwrite=True (CLI: --overwrite) or choose another folder"
    if not meta_path.is_file():
        raise PhantomError("folder exists and is not a phantom benchmark", out_dir, fix)
    try:
        stored = json.loads(meta_path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise PhantomError(f"unreadable {META_FILENAME}", out_dir, fix) from exc
    recorded = {k: stored.get(k) for k in params}
    if recorded != params:
        raise PhantomError(f"phantom benchmark was generated with {recorded}, "
                           f"which differs from the requested {params}", out_dir, fix)
    if not all((p / "dataset.json").is_file() for p in _result_paths(out_dir).values()):
        raise PhantomError("incomplete phantom benchmark", out_dir, fix)
    return True


def _validate_args(seed: int, n_source: int, n_target: int, n_misleading: int = 0) -> None:
    """Raise PhantomError naming the first invalid argument."""
    checks = (("seed", seed, 0), ("n_source", n_source, 1), ("n_target", n_target, 1),
              ("n_misleading", n_misleading, 0))
    for name, value, minimum in checks:
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
            raise PhantomError(f"{name} must be an integer, got {value!r}")
        if value < minimum:
            raise PhantomError(f"{name} must be >= {minimum}, got {value}")


def _install(tmp: Path, out_dir: Path, overwrite: bool) -> None:
    """Atomically move the finished ``tmp`` tree to ``out_dir``."""
    trash = None
    if overwrite and out_dir.exists():
        if any(out_dir.iterdir()) and not (out_dir / "phantom_meta.json").exists():
            raise PhantomError(f"{out_dir} is not a phantom benchmark folder; refusing to replace it with "
                               "overwrite=True (choose an empty or new folder)")
        trash = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old-", dir=out_dir.parent))
        os.replace(out_dir, trash / out_dir.name)
    os.replace(tmp, out_dir)  # succeeds if out_dir is absent or an empty folder
    if trash is not None:
        shutil.rmtree(trash, ignore_errors=True)


def generate_benchmark(out_dir: str | Path, seed: int = 0, n_source: int = 24, n_target: int = 40,
                       overwrite: bool = False, n_misleading: int = 0) -> dict[str, Path]:
    """Generate (or reuse) the two-domain phantom benchmark.

    Writes ``out_dir/source`` and ``out_dir/target`` as nnU-Net v2 raw
    datasets (``dataset.json``, ``imagesTr/<case>_0000.nii.gz``,
    ``labelsTr/<case>.nii.gz`` and a ``phantom_meta.json`` mapping case id ->
    ``{"subgroup", "seed"}``), plus ``out_dir/phantom_meta.json`` holding the
    generation parameters. Everything is built in a temporary sibling folder
    and moved into place with ``os.replace``.

    Args:
        out_dir: Benchmark root folder.
        seed: Non-negative benchmark seed; same seed -> identical data.
        n_source: Number of source (CT-like) cases, all subgroup ``common``.
        n_target: Number of target (MR-like) cases, split by ``SUBGROUPS_TARGET``.
        overwrite: Replace an existing ``out_dir`` instead of reusing it.
        n_misleading: Extra target cases of the misleading sub-population ``MISLEADING`` (cystic livers),
            appended after the ``n_target`` regular ones (ids ``tgt_<n_target>`` on); 0 (the default) leaves the
            benchmark exactly as before.

    Returns:
        ``{"source": out_dir / "source", "target": out_dir / "target"}``.

    Raises:
        PhantomError: (a ``ValueError``) on invalid arguments, or if
            ``out_dir`` exists, is not empty and does not hold a benchmark with
            the same parameters, while ``overwrite`` is False.
    """
    _validate_args(seed, n_source, n_target, n_misleading)
    seed, n_source, n_target, n_misleading = int(seed), int(n_source), int(n_target), int(n_misleading)
    out_dir = Path(out_dir)
    params = _params(seed, n_source, n_target, n_misleading)
    if out_dir.exists() and not overwrite:
        if out_dir.is_dir() and not any(out_dir.iterdir()):
            pass  # empty folder: generate into it
        elif _check_existing(out_dir, params):
            return _result_paths(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        os.chmod(tmp, 0o755)
        _write_dataset(tmp / "source", "source", seed, ["common"] * n_source)
        _write_dataset(tmp / "target", "target", seed,
                       assign_subgroups(n_target, seed) + [MISLEADING] * n_misleading)
        counts = _subgroup_counts(n_target) | ({MISLEADING: n_misleading} if n_misleading else {})
        _write_json(tmp / META_FILENAME, {**params, "subgroups_target": dict(SUBGROUPS_TARGET),
                                          "subgroup_counts": counts})
        try:
            _install(tmp, out_dir, overwrite)
        except OSError:
            # A concurrent generator may have installed the same benchmark.
            if not overwrite and out_dir.is_dir() and _check_existing(out_dir, params):
                shutil.rmtree(tmp, ignore_errors=True)
                return _result_paths(out_dir)
            raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    logger.info("phantom benchmark written to %s", out_dir)
    return _result_paths(out_dir)
