"""Training-patch augmentation with MONAI's random transforms.

Two recipes (``TrainConfig.augmentation``):

* ``intensity``: the original light recipe (global scale/shift, occasional gamma and noise), image only.
* ``spatial_mr``: a patch 1.25x larger is cut, then rotated (up to 15 degrees about each axis, most in-plane)
  and scaled (0.85-1.15) to the training patch with ``RandAffined`` (image bilinear, label and mask nearest),
  followed by MR-typical intensity changes (``RandBiasFieldd``, ``RandAdjustContrastd`` gamma,
  ``RandScaleIntensityd`` / ``RandShiftIntensityd``, ``RandGaussianNoised``, ``RandGaussianSmoothd``).
  Never a left-right flip: the labels are lateral (kidney_left / kidney_right).

Every random draw comes from the trainer's seeded generator, so a round is reproducible.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch

from asfda.options import AUGMENTATIONS, check_option

__all__ = ["AUGMENTATIONS", "PatchAugmenter"]

_SPATIAL_MARGIN = 1.25


class PatchAugmenter:
    """Turns a sampled region into an augmented training patch.

    Args:
        kind: one of `AUGMENTATIONS`.
        patch: the training patch size.
        seed: seeds MONAI's transforms.
    """

    def __init__(self, kind: str, patch: tuple[int, int, int], seed: int) -> None:
        check_option(kind, AUGMENTATIONS, "augmentation", listed=f"{AUGMENTATIONS}", error=ValueError)
        self.kind = kind
        self.patch = (int(patch[0]), int(patch[1]), int(patch[2]))
        self._spatial: Callable[[dict], dict] | None = None  # MONAI's RandAffined and Compose, built by _build
        self._intensity: Callable[[dict], dict] | None = None
        if kind == "spatial_mr":
            self._build(seed)

    @property
    def region(self) -> tuple[int, int, int]:
        """The size of the region to sample before augmentation (larger when it is rotated and scaled)."""
        if self.kind != "spatial_mr":
            return self.patch
        x, y, z = (int(math.ceil(p * _SPATIAL_MARGIN)) for p in self.patch)
        return x, y, z

    def _build(self, seed: int) -> None:
        from monai.transforms import (
            Compose,
            RandAdjustContrastd,
            RandAffined,
            RandBiasFieldd,
            RandGaussianNoised,
            RandGaussianSmoothd,
            RandScaleIntensityd,
            RandShiftIntensityd,
        )

        self._spatial = RandAffined(
            keys=["image", "label", "mask"], spatial_size=self.patch, prob=0.7,
            rotate_range=(math.pi / 36, math.pi / 36, math.pi / 12), scale_range=(0.15, 0.15, 0.15),
            mode=["bilinear", "nearest", "nearest"], padding_mode="zeros")
        self._intensity = Compose([
            RandBiasFieldd(keys="image", prob=0.3, coeff_range=(0.0, 0.3)),
            RandAdjustContrastd(keys="image", prob=0.3, gamma=(0.7, 1.5)),
            RandScaleIntensityd(keys="image", prob=0.8, factors=0.1),
            RandShiftIntensityd(keys="image", prob=0.8, offsets=0.1),
            RandGaussianNoised(keys="image", prob=0.2, std=0.03),
            RandGaussianSmoothd(keys="image", prob=0.2, sigma_x=(0.5, 1.0), sigma_y=(0.5, 1.0), sigma_z=(0.5, 1.0)),
        ])
        self._spatial.set_random_state(seed)
        self._intensity.set_random_state(seed + 1)

    def __call__(self, image: torch.Tensor, label: torch.Tensor, mask: torch.Tensor, rng: np.random.Generator
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``image [1, *region]``, ``label`` and ``mask [*region]`` -> the same at the patch size, augmented."""
        if self.kind == "none":
            return image, label, mask
        if self.kind == "intensity":
            return _light_intensity(image, rng), label, mask
        assert self._spatial is not None and self._intensity is not None  # spatial_mr: built in __init__
        data = {"image": image.float(), "label": label[None].float(), "mask": mask[None].float()}
        data = self._spatial(data)
        data = self._intensity({"image": data["image"], "label": data["label"], "mask": data["mask"]})

        def plain(t: object) -> torch.Tensor:
            return t.as_tensor() if hasattr(t, "as_tensor") else torch.as_tensor(t)

        return (plain(data["image"]).float(), plain(data["label"])[0].round().to(label.dtype),
                plain(data["mask"])[0] > 0.5)


def _light_intensity(x: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
    """The original light intensity augmentation; never flips (the labels are lateral)."""
    scale = float(rng.uniform(0.9, 1.1))
    shift = float(rng.uniform(-0.1, 0.1))
    x = x * scale + shift
    if rng.random() < 0.3:
        gamma = float(rng.uniform(0.7, 1.5))
        lo, hi = x.min(), x.max()
        x = ((x - lo) / (hi - lo + 1e-6)).pow(gamma) * (hi - lo) + lo
    if rng.random() < 0.2:
        g = torch.Generator().manual_seed(int(rng.integers(2**31)))
        x = x + torch.randn(x.shape, generator=g) * 0.03
    return x
