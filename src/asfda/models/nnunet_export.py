"""An adapted nnU-Net model written back as an nnU-Net v2 results folder that ``nnUNetv2_predict`` runs."""

from __future__ import annotations

import copy
import functools
from pathlib import Path

import torch
from torch import nn

from asfda.errors import AsfdaError
from asfda.io.atomic import atomic_write, atomic_write_folder, atomic_write_json
from asfda.models.loaded import state_dict_hash
from asfda.models.nnunet import CHECKPOINT_NAMES, FORMAT, NnUNetEnsemble, load_checkpoint

__all__ = ["save_results_folder"]




def _fold_states(network: nn.Module, n_folds: int) -> list[dict[str, torch.Tensor]]:
    state = {k: v.detach().cpu().contiguous().clone() for k, v in network.state_dict().items()}
    if n_folds == 1 and not isinstance(network, NnUNetEnsemble):
        return [state]
    return [{k[len(f"folds.{i}."):]: v for k, v in state.items() if k.startswith(f"folds.{i}.")}
            for i in range(n_folds)]


def save_results_folder(model, out_dir: str | Path, *, extra_metadata: dict | None = None) -> Path:
    """Writes ``model`` (loaded by `load_nnunet`, weights possibly adapted) as an nnU-Net v2 results folder that
    ``nnUNetv2_predict`` / ``nnUNetPredictor`` run: ``plans.json``, ``dataset.json`` (and ``dataset_fingerprint.json``)
    as the source has them, and per fold ``fold_X/checkpoint_final.pth`` with the source checkpoint's keys and
    ``network_weights`` replaced. asfda's record (class map, rounds, weights hash) goes to ``asfda.json``. Written as a
    whole (`asfda.io.atomic.atomic_write_folder`)."""
    info = model.config.get("nnunet")
    if not isinstance(info, dict):
        raise AsfdaError("the model was not loaded from an nnU-Net results folder", model.source)
    out = Path(out_dir)
    folds, paths = info["folds"], [Path(p) for p in info["checkpoints"]]
    states = _fold_states(model.network, len(folds))
    meta = {"format": FORMAT, "asfda": {**copy.deepcopy(model.metadata.get("asfda", {})), **(extra_metadata or {}),
                                        "weights_sha256_16": state_dict_hash(model.network.state_dict())},
            "source": {k: info.get(k) for k in ("root", "checkpoints", "configuration", "trainer_name")}}
    root = Path(info["root"]) if info.get("root") else None

    def write(folder: Path) -> None:
        for name, data in (("plans.json", info["plans"]), ("dataset.json", info["dataset"])):
            atomic_write_json(folder / name, data)
        if root is not None and (root / "dataset_fingerprint.json").is_file():
            atomic_write(folder / "dataset_fingerprint.json",
                         lambda p: p.write_bytes((root / "dataset_fingerprint.json").read_bytes()))
        for fold, path, state in zip(folds, paths, states):
            try:
                ckpt = load_checkpoint(path)
            except AsfdaError:  # the source moved: the keys nnU-Net's predictor reads
                ckpt = {"trainer_name": info.get("trainer_name") or "nnUNetTrainer",
                        "inference_allowed_mirroring_axes": tuple(info.get("inference_allowed_mirroring_axes") or ())
                        or None, "current_epoch": 0,
                        "init_args": {"plans": info["plans"], "configuration": info["configuration"],
                                      "fold": int(fold) if fold.isdigit() else fold, "dataset_json": info["dataset"]}}
            ckpt["network_weights"] = state
            (folder / f"fold_{fold}").mkdir()
            atomic_write(folder / f"fold_{fold}" / CHECKPOINT_NAMES[0], functools.partial(torch.save, ckpt))
        atomic_write_json(folder / "asfda.json", meta)

    atomic_write_folder(out, write)
    return out
