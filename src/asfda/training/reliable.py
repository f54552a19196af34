"""Selective semi-supervision: which unlabeled volumes are reliable, and their masked pseudo-labels."""

from __future__ import annotations

import numpy as np
import torch

from asfda.config import default_of
from asfda.metrics import dice_per_class, mean_ignoring_nan

__all__ = ["pseudo_label", "pseudo_label_quality", "select_reliable"]


def select_reliable(ids: list[str], confidence: np.ndarray, distance: np.ndarray, *,
                    confident_fraction: float = default_of("semi.confident_fraction"),
                    close_fraction: float = default_of("semi.close_fraction")) -> list[str]:
    """Keeps the volumes that are both among the most confident and among the closest to the labelled set.

    Args:
        ids: unlabeled case ids ``[N]``.
        confidence: ``[N]`` mean max-probability over predicted foreground (higher = more confident).
        distance: ``[N]`` min cosine distance to the labelled embeddings (lower = closer).
        confident_fraction, close_fraction: fractions kept by each criterion (rounded up, at least one
            volume each when ``N > 0`` and the fraction is > 0); by default the settings' (`asfda.config.SemiConfig`).

    Returns:
        the ids in both sets, sorted by id. Ties at a cut-off are broken by id, so the rule is
        deterministic and independent of the pool's order.
    """
    for name, frac in (("confident_fraction", confident_fraction), ("close_fraction", close_fraction)):
        if not 0.0 <= frac <= 1.0:
            raise ValueError(f"{name} must be in [0, 1], got {frac}")
    n = len(ids)
    if n == 0 or confident_fraction == 0 or close_fraction == 0:
        return []
    confidence = np.asarray(confidence, dtype=np.float64)
    distance = np.asarray(distance, dtype=np.float64)
    if confidence.shape != (n,) or distance.shape != (n,):
        raise ValueError(f"confidence {confidence.shape} and distance {distance.shape} must both be ({n},)")
    names = np.asarray(ids, dtype=object).astype(str)
    k_conf = max(1, int(np.ceil(confident_fraction * n)))
    k_close = max(1, int(np.ceil(close_fraction * n)))
    by_conf = np.lexsort((names, -confidence))[:k_conf]
    by_close = np.lexsort((names, distance))[:k_close]
    keep = set(by_conf.tolist()) & set(by_close.tolist())
    return sorted(ids[i] for i in keep)


def pseudo_label(logits: torch.Tensor, temperature: float = 1.0, threshold: float = 0.9
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Argmax pseudo-label ``[X, Y, Z]`` and the mask of voxels with max probability >= ``threshold``.

    Args:
        logits: ``[C, X, Y, Z]`` (e.g. averaged over flips).
    """
    prob = torch.softmax(logits / temperature, 0)
    conf, label = prob.max(0)
    return label.to(torch.uint8), conf >= threshold


def pseudo_label_quality(label: torch.Tensor, mask: torch.Tensor, truth: torch.Tensor | np.ndarray,
                         names: list[str]) -> dict[str, float]:
    """How good a masked pseudo-label is against the volume's true label (simulation only: the pool's labels exist
    there and are never trained on): ``pseudo_dice`` (the mean foreground Dice of the whole pseudo-label),
    ``pseudo_dice_masked`` (the same over the voxels it trains on, the mask), ``kept_fraction`` (of the volume's
    voxels) and ``pseudo_dice:<organ>`` per foreground class (``names``: the class names, background first; NaN
    where the organ is in neither map). The semi-supervision issue's quality table reads these."""
    truth_t = torch.as_tensor(np.asarray(truth)).to(label.device)
    classes = range(1, len(names))
    per = dice_per_class(label, truth_t, classes)
    keep = mask.bool()
    masked = dice_per_class(label[keep], truth_t[keep], classes) if bool(keep.any()) else np.full(len(per), np.nan)
    out = {"pseudo_dice": mean_ignoring_nan(per), "pseudo_dice_masked": mean_ignoring_nan(masked),
           "kept_fraction": float(keep.float().mean())}
    out.update({f"pseudo_dice:{name}": float(v) for name, v in zip(names[1:], per, strict=True)})
    return out
