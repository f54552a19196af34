"""Sliding-window inference that returns, in one forward pass per volume, the target-class logits and
the pooled bottleneck embedding (a forward hook).

The network given here is expected to output *target-class* logits (wrap a source network in
`asfda.models.ClassMappedNetwork`). Hot loops take plain tensors, never MetaTensors.

Test-time augmentation (``run(image, tta=True)``) averages the logits of ``1 + len(tta_axes)``
sliding-window passes: the image as is, and the image flipped along each axis of ``tta_axes`` alone
(each output flipped back). The default axes are the model grid's axes 1 and 2 (anterior-posterior
and superior-inferior in RAS); axis 0 (left-right) is never flipped by default because left and
right organs are different labels.
"""

from __future__ import annotations

import contextlib
import logging
import re
from collections.abc import Iterator, Sequence

import torch
from monai.inferers import sliding_window_inference
from torch import nn

from asfda.errors import AsfdaError
from asfda.models.nnunet_window import NNUNET_MODE, mirror_combinations
from asfda.models.nnunet_window import sliding_window as nnunet_sliding_window
from asfda.models.probe import probe_network
from asfda.options import PRECISIONS, check_option

__all__ = ["DEFAULT_TTA_AXES", "INFERENCE_PRECISIONS", "OUTPUT_EMBEDDING", "InferenceEngine", "find_embedding_layer",
           "describe_device", "probe_network", "select_device"]

log = logging.getLogger(__name__)

DEFAULT_TTA_AXES: tuple[int, ...] = (1, 2)
"""Model-grid spatial axes flipped by TTA: anterior-posterior and superior-inferior in RAS, never left-right."""

INFERENCE_PRECISIONS = PRECISIONS
"""``fp32``, or ``bf16``: the network's forward under bfloat16 autocast (windows blended and returned in float32);
the one list `asfda.options.PRECISIONS`, which fine-tuning takes too."""

OUTPUT_EMBEDDING = "output"
"""``embedding_layer`` value meaning "no hook: the embedding is the network output (logits) averaged over the
volume". Used for networks whose inner modules cannot be hooked (TorchScript)."""


DEVICE_FORMS = "auto, cpu, cuda, cuda:N (N = 0, 1, ...), mps"
"""The device names asfda takes (`check_device_name`): ``auto`` is CUDA when available, else the CPU."""
_DEVICE_NAME = re.compile(r"auto|cpu|cuda(:\d{1,4})?|mps")


def check_device_name(requested: object) -> str:
    """``requested`` (None: ``auto``) when it is one of `DEVICE_FORMS`, else an `AsfdaError` naming them. The
    command line checks its ``--device`` with this when it parses it; `select_device` again, with what is here."""
    name = "auto" if requested is None else str(requested)
    if not _DEVICE_NAME.fullmatch(name):
        raise AsfdaError(f"device must be one of {DEVICE_FORMS}; got {name!r}", fix="use --device auto, cpu or cuda")
    return name


def select_device(requested: str | None = None) -> torch.device:
    """The one place the compute device is chosen (``"auto"``: CUDA when available, else CPU); a name that is not
    one of `DEVICE_FORMS`, or a device this machine does not have, is an `AsfdaError`."""
    name = check_device_name(requested)
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise AsfdaError(f"device {name!r} was asked for, but CUDA is not available here",
                             fix="use --device cpu or auto")
        count = torch.cuda.device_count()
        if ":" in name and int(name.split(":")[1]) >= count:
            raise AsfdaError(f"device {name!r} was asked for, but this machine has {count} CUDA device"
                             f"{'' if count == 1 else 's'} (cuda:0 to cuda:{count - 1})",
                             fix="use --device cuda or auto")
    if name == "mps" and not torch.backends.mps.is_available():
        raise AsfdaError("device 'mps' was asked for, but MPS (an Apple GPU) is not available here",
                         fix="use --device cpu or auto")
    return torch.device(name)


def describe_device(device: torch.device) -> str:
    """What computed a result, for its record: the GPU's name, or ``cpu`` and the torch thread count."""
    if device.type == "cuda":
        return f"{device} ({torch.cuda.get_device_name(device)})"
    return f"{device.type} ({torch.get_num_threads()} threads)"


def find_embedding_layer(network: nn.Module, roi_size: tuple[int, ...], in_channels: int = 1) -> str:
    """Name of the module whose output is the bottleneck: the last module to finish its forward among
    those with the smallest spatial output (for MONAI's UNet, the deepest skip connection).

    Returns `OUTPUT_EMBEDDING` (with a warning) when no inner module can be hooked, as in TorchScript
    networks, or when no module outputs a feature map smaller than the input window.
    """
    outputs: list[tuple[str, int]] = []
    hooks = []
    for name, module in network.named_modules():
        if not name:
            continue

        def hook(mod, inp, out, name=name):
            if isinstance(out, torch.Tensor) and out.ndim == 5:
                outputs.append((name, int(out.shape[2:].numel())))

        try:
            hooks.append(module.register_forward_hook(hook))
        except RuntimeError:  # ScriptModules refuse hooks
            continue
    try:
        probe_network(network, roi_size, in_channels)  # a roi the network cannot take is refused with its numbers
    finally:
        for h in hooks:
            h.remove()
    window = int(torch.Size(roi_size).numel())
    smallest = min((n for _, n in outputs), default=window)
    if smallest >= window:
        if _has_torchscript(network):
            log.warning("TorchScript network: its bottleneck cannot be hooked, so the volume embedding is the "
                        "volume-averaged output logits")
            return OUTPUT_EMBEDDING
        raise AsfdaError("cannot find a 3D feature map inside the network to use as embedding",
                         fix="set the model's embedding layer by name (asfda_embedding_layer in the config), "
                             f"or {OUTPUT_EMBEDDING!r} for the volume-averaged logits")
    return [name for name, n in outputs if n == smallest][-1]


def _has_torchscript(network: nn.Module) -> bool:
    return any(isinstance(m, torch.jit.ScriptModule) for m in network.modules())


def _check_axes(axes: Sequence[int]) -> tuple[int, ...]:
    out = tuple(int(a) for a in axes)
    if any(a not in (0, 1, 2) for a in out) or len(set(out)) != len(out):
        raise ValueError(f"tta_axes must be distinct spatial axes among 0, 1, 2; got {tuple(axes)!r}")
    return out


class InferenceEngine:
    """Runs a (class-mapped) network over volumes: logits + embedding in one pass.

    Args:
        network: module returning target-class logits ``[B, C, ...]``.
        roi_size, sw_batch_size, overlap: sliding-window settings.
        embedding_layer: dotted module name of the bottleneck inside ``network`` (found if None);
            `OUTPUT_EMBEDDING` for the volume-averaged logits instead of a hook.
        device: where to compute (see `select_device`).
        tta_axes: model-grid spatial axes (0, 1, 2) flipped by ``run(..., tta=True)``, each alone;
            default `DEFAULT_TTA_AXES` (never the left-right axis 0). ``()`` makes TTA a single pass.
        mode: how overlapping windows are blended (MONAI's ``mode``): ``constant`` or ``gaussian`` (sigma 1/8 of
            the window, as nnU-Net).
        precision: ``fp32``, or ``bf16``: each window's forward under bfloat16 autocast (faster on CPUs with bf16
            instructions and on GPUs); the windows are blended, and the logits returned, in float32.
    """

    def __init__(self, network: nn.Module, roi_size: tuple[int, int, int], *, sw_batch_size: int = 4,
                 overlap: float = 0.25, embedding_layer: str | None = None, device: torch.device | None = None,
                 tta_axes: Sequence[int] = DEFAULT_TTA_AXES, mode: str = "constant", precision: str = "fp32") -> None:
        check_option(precision, INFERENCE_PRECISIONS, "inference precision", listed=", ".join(INFERENCE_PRECISIONS),
                     fix="use --precision fp32 or bf16")
        self.network = network
        self.precision = precision
        self.mode = mode
        self.roi_size = tuple(roi_size)
        self.sw_batch_size = sw_batch_size
        self.overlap = overlap
        self.device = device or select_device()
        self.tta_axes = _check_axes(tta_axes)
        self.embedding_layer = embedding_layer or find_embedding_layer(network, self.roi_size)
        self._module: nn.Module | None = None
        if self.embedding_layer != OUTPUT_EMBEDDING:
            modules = dict(network.named_modules())
            if self.embedding_layer not in modules:
                raise AsfdaError(f"embedding layer {self.embedding_layer!r} is not a module of the network")
            self._module = modules[self.embedding_layer]
        self._sum: torch.Tensor | None = None
        self._count = 0
        self.sweeps = 0  # sliding-window passes over a whole volume so far (what "a forward pass" counts)

    @property
    def n_passes(self) -> int:
        """Sliding-window passes of ``run(..., tta=True)``: the identity plus one per flipped axis (an nnU-Net model,
        mode ``nnunet``: every combination of its mirror axes, 2^k, as nnU-Net's predictor)."""
        if self.mode == NNUNET_MODE:  # nnU-Net mirrors each window over every combination of the axes
            return len(mirror_combinations(self.tta_axes))
        return 1 + len(self.tta_axes)

    def _hook(self, module: nn.Module, inp: object, out: torch.Tensor) -> None:
        pooled = out.detach().float().flatten(2).mean(dim=2).sum(dim=0)  # [D]
        self._sum = pooled if self._sum is None else self._sum + pooled
        self._count += out.shape[0]

    @contextlib.contextmanager
    def _capturing(self) -> Iterator[None]:
        self._sum, self._count = None, 0
        if self._module is None:
            yield
            return
        handle = self._module.register_forward_hook(self._hook)
        try:
            yield
        finally:
            handle.remove()

    def _forward(self, window: torch.Tensor) -> torch.Tensor:
        if self.precision == "bf16":
            with torch.autocast(self.device.type, dtype=torch.bfloat16):
                return self.network(window).float()
        return self.network(window)

    def _window(self, x: torch.Tensor) -> torch.Tensor:
        self.sweeps += 1
        if self.mode == NNUNET_MODE:  # nnU-Net's window positions and Gaussian (asfda.models.nnunet_window)
            return nnunet_sliding_window(x, self._forward, self.roi_size, step=1 - self.overlap,
                                         sw_batch_size=self.sw_batch_size)
        out = sliding_window_inference(x, self.roi_size, self.sw_batch_size, self._forward, overlap=self.overlap,
                                       mode=self.mode, sigma_scale=0.125)
        assert isinstance(out, torch.Tensor)  # _forward returns one tensor, so one (Meta)Tensor comes back
        return out.as_tensor() if hasattr(out, "as_tensor") else out

    def run(self, image: torch.Tensor, *, mc_dropout: bool = False, tta: bool = False
            ) -> tuple[torch.Tensor, torch.Tensor]:
        """One volume ``[1, X, Y, Z]`` -> (logits ``[C, X, Y, Z]``, embedding ``[D]``), on the CPU.

        With ``tta`` the logits are the mean over `n_passes` passes (identity and one flip per axis of
        ``tta_axes``, flipped back); the embedding always comes from the un-flipped pass.
        """
        x = image.as_tensor() if hasattr(image, "as_tensor") else image
        x = x.to(self.device, non_blocking=True)[None]
        was_training = self.network.training
        self.network.eval()
        if mc_dropout:
            _enable_dropout(self.network)
        try:
            with torch.inference_mode():
                with self._capturing():
                    logits = self._window(x)
                    embedding = None
                    if self._module is not None:
                        if self._sum is None:  # the hooked layer never ran (it used to fail as None / int)
                            raise AsfdaError(f"embedding layer {self.embedding_layer!r} did not run in the network's "
                                             "forward pass", fix="name a layer the network's forward goes through")
                        embedding = self._sum / max(self._count, 1)
                if embedding is None:
                    embedding = logits[0].float().flatten(1).mean(dim=1)
                if tta and self.tta_axes and self.mode == NNUNET_MODE:
                    self.sweeps += 1  # the mirrored windows, averaged inside each window as nnU-Net does
                    more = self.n_passes - 1
                    mirrored = nnunet_sliding_window(x, self._forward, self.roi_size, step=1 - self.overlap,
                                                     sw_batch_size=self.sw_batch_size, mirror_axes=self.tta_axes,
                                                     include_identity=False)
                    logits = (logits.float() + more * mirrored) / self.n_passes
                elif tta and self.tta_axes:
                    logits = logits.float()
                    for axis in self.tta_axes:
                        dims = (axis + 2,)
                        logits += self._window(x.flip(dims)).flip(dims)
                    logits /= self.n_passes
        finally:
            self.network.train(was_training)
        return logits[0].float().cpu(), embedding.cpu()


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
