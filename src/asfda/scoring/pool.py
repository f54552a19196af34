"""The scoring stage: stream the unlabeled pool through the engines, keep a few numbers per volume.

One forward pass of the current model per volume, plus one of the frozen pretrained model once the
current model has been adapted (for the knowledge divergence). Logits never outlive their volume.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import numpy as np
import torch

from asfda.engine import InferenceEngine
from asfda.scoring.metrics import (
    anatomical_segmentation_difficulty,
    foreground_confidence,
    foreground_kl_divergence,
    mean_entropy,
)

__all__ = ["PoolMetrics", "score_volumes"]

PoolMetrics = tuple[dict[str, np.ndarray], np.ndarray, np.ndarray | None]


def score_volumes(volumes: Iterable, current: InferenceEngine, temperature: float, *,
                  frozen: InferenceEngine | None = None, grow_voxels: int = 2,
                  progress: Callable[[Iterable], Iterable] = lambda x: x) -> PoolMetrics:
    """Per-volume metrics for prepared volumes (objects with ``image``).

    Args:
        volumes: prepared volumes, consumed one at a time.
        current: engine of the model being adapted.
        temperature: T of this round; probabilities are ``softmax(z / T)``.
        frozen: engine of the pretrained model; when given, ``kd`` = KL(p_t || p_0) and the pretrained
            embeddings are returned too.

    Returns:
        (metric name -> ``[N]`` array, current embeddings ``[N, D]``, pretrained embeddings or None).
    """
    names = ["asd", "enpy", "confidence"] + (["kd"] if frozen is not None else [])
    metrics: dict[str, list[float]] = {n: [] for n in names}
    embs, embs0 = [], []
    for vol in progress(volumes):
        logits, emb = current.run(vol.image)
        prob = torch.softmax(logits / temperature, 0)
        metrics["asd"].append(anatomical_segmentation_difficulty(prob, grow_voxels))
        metrics["enpy"].append(mean_entropy(prob))
        metrics["confidence"].append(foreground_confidence(prob))
        embs.append(emb.numpy())
        if frozen is not None:
            logits0, emb0 = frozen.run(vol.image)
            metrics["kd"].append(foreground_kl_divergence(prob, torch.softmax(logits0 / temperature, 0)))
            embs0.append(emb0.numpy())
        del logits, prob
    arrays = {k: np.asarray(v, dtype=np.float64) for k, v in metrics.items()}
    return arrays, (np.stack(embs) if embs else np.zeros((0, 0))), (np.stack(embs0) if embs0 else None)
