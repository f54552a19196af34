"""Saving an adapted model: as a MONAI bundle, or (a model loaded from an nnU-Net results folder) as a results
folder."""

from __future__ import annotations

import copy
import functools
import shutil
from pathlib import Path

import torch

from asfda.io.atomic import atomic_write, atomic_write_folder, atomic_write_json
from asfda.models.loaded import LoadedModel, state_dict_hash
from asfda.models.nnunet_export import save_results_folder

__all__ = ["save_bundle"]


def save_bundle(model: LoadedModel, out_dir: str | Path, *, extra_metadata: dict | None = None) -> Path:
    """Writes ``model`` as a MONAI bundle that ``python -m monai.bundle run`` runs as is.

    Configs are copied from the source bundle when there is one (so its own pipeline keeps working);
    weights go to ``models/model.pt`` (plain state dict, what MONAI's CheckpointLoader reads) and
    ``models/model.safetensors`` (a TorchScript model: ``models/model.ts``, written with ``torch.jit.save``). The
    bundle is written as a whole (`asfda.io.atomic.atomic_write_folder`): a folder
    that held an earlier bundle is replaced in one step, so a reader (or a kill -9 in the middle) never sees a mix of
    the two models.
    """
    from safetensors.torch import save_file

    if model.metadata.get("format") == "nnunet_v2":  # loaded from an nnU-Net results folder: written back as one
        return save_results_folder(model, out_dir, extra_metadata=extra_metadata)
    out = Path(out_dir)
    src = model.source if model.source is not None and model.source.is_dir() else None
    state = {k: v.detach().cpu().contiguous() for k, v in model.network.state_dict().items()}
    meta = copy.deepcopy(model.metadata) or {}
    if not meta.get("network_data_format"):
        meta["network_data_format"] = {"outputs": {"pred": {"type": "image", "format": "segmentation",
                                                           "num_channels": len(model.class_names),
                                                           "channel_def": {str(i): n for i, n
                                                                           in enumerate(model.class_names)}}}}
    meta.setdefault("asfda", {}).update(extra_metadata or {})
    meta["asfda"]["weights_sha256_16"] = state_dict_hash(state)
    meta["asfda"]["output_activation"] = model.output_activation  # also when given on the command line
    scripted = isinstance(model.network, torch.jit.ScriptModule)

    def write(folder: Path) -> None:
        (folder / "configs").mkdir()
        (folder / "models").mkdir()
        if src is not None:
            for sub in ("configs", "docs"):
                if (src / sub).is_dir():
                    (folder / sub).mkdir(exist_ok=True)
                    for f in (src / sub).iterdir():
                        if f.is_file() and f.name != "metadata.json":
                            atomic_write(folder / sub / f.name, functools.partial(shutil.copyfile, f))
        else:
            atomic_write_json(folder / "configs" / "inference.json", model.config)
        if scripted:  # no network_def to rebuild it from: the adapted TorchScript module itself
            atomic_write(folder / "models" / "model.ts", lambda p: torch.jit.save(model.network, str(p)))
        else:
            atomic_write(folder / "models" / "model.pt", lambda p: torch.save(state, p))
            atomic_write(folder / "models" / "model.safetensors", lambda p: save_file(state, str(p)))
        atomic_write_json(folder / "configs" / "metadata.json", meta)

    atomic_write_folder(out, write)
    return out
