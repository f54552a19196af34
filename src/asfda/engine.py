"""Sliding-window inference that returns, in one forward pass per volume, the target-class logits and
the pooled bottleneck embedding (a forward hook), streaming over a pool.

The network given here is expected to output *target-class* logits (wrap a source network in
`asfda.models.ClassMappedNetwork`). Hot loops take plain tensors, never MetaTensors.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from monai.inferers import sliding_window_inference
from torch import nn

from asfda.errors import AsfdaError

__all__ = ["InferenceEngine", "VolumeOutput", "find_embedding_layer", "select_device"]


def select_device(requested: str | None = None) -> torch.device:
    """The one place the compute device is chosen (``"auto"``: CUDA when available, else CPU)."""
    if requested in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(requested)


@dataclass
class VolumeOutput:
    """What one forward pass gives for a volume: logits ``[C, X, Y, Z]`` on the model grid, embedding ``[D]``."""

    case_id: str
    logits: torch.Tensor
    embedding: torch.Tensor


def find_embedding_layer(network: nn.Module, roi_size: tuple[int, ...], in_channels: int = 1) -> str:
    """Name of the module whose output is the bottleneck: the last module to finish its forward among
    those with the smallest spatial output (for MONAI's UNet, the deepest skip connection)."""
    outputs: list[tuple[str, int]] = []
    hooks = []
    for name, module in network.named_modules():
        if not name:
            continue

        def hook(mod, inp, out, name=name):
            if isinstance(out, torch.Tensor) and out.ndim == 5:
                outputs.append((name, int(out.shape[2:].numel())))

        hooks.append(module.register_forward_hook(hook))
    try:
        with torch.inference_mode():
            network(torch.zeros(1, in_channels, *roi_size))
    finally:
        for h in hooks:
            h.remove()
    if not outputs:
        raise AsfdaError("cannot find a 3D feature map inside the network to use as embedding",
                         fix="set the model's embedding layer by name (asfda_embedding_layer in the config)")
    smallest = min(n for _, n in outputs)
    return [name for name, n in outputs if n == smallest][-1]


class InferenceEngine:
    """Runs a (class-mapped) network over volumes: logits + embedding in one pass.

    Args:
        network: module returning target-class logits ``[B, C, ...]``.
        roi_size, sw_batch_size, overlap: sliding-window settings.
        embedding_layer: dotted module name of the bottleneck inside ``network`` (found if None).
        device: where to compute (see `select_device`).
    """

    def __init__(self, network: nn.Module, roi_size: tuple[int, int, int], *, sw_batch_size: int = 4,
                 overlap: float = 0.25, embedding_layer: str | None = None, device: torch.device | None = None) -> None:
        self.network = network
        self.roi_size = tuple(roi_size)
        self.sw_batch_size = sw_batch_size
        self.overlap = overlap
        self.device = device or select_device()
        self.embedding_layer = embedding_layer or find_embedding_layer(network, self.roi_size)
        modules = dict(network.named_modules())
        if self.embedding_layer not in modules:
            raise AsfdaError(f"embedding layer {self.embedding_layer!r} is not a module of the network")
        self._module = modules[self.embedding_layer]
        self._sum: torch.Tensor | None = None
        self._count = 0

    def _hook(self, module: nn.Module, inp: object, out: torch.Tensor) -> None:
        pooled = out.detach().float().flatten(2).mean(dim=2).sum(dim=0)  # [D]
        self._sum = pooled if self._sum is None else self._sum + pooled
        self._count += out.shape[0]

    @contextlib.contextmanager
    def _capturing(self) -> Iterator[None]:
        self._sum, self._count = None, 0
        handle = self._module.register_forward_hook(self._hook)
        try:
            yield
        finally:
            handle.remove()

    def run(self, image: torch.Tensor, *, mc_dropout: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """One volume ``[1, X, Y, Z]`` -> (logits ``[C, X, Y, Z]``, embedding ``[D]``), on the CPU."""
        x = image.as_tensor() if hasattr(image, "as_tensor") else image
        x = x.to(self.device, non_blocking=True)[None]
        was_training = self.network.training
        self.network.eval()
        if mc_dropout:
            _enable_dropout(self.network)
        try:
            with torch.inference_mode(), self._capturing():
                logits = sliding_window_inference(x, self.roi_size, self.sw_batch_size, self.network,
                                                  overlap=self.overlap, mode="constant")
                embedding = self._sum / max(self._count, 1)
        finally:
            self.network.train(was_training)
        logits = logits.as_tensor() if hasattr(logits, "as_tensor") else logits
        return logits[0].float().cpu(), embedding.cpu()

    def stream(self, volumes: Iterator) -> Iterator[VolumeOutput]:
        """Yields one `VolumeOutput` per prepared volume (objects with ``case_id`` and ``image``)."""
        for vol in volumes:
            logits, emb = self.run(vol.image)
            yield VolumeOutput(vol.case_id, logits, emb)


def _enable_dropout(network: nn.Module) -> int:
    n = 0
    for m in network.modules():
        if isinstance(m, nn.modules.dropout._DropoutNd) and m.p > 0:
            m.train()
            n += 1
    if n == 0:
        raise AsfdaError("MC dropout needs dropout layers, and this network has none",
                         fix="use the 'tta' strategy instead, or a network with dropout > 0")
    return n
