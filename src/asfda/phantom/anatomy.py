"""The phantom's anatomy: per-case organ parameters, smooth random deformation and texture fields, and the
tissue / label maps painted from them (lesions, and the cysts of the misleading sub-population, included)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage

from asfda.phantom.spec import _T, LABELS, MISLEADING, _Grid

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
