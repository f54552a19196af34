"""Fine-tuning the adapted model: supervised or selective semi-supervised, then the non-regression guard."""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass

import numpy as np
import torch

from asfda.config import MAX_TRAIN_VOXELS, SemiConfig, train_voxels_ok
from asfda.engine import OUTPUT_EMBEDDING
from asfda.errors import AsfdaError
from asfda.io.datasets import Case
from asfda.scoring.metrics import cosine_distance
from asfda.selection import PoolScores
from asfda.training import TrainConfig, TrainVolume, finetune, pseudo_label, pseudo_label_quality, select_reliable
from asfda.training.guard import (
    GuardResult,
    anatomical_plausibility,
    collapsed,
    discards,
    guard_sample,
    organ_shrink,
    organ_voxels,
    volume_ratios,
)

from .scoring import ScoringMixin

__all__ = ["RoundTraining", "TrainingMixin", "reliable_from_scores"]

log = logging.getLogger(__name__)


@dataclass
class RoundTraining:
    """What a round's fine-tuning gives: the loss history, the reliable unlabeled volumes used (id ->
    confidence, distance), the guard's decision (None when the guard did not run) and, when the guard discarded the
    round, the weights it discarded (so that a simulation can measure what they would have scored)."""

    history: dict[str, list[float]]
    reliable: dict[str, dict[str, float]]
    guard: GuardResult | None = None
    discarded_state: dict[str, torch.Tensor] | None = None


class TrainingMixin(ScoringMixin):
    """Training jobs of `asfda.adapter.Adapter` (the semi-supervised round scores the pool: `ScoringMixin`)."""

    # ------------------------------------------------------------------------------------
    def pseudo_volumes(self, cases: list[Case], temperature: float, threshold: float, flip_average: bool
                       ) -> list[TrainVolume]:
        """Masked pseudo-labels of the current model for ``cases`` (one forward pass each, or the engine's
        flip passes with ``flip_average``: the round's ``semi.prob_threshold`` and ``semi.flip_average``)."""
        out = []
        for case in self._bar(cases, "pseudo-label"):
            vol = self.prepare(case, with_label=False)
            logits = self.engine_current.run(vol.image, tta=True)[0] if flip_average else self.forward(case, vol)[0]
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
        patch = tuple(cfg.patch_size or self.pretrained.roi_size)
        if not train_voxels_ok(patch, cfg.batch_size):  # the model's window as the patch: checked once it is known
            raise AsfdaError(f"a training step of {cfg.batch_size} patches of {list(patch)} voxels is more than "
                             f"{MAX_TRAIN_VOXELS:,} voxels", self.pretrained.source,
                             "set a smaller train.patch_size or train.batch_size")
        vols = []
        for case in labelled:
            v = self.prepare(case)
            assert v.label is not None  # a labelled case: prepared with its label
            vols.append(TrainVolume(v.image, v.label))  # uint8: cast per patch
        self._check_trainable()
        frozen_names = set(self.encoder_parameters()) if cfg.freeze_encoder else set()
        for n, p in self.current.named_parameters():
            p.requires_grad_(n not in frozen_names)
        try:
            hist = finetune(self.current, vols, cfg, patch_size=self.pretrained.roi_size, pseudo=pseudo,
                            device=self.device, progress=self.progress, desc=desc,
                            dist=self.dist if self.spmd else None)  # DDP over the ranks inside all_ranks
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
                             "torch.jit.trace of the module in eval mode), or give its state dict with a network "
                             "config")

    def train_round(self, labelled: list[Case], unlabelled: list[Case], train: TrainConfig, semi: SemiConfig,
                    temperature: float, scores: PoolScores | None = None, queried: list[str] | None = None,
                    desc: str = "fine-tune") -> RoundTraining:
        """One round of fine-tuning (supervised, or selective semi-supervised when ``semi.enabled``), then
        the non-regression guard (`asfda.training.guard`) when ``train.guard`` and unlabeled volumes exist:
        if the new weights are anatomically less plausible than the pretrained model on a seeded sample of
        the unlabeled volumes, or an organ collapsed, the round's weights are discarded (the model is the one the
        round started from). A semi-supervised round whose weights fail is judged again as they stood after its
        labelled half (the warm-up): when those pass, they are kept and only the pseudo-labelled half is discarded
        (``guard.semi_discarded`` holds the failed reading), since self-training on the model's own weak organs can
        shrink them without the labels being to blame; when they fail too, the round is discarded as any other
        (``guard.labelled_half`` holds their reading).
        """
        guard_cases = []
        discarded: dict[str, torch.Tensor] | None = None
        start_state = self.current_state() if (train.guard and unlabelled) or train.restart else None
        if train.guard and unlabelled:
            keep = set(guard_sample([c.case_id for c in unlabelled], train.guard_volumes, train.seed))
            guard_cases = [c for c in unlabelled if c.case_id in keep]
            reference, voxels0 = self.guard_measures(guard_cases, pretrained=True)
            annotated = self._annotated_voxels(labelled)
        if train.restart:  # train from the pretrained weights (the frozen copy holds them, class map included)
            self.current.load_state_dict(self.frozen.state_dict())
        hist, reliable, warm_state = self._train_round(labelled, unlabelled, train, semi, temperature, scores, queried,
                                                       desc)
        guard = None
        if guard_cases:
            guard = self._judge(guard_cases, reference, voxels0, annotated)
            if guard.reverted:
                discarded = self.current_state()
                assert start_state is not None  # kept whenever the guard runs
                if warm_state is not None:  # the semi round's labelled half, judged alone
                    self.load_current_state(warm_state)
                    warm = self._judge(guard_cases, reference, voxels0, annotated)
                    guard = (dataclasses.replace(warm, semi_discarded=guard.to_dict()) if not warm.reverted
                             else dataclasses.replace(guard, labelled_half=warm.to_dict()))
                if guard.reverted:
                    self.load_current_state(start_state)  # is_adapted follows the weights
            (log.warning if guard.reverted or guard.semi_discarded else log.info)(guard.message())
        return RoundTraining(hist, reliable, guard, discarded)

    def _judge(self, guard_cases: list[Case], reference: float, voxels0: list[np.ndarray],
               annotated: list[np.ndarray]) -> GuardResult:
        """The guard's reading and decision for the current weights on ``guard_cases`` (one pass each), against the
        pretrained model's plausibility ``reference`` and organ voxels ``voxels0`` and the labels' ``annotated``."""
        adapted, voxels1 = self.guard_measures(guard_cases)
        organs = [self.target_names[k] for k in self._guard_classes()]
        ratio0, ratio1 = volume_ratios(voxels0, annotated), volume_ratios(voxels1, annotated)
        shrink = organ_shrink(ratio0, ratio1) if ratio0 else []
        gone = collapsed(organs, shrink, ratio_adapted=ratio1) if shrink else []
        return GuardResult([c.case_id for c in guard_cases], reference, adapted, discards(reference, adapted, gone),
                           organs, ratio0, ratio1, shrink, gone)

    def plausibility(self, cases: list[Case], *, pretrained: bool = False) -> float:
        """`anatomical_plausibility` of the current (or pretrained) model's label maps on ``cases``
        (`guard_measures`)."""
        return self.guard_measures(cases, pretrained=pretrained)[0]

    def guard_measures(self, cases: list[Case], *, pretrained: bool = False) -> tuple[float, list[np.ndarray]]:
        """The guard's reading of the current (or pretrained) model on ``cases``, one forward pass each (sharded over
        the ranks inside `all_ranks`): the mean `anatomical_plausibility` of its label maps, and per case the voxels
        of each guarded class (`organ_voxels`). The pretrained model's per-case values are kept (its weights never
        change)."""
        n, classes = len(self.target_names), self._guard_classes()
        cols = np.asarray(classes, dtype=np.int64) - 1

        def one(case: Case) -> tuple[float, np.ndarray]:
            if pretrained and case.case_id in self._plausibility0:
                return self._plausibility0[case.case_id]
            logits, _ = self.forward(case, pretrained=pretrained)
            label_map = logits.argmax(0)
            return anatomical_plausibility([label_map], n, classes), organ_voxels(label_map, n)[cols]

        values = self.map_cases(cases, one, "guard")  # sharded over the ranks inside all_ranks
        if pretrained:
            self._plausibility0.update({c.case_id: v for c, v in zip(cases, values, strict=True)})
        mean = float(np.mean([v[0] for v in values])) if values else float("nan")
        return mean, [v[1] for v in values]

    def _annotated_voxels(self, labelled: list[Case]) -> list[np.ndarray]:
        """Voxels of each guarded class in the labels of ``labelled`` on the model's grid (prepared as training
        prepares them; the preparation cache makes this a read)."""
        n, cols = len(self.target_names), np.asarray(self._guard_classes(), dtype=np.int64) - 1
        out = []
        for case in labelled:
            label = self.prepare(case, with_label=True).label
            if label is not None:
                out.append(organ_voxels(label, n)[cols])
        return out

    def _guard_classes(self) -> list[int]:
        """The target classes the guard compares: those the pretrained model can predict (a new class, which
        it never predicts, would otherwise count for any adapted model)."""
        new = set(self.class_map.new_classes)
        return [i for i, name in enumerate(self.target_names) if i > 0 and name not in new]

    def _note_pseudo_quality(self, cases: list[Case], pseudo: list[TrainVolume],
                             reliable: dict[str, dict[str, float]]) -> None:
        """Adds `pseudo_label_quality` to the record of each reliable volume whose true label exists (a simulation's
        pool; a project's unlabeled volumes have none): recorded, never trained on."""
        for case, vol in zip(cases, pseudo, strict=True):
            truth = self.prepare(case, with_label=True).label if case.has_label and vol.mask is not None else None
            if truth is not None and vol.mask is not None and case.case_id in reliable:
                reliable[case.case_id].update(pseudo_label_quality(vol.label, vol.mask, truth, self.target_names))

    def _train_round(self, labelled: list[Case], unlabelled: list[Case], train: TrainConfig, semi: SemiConfig,
                     temperature: float, scores: PoolScores | None, queried: list[str] | None, desc: str
                     ) -> tuple[dict[str, list[float]], dict[str, dict[str, float]], dict[str, torch.Tensor] | None]:
        """The fine-tuning of `train_round`: the loss history, the reliable volumes used (id -> confidence,
        distance) and, for a semi-supervised round with a labelled warm-up, the weights after that warm-up."""
        if not semi.enabled or not unlabelled:
            return self.finetune(labelled, train, desc=desc), {}, None
        if semi.pseudo_from == "previous" and scores is not None:
            reliable = reliable_from_scores(scores, queried or [], semi.confident_fraction, semi.close_fraction)
            chosen = [c for c in unlabelled if c.case_id in reliable]
            pseudo = self.pseudo_volumes(chosen, temperature, semi.prob_threshold, semi.flip_average)
            self._note_pseudo_quality(chosen, pseudo, reliable)
            return self.finetune(labelled, train, pseudo=pseudo or None, desc=desc), reliable, None
        warm = max(1, int(round(train.steps * semi.warmup_fraction)))
        hist = self.finetune(labelled, dataclasses.replace(train, steps=warm), desc=f"{desc} (labelled)")
        warm_state = self.current_state() if train.guard else None
        scored = self.score_pool(unlabelled, temperature, divergence=False)
        lab_emb = np.stack([self.forward(c)[1].numpy() for c in labelled])
        fresh = PoolScores([c.case_id for c in unlabelled], scored.metrics, scored.embeddings, lab_emb, None, 0)
        reliable = reliable_from_scores(fresh, [], semi.confident_fraction, semi.close_fraction)
        if self.spmd:  # torchrun: rank 0's choice (each rank embedded the labelled volumes itself)
            reliable = self.dist.broadcast_from_main(reliable)
        chosen = [c for c in unlabelled if c.case_id in reliable]
        pseudo = self.pseudo_volumes(chosen, temperature, semi.prob_threshold, semi.flip_average)
        self._note_pseudo_quality(chosen, pseudo, reliable)
        rest = dataclasses.replace(train, steps=max(1, train.steps - warm), seed=train.seed + 7919, warmup_fraction=0.0)
        hist2 = self.finetune(labelled, rest, pseudo=pseudo or None, desc=f"{desc} (+pseudo)")
        return {k: hist[k] + hist2[k] for k in hist}, reliable, warm_state


def reliable_from_scores(scores: PoolScores, queried: list[str], confident_fraction: float,
                         close_fraction: float) -> dict[str, dict[str, float]]:
    """The reliable unlabeled volumes after a query, from this round's pool scores (no extra pass).

    Confidence is the scoring stage's ``confidence`` (computed with the round's T); distance is the min
    cosine distance of a volume's embedding to the labelled set including the volumes just queried.
    Returns ``{id: {"confidence": c, "distance": d}}`` for the kept volumes.
    """
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
    dist = cosine_distance(torch.as_tensor(emb[rows]), torch.as_tensor(np.concatenate(anchors))).min(1).values.numpy()
    keep = select_reliable(remaining, conf, dist, confident_fraction=confident_fraction, close_fraction=close_fraction)
    pos = {i: k for k, i in enumerate(remaining)}
    return {i: {"confidence": float(conf[pos[i]]), "distance": float(dist[pos[i]])} for i in keep}


