"""One forward pass of a network on an empty window, before any real inference: what it outputs on a window of the
model's roi, or, when it cannot run there, a one-line refusal with the numbers and a window size it takes."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from asfda.errors import AsfdaError, missing_package_error

__all__ = ["output_sums_to_one", "probe_network"]


def _network_device(network: nn.Module) -> torch.device:
    try:
        return next(network.parameters()).device
    except StopIteration:
        return torch.device("cpu")


def probe_network(network: nn.Module, roi_size: tuple[int, ...], in_channels: int = 1, *,
                  where: str | Path | None = None) -> tuple[int, ...]:
    """Runs ``network`` once on an empty window ``[1, in_channels, *roi_size]`` (on its own device) and returns the
    output's shape. Refuses, before any real inference and with the numbers, a network that cannot run on that
    window (with a window size it does take, when a nearby multiple of 8, 16 or 32 works), that needs an optional
    package which is not installed, or whose output is not one 3D map of the window's size."""
    return tuple(_probe(network, tuple(int(r) for r in roi_size), in_channels, where, None).shape)


def output_sums_to_one(network: nn.Module, roi_size: tuple[int, ...], in_channels: int = 1, *,
                       where: str | Path | None = None, tolerance: float = 1e-4) -> bool:
    """Whether the network's output already is a distribution over its channels: on one window of the model's roi
    (a fixed random image, drawn from its own generator: the global random state is left as it is), every value in
    [0, 1] and the channels summing to 1 at every voxel within ``tolerance``: a softmax inside the network (logits
    do that at every voxel of a window only by design). A single output channel is never a distribution over
    channels, and a network that cannot run on the window is not one either (False: `probe_network` refuses it
    where it did before)."""
    roi = tuple(int(r) for r in roi_size)
    image = torch.rand(1, in_channels, *roi, generator=torch.Generator().manual_seed(0))
    try:
        out = _probe(network, roi, in_channels, where, image).float()
    except AsfdaError:
        return False
    if out.shape[1] < 2 or not bool(torch.isfinite(out).all()):
        return False
    if float(out.min()) < -tolerance or float(out.max()) > 1 + tolerance:
        return False
    return float((out.sum(1) - 1).abs().max()) <= tolerance


def _probe(network: nn.Module, roi: tuple[int, ...], in_channels: int, where: str | Path | None,
           image: torch.Tensor | None) -> torch.Tensor:
    """The network's output on ``image`` (None: zeros) of one window, checked to be class scores on its grid."""
    try:
        out = _forward_zeros(network, roi, in_channels, image)
    except AsfdaError:
        raise
    except Exception as exc:
        raise _probe_error(network, roi, in_channels, exc, where) from None
    if not isinstance(out, torch.Tensor):
        raise AsfdaError(f"the network returns a {type(out).__name__}, not one tensor of class scores", where,
                         "export the network so that its forward returns the segmentation output alone")
    if out.ndim != 5 or tuple(out.shape[2:]) != roi:
        raise AsfdaError(f"the network turns a window of {list(roi)} voxels into an output of shape "
                         f"{list(out.shape)}; asfda needs class scores [1, C, {', '.join(map(str, roi))}] "
                         "on the window's "
                         "own grid", where, "use a segmentation network whose output has its input's size")
    return out


def _forward_zeros(network: nn.Module, roi: tuple[int, ...], in_channels: int, image: torch.Tensor | None = None
                   ) -> object:
    device = _network_device(network)
    with torch.inference_mode():
        return network(torch.zeros(1, in_channels, *roi, device=device) if image is None else image.to(device))


def _probe_error(network: nn.Module, roi: tuple[int, ...], in_channels: int, exc: Exception, where: str | Path | None
                 ) -> AsfdaError:
    missing = missing_package_error(exc, "running the network", where)
    if missing is not None:
        return missing
    what = f"{exc.__class__.__name__}: {' '.join(str(exc).split())[:160]}"
    if "out of memory" in str(exc).lower():
        return AsfdaError(f"out of memory running the network on one window of roi_size {list(roi)} ({what})", where,
                          "use a smaller roi_size in the model's inferer, or another device (--device)")
    suggestion = None
    for k in (8, 16, 32):
        candidate = tuple(-(-r // k) * k for r in roi)
        if candidate == roi:  # already a multiple of k: the next one (a network may need larger windows)
            candidate = tuple(r + k for r in roi)
        try:
            out = _forward_zeros(network, candidate, in_channels)
        except Exception:
            continue
        if isinstance(out, torch.Tensor) and tuple(out.shape[2:]) == candidate:
            suggestion = (candidate, k)
            break
    fix = (f"set the inferer's roi_size to {list(suggestion[0])} (each side a multiple of {suggestion[1]}), which it "
           "takes" if suggestion else "set the inferer's roi_size to a window size the network takes (for a UNet "
           "with n stride-2 levels, each side a multiple of 2^n)")
    return AsfdaError(f"the network cannot run on a window of roi_size {list(roi)} ({what})", where, fix)
