"""Metrics: pure functions from probabilities ``[C, X, Y, Z]`` (softmax over classes, channel 0 =
background) or embeddings to a voxel map or one number per volume. No I/O, no model calls.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from asfda.config import default_of
from asfda.metrics import largest_component

__all__ = [
    "anatomical_segmentation_difficulty",
    "anatomy_composition",
    "badge_embedding",
    "bald",
    "cosine_distance",
    "foreground_confidence",
    "foreground_kl_divergence",
    "gaussian_kl",
    "grow_mask",
    "mc_entropy",
    "mc_scores_from_moments",
    "mean_entropy",
    "normalisation_stat_divergence",
    "organ_extent",
    "pool_normalisation_divergence",
    "tta_variance",
    "voxel_entropy",
]

_EPS = 1e-12


def voxel_entropy(prob: torch.Tensor) -> torch.Tensor:
    """Normalised predictive entropy ``-sum_c p log p / log C`` per voxel, in [0, 1]; ``[C, ...] -> [...]``."""
    c = prob.shape[0]
    if c < 2:
        raise ValueError(f"prob must have >= 2 classes along dim 0, got shape {tuple(prob.shape)}")
    return -(prob * torch.log(prob.clamp_min(_EPS))).sum(0) / math.log(c)


def mean_entropy(prob: torch.Tensor, *, entropy: torch.Tensor | None = None) -> float:
    """ENPY: whole-volume mean of the normalised voxel entropy (a baseline, not ASD).

    ``entropy``: ``voxel_entropy(prob)`` when the caller has it already (the scoring stage shares it)."""
    return float((voxel_entropy(prob) if entropy is None else entropy).mean())


def grow_mask(mask: torch.Tensor, voxels: int) -> torch.Tensor:
    """Grows a boolean mask ``[X, Y, Z]`` by ``voxels`` in every direction (cubic structuring element).

    The cube is separable: three 1D max-pools (one per axis, ``3 (2v + 1)`` comparisons per voxel instead of
    ``(2v + 1)^3``) give exactly the cubic dilation."""
    if voxels <= 0:
        return mask.bool()
    k = 2 * voxels + 1
    grown = mask[None, None].float()
    for axis in range(3):
        kernel, pad = [1, 1, 1], [0, 0, 0]
        kernel[axis], pad[axis] = k, voxels
        grown = F.max_pool3d(grown, kernel_size=tuple(kernel), stride=1, padding=tuple(pad))
    return grown[0, 0] > 0


def _bounding_box(mask: torch.Tensor, margin: int) -> tuple[slice, ...]:
    """Slices of the smallest box holding ``mask``'s True voxels, widened by ``margin`` (clipped)."""
    box = []
    for axis in range(mask.ndim):
        other = tuple(a for a in range(mask.ndim) if a != axis)
        idx = torch.nonzero(mask.any(dim=other)).flatten()
        lo, hi = int(idx[0]), int(idx[-1]) + 1
        box.append(slice(max(0, lo - margin), min(mask.shape[axis], hi + margin)))
    return tuple(box)


def anatomical_segmentation_difficulty(prob: torch.Tensor, grow_voxels: int = default_of("grow_voxels"),
                                       fallback_fraction: float = 0.01, *, entropy: torch.Tensor | None = None,
                                       argmax: torch.Tensor | None = None) -> float:
    """ASD: entropy inside the predicted anatomy, each predicted foreground class counting equally.

    For each foreground class predicted somewhere (argmax), take the mean normalised entropy over its
    region grown by ``grow_voxels``; ASD is the mean over those classes. When nothing is predicted as
    foreground, fall back to the mean entropy of the ``fallback_fraction`` most foreground-probable voxels.

    Args:
        prob: ``[C, X, Y, Z]`` class probabilities.
        entropy, argmax: ``voxel_entropy(prob)`` and ``prob.argmax(0)`` when the caller has them already.
    """
    ent = voxel_entropy(prob) if entropy is None else entropy
    pred = prob.argmax(0) if argmax is None else argmax
    values = []
    for c in range(1, prob.shape[0]):
        region = pred == c
        if region.any():
            box = _bounding_box(region, max(grow_voxels, 0))  # the grown region cannot leave this box
            values.append(ent[box][grow_mask(region[box], grow_voxels)].mean())
    if values:
        return float(torch.stack(values).mean())
    fg = (1.0 - prob[0]).reshape(-1)
    k = max(1, int(round(fallback_fraction * fg.numel())))
    top = torch.topk(fg, k).indices
    return float(ent.reshape(-1)[top].mean())


def foreground_kl_divergence(prob_t: torch.Tensor, prob_0: torch.Tensor, *, argmax_t: torch.Tensor | None = None
                             ) -> float:
    """Knowledge divergence ``KL(p_t || p_0)`` averaged over voxels in the union of both models' foreground.

    Returns 0 when neither model predicts any foreground. ``argmax_t``: ``prob_t.argmax(0)`` if already known.
    """
    if prob_t.shape != prob_0.shape:
        raise ValueError(f"prob_t {tuple(prob_t.shape)} and prob_0 {tuple(prob_0.shape)} differ in shape")
    union = ((prob_t.argmax(0) if argmax_t is None else argmax_t) > 0) | (prob_0.argmax(0) > 0)
    if not union.any():
        return 0.0
    kl = (prob_t * (torch.log(prob_t.clamp_min(_EPS)) - torch.log(prob_0.clamp_min(_EPS)))).sum(0)
    return float(kl[union].mean())


def foreground_confidence(prob: torch.Tensor) -> float:
    """Mean over predicted-foreground voxels of the max class probability (0 if no foreground)."""
    top = prob.max(0)  # values and argmax in one pass
    fg = top.indices > 0
    if not fg.any():
        return 0.0
    return float(top.values[fg].mean())


def anatomy_composition(prob: torch.Tensor) -> torch.Tensor:
    """The predicted anatomy's composition ``[C - 1]``: the soft volume fraction of each foreground class,
    ``mean over voxels of p_cv`` for c = 1 .. C-1 (float64).

    Under cosine distance only its direction counts, i.e. the organs' relative sizes (a larger liver, a
    missing kidney, a cut-off field of view), not how much background surrounds them. It is read off the
    probabilities of the pass that gives the other metrics, so it costs no forward pass. Unlike the pooled
    bottleneck embedding it still describes the volume when the network instance-normalises every feature
    map (InstanceNorm fixes each channel's mean over the window, so the pooled features barely vary).
    """
    if prob.ndim < 2 or prob.shape[0] < 2:
        raise ValueError(f"prob must be [C >= 2, ...], got shape {tuple(prob.shape)}")
    return prob[1:].reshape(prob.shape[0] - 1, -1).double().mean(1)


def organ_extent(label_map: torch.Tensor | np.ndarray, n_classes: int) -> np.ndarray:
    """Per foreground class 1 .. ``n_classes`` - 1 of a predicted label map ``[X, Y, Z]``: ``[voxels of its largest
    connected component, 1.0 if that component reaches the first or last slice along Z else 0.0]`` -> ``[C - 1, 2]``
    (float64; a class predicted nowhere: ``[0, 0]``).

    Z is the grid's third axis, the scan's slice axis for a volume read as acquired (and superior-inferior after a
    bundle's RAS orientation). An organ whose component reaches an end slice is cut by the field of view: a label of
    that volume shows it truncated. The largest component leaves stray fragments out. Read off the argmax of the pass
    that gives the other metrics, so it costs no forward pass (`asfda.selection.diversity.anatomy_completeness`)."""
    lab = np.asarray(label_map.cpu() if isinstance(label_map, torch.Tensor) else label_map)
    if lab.ndim != 3:
        raise ValueError(f"label_map must be [X, Y, Z], got shape {lab.shape}")
    out = np.zeros((n_classes - 1, 2), dtype=np.float64)
    for k in range(1, n_classes):
        mask = largest_component(lab == k)
        n = int(mask.sum())
        if n:
            zs = np.flatnonzero(mask.any(axis=(0, 1)))
            out[k - 1] = (n, float(zs[0] == 0 or zs[-1] == lab.shape[2] - 1))
    return out


def cosine_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Pairwise cosine distance ``1 - cos`` between rows of ``a [N, D]`` and ``b [M, D]`` -> ``[N, M]``."""
    a = F.normalize(a.double(), dim=1)
    b = F.normalize(b.double(), dim=1)
    return (1.0 - a @ b.T).clamp_min(0.0)


# ---------------------------------------------------------------------------------------------- baselines
def mc_scores_from_moments(mean_prob: torch.Tensor, mean_voxel_entropy: torch.Tensor) -> tuple[float, float]:
    """(MC entropy, BALD) from the mean of K stochastic predictions ``[C, ...]`` and the mean over the K
    passes of their normalised voxel entropies ``[...]`` (what a streaming pass accumulates).

    MC entropy = whole-volume mean of ``H(mean_k p_k) / log C``; BALD = whole-volume mean of the mutual
    information ``H(mean_k p_k) - mean_k H(p_k)``, also divided by ``log C`` (so both lie in [0, 1]).
    """
    h_mean = voxel_entropy(mean_prob)
    if h_mean.shape != mean_voxel_entropy.shape:
        raise ValueError(f"mean_prob {tuple(mean_prob.shape)} and entropy map {tuple(mean_voxel_entropy.shape)} "
                         "do not match")
    # the mutual information is >= 0 exactly (Jensen); clamp only floating-point noise
    mi = (h_mean - mean_voxel_entropy).clamp_min(0.0)
    return float(h_mean.mean()), float(mi.mean())


def _check_stack(probs: torch.Tensor, name: str, min_k: int = 1) -> None:
    if probs.ndim < 3 or probs.shape[0] < min_k:
        raise ValueError(f"{name} needs a stack [K >= {min_k}, C, ...] of predictions, got shape {tuple(probs.shape)}")


def mc_entropy(probs: torch.Tensor) -> float:
    """MC-dropout predictive entropy: whole-volume mean of ``H(mean_k p_k) / log C`` for ``probs [K, C, ...]``."""
    _check_stack(probs, "mc_entropy")
    return mc_scores_from_moments(probs.mean(0), voxel_entropy(probs.movedim(0, 1)).mean(0))[0]


def bald(probs: torch.Tensor) -> float:
    """BALD (Houlsby et al. 2011): whole-volume mean mutual information between the prediction and the
    dropout mask, ``H(mean_k p_k) - mean_k H(p_k)``, divided by ``log C``; ``probs [K, C, ...]``."""
    _check_stack(probs, "bald")
    return mc_scores_from_moments(probs.mean(0), voxel_entropy(probs.movedim(0, 1)).mean(0))[1]


def tta_variance(probs: torch.Tensor) -> float:
    """TTA variance: for test-time-augmented predictions ``probs [K, C, ...]`` (each mapped back to the
    original grid), the population variance over the K predictions of each *foreground* class
    probability (channels 1..C-1), averaged over those classes and over every voxel of the volume.

    A whole-volume mean, like ENPY (not restricted to the predicted anatomy); 0 when all K agree.
    """
    _check_stack(probs, "tta_variance", min_k=1)
    if probs.shape[1] < 2:
        raise ValueError(f"tta_variance needs >= 2 classes, got shape {tuple(probs.shape)}")
    fg = probs[:, 1:].double()
    return float(fg.var(dim=0, unbiased=False).mean())


def badge_embedding(prob: torch.Tensor, embedding: torch.Tensor) -> torch.Tensor:
    """A per-volume BADGE gradient embedding ``[C * D]`` for a segmentation network (an approximation).

    BADGE (Ash et al. 2020) embeds a sample by the gradient of the cross-entropy loss, with the model's
    own argmax as the label, w.r.t. the last layer's weights: ``(p - onehot(argmax p)) (x) features``.
    For a 3D segmentation network the last layer is a per-voxel 1x1 convolution, so the exact gradient is
    ``sum_v (p_v - y_v) (x) f_v`` over voxels v with the penultimate feature map f_v, which the engine
    does not keep. The approximation used here replaces every f_v by the volume's pooled bottleneck
    embedding h and averages instead of summing:
    ``g_c = mean over predicted-foreground voxels of (p_cv - y_cv)`` (all voxels when nothing is predicted
    as foreground), and the embedding is the outer product ``g (x) h`` flattened class by class, i.e.
    ``[g_0 * h, g_1 * h, ..., g_{C-1} * h]``. Its norm grows with the uncertainty inside the predicted
    anatomy; its direction mixes which classes are uncertain with what the volume looks like.

    Args:
        prob: ``[C, X, Y, Z]`` class probabilities; embedding: ``[D]`` pooled bottleneck features.
    """
    if embedding.ndim != 1:
        raise ValueError(f"embedding must be [D], got shape {tuple(embedding.shape)}")
    c = prob.shape[0]
    flat = prob.reshape(c, -1).double()
    pred = flat.argmax(0)
    resid = flat - F.one_hot(pred, c).T.double()
    fg = pred > 0
    g = resid[:, fg].mean(1) if bool(fg.any()) else resid.mean(1)
    return (g[:, None] * embedding.double()[None, :]).reshape(-1)


def gaussian_kl(mean1: torch.Tensor, var1: torch.Tensor, mean0: torch.Tensor, var0: torch.Tensor) -> torch.Tensor:
    """Elementwise ``KL(N(mean1, var1) || N(mean0, var0))`` of univariate Gaussians:
    ``0.5 * (log(var0 / var1) + (var1 + (mean1 - mean0)^2) / var0 - 1)``."""
    var1 = var1.double().clamp_min(_EPS)
    var0 = var0.double().clamp_min(_EPS)
    return 0.5 * (torch.log(var0 / var1) + (var1 + (mean1.double() - mean0.double()) ** 2) / var0 - 1.0)


def normalisation_stat_divergence(layers: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]]
                                  ) -> float:
    """The round-0 feature-statistics gap of DKD: for each normalisation layer, the mean over channels of
    ``KL(N(volume mean, volume var) || N(running mean, running var))`` (the source statistics a BatchNorm
    layer stores), then the mean over layers (each layer counts equally).

    Args:
        layers: per layer ``(mean, var, running_mean, running_var)``, each ``[channels]``.
    """
    if not layers:
        raise ValueError("normalisation_stat_divergence needs at least one layer")
    return float(torch.stack([gaussian_kl(m, v, rm, rv).mean() for m, v, rm, rv in layers]).mean())


def pool_normalisation_divergence(means: list[torch.Tensor], variances: list[torch.Tensor]) -> torch.Tensor:
    """The round-0 feature-statistics gap for networks whose normalisation layers store no source
    statistics (InstanceNorm, GroupNorm): the same per-layer Gaussian KL as `normalisation_stat_divergence`,
    with the *pool's* statistics as the reference instead of the absent running statistics.

    For each layer l, the reference of channel c is the Gaussian with the moments of the pool mixture,
    ``mean0 = mean_n(mean[n, c])`` and ``var0 = mean_n(var[n, c] + mean[n, c]^2) - mean0^2``; each volume gets
    the mean over channels of ``KL(N(mean[n], var[n]) || N(mean0, var0))``, then the mean over layers.
    Atypical volumes (far from the pool's usual feature statistics) score highest.

    Args:
        means, variances: per layer ``[N, channels]``: each volume's per-channel mean and variance of the
            layer's input.

    Returns:
        ``[N]`` float64.
    """
    if not means or len(means) != len(variances):
        raise ValueError("pool_normalisation_divergence needs the same number (>= 1) of mean and variance layers")
    per_layer = []
    for m, v in zip(means, variances):
        m, v = m.double(), v.double().clamp_min(_EPS)
        m0 = m.mean(0, keepdim=True)
        v0 = ((v + m * m).mean(0, keepdim=True) - m0 * m0).clamp_min(_EPS)
        per_layer.append(gaussian_kl(m, v, m0, v0).mean(1))
    return torch.stack(per_layer).mean(0)
