"""Matching a model's output channels to a dataset's labels by name.

Source classes the target does not have fold into background by log-sum-exp of their logits, so the
target-class probabilities stay a proper distribution. A target class the model does not know gets a
new, trainable output channel (a 1x1x1 convolution over the source logits, started at a low logit), or, with
``fold_uncovered`` (a model with fewer organs than the dataset), is folded into background: never predicted, its
label voxels counted as background. An adapted model's recorded class map names its channels again at loading
(`names_from_recorded_class_map`).
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass

import torch
from torch import nn

from asfda.errors import AsfdaError

__all__ = ["ChannelName", "ClassMap", "ClassMappedNetwork", "OutputAsLogits", "build_class_map",
           "names_from_recorded_class_map", "parse_class_map_override", "probabilities_to_logits"]

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
    fold_uncovered: bool = False  # target classes without a source are folded into background, not given a channel

    @property
    def is_identity(self) -> bool:
        return (len(self.target_names) == len(self.source_names)
                and self.source_index == tuple(range(len(self.source_names))))

    @property
    def new_classes(self) -> list[str]:
        return [n for n, s in zip(self.target_names, self.source_index) if s is None]

    @property
    def covered(self) -> tuple[int, ...]:
        """The target label values (foreground) the model has an output channel for: the organs it segments."""
        return tuple(t for t, s in enumerate(self.source_index) if t > 0 and s is not None)

    @property
    def uncovered(self) -> tuple[int, ...]:
        """The target label values (foreground) the model has no output channel for (a one-organ model on a
        four-organ dataset: three); before fine-tuning gives them a channel, they are never predicted, and a
        comparison with labels folds them into background (`fold_uncovered_label`)."""
        return tuple(t for t, s in enumerate(self.source_index) if t > 0 and s is None)

    def fold_uncovered_label(self, label: torch.Tensor) -> torch.Tensor:
        """``label`` (target label values) with the `uncovered` classes folded into background (0): what a model
        that cannot segment them is measured against; their Dice is then NaN (in neither map) and a mean that
        leaves NaN out covers the model's organs only."""
        if not self.uncovered:
            return label
        out = label.clone()
        out[torch.isin(out, torch.tensor(self.uncovered, dtype=out.dtype, device=out.device))] = 0
        return out

    def uncovered_note(self) -> str | None:
        """One sentence for a command's output and summary naming the dataset classes the model does not segment,
        and what happens to them; None when the model covers every class."""
        if not self.uncovered:
            return None
        names = [self.target_names[t] for t in self.uncovered]
        own = [self.target_names[t] for t in self.covered]
        return (f"dataset classes {names} are not classes of the model: folded into background (never predicted; "
                f"their label voxels count as background); the model segments {own} only")

    def to_dict(self) -> dict:
        return {t: (None if s is None else self.source_names[s]) for t, s in zip(self.target_names, self.source_index)}

    def refuse_new_classes(self, where: str | os.PathLike[str] | None = None) -> None:
        """Refuses, before any work, a fine-tuning run whose dataset has classes the model lacks: they would train
        new output channels, which the adapted model, written as the source bundle, cannot hold."""
        if self.new_classes and not self.fold_uncovered:
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
                    *, background: str = "background", allow_no_match: bool = False,
                    fold_uncovered: bool = False) -> ClassMap:
    """Builds the name match; the target's index 0 must be background.

    Args:
        allow_no_match: when no target class matches a source class, give every target class a new output channel
            (METHOD.md's cold start: the model has no head for the target yet) instead of refusing.
        fold_uncovered: a target class the model has no channel for (a one-organ model on a four-organ dataset) is
            folded into background (`ClassMap.fold_uncovered`: never predicted, its label voxels count as
            background) instead of getting a new, trainable output channel.
    """
    override = dict(override or {})
    if target_names[0] != background:
        raise AsfdaError(f"target label 0 is {target_names[0]!r}, expected {background!r}",
                         fix="make label value 0 the background")
    norm = {_norm(n): i for i, n in enumerate(source_names)}
    for i, n in enumerate(source_names):  # a channel renamed by its recorded class map keeps its declared name
        if isinstance(n, ChannelName):
            norm.setdefault(_norm(n.declared), i)
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
    folded = tuple(i for i in range(len(source_names)) if i not in set(index))
    cmap = ClassMap(tuple(target_names), tuple(source_names), tuple(index), (src_bg, *folded),
                    fold_uncovered and bool(matched) and None in index[1:])  # only where something is folded
    if cmap.new_classes and cmap.fold_uncovered:
        log.warning("%s", cmap.uncovered_note())
    elif cmap.new_classes:
        log.warning("dataset classes %s are unknown to the model: they get new output channels, untrained until "
                    "fine-tuning", cmap.new_classes)
    return cmap


def _norm(name: str) -> str:
    return name.strip().lower().replace(" ", "_").replace("-", "_")


class ChannelName(str):
    """An output channel's name as asfda matches it (the dataset class it was adapted to, from the class map
    recorded with the adapted model), remembering the name the model's files declare (``declared``): a class map
    matches either, and an export records the declared one (`declared_class_map`)."""

    declared: str

    def __new__(cls, name: str, declared: str) -> ChannelName:
        obj = super().__new__(cls, name)
        obj.declared = str(declared)
        return obj

    def __reduce__(self) -> tuple:
        return ChannelName, (str(self), self.declared)


def declared_class_map(class_map: dict) -> dict:
    """A class map (``{target: source}``) with each source named as the model's files declare it: what an export
    records, so that the adapted model's metadata names channels its channel_def has."""
    return {t: (s.declared if isinstance(s, ChannelName) else s) for t, s in class_map.items()}


def names_from_recorded_class_map(names: list[str], metadata: dict) -> list[str]:
    """The model's channel names with the class map recorded at its adaptation (``metadata["asfda"]["class_map"]``,
    ``{target: source}``) applied: the channel adapted to target class ``T`` is named ``T`` (a `ChannelName` that
    keeps the declared name too), so that the adapted model runs on the dataset it was adapted on without
    ``--class-map`` again. Unchanged when nothing is recorded, or when a renaming would give two channels one name."""
    recorded = metadata.get("asfda") if isinstance(metadata, dict) else None
    cmap = recorded.get("class_map") if isinstance(recorded, dict) else None
    if not isinstance(cmap, dict) or not cmap:
        return names
    by_norm = {_norm(str(n)): i for i, n in enumerate(names)}
    out: list[str] = list(names)
    renamed = []
    for k, (target, source) in enumerate(cmap.items()):
        if k == 0 or not isinstance(target, str) or not isinstance(source, str):  # background, or a new class
            continue
        i = by_norm.get(_norm(source))
        if i is not None and _norm(target) != _norm(str(names[i])):
            out[i] = ChannelName(target, names[i])
            renamed.append(f"{names[i]} -> {target}")
    if not renamed:
        return names
    if len({_norm(str(n)) for n in out}) != len(out):
        log.warning("the class map recorded with the model (%s) would give two output channels one name: not "
                    "applied (pass --class-map)", ", ".join(renamed))
        return names
    log.info("the model's channels are named by the class map recorded at its adaptation: %s", ", ".join(renamed))
    return out


_PROB_EPS = 1e-7
_FOLDED_GAP = 30.0  # a folded target class's logit below background's: probability ~1e-13 of background's, finite


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
        n_new = 0 if class_map.fold_uncovered else len(class_map.new_classes)
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
            elif s is None and self.class_map.fold_uncovered:  # folded into background: never predicted
                parts.append(parts[0] - _FOLDED_GAP)
            elif s is None:
                assert new_logits is not None  # a target class without a source is one of new_head's outputs
                parts.append(new_logits[:, k : k + 1])
                k += 1
            else:
                parts.append(z[:, s : s + 1])
        return torch.cat(parts, dim=1)
