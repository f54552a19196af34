"""`LoadedModel`: a pretrained network and everything needed to run it on new volumes (classes, preprocessing,
sliding window, output activation), and the helpers that copy and fingerprint its weights."""

from __future__ import annotations

import copy
import hashlib
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from asfda.errors import AsfdaError
from asfda.models.classmap import ClassMappedNetwork
from asfda.models.preprocessing import Preprocessing
from asfda.models.probe import probe_network
from asfda.options import OUTPUT_ACTIVATIONS

__all__ = ["OUTPUT_ACTIVATIONS", "LoadedModel", "check_finite_weights", "check_unique_class_names", "clone_module",
           "is_torchscript", "state_dict_hash", "torchscript_refusal"]



@dataclass
class LoadedModel:
    """A pretrained network and everything needed to run it on new volumes.

    Attributes:
        network: the source network (its own output channels), in eval mode.
        class_names: names of the network's output channels, index = channel.
        preprocessing: what the model declares of its input grid and intensities.
        roi_size, sw_batch_size, overlap: sliding-window settings.
        activation: ``"softmax"`` (single-label) or ``"sigmoid"`` (multi-label: one independent channel per class).
        source: where it was loaded from.
        config: the parsed config dict (``network_def``, ``preprocessing``, ...) to write bundles back.
        metadata: bundle metadata dict (may be empty).
        embedding_layer: module name whose output is the volume embedding (None: found automatically).
        probabilities: the network's output already went through ``activation`` (``output_activation: none``):
            asfda takes it as probabilities instead of applying the activation a second time.
        sw_mode: how overlapping sliding windows are blended (MONAI's ``mode``): ``constant``, or ``gaussian``
            (nnU-Net's, for nnU-Net models).
        tta_axes: model-grid axes that test-time augmentation flips (`asfda.engine.DEFAULT_TTA_AXES`: the RAS grid's
            anterior-posterior and superior-inferior axes; an nnU-Net grid's axes other than left-right).
    """

    network: nn.Module
    class_names: list[str]
    preprocessing: Preprocessing
    roi_size: tuple[int, int, int]
    sw_batch_size: int = 4
    overlap: float = 0.25
    activation: str = "softmax"
    source: Path | None = None
    config: dict = field(default_factory=dict)
    metadata: dict = field(default_factory=dict)
    embedding_layer: str | None = None
    probabilities: bool = False
    sw_mode: str = "constant"
    tta_axes: tuple[int, ...] = (1, 2)

    @property
    def output_activation(self) -> str:
        """What turns the network's output into probabilities: ``softmax``, ``sigmoid`` or ``none``."""
        return "none" if self.probabilities else self.activation

    @property
    def adds_background(self) -> bool:
        """Whether asfda's single-label view of this model prepends a background class: a sigmoid head whose
        channel 0 is not a background channel (its channels are the foreground classes)."""
        return self.activation == "sigmoid" and _norm_name(self.class_names[0]) != "background"

    @property
    def label_names(self) -> list[str]:
        """The model's classes in asfda's single-label view (index = label value, 0 = background): the softmax
        channels as they are; for a sigmoid head, ``background`` (no channel on) and then its channels."""
        return ["background", *self.class_names] if self.adds_background else list(self.class_names)

    def check_usable(self, in_channels: int = 1, where: str | Path | None = None) -> None:
        """Refuses, before any inference, a model that cannot run on asfda's inputs: another number of input
        channels, a sliding-window roi the network cannot take, or output channels its class names do not match.
        Runs the network once on an empty window (on its own device)."""
        self.check_input_channels(in_channels, where)

        shape = probe_network(self.network, self.roi_size, in_channels, where=where or self.source)
        if shape[1] != len(self.class_names):
            raise AsfdaError(f"the network outputs {shape[1]} channels but the model names {len(self.class_names)} "
                             f"classes {self.class_names}", where or self.source,
                             "make the metadata's channel_def (or the config's channel_def) name one class per output "
                             "channel")

    def mapped_network(self, class_map, network: nn.Module | None = None) -> ClassMappedNetwork:
        """``network`` (default: this model's) wrapped to output softmax logits of ``class_map``'s target classes
        (`asfda.models.ClassMappedNetwork`, with this model's activation; ``class_map`` built on `label_names`)."""
        return ClassMappedNetwork(self.network if network is None else network, class_map, self.activation,
                                  probabilities=self.probabilities, add_background=self.adds_background)

    @property
    def in_channels(self) -> int | None:
        """Input channels the network expects: its first convolution's (None when it has none to read)."""
        for m in self.network.modules():
            n = getattr(m, "in_channels", None)
            if isinstance(n, int) and hasattr(m, "weight"):
                return n
        return None

    def check_input_channels(self, have: int = 1, where: str | Path | None = None) -> None:
        """Refuses, before any inference, a network that expects another number of input channels."""
        want = self.in_channels
        if want is not None and want != have and not self._runs_with(have):
            raise AsfdaError(f"the model expects {want} input channels, the dataset has {have} (a model of several "
                             "stacked sequences or modalities)", where or self.source,
                             "use a model trained on single-channel images; asfda reads one channel per case "
                             "(nnU-Net's _0000 file)")

    def _runs_with(self, channels: int) -> bool:
        """Whether the network runs on a window of ``channels`` input channels: the first convolution found is a
        guess (in a TorchScript module the layers come in no reliable order: a scripted DiNTS names an inner
        16-channel layer first), so a disagreeing guess is checked by running it once."""
        try:
            probe_network(self.network, self.roi_size, channels, where=self.source)
        except (AsfdaError, RuntimeError, ValueError):
            return False
        return True

    @property
    def weights_hash(self) -> str:
        return state_dict_hash(self.network.state_dict())

    def copy(self) -> LoadedModel:
        other = copy.copy(self)
        other.network = clone_module(self.network)
        return other


def _norm_name(name: str) -> str:
    return str(name).strip().lower().replace(" ", "_").replace("-", "_")


def check_unique_class_names(names: list[str], activation: str, where: str | Path | None) -> None:
    """Refuses output channels that share a name as the class map reads names (case, spaces and dashes aside), also
    in asfda's single-label view (a sigmoid head's ``background`` first): a dataset label would match two channels,
    and which one it takes is arbitrary."""
    prepended = activation == "sigmoid" and bool(names) and _norm_name(names[0]) != "background"
    seen: dict[str, str] = {"background": "asfda's background (no sigmoid channel on)"} if prepended else {}
    for i, name in enumerate(names):
        key = _norm_name(name)
        if key in seen:
            raise AsfdaError(f"the model names two output classes alike: {seen[key]} and channel {i} {name!r}; class "
                             "names must be unique", where, "give every output channel its own name in the "
                             "metadata's channel_def (or the config's channel_def)")
        seen[key] = f"channel {i} {name!r}"


def is_torchscript(path: Path) -> bool:
    """Whether ``path`` is a TorchScript archive, by its content whatever its suffix, read from the zip's listing
    (nothing in it is run or unpickled): a zip holding compiled code (``<name>/code/__torch__.py`` or
    ``<name>/code/__torch__/...``) or TorchScript's ``constants.pkl`` (what ``torch.load`` itself takes for
    TorchScript), unlike a ``torch.save`` state dict. A ``.ts``/``.ptl`` file counts as TorchScript whatever it holds
    (a damaged one then gets TorchScript's error, with the user's trust)."""
    import zipfile

    if path.suffix.lower() in (".ts", ".ptl"):
        return True
    try:
        if not zipfile.is_zipfile(path):
            return False
        with zipfile.ZipFile(path) as z:
            for name in z.namelist():
                inner = name.split("/", 1)[-1]
                if inner.startswith("code/") or inner == "constants.pkl" or "/code/__torch__" in name:
                    return True
        return False
    except (OSError, zipfile.BadZipFile, ValueError):
        return False


def torchscript_refusal(path: Path) -> AsfdaError:
    """Why a TorchScript file is not loaded without the user's trust (``--trust-model-code``), and what to do."""
    return AsfdaError(f"{path.name} is a TorchScript model: a program, not weights, whose code runs when it is loaded "
                      "and at every inference (it can read and write files); asfda runs it only when you trust it",
                      path, "if you trust this model, pass --trust-model-code (Python: load_model(..., "
                      "allow_code=True)); otherwise use its weights as a state dict (.safetensors or .pt) with a "
                      "network config")


def check_finite_weights(state: dict[str, torch.Tensor], where: str | Path | None) -> None:
    """Refuses weights holding NaN or infinity, naming the tensors: such a network predicts one class everywhere (or
    NaN), silently."""
    bad = [k for k, v in state.items()
           if isinstance(v, torch.Tensor) and v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        shown = ", ".join(bad[:5]) + (f" (+{len(bad) - 5} more)" if len(bad) > 5 else "")
        raise AsfdaError(f"the model's weights hold NaN or infinite values (in {shown}); it would predict nothing "
                         "usable", where, "use the weights of a training that converged (a checkpoint saved before "
                         "the loss diverged)")


def clone_module(module: nn.Module) -> nn.Module:
    """A deep copy of ``module``. A TorchScript module is copied without autograd history: ``copy.deepcopy`` of a
    ScriptModule otherwise gives parameters that are not leaves, which can then be neither frozen nor trained."""
    if not any(isinstance(m, torch.jit.ScriptModule) for m in module.modules()):
        return copy.deepcopy(module)
    with torch.no_grad():
        other = copy.deepcopy(module)
    for p, q in zip(module.parameters(), other.parameters()):
        q.requires_grad_(p.requires_grad)
    return other


def state_dict_hash(state: dict[str, torch.Tensor]) -> str:
    """SHA-256 (first 16 hex digits) of a state dict's names and values."""
    h = hashlib.sha256()
    for k in sorted(state):
        v = state[k]
        h.update(k.encode())
        if isinstance(v, torch.Tensor):
            # reshape(-1): a 0-d tensor (BatchNorm's num_batches_tracked) cannot be viewed as bytes directly
            h.update(v.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
                     if v.numel() else b"")
    return h.hexdigest()[:16]
