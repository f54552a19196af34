"""nnU-Net v2's sliding window (``nnUNetPredictor.predict_sliding_window_return_logits``), redone in torch.

What nnU-Net's predictor does on a preprocessed volume, and what MONAI's ``sliding_window_inference`` (asfda's default
tiling) does otherwise, measured on real anisotropic MR volumes (benchmarks/results/nnunet_parity.md):

* window positions: nnU-Net spreads ``ceil((size - patch) / (step * patch)) + 1`` windows evenly over each axis
  (`window_starts`); MONAI puts them at multiples of ``patch * (1 - overlap)`` and clamps the last one. They agree only
  where an axis holds at most two windows; elsewhere the label maps differ at about 2 % of the voxels;
* the Gaussian weight (`importance_map`): nnU-Net's is a unit impulse at ``patch // 2`` filtered by scipy (sigma 1/8
  of the patch, cut at 4 sigma), scaled to a maximum of 10 and stored in float16 (zeros raised to the smallest
  non-zero weight); MONAI's is analytic about ``(patch - 1) / 2`` with a floor of 1e-3. With nnU-Net's positions and
  MONAI's weight about 0.3 % of the voxels still differ;
* padding: a volume smaller than the patch is padded with zeros to the patch, centred (the odd voxel after);
* mirroring (test-time augmentation): each window is predicted as is and mirrored over every non-empty combination of
  the mirror axes (``2 ** len(axes)`` passes, `mirror_combinations`), averaged inside the window, before blending.

Deviation: the blended sums are float32 (nnU-Net accumulates them in float16), which moves the argmax only at ties
(about 0.001 % of the voxels).
"""

from __future__ import annotations

import functools
import itertools
import math
from collections.abc import Callable, Sequence

import numpy as np
import torch
from scipy import ndimage

__all__ = ["NNUNET_MODE", "importance_map", "mirror_combinations", "sliding_window", "window_starts"]

NNUNET_MODE = "nnunet"
"""The sliding-window ``mode`` of nnU-Net models: this module's tiling, blending and mirroring instead of MONAI's."""


def window_starts(size: Sequence[int], patch: Sequence[int], step: float = 0.5) -> list[list[int]]:
    """nnU-Net's ``compute_steps_for_sliding_window``: per axis, the first voxel of each window (``size >= patch``)."""
    out = []
    for n, p in zip(size, patch):
        count = int(math.ceil((n - p) / (p * step))) + 1
        stride = (n - p) / (count - 1) if count > 1 else 0.0
        out.append([int(np.round(stride * i)) for i in range(count)])
    return out


@functools.lru_cache(maxsize=4)
def _importance(patch: tuple[int, ...]) -> np.ndarray:
    impulse = np.zeros(patch)
    impulse[tuple(p // 2 for p in patch)] = 1
    g = ndimage.gaussian_filter(impulse, [p / 8 for p in patch], 0, mode="constant", cval=0)
    g = (g / (g.max() / 10)).astype(np.float16)
    g[g == 0] = g[g != 0].min()
    return g.astype(np.float32)


def importance_map(patch: Sequence[int], device: torch.device | str = "cpu") -> torch.Tensor:
    """nnU-Net's ``compute_gaussian(patch, 1/8, value_scaling_factor=10)``: its float16 values, as float32."""
    return torch.from_numpy(_importance(tuple(int(p) for p in patch))).to(device)


def mirror_combinations(axes: Sequence[int]) -> list[tuple[int, ...]]:
    """The mirrorings nnU-Net averages over (spatial axes): none first, then every non-empty combination of ``axes``
    in nnU-Net's order (single axes, pairs, ...)."""
    axes = tuple(int(a) for a in axes)
    return [()] + [c for k in range(1, len(axes) + 1) for c in itertools.combinations(axes, k)]


def _pad(x: torch.Tensor, patch: Sequence[int]) -> tuple[torch.Tensor, tuple[slice, ...]]:
    """``acvl_utils.pad_nd_image(x, patch, "constant", {"value": 0})``: zero padding to at least ``patch``, centred."""
    widths: list[int] = []
    keep = []
    for n, p in zip(reversed(x.shape[2:]), reversed(tuple(patch))):
        diff = max(int(p) - int(n), 0)
        widths += [diff // 2, diff - diff // 2]
    for n, p in zip(x.shape[2:], patch):
        diff = max(int(p) - int(n), 0)
        keep.append(slice(diff // 2, diff // 2 + int(n)))
    if any(widths):
        x = torch.nn.functional.pad(x, widths, mode="constant", value=0.0)
    return x, tuple(keep)


def sliding_window(x: torch.Tensor, forward: Callable[[torch.Tensor], torch.Tensor], patch: Sequence[int], *,
                   step: float = 0.5, sw_batch_size: int = 1, mirror_axes: Sequence[int] = (),
                   include_identity: bool = True) -> torch.Tensor:
    """nnU-Net's sliding-window logits of ``x [1, C_in, *spatial]`` (see the module docstring): ``forward`` maps a
    batch of windows ``[B, C_in, *patch]`` to logits ``[B, C, *patch]``; ``mirror_axes`` (spatial axes 0, 1, 2)
    mirrors each window over all their combinations, averaged. Without ``include_identity`` the average leaves the
    unmirrored window out (``(plain + k * that) / (k + 1)``, k the number of mirrorings, is nnU-Net's mirrored result:
    the blending is linear). Returns ``[1, C, *spatial]`` float32 on ``x``'s device."""
    if x.shape[0] != 1:
        raise ValueError(f"one volume at a time (batch 1), got a batch of {x.shape[0]}")
    patch = tuple(int(p) for p in patch)
    padded, keep = _pad(x, patch)
    size = tuple(padded.shape[2:])
    boxes = [tuple(slice(s, s + p) for s, p in zip(start, patch))
             for start in itertools.product(*window_starts(size, patch, step))]
    weight = importance_map(patch, x.device)
    flips = mirror_combinations(mirror_axes)[0 if include_identity else 1:]
    if not flips:
        raise ValueError("no window pass: include_identity=False needs mirror_axes")
    total: torch.Tensor | None = None
    norm = torch.zeros(size, dtype=torch.float32, device=x.device)
    for first in range(0, len(boxes), max(int(sw_batch_size), 1)):
        batch = boxes[first:first + max(int(sw_batch_size), 1)]
        windows = torch.cat([padded[(slice(None), slice(None), *box)] for box in batch])
        out = None
        for axes in flips:
            dims = tuple(a + 2 for a in axes)
            y = forward(windows.flip(dims) if dims else windows).float()
            y = y.flip(dims) if dims else y
            out = y if out is None else out + y
        assert out is not None  # flips holds the identity at least
        out /= len(flips)
        if total is None:
            total = torch.zeros((out.shape[1], *size), dtype=torch.float32, device=x.device)
        for k, box in enumerate(batch):
            total[(slice(None), *box)] += out[k] * weight
            norm[box] += weight
    assert total is not None  # at least one window
    total /= norm
    return total[(slice(None), *keep)][None]
