"""One adaptation round's stages on top of the pretrained model: score, query, fine-tune, evaluate.

`Adapter` owns the two networks (the frozen pretrained one and the one being adapted), their
inference engines and the prepared-volume cache. `PoolState` records who was labelled when.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
from pathlib import Path
from dataclasses import dataclass, field

import numpy as np
import torch
from tqdm.auto import tqdm

from asfda.config import SemiConfig
from asfda.cache import EngineOutputCache
from asfda.engine import OUTPUT_EMBEDDING, InferenceEngine, select_device
from asfda.errors import AsfdaError
from asfda.evaluation import compute_dice, largest_component_per_class, per_class_scores
from asfda.io.datasets import Case
from asfda.io.labels import check_label_values
from asfda.io.nifti import read_nifti
from asfda.models import (
    LoadedModel,
    clone_module,
    PreparedVolume,
    build_class_map,
    prepare_case,
    state_dict_hash,
)
from asfda.scoring import expected_calibration_error, fit_temperature
from asfda.scoring.metrics import anatomy_composition
from asfda.scoring.needs import ScoringNeeds
from asfda.scoring.pool import ScoredPool, score_volumes
from asfda.scoring.temperature import sample_voxels
from asfda.selection import PoolScores
from asfda.training import TrainConfig, TrainVolume, finetune, pseudo_label, select_reliable
from asfda.training.guard import GuardResult, anatomical_plausibility, discards, guard_sample

__all__ = ["Adapter", "Anchors", "PoolState", "RoundTemperature", "RoundTraining", "reliable_from_scores"]

log = logging.getLogger(__name__)


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


@dataclass
class Anchors:
    """The labelled volumes as the diversity terms see them (rows in the order of the labelled cases).

    Attributes:
        embeddings: ``[L, D]`` pooled bottleneck embeddings of the current model (``[0, 0]`` when none).
        vectors: vector name -> ``[L, K]``: ``anatomy``, the predicted foreground composition
            (`asfda.scoring.metrics.anatomy_composition`) at the round's temperature.
    """

    embeddings: np.ndarray = field(default_factory=lambda: np.zeros((0, 0)))
    vectors: dict[str, np.ndarray] = field(default_factory=dict)


@dataclass
class RoundTraining:
    """What a round's fine-tuning gives: the loss history, the reliable unlabeled volumes used (id ->
    confidence, distance) and the guard's decision (None when the guard did not run)."""

    history: dict[str, list[float]]
    reliable: dict[str, dict[str, float]]
    guard: GuardResult | None = None


class Adapter:
    """The pretrained model (frozen) and its adapted copy, mapped onto the target's classes.

    Args:
        pretrained: the loaded source model.
        target_names: the dataset's class names (index = label value, 0 = background).
        class_map_override: ``{"target": "source"}`` name overrides.
        cache_dir: where prepared volumes are cached (None: no cache).
        device: compute device (``"auto"``, ``"cpu"``, ``"cuda"``).
        cold_start_ok: accept a model none of whose classes is a target class (every target class gets a new
            output channel: `cold_start`); otherwise such a model is refused (`build_class_map`).
    """

    def __init__(self, pretrained: LoadedModel, target_names: list[str], *, class_map_override: dict | None = None,
                 cache_dir: str | None = None, device: str = "auto", progress: bool = True,
                 cold_start_ok: bool = False) -> None:
        pretrained.check_input_channels(1)
        self.pretrained = pretrained
        self.target_names = list(target_names)
        # a sigmoid head is adapted in its single-label view: background (no channel on), then its channels
        self.class_map = build_class_map(pretrained.label_names, self.target_names, class_map_override,
                                         allow_no_match=cold_start_ok)
        self.device = select_device(device)
        self.cache_dir = cache_dir
        self.progress = progress
        self.frozen = pretrained.mapped_network(self.class_map, clone_module(pretrained.network)).to(self.device).eval()
        for p in self.frozen.parameters():
            p.requires_grad_(False)
        self.current = pretrained.mapped_network(self.class_map, clone_module(pretrained.network)).to(self.device).eval()
        kw = dict(sw_batch_size=pretrained.sw_batch_size, overlap=pretrained.overlap, device=self.device,
                  mode=pretrained.sw_mode, tta_axes=pretrained.tta_axes)
        layer = pretrained.embedding_layer
        if layer and layer != OUTPUT_EMBEDDING:
            layer = f"network.{layer}"
        self.engine_frozen = InferenceEngine(self.frozen, pretrained.roi_size, embedding_layer=layer, **kw)
        self.engine_current = InferenceEngine(self.current, pretrained.roi_size,
                                              embedding_layer=self.engine_frozen.embedding_layer, **kw)
        self.is_adapted = False
        self._plausibility0: dict[str, float] = {}

    # -- data -------------------------------------------------------------------------------------
    def prepare(self, case: Case, with_label: bool = True) -> PreparedVolume:
        return prepare_case(case, self.pretrained.preprocessing, with_label=with_label, cache_dir=self.cache_dir,
                            n_labels=len(self.target_names))

    def _bar(self, items: list, desc: str):
        return tqdm(items, desc=desc, disable=not self.progress, leave=False, dynamic_ncols=True)

    # -- weights ----------------------------------------------------------------------------------
    def load_current_state(self, state: dict[str, torch.Tensor]) -> None:
        """Loads weights into the adapted model; it counts as adapted when they differ from the pretrained
        weights (a round the guard discarded leaves the pretrained weights, and round-0 fallbacks apply)."""
        self.current.load_state_dict(state)
        frozen = self.frozen.state_dict()
        self.is_adapted = any(k not in frozen or not torch.equal(v.to(frozen[k].device), frozen[k])
                              for k, v in state.items())

    def export_bundle(self, out_dir: str | Path, extra_metadata: dict | None = None) -> Path:
        """Writes the adapted model as a MONAI bundle (configs of the source bundle, new weights in
        ``models/model.pt`` and ``models/model.safetensors``) that ``python -m monai.bundle run`` and
        ``asfda predict`` run as is. Its output channels are the source model's; the name match to the
        target labels is recorded under ``asfda`` in the metadata."""
        from asfda.models import save_bundle

        if self.current.new_head is not None:
            raise AsfdaError("the adapted model has output channels the source network lacks; it cannot be "
                             "written as the source bundle", self.pretrained.source)
        adapted = self.pretrained.copy()
        adapted.network.load_state_dict(self.current.network.state_dict())
        meta = {"class_map": self.class_map.to_dict(), "target_classes": self.target_names, **(extra_metadata or {})}
        return save_bundle(adapted, out_dir, extra_metadata=meta)

    def current_state(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().cpu().clone() for k, v in self.current.state_dict().items()}

    # -- scoring ----------------------------------------------------------------------------------
    def fit_temperature(self, labelled: list[Case], t0: float, seed: int, max_voxels: int = 100_000
                        ) -> tuple[RoundTemperature, Anchors]:
        """Fits T on the labelled volumes (T0 when there are none); returns it with their `Anchors`, from the
        same pass: the embeddings, and the anatomy composition at the fitted T estimated on each volume's
        uniform sample of ``max_voxels`` voxels (exact when the volume has no more voxels than that)."""
        if not labelled:
            return RoundTemperature(t0, None, None), Anchors()
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
        anatomy = np.stack([anatomy_composition(torch.softmax(zi / t, 1).T).numpy() for zi in zs])
        return RoundTemperature(t, before, after), Anchors(np.stack(embs), {"anatomy": anatomy})

    def anchors(self, cases: list[Case], temperature: float) -> Anchors:
        """`Anchors` of ``cases`` without their labels (one forward pass each; the composition is exact)."""
        if not cases:
            return Anchors()
        embs, anatomy = [], []
        for case in self._bar(cases, "labelled"):
            logits, emb = self.engine_current.run(self.prepare(case, with_label=False).image)
            embs.append(emb.numpy())
            anatomy.append(anatomy_composition(torch.softmax(logits / temperature, 0)).numpy())
            del logits
        return Anchors(np.stack(embs), {"anatomy": np.stack(anatomy)})

    def score_pool(self, cases: list[Case], temperature: float, *, grow_voxels: int = 2, divergence: bool = True,
                   needs: ScoringNeeds | None = None, seed: int = 0) -> ScoredPool:
        """Streams the unlabeled pool through `asfda.scoring.pool.score_volumes` (see there); ``needs``
        (a strategy's ``needs``, or `asfda.selection.needs_of` of several) decides the extra passes.
        The result also unpacks as ``metrics, embeddings, embeddings0``."""
        volumes = (self.prepare(c, with_label=False) for c in cases)
        wants_kd = needs is None or getattr(needs, "divergence", False)
        frozen = self.engine_frozen if (divergence and wants_kd and self.is_adapted) else None
        cache = key_fn = None
        if self.cache_dir is not None:
            cache = EngineOutputCache(Path(self.cache_dir) / "scores")
            current_hash = state_dict_hash(self.current.state_dict())
            extra = json.dumps([frozen is not None and self.pretrained.weights_hash, float(temperature),
                                repr(needs), grow_voxels, seed])
            if self.pretrained.output_activation != "softmax" or self.pretrained.adds_background:
                # the same weights read another way give other numbers (softmax logits: the key as it always was)
                extra += f"|{self.pretrained.output_activation}:{self.pretrained.activation}"
            prep_key = self.pretrained.preprocessing.cache_key()
            stamps = {c.case_id: f"{c.image_path}:{c.image_path.stat().st_mtime_ns}" for c in cases}
            key_fn = lambda cid: cache.key(cid, current_hash, prep_key, False, extra + stamps.get(cid, ""))  # noqa: E731
        return score_volumes(volumes, self.engine_current, temperature, frozen=frozen, grow_voxels=grow_voxels,
                             needs=needs, seed=seed, cache=cache, cache_key=key_fn,
                             progress=lambda it: tqdm(it, total=len(cases), desc="score pool",
                                                      disable=not self.progress, leave=False, dynamic_ncols=True))

    def pool_scores(self, cases: list[Case], labelled: list[Case], temperature: float, round_index: int,
                    anchors: Anchors | None = None, grow_voxels: int = 2, *, needs: ScoringNeeds | None = None,
                    seed: int = 0) -> PoolScores:
        """`PoolScores` of the unlabeled ``cases``; pass ``needs=strategy.needs`` so that strategies reading
        MC-dropout, TTA, BADGE or anatomy numbers get them (the default computes only the one-pass metrics).
        ``anchors``: the labelled volumes' (from `fit_temperature` or `anchors`; None when nothing is labelled)."""
        if anchors is None:
            anchors = Anchors()
        elif not isinstance(anchors, Anchors):
            raise TypeError(f"anchors must be the Anchors of fit_temperature() or anchors(), got {type(anchors).__name__}")
        scored = self.score_pool(cases, temperature, grow_voxels=grow_voxels, needs=needs, seed=seed)
        return PoolScores([c.case_id for c in cases], scored.metrics, scored.embeddings, anchors.embeddings,
                          scored.embeddings0, round_index, scored.vectors, dict(anchors.vectors), self.cold_start)

    def round_scores(self, strategy, labelled: list[Case], unlabelled: list[Case], t0: float, round_index: int,
                     seed: int, grow_voxels: int = 2, *, always: bool = False) -> tuple[RoundTemperature, PoolScores]:
        """A round's temperature and pool scores for ``strategy``: T fitted on ``labelled`` (``t0`` when none), the
        labelled anchors and the unlabeled pool scored with its needs. A strategy that reads no scores (random)
        gets the pool's ids alone and no forward pass, unless ``always`` (selective semi-supervision reads them)."""
        if not (strategy.reads_pool or always):
            return RoundTemperature(t0, None, None), PoolScores.ids_only([c.case_id for c in unlabelled], round_index)
        temp, anchors = self.fit_temperature(labelled, t0, seed)
        return temp, self.pool_scores(unlabelled, labelled, temp.temperature, round_index, anchors, grow_voxels,
                                      needs=strategy.needs, seed=seed)

    # -- training ---------------------------------------------------------------------------------
    def pseudo_volumes(self, cases: list[Case], temperature: float, threshold: float, flip_average: bool = False
                       ) -> list[TrainVolume]:
        """Masked pseudo-labels of the current model for ``cases`` (one forward pass each, or the engine's
        flip passes with ``flip_average``)."""
        out = []
        for case in self._bar(cases, "pseudo-label"):
            vol = self.prepare(case, with_label=False)
            logits, _ = self.engine_current.run(vol.image, tta=flip_average)
            label, mask = pseudo_label(logits, temperature, threshold)
            out.append(TrainVolume(vol.image, label, mask))  # uint8: cast per patch
        return out

    def encoder_parameters(self) -> list[str]:
        """Names of the current network's parameters that run up to the embedding (bottleneck) layer."""
        if self.engine_current.embedding_layer == OUTPUT_EMBEDDING:
            raise AsfdaError("cannot tell the encoder from the decoder of this network (no hookable bottleneck)",
                             self.pretrained.source, "train the whole network (train.freeze_encoder: false)")
        finished: list[str] = []
        hooks = [m.register_forward_hook(lambda mod, i, o, n=n: finished.append(n))
                 for n, m in self.current.named_modules() if n]
        try:
            with torch.inference_mode():
                self.current(torch.zeros(1, 1, *self.pretrained.roi_size, device=self.device))
        finally:
            for h in hooks:
                h.remove()
        if self.engine_current.embedding_layer not in finished:
            raise AsfdaError("cannot tell the encoder from the decoder of this network (no hookable bottleneck)",
                             self.pretrained.source, "train the whole network (train.freeze_encoder: false)")
        cut = finished.index(self.engine_current.embedding_layer)
        encoder_modules = set(finished[: cut + 1])
        return [n for n, _ in self.current.named_parameters() if n.rsplit(".", 1)[0] in encoder_modules]

    def finetune(self, labelled: list[Case], cfg: TrainConfig, pseudo: list[TrainVolume] | None = None,
                 desc: str = "fine-tune") -> dict[str, list[float]]:
        vols = []
        for case in labelled:
            v = self.prepare(case)
            vols.append(TrainVolume(v.image, v.label))  # uint8: cast per patch
        self._check_trainable()
        frozen_names = set(self.encoder_parameters()) if cfg.freeze_encoder else set()
        for n, p in self.current.named_parameters():
            p.requires_grad_(n not in frozen_names)
        patch = tuple(cfg.patch_size or self.pretrained.roi_size)
        try:
            hist = finetune(self.current, vols, cfg, patch_size=self.pretrained.roi_size, pseudo=pseudo,
                            device=self.device, progress=self.progress, desc=desc)
        except (ValueError, RuntimeError) as exc:
            if "more than 1" in str(exc):  # a normalisation layer over a single voxel or a single value in training
                raise AsfdaError(f"the network cannot train on patches of {list(patch)} voxels: a normalisation layer "
                                 f"sees a single value per channel there ({' '.join(str(exc).split())[:120]})",
                                 self.pretrained.source, "train on larger patches (train.patch_size, or a larger "
                                 "roi_size in the model's inferer) or with train.batch_size 2 or more") from None
            raise
        finally:
            for p in self.current.parameters():
                p.requires_grad_(True)
        self.is_adapted = True
        return hist

    def _check_trainable(self) -> None:
        """Refuses fine-tuning a source network without trainable parameters (a TorchScript module frozen with
        ``torch.jit.freeze`` keeps its weights as constants), before any step."""
        if not any(True for _ in self.current.network.parameters()):
            kind = "TorchScript model" if isinstance(self.pretrained.network, torch.jit.ScriptModule) else "network"
            raise AsfdaError(f"this {kind} has no trainable parameters (its weights are constants, as torch.jit.freeze "
                             "leaves them), so it cannot be fine-tuned; scoring, query and predict work on it",
                             self.pretrained.source, "export it without torch.jit.freeze (torch.jit.script or "
                             "torch.jit.trace of the module in eval mode), or give its state dict with a network config")

    def train_round(self, labelled: list[Case], unlabelled: list[Case], train: TrainConfig, semi: SemiConfig,
                    temperature: float, scores: PoolScores | None = None, queried: list[str] | None = None,
                    desc: str = "fine-tune") -> RoundTraining:
        """One round of fine-tuning (supervised, or selective semi-supervised when ``semi.enabled``), then
        the non-regression guard (`asfda.training.guard`) when ``train.guard`` and unlabeled volumes exist:
        if the new weights are anatomically less plausible than the pretrained model on a seeded sample of
        the unlabeled volumes, the round's weights are discarded (the model is the one the round started from).
        """
        guard_cases = []
        start_state = self.current_state() if (train.guard and unlabelled) or train.restart else None
        if train.guard and unlabelled:
            keep = set(guard_sample([c.case_id for c in unlabelled], train.guard_volumes, train.seed))
            guard_cases = [c for c in unlabelled if c.case_id in keep]
            reference = self.plausibility(guard_cases, pretrained=True)
        if train.restart:  # train from the pretrained weights (the frozen copy holds them, class map included)
            self.current.load_state_dict(self.frozen.state_dict())
        hist, reliable = self._train_round(labelled, unlabelled, train, semi, temperature, scores, queried, desc)
        guard = None
        if guard_cases:
            adapted = self.plausibility(guard_cases)
            guard = GuardResult([c.case_id for c in guard_cases], reference, adapted, discards(reference, adapted))
            if guard.reverted:
                self.load_current_state(start_state)  # is_adapted follows the weights
            (log.warning if guard.reverted else log.info)(guard.message())
        return RoundTraining(hist, reliable, guard)

    def plausibility(self, cases: list[Case], *, pretrained: bool = False) -> float:
        """`anatomical_plausibility` of the current (or pretrained) model's label maps on ``cases``, one
        forward pass each; the pretrained model's per-case values are kept (its weights never change)."""
        n = len(self.target_names)
        values = []
        for case in self._bar(cases, "guard"):
            if pretrained and case.case_id in self._plausibility0:
                values.append(self._plausibility0[case.case_id])
                continue
            engine = self.engine_frozen if pretrained else self.engine_current
            logits, _ = engine.run(self.prepare(case, with_label=False).image)
            v = anatomical_plausibility([logits.argmax(0)], n, self._guard_classes())
            if pretrained:
                self._plausibility0[case.case_id] = v
            values.append(v)
        return float(np.mean(values)) if values else float("nan")

    @property
    def cold_start(self) -> bool:
        """True while the model has no trained output for any target class (every target class got a new channel
        and nothing has been fine-tuned yet): its probabilities mean nothing, only its embeddings do."""
        new = set(self.class_map.new_classes)
        return not self.is_adapted and all(name in new for name in self.target_names[1:])

    def _guard_classes(self) -> list[int]:
        """The target classes the guard compares: those the pretrained model can predict (a new class, which
        it never predicts, would otherwise count for any adapted model)."""
        new = set(self.class_map.new_classes)
        return [i for i, name in enumerate(self.target_names) if i > 0 and name not in new]

    def _train_round(self, labelled: list[Case], unlabelled: list[Case], train: TrainConfig, semi: SemiConfig,
                     temperature: float, scores: PoolScores | None, queried: list[str] | None, desc: str
                     ) -> tuple[dict[str, list[float]], dict[str, dict[str, float]]]:
        """The fine-tuning of `train_round`: the loss history and the reliable volumes used (id -> confidence,
        distance)."""
        if not semi.enabled or not unlabelled:
            return self.finetune(labelled, train, desc=desc), {}
        if semi.pseudo_from == "previous" and scores is not None:
            reliable = reliable_from_scores(scores, queried or [], semi.confident_fraction, semi.close_fraction)
            pseudo = self.pseudo_volumes([c for c in unlabelled if c.case_id in reliable], temperature,
                                         semi.prob_threshold, semi.flip_average)
            return self.finetune(labelled, train, pseudo=pseudo or None, desc=desc), reliable
        warm = max(1, int(round(train.steps * semi.warmup_fraction)))
        hist = self.finetune(labelled, dataclasses.replace(train, steps=warm), desc=f"{desc} (labelled)")
        metrics, emb, _ = self.score_pool(unlabelled, temperature, divergence=False)
        lab_emb = np.stack([self.engine_current.run(self.prepare(c, with_label=False).image)[1].numpy()
                            for c in labelled])
        fresh = PoolScores([c.case_id for c in unlabelled], metrics, emb, lab_emb, None, 0)
        reliable = reliable_from_scores(fresh, [], semi.confident_fraction, semi.close_fraction)
        pseudo = self.pseudo_volumes([c for c in unlabelled if c.case_id in reliable], temperature,
                                     semi.prob_threshold, semi.flip_average)
        rest = dataclasses.replace(train, steps=max(1, train.steps - warm), seed=train.seed + 7919, warmup_fraction=0.0)
        hist2 = self.finetune(labelled, rest, pseudo=pseudo or None, desc=f"{desc} (+pseudo)")
        return {k: hist[k] + hist2[k] for k in hist}, reliable

    # -- evaluation -------------------------------------------------------------------------------
    def evaluate(self, cases: list[Case], *, pretrained: bool = False, tta: bool = False) -> list[dict]:
        """Per-case Dice on each case's native grid (probabilities resampled back one class at a time, then argmax).

        Each label is checked as `asfda ingest` checks it: integer values among the target's label values. With
        ``tta`` the logits are averaged over the engine's flips (never left-right), as `asfda predict --tta`. Each
        row also has ``lcc_dice_*``: the Dice after cutting every organ to its largest connected component."""
        from asfda.predict import label_map_on_native_grid
        engine = self.engine_frozen if pretrained else self.engine_current
        rows = []
        n = len(self.target_names)
        for case in self._bar(cases, "evaluate"):
            label, _ = read_nifti(case.label_path, dtype=np.float64)
            check_label_values(label, range(n), case.label_path)
            vol = self.prepare(case, with_label=False)
            logits, _ = engine.run(vol.image, tta=tta)
            fg = tuple(range(1, n))
            pred = label_map_on_native_grid(logits, "softmax", fg, fg, vol.affine, vol.native_affine, vol.native_shape,
                                            self.pretrained.preprocessing)
            ref = torch.from_numpy(label).long()
            dice = compute_dice(torch.from_numpy(pred.astype(np.int64)), ref, n)
            # the same map with each organ cut to its largest component: whether that post-processing helps a
            # class is read off these columns (nnU-Net's choice by cross-validation)
            dice_lcc = compute_dice(torch.from_numpy(largest_component_per_class(pred, fg).astype(np.int64)), ref, n)
            row = {"case_id": case.case_id, **per_class_scores(dice, self.target_names),
                   **per_class_scores(dice_lcc, self.target_names, prefix="lcc_dice_")}
            rows.append(row)
        return rows


def reliable_from_scores(scores: PoolScores, queried: list[str], confident_fraction: float,
                         close_fraction: float) -> dict[str, dict[str, float]]:
    """The reliable unlabeled volumes after a query, from this round's pool scores (no extra pass).

    Confidence is the scoring stage's ``confidence`` (computed with the round's T); distance is the min
    cosine distance of a volume's embedding to the labelled set including the volumes just queried.
    Returns ``{id: {"confidence": c, "distance": d}}`` for the kept volumes.
    """
    import torch as _torch

    from asfda.scoring.metrics import cosine_distance

    index = {i: k for k, i in enumerate(scores.ids)}
    queried_set = set(queried)
    remaining = [i for i in scores.ids if i not in queried_set]
    if not remaining:
        return {}
    emb = np.asarray(scores.embeddings)
    anchors = [emb[[index[i] for i in queried]]] if queried else []
    if scores.labelled_embeddings is not None and np.asarray(scores.labelled_embeddings).size:
        anchors.append(np.asarray(scores.labelled_embeddings))
    rows = [index[i] for i in remaining]
    conf = np.asarray(scores.metrics["confidence"])[rows]
    dist = cosine_distance(_torch.as_tensor(emb[rows]), _torch.as_tensor(np.concatenate(anchors))).min(1).values.numpy()
    keep = select_reliable(remaining, conf, dist, confident_fraction=confident_fraction, close_fraction=close_fraction)
    pos = {i: k for k, i in enumerate(remaining)}
    return {i: {"confidence": float(conf[pos[i]]), "distance": float(dist[pos[i]])} for i in keep}


def mean_of(rows: list[dict], key: str) -> float:
    vals = [r[key] for r in rows if not math.isnan(r[key])]
    return float(np.mean(vals)) if vals else math.nan
