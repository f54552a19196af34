"""Model-grid logits back to a label map on the input image's own grid (the inverse of the model's preprocessing),
one class at a time; shared by `asfda predict`, evaluation and the annotation pre-segmentations."""

from __future__ import annotations

import numpy as np
import torch

from asfda.models.preprocessing import resample_to_native

__all__ = ["SIGMOID_THRESHOLD", "label_map_on_native_grid"]

SIGMOID_THRESHOLD = 0.5
"""A sigmoid (multi-label) head's channel is on where its probability is at least this."""


def label_map_on_native_grid(logits: torch.Tensor, activation: str, channels: tuple[int, ...],
                             values: tuple[int, ...], grid_affine: np.ndarray, native_affine: np.ndarray,
                             native_shape: tuple[int, int, int], preprocessing: object = None) -> np.ndarray:
    """Model-grid logits ``[C, X, Y, Z]`` -> uint8 label map ``[X', Y', Z']`` on the input image's grid.

    A ``preprocessing`` with its own inverse (``label_map_on_native_grid``: nnU-Net's export, which resamples logits
    and pastes the cropped box back) decides softmax labels itself; the rest of this docstring is the general path.

    Probabilities are resampled (bilinear) one channel at a time, so memory stays at a few native-size
    volumes whatever the number of classes, and the label is decided on the native grid:

    * ``"softmax"``: the channel of highest probability (background = channel 0 wins ties);
    * ``"sigmoid"`` (multi-label heads): each channel of ``channels`` is thresholded at 0.5, and a voxel
      above the threshold in several channels takes the one of highest probability; voxels above it in
      none are background (0).

    Args:
        channels: foreground channels of ``logits`` to consider; ``values``: label value written for each.
    """
    if activation not in ("softmax", "sigmoid"):
        raise ValueError(f"activation must be 'softmax' or 'sigmoid', got {activation!r}")
    if len(channels) != len(values):
        raise ValueError(f"channels and values must have the same length, got {len(channels)} and {len(values)}")
    if any(not 0 <= v <= 255 for v in values):
        raise ValueError(f"label values must fit uint8 (0..255), got {list(values)}")
    own = getattr(preprocessing, "label_map_on_native_grid", None) if activation == "softmax" else None
    label = own(logits, channels, values, grid_affine, native_affine, native_shape) if own else None
    if label is not None:
        return label
    logits = logits.float()
    same_grid = (tuple(logits.shape[1:]) == tuple(native_shape)
                 and np.allclose(grid_affine, native_affine, atol=1e-4, rtol=1e-5))

    def native(prob: torch.Tensor) -> torch.Tensor:
        if same_grid:
            return prob
        return resample_to_native(prob[None], grid_affine, native_affine, native_shape)[0]

    label = torch.zeros(tuple(native_shape), dtype=torch.uint8)
    if activation == "softmax":
        lse = torch.logsumexp(logits, 0)
        best = native(torch.exp(logits[0] - lse))  # background probability
        for c, v in zip(channels, values):
            p = native(torch.exp(logits[c] - lse))
            win = p > best
            best = torch.where(win, p, best)
            label[win] = v
    else:
        best = torch.full(tuple(native_shape), -1.0)
        for c, v in zip(channels, values):
            p = native(torch.sigmoid(logits[c]))
            win = (p >= SIGMOID_THRESHOLD) & (p > best)
            best = torch.where(win, p, best)
            label[win] = v
    return label.numpy()
