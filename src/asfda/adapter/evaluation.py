"""Evaluating the adapted (or pretrained) model on labelled volumes, and exporting it as a bundle."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from asfda.errors import AsfdaError
from asfda.evaluation import compute_dice, compute_hd95, largest_component_per_class, per_class_scores
from asfda.io.datasets import Case
from asfda.io.labels import check_label_values
from asfda.io.nifti import read_nifti
from asfda.metrics import mean_ignoring_nan
from asfda.models import save_bundle
from asfda.models.native_grid import label_map_on_native_grid

from .models import AdaptedModels

__all__ = ["EvaluationMixin", "mean_of"]


class EvaluationMixin(AdaptedModels):
    """Evaluation and export jobs of `asfda.adapter.Adapter`."""

    def export_bundle(self, out_dir: str | Path, extra_metadata: dict | None = None) -> Path:
        """Writes the adapted model as a MONAI bundle (configs of the source bundle, new weights in
        ``models/model.pt`` and ``models/model.safetensors``) that ``python -m monai.bundle run`` and
        ``asfda predict`` run as is. Its output channels are the source model's; the name match to the
        target labels is recorded under ``asfda`` in the metadata."""
        if self.current.new_head is not None:
            raise AsfdaError("the adapted model has output channels the source network lacks; it cannot be "
                             "written as the source bundle", self.pretrained.source)
        adapted = self.pretrained.copy()
        adapted.network.load_state_dict(self.current.network.state_dict())
        meta = {"class_map": self.class_map.to_dict(), "target_classes": self.target_names, **(extra_metadata or {})}
        return save_bundle(adapted, out_dir, extra_metadata=meta)

    # ----------------------------------------------------------------------------------
    def evaluate(self, cases: list[Case], *, pretrained: bool = False, tta: bool = False, hd95: bool = False,
                 largest_component: bool = True) -> list[dict]:
        """Per-case Dice on each case's native grid (probabilities resampled back one class at a time, then argmax).

        Each label is checked as `asfda ingest` checks it: integer values among the target's label values. With
        ``tta`` the logits are averaged over the engine's flips (never left-right), as `asfda predict --tta`. Each
        row also has ``lcc_dice_*``: the Dice after cutting every organ to its largest connected component (left out
        when ``largest_component`` is False); with ``hd95``, ``hd95_mm_*``: the 95th-percentile Hausdorff distance
        (mm, at the case's voxel spacing) of the plain prediction, as `asfda evaluate` reports it. An adapter that
        folds the classes the model lacks (``fold_uncovered``, `ClassMap.fold_uncovered_label`) folds them in the
        label too: their Dice is NaN, and ``dice_mean`` covers the model's organs only. Inside `all_ranks` the cases
        are sharded over the ranks and every rank gets every row."""
        engine = self.engine_frozen if pretrained else self.engine_current
        n = len(self.target_names)
        fg = tuple(range(1, n))

        def one(case: Case) -> dict:
            if case.label_path is None:
                raise AsfdaError(f"case {case.case_id!r} has no label to evaluate against", case.image_path,
                                 "evaluate on labelled cases only")
            label, _ = read_nifti(case.label_path, dtype=np.float64)
            check_label_values(label, range(n), case.label_path)
            vol = self.prepare(case, with_label=False)
            logits = engine.run(vol.image, tta=True)[0] if tta else self.forward(case, vol, pretrained=pretrained)[0]
            pred = label_map_on_native_grid(logits, "softmax", fg, fg, vol.affine, vol.native_affine, vol.native_shape,
                                            self.pretrained.preprocessing)
            ref = torch.from_numpy(label).long()
            if self.class_map.fold_uncovered:  # the organs the model lacks count as background
                ref = self.class_map.fold_uncovered_label(ref)
            plain = torch.from_numpy(pred.astype(np.int64))
            row = {"case_id": case.case_id, **per_class_scores(compute_dice(plain, ref, n), self.target_names)}
            if hd95:
                hd = compute_hd95(plain, ref, n, case.spacing_mm)
                row.update({f"hd95_mm_{name}": float(h) for name, h in zip(self.target_names[1:], hd)})
            if largest_component:
                # the same map with each organ cut to its largest component: whether that post-processing helps a
                # class is read off these columns (nnU-Net's choice by cross-validation)
                cut = torch.from_numpy(largest_component_per_class(pred, fg).astype(np.int64))
                row.update(per_class_scores(compute_dice(cut, ref, n), self.target_names, prefix="lcc_dice_"))
            return row

        return self.map_cases(cases, one, "evaluate")  # sharded over the ranks inside all_ranks


def mean_of(rows: list[dict], key: str) -> float:
    """`asfda.metrics.mean_ignoring_nan` of ``key`` over ``rows`` (a Dice mean over cases)."""
    return mean_ignoring_nan([r[key] for r in rows])
