"""What the phantom benchmark is made of: its labels, target subgroups (and the opt-in misleading one), the two
domains and their acquisition grids, and the tissues the anatomy is painted with."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from asfda.errors import AsfdaError

GENERATOR_VERSION = "2"
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
# Tissues (each protocol gives every one an intensity)
# ---------------------------------------------------------------------------

_TISSUES = ("air", "fat", "muscle", "bone", "disc", "vessel", "liver", "spleen",
            "cortex", "medulla", "lesion_dark", "lesion_bright")
_T = {name: i for i, name in enumerate(_TISSUES)}
