"""Matching a model's output channels to a dataset's labels by name.

Source classes the target does not have fold into background by log-sum-exp of their logits, so the
target-class probabilities stay a proper distribution. A target class the model does not know gets a
new, trainable output channel (a 1x1x1 convolution over the source logits, started at a low logit).
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass

import torch
from torch import nn

from asfda.errors import AsfdaError

__all__ = ["ClassMap", "ClassMappedNetwork", "OutputAsLogits", "build_class_map", "parse_class_map_override",
           "probabilities_to_logits"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ClassMap:
    """For each target class (index = target label value), the source channel it reads, or None (new).

    ``background_sources`` are the source channels folded into target background (source background
    and every unmatched source class).
    """

    target_names: tuple[str, ...]
    source_names: tuple[str, ...]
    source_index: tuple[int | None, ...]
    background_sources: tuple[int, ...]

    @property
    def is_identity(self) -> bool:
        return (len(self.target_names) == len(self.source_names)
                and self.source_index == tuple(range(len(self.source_names))))

    @property
    def new_classes(self) -> list[str]:
        return [n for n, s in zip(self.target_names, self.source_index) if s is None]

    def to_dict(self) -> dict:
        return {t: (None if s is None else self.source_names[s]) for t, s in zip(self.target_names, self.source_index)}

    def refuse_new_classes(self, where: str | os.PathLike[str] | None = None) -> None:
        """Refuses, before any work, a fine-tuning run whose dataset has classes the model lacks: they would train
        new output channels, which the adapted model, written as the source bundle, cannot hold."""
        if self.new_classes:
            raise AsfdaError(f"dataset classes {self.new_classes} are not classes of the model "
                             f"{[n for n in self.source_names if n != 'background']}: fine-tuning would give them new "
                             "output channels, which the adapted model (written as the source bundle) cannot hold",
                             where, "map each onto a model class with --class-map target=source, or leave them out "
                             "of the dataset's labels")


def parse_class_map_override(text: str | None) -> dict[str, str]:
    """Parses ``"target=source,target2=source2"`` into a dict."""
    if not text:
        return {}
    out: dict[str, str] = {}
    for item in text.split(","):
        if "=" not in item:
            raise AsfdaError(f"class-map entry {item!r} is not target=source",
                             fix="write e.g. liver=liver,kidney_right=rk")
        t, s = (x.strip() for x in item.split("=", 1))
        out[t] = s
    return out


NO_MATCH_FIX = ("pass --class-map target=source,... to match them by hand; `asfda query --strategy asfda` picks the "
                "first cases to annotate on the model's embeddings alone (the cold start)")


def build_class_map(source_names: list[str], target_names: list[str], override: dict[str, str] | None = None,
                    *, background: str = "background", allow_no_match: bool = False) -> ClassMap:
    """Builds the name match; the target's index 0 must be background.

    Args:
        allow_no_match: when no target class matches a source class, give every target class a new output channel
            (METHOD.md's cold start: the model has no head for the target yet) instead of refusing.
    """
    override = dict(override or {})
    if target_names[0] != background:
        raise AsfdaError(f"target label 0 is {target_names[0]!r}, expected {background!r}",
                         fix="make label value 0 the background")
    norm = {_norm(n): i for i, n in enumerate(source_names)}
    bad = [s for s in override.values() if _norm(s) not in norm]
    if bad:
        raise AsfdaError(f"class-map names {bad} are not model classes; the model has {list(source_names)}",
                         fix="use the model's channel names on the right of '='")
    unknown_targets = [t for t in override if t not in target_names]
    if unknown_targets:
        raise AsfdaError(f"class-map targets {unknown_targets} are not dataset labels {list(target_names)}")
    src_bg = norm.get(_norm(background), 0)
    index: list[int | None] = [src_bg]
    for name in target_names[1:]:
        key = _norm(override.get(name, name))
        index.append(norm.get(key))
    matched = [i for i in index[1:] if i is not None]
    if not matched and not allow_no_match:
        raise AsfdaError(f"no dataset label {list(target_names[1:])} matches a model class {list(source_names)}",
                         fix=NO_MATCH_FIX)
    if len(set(matched)) != len(matched):
        raise AsfdaError("two dataset labels map to the same model class", fix="check --class-map")
    new = [n for n, i in zip(target_names, index) if i is None]
    if new:
        log.warning("dataset classes %s are unknown to the model: they get new output channels, untrained until "
                    "fine-tuning", new)
    folded = tuple(i for i in range(len(source_names)) if i not in set(index))
    return ClassMap(tuple(target_names), tuple(source_names), tuple(index), (src_bg, *folded))


def _norm(name: str) -> str:
    return name.strip().lower().replace(" ", "_").replace("-", "_")


_PROB_EPS = 1e-7


def probabilities_to_logits(p: torch.Tensor, activation: str) -> torch.Tensor:
    """Logits whose ``activation`` gives back the probabilities ``p``: ``log p`` for a softmax (each voxel's channels
    sum to 1), ``log p - log(1 - p)`` for a sigmoid; clamped away from 0 and 1 so that they stay finite."""
    p = p.float().clamp(_PROB_EPS, 1.0 - _PROB_EPS) if activation == "sigmoid" else p.float().clamp_min(_PROB_EPS)
    return torch.log(p) if activation == "softmax" else torch.log(p) - torch.log1p(-p)


class OutputAsLogits(nn.Module):
    """Wraps a network whose output already is probabilities (``output_activation: none``) so that it outputs the
    logits of its ``activation`` (`probabilities_to_logits`): asfda's softmax / sigmoid then gives back exactly the
    network's probabilities, never a second activation on top of the first."""

    def __init__(self, network: nn.Module, activation: str = "softmax") -> None:
        super().__init__()
        self.network = network
        self.activation = activation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return probabilities_to_logits(self.network(x), self.activation)


class ClassMappedNetwork(nn.Module):
    """Wraps a source network so that it outputs target-class logits ``[B, C_target, ...]`` of a softmax.

    Args:
        activation: the source network's (``softmax`` or ``sigmoid``).
        probabilities: the source network's output already went through ``activation`` (`OutputAsLogits`).
        add_background: a sigmoid head without a background channel: its channels are the foreground classes
            (``class_map.source_names`` then starts with an added ``background``), and the source logits become
            ``[0, z_1, ..., z_K]``: a softmax over them is exactly the sigmoid for one channel, and for several the
            single-label distribution in which "no channel on" is background.
    """

    _bg: torch.Tensor  # a buffer: the source channels summed into the target background

    def __init__(self, network: nn.Module, class_map: ClassMap, activation: str = "softmax", *,
                 probabilities: bool = False, add_background: bool = False) -> None:
        super().__init__()
        if activation not in ("softmax", "sigmoid"):
            raise ValueError(f"activation must be 'softmax' or 'sigmoid', got {activation!r}")
        self.network = network
        self.class_map = class_map
        self.activation = activation
        self.probabilities = probabilities
        self.add_background = add_background and activation == "sigmoid"
        n_new = len(class_map.new_classes)
        self.new_head: nn.Conv3d | None = None
        if n_new:
            self.new_head = nn.Conv3d(len(class_map.source_names), n_new, kernel_size=1)
            nn.init.zeros_(self.new_head.weight)
            assert self.new_head.bias is not None  # bias=True, nn.Conv3d's default
            nn.init.constant_(self.new_head.bias, -math.log(100.0))
        self.register_buffer("_bg", torch.tensor(class_map.background_sources, dtype=torch.long), persistent=False)

    def source_logits(self, x: torch.Tensor) -> torch.Tensor:
        """The source network's output as logits of a softmax over ``class_map.source_names``."""
        z = self.network(x)
        if isinstance(z, (list, tuple)) and z and isinstance(z[0], torch.Tensor):
            z = z[0]  # deep supervision as a list: the full-resolution output comes first
        if z.ndim == x.ndim + 1:
            z = z[:, 0]  # deep supervision stacked on dim 1 (MONAI's DynUNet in training): the full-resolution output
        if self.probabilities:
            z = probabilities_to_logits(z, self.activation)
        if self.add_background:
            z = torch.cat([torch.zeros_like(z[:, :1]), z], dim=1)
        return z

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.source_logits(x)
        if z.shape[1] != len(self.class_map.source_names):
            n = z.shape[1] - int(self.add_background)
            raise AsfdaError(f"the network outputs {n} channels but its metadata names "
                             f"{len(self.class_map.source_names) - int(self.add_background)} classes",
                             fix="make channel_def match out_channels")
        if self.class_map.is_identity:
            return z
        parts = []
        new_logits = self.new_head(z) if self.new_head is not None else None
        k = 0
        for t, s in enumerate(self.class_map.source_index):
            if t == 0:
                parts.append(torch.logsumexp(z.index_select(1, self._bg), dim=1, keepdim=True))
            elif s is None:
                assert new_logits is not None  # a target class without a source is one of new_head's outputs
                parts.append(new_logits[:, k : k + 1])
                k += 1
            else:
                parts.append(z[:, s : s + 1])
        return torch.cat(parts, dim=1)
