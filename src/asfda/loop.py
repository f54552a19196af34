"""One adaptation round's stages on top of the pretrained model: score, query, fine-tune, evaluate.

`Adapter` owns the two networks (the frozen pretrained one and the one being adapted), their
inference engines and the prepared-volume cache. `PoolState` records who was labelled when.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field

import numpy as np
import torch
from tqdm.auto import tqdm

from asfda.engine import InferenceEngine, select_device
from asfda.evaluation import compute_dice, per_class_scores
from asfda.io.datasets import Case
from asfda.io.nifti import read_nifti
from asfda.models import ClassMappedNetwork, LoadedModel, PreparedVolume, build_class_map, prepare_case
from asfda.models.preprocessing import resample_to_native
from asfda.scoring import expected_calibration_error, fit_temperature
from asfda.scoring.pool import score_volumes
from asfda.scoring.temperature import sample_voxels
from asfda.selection import PoolScores
from asfda.training import TrainConfig, TrainVolume, finetune

__all__ = ["Adapter", "PoolState", "RoundTemperature"]


@dataclass
class PoolState:
    """Which case was labelled in which round; serialisable with `state_dict` / `load_state_dict`."""

    labelled: dict[str, int] = field(default_factory=dict)

    def add(self, ids: list[str], round_index: int) -> None:
        for i in ids:
            if i in self.labelled:
                raise ValueError(f"case {i!r} is already labelled (round {self.labelled[i]})")
            self.labelled[i] = round_index

    def labelled_ids(self) -> list[str]:
        return sorted(self.labelled, key=lambda i: (self.labelled[i], i))

    def unlabelled(self, pool_ids: list[str]) -> list[str]:
        return [i for i in pool_ids if i not in self.labelled]

    def state_dict(self) -> dict:
        return {"labelled": dict(self.labelled)}

    def load_state_dict(self, state: dict) -> None:
        self.labelled = {str(k): int(v) for k, v in state.get("labelled", {}).items()}


@dataclass
class RoundTemperature:
    temperature: float
    ece_before: float | None
    ece_after: float | None


class Adapter:
    """The pretrained model (frozen) and its adapted copy, mapped onto the target's classes.

    Args:
        pretrained: the loaded source model.
        target_names: the dataset's class names (index = label value, 0 = background).
        class_map_override: ``{"target": "source"}`` name overrides.
        cache_dir: where prepared volumes are cached (None: no cache).
        device: compute device (``"auto"``, ``"cpu"``, ``"cuda"``).
    """

    def __init__(self, pretrained: LoadedModel, target_names: list[str], *, class_map_override: dict | None = None,
                 cache_dir: str | None = None, device: str = "auto", progress: bool = True) -> None:
        self.pretrained = pretrained
        self.target_names = list(target_names)
        self.class_map = build_class_map(pretrained.class_names, self.target_names, class_map_override)
        self.device = select_device(device)
        self.cache_dir = cache_dir
        self.progress = progress
        self.frozen = ClassMappedNetwork(copy.deepcopy(pretrained.network), self.class_map).to(self.device).eval()
        for p in self.frozen.parameters():
            p.requires_grad_(False)
        self.current = ClassMappedNetwork(copy.deepcopy(pretrained.network), self.class_map).to(self.device).eval()
        kw = dict(sw_batch_size=pretrained.sw_batch_size, overlap=pretrained.overlap, device=self.device)
        self.engine_frozen = InferenceEngine(self.frozen, pretrained.roi_size, embedding_layer=pretrained.embedding_layer
                                             and f"network.{pretrained.embedding_layer}", **kw)
        self.engine_current = InferenceEngine(self.current, pretrained.roi_size,
                                              embedding_layer=self.engine_frozen.embedding_layer, **kw)
        self.is_adapted = False

    # -- data -------------------------------------------------------------------------------------
    def prepare(self, case: Case, with_label: bool = True) -> PreparedVolume:
        return prepare_case(case, self.pretrained.preprocessing, with_label=with_label, cache_dir=self.cache_dir,
                            n_labels=len(self.target_names))

    def _bar(self, items: list, desc: str):
        return tqdm(items, desc=desc, disable=not self.progress, leave=False, dynamic_ncols=True)

    # -- weights ----------------------------------------------------------------------------------
    def load_current_state(self, state: dict[str, torch.Tensor]) -> None:
        self.current.load_state_dict(state)
        self.is_adapted = True

    def current_state(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().cpu().clone() for k, v in self.current.state_dict().items()}

    # -- scoring ----------------------------------------------------------------------------------
    def fit_temperature(self, labelled: list[Case], t0: float, seed: int, max_voxels: int = 100_000
                        ) -> tuple[RoundTemperature, np.ndarray]:
        """Fits T on the labelled volumes (T0 when there are none); returns it with their embeddings."""
        if not labelled:
            return RoundTemperature(t0, None, None), np.zeros((0, 0))
        gen = torch.Generator().manual_seed(seed)
        zs, ys, embs = [], [], []
        for case in self._bar(labelled, "labelled"):
            vol = self.prepare(case)
            logits, emb = self.engine_current.run(vol.image)
            z, y = sample_voxels(logits, vol.label, max_voxels, gen)
            zs.append(z)
            ys.append(y)
            embs.append(emb.numpy())
        z, y = torch.cat(zs), torch.cat(ys)
        t = fit_temperature(z, y)
        before = expected_calibration_error(torch.softmax(z, 1), y)
        after = expected_calibration_error(torch.softmax(z / t, 1), y)
        return RoundTemperature(t, before, after), np.stack(embs)

    def score_pool(self, cases: list[Case], temperature: float, *, grow_voxels: int = 2,
                   divergence: bool = True) -> tuple[dict[str, np.ndarray], np.ndarray, np.ndarray | None]:
        """Streams the unlabeled pool through `asfda.scoring.pool.score_volumes` (see there)."""
        volumes = (self.prepare(c, with_label=False) for c in cases)
        frozen = self.engine_frozen if (divergence and self.is_adapted) else None
        return score_volumes(volumes, self.engine_current, temperature, frozen=frozen, grow_voxels=grow_voxels,
                             progress=lambda it: tqdm(it, total=len(cases), desc="score pool",
                                                      disable=not self.progress, leave=False, dynamic_ncols=True))

    def pool_scores(self, cases: list[Case], labelled: list[Case], temperature: float, round_index: int,
                    labelled_embeddings: np.ndarray, grow_voxels: int = 2) -> PoolScores:
        metrics, emb, emb0 = self.score_pool(cases, temperature, grow_voxels=grow_voxels)
        return PoolScores([c.case_id for c in cases], metrics, emb, labelled_embeddings, emb0, round_index)

    # -- training ---------------------------------------------------------------------------------
    def finetune(self, labelled: list[Case], cfg: TrainConfig, pseudo: list[TrainVolume] | None = None,
                 desc: str = "fine-tune") -> dict[str, list[float]]:
        vols = []
        for case in labelled:
            v = self.prepare(case)
            vols.append(TrainVolume(v.image, v.label.long()))
        hist = finetune(self.current, vols, cfg, patch_size=self.pretrained.roi_size, pseudo=pseudo,
                        device=self.device, progress=self.progress, desc=desc)
        self.is_adapted = True
        return hist

    # -- evaluation -------------------------------------------------------------------------------
    def evaluate(self, cases: list[Case], *, pretrained: bool = False) -> list[dict]:
        """Per-case Dice on each case's native grid (prediction resampled back, then argmax)."""
        engine = self.engine_frozen if pretrained else self.engine_current
        rows = []
        n = len(self.target_names)
        for case in self._bar(cases, "evaluate"):
            vol = self.prepare(case, with_label=False)
            logits, _ = engine.run(vol.image)
            prob = resample_to_native(torch.softmax(logits, 0), vol.affine, vol.native_affine, vol.native_shape)
            label, _ = read_nifti(case.label_path)
            dice = compute_dice(prob.argmax(0), torch.from_numpy(label).round().long(), n)
            row = {"case_id": case.case_id, **per_class_scores(dice, self.target_names)}
            rows.append(row)
        return rows


def mean_of(rows: list[dict], key: str) -> float:
    vals = [r[key] for r in rows if not math.isnan(r[key])]
    return float(np.mean(vals)) if vals else math.nan
