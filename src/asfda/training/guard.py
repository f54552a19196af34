"""The non-regression guard of a fine-tuning round: keep the new weights only when the adapted model's
predictions on unlabeled volumes are anatomically at least as plausible as the pretrained model's.

Why a label-free check: with one or two labelled volumes there is no held-out label to validate on, and
an atypical labelled volume (on the CT-to-MR pair, chaos_036 with its large bright cyst) can teach a
model that segments the other volumes *worse* than the zero-shot model did. Such a model's organs fall
apart into fragments, while a model that generalises predicts each organ as one connected structure. The
plausibility of a prediction is the mean over the target's foreground classes of the fraction of the
class's predicted voxels that lie in its largest connected component (0 for a class predicted nowhere).

Measured on the CT-to-MR pair (`benchmarks/guard.py`, results in benchmarks/results/guard/): fine-tuned on
each of the 10 pool volumes of the seed-0 split alone, 9 models are far more plausible than the pretrained
one (0.875-0.934 against 0.68-0.72) and end at 0.78-0.84 Dice; the one trained on chaos_036 alone is less
plausible (0.632 against 0.703) and ends below zero-shot (0.299 against 0.397), and only it is discarded.
On the phantom pool: pretrained 0.54-0.56, adapted 0.64-0.95.

A second, label-free reason to discard a round: an organ collapse. A round that teaches the model to predict an organ
on the unlabeled volumes at less than a fifth of the pretrained model's volume (`COLLAPSE_FLOOR`) *and* at less than
a fifth of the labelled volumes' annotated volume has taught it to miss that organ, however whole the rest stays. On
the MR-to-CT pair, btcv_007's label (a small right kidney) left the right kidney at 0.04 of the pretrained model's
volume and 0.13 of the annotated one, and the test Dice 0.078 below zero-shot, while fragmentation improved (0.657 ->
0.763) and the first rule kept it. Both conditions, and a fifth: a pretrained model that over-segments an organ is
brought down to size by a good round (the demo phantom's pretrained kidneys and spleen are 2-4x their annotated
volume, and a good round takes them to 0.5-1.5x: a shrink to 0.3, not a collapse); and weak labels shrink organs
without harming (on the MR-to-CT pair, rounds on btcv_012, btcv_010 and btcv_005 left an organ at 0.23-0.49 of both
volumes and scored 0.014-0.07 above the weights a discard would have kept). The first form of the rule (below half
of the pretrained volume alone) discarded all of those, and every demo round. The floor sits between the one harmful
collapse measured (0.13) and the mildest harmless one (0.23): set on five rounds, to be checked on every new one
(benchmarks/results/guard/README.md, `benchmarks/guard_recall.py`).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields

import numpy as np
import torch

from asfda.metrics import largest_component_fractions

__all__ = ["COLLAPSE_FLOOR", "HOLD_BACK_MIN_OTHERS", "GuardResult", "anatomical_plausibility", "blamed",
           "collapse_levels", "collapsed",
           "discards", "guard_sample", "held_back", "organ_shrink", "organ_voxels", "volume_ratios"]

COLLAPSE_FLOOR = 0.2
"""An organ whose predicted volume on the guard's unlabeled volumes falls below this fraction of the pretrained
model's and of the labelled volumes' annotated volume has collapsed, and the round is discarded (`collapsed`)."""
MIN_PRETRAINED_RATIO = 0.05
"""`organ_shrink` compares an organ only where the pretrained model predicts at least this fraction of the labelled
volumes' organ volume (below it the pretrained volume is too small to divide by)."""


def anatomical_plausibility(label_maps: list[torch.Tensor | np.ndarray], n_classes: int,
                            classes: list[int] | None = None) -> float:
    """Mean over volumes and foreground classes (all, or the label values in ``classes``) of
    `asfda.metrics.largest_component_fractions` (NaN for no volume or no class)."""
    if not label_maps:
        return float("nan")
    keep = np.arange(n_classes - 1) if classes is None else np.asarray(classes, dtype=np.int64) - 1
    if keep.size == 0:
        return float("nan")
    return float(np.mean([largest_component_fractions(m, n_classes)[keep] for m in label_maps]))


def organ_voxels(label_map: torch.Tensor | np.ndarray, n_classes: int) -> np.ndarray:
    """Voxels of each foreground class (1 .. ``n_classes`` - 1) in a label map (float64, length ``n_classes`` - 1)."""
    flat = np.asarray(label_map.cpu() if isinstance(label_map, torch.Tensor) else label_map).ravel().astype(np.int64)
    return np.bincount(flat, minlength=n_classes)[1:n_classes].astype(np.float64)


def volume_ratios(predicted: list[np.ndarray], annotated: list[np.ndarray]) -> list[float]:
    """Per foreground class: the mean predicted voxels over the guard's unlabeled volumes divided by the median
    annotated voxels over the labelled volumes (both on the model's grid; NaN where no labelled volume has the class).

    Recorded with every guarded round (`GuardResult.volume_ratio_adapted`): on pair 2 a harmful first round left both
    kidneys at 0.17-0.41 of the annotated volume where a good round predicts every organ at 1.1-1.3x
    (benchmarks/results/guard/kidney_miss.md); whether a floor on it separates harmful rounds is measured on the
    cross-validated rounds (benchmarks/guard_recall.py) before the guard decides on it."""
    if not predicted or not annotated:
        return []
    pred = np.mean(np.stack(predicted), axis=0)
    ann = np.median(np.stack(annotated), axis=0)
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = np.where(ann > 0, pred / np.where(ann > 0, ann, 1.0), np.nan)
    return [round(float(r), 4) for r in ratio]


def organ_shrink(ratio_pretrained: list[float], ratio_adapted: list[float]) -> list[float]:
    """Per organ, the adapted model's predicted volume on the guard's volumes over the pretrained model's (the two
    `volume_ratios`' quotient: the labelled volumes' annotated volume cancels); NaN where the pretrained ratio is NaN or
    below `MIN_PRETRAINED_RATIO`."""
    out = []
    for p, a in zip(ratio_pretrained, ratio_adapted, strict=True):
        ok = p == p and a == a and p >= MIN_PRETRAINED_RATIO
        out.append(round(float(a / p), 4) if ok else float("nan"))
    return out


def collapse_levels(shrink: list[float], ratio_adapted: list[float] | None = None) -> list[float]:
    """Per organ, how far it fell: max(`organ_shrink`, the adapted model's `volume_ratios`), or the shrink alone where
    no ratio is given (NaN: no labelled volume has the organ); NaN where the shrink is. An organ has collapsed below
    a floor exactly when its level is below it (`collapsed`; `benchmarks/guard_recall.py` reads it per round)."""
    ratio = ratio_adapted if ratio_adapted else [float("nan")] * len(shrink)
    return [max(s, r) if s == s and r == r else s for s, r in zip(shrink, ratio, strict=True)]


def collapsed(organs: list[str], shrink: list[float], floor: float = COLLAPSE_FLOOR,
              ratio_adapted: list[float] | None = None) -> list[str]:
    """The organs whose `collapse_levels` are below ``floor``: `organ_shrink` below it and, where ``ratio_adapted``
    (the adapted model's `volume_ratios`) gives one, the predicted volume also below ``floor`` times the labelled
    volumes' annotated volume (an organ no labelled volume has, NaN there, is judged by its shrink alone)."""
    return [o for o, level in zip(organs, collapse_levels(shrink, ratio_adapted), strict=True) if level < floor]


def discards(plausibility_pretrained: float, plausibility_adapted: float, collapsed_organs: list[str] | None = None,
             ) -> bool:
    """The guard's rule: discard a round's weights when the adapted model is less plausible than the
    pretrained one (no margin: the pretrained model is far below any model that generalises), or when an organ
    collapsed (``collapsed_organs``, `collapsed`)."""
    return bool(plausibility_adapted < plausibility_pretrained or collapsed_organs)


def guard_sample(ids: list[str], n: int, seed: int) -> list[str]:
    """A seeded sample of up to ``n`` ids, independent of the order of ``ids``."""
    ordered = sorted(ids)
    if n <= 0 or n >= len(ordered):
        return ordered
    pick = np.random.default_rng(seed).choice(len(ordered), size=n, replace=False)
    return sorted(ordered[i] for i in pick)


@dataclass
class GuardResult:
    """What the guard measured and decided for one round."""

    cases: list[str]
    plausibility_pretrained: float
    plausibility_adapted: float
    reverted: bool
    # per guarded class (`organs`), predicted / annotated organ volume (`volume_ratios`) of either model; the
    # adapted model's is part of the collapse rule (`collapsed`)
    organs: list[str] = field(default_factory=list)
    volume_ratio_pretrained: list[float] = field(default_factory=list)
    volume_ratio_adapted: list[float] = field(default_factory=list)
    organ_shrink: list[float] = field(default_factory=list)  # `organ_shrink`
    collapsed: list[str] = field(default_factory=list)  # the organs that collapsed (`collapsed`: a reason to discard)
    # a semi-supervised round whose weights failed while its labelled warm-up passed: the failed reading (`to_dict`);
    # the warm-up's weights were kept (this result is theirs) and only the pseudo-labelled half was discarded
    semi_discarded: dict | None = None
    # a semi-supervised round discarded whole: the reading of its labelled warm-up's weights, which failed too
    labelled_half: dict | None = None

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> GuardResult:
        """From a round record's ``guard`` (keys this class does not hold, such as a simulation's ``dice_discarded``
        or a status line's round fields, are left out)."""
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    def message(self) -> str:
        if not self.reverted and self.semi_discarded:
            failed = GuardResult.from_dict(self.semi_discarded)
            return (f"guard: after its pseudo-labelled half, {failed.reason()}; the weights after the round's labelled "
                    f"half pass (plausibility {self.plausibility_adapted:.3f}, no organ collapsed), so they were kept "
                    "and the pseudo-labelled half discarded")
        if not self.reverted:
            return (f"guard: adapted model kept (plausibility {self.plausibility_adapted:.3f} >= pretrained "
                    f"{self.plausibility_pretrained:.3f} on {len(self.cases)} unlabeled volumes, no organ collapsed)")
        return (f"guard: {self.reason()} on {len(self.cases)} unlabeled volumes, so the round's weights were "
                "discarded and the model is the one the round started from; label more volumes and train again")

    def reason(self) -> str:
        """Why the round was discarded, in words (empty when it was kept)."""
        if not self.reverted:
            return ""
        why = []
        if self.plausibility_adapted < self.plausibility_pretrained:
            why.append(f"the fine-tuned model's organs are more fragmented than the pretrained model's (plausibility "
                       f"{self.plausibility_adapted:.3f} < {self.plausibility_pretrained:.3f}: the mean fraction of "
                       "each organ in its largest connected piece)")
        shrink = dict(zip(self.organs, self.organ_shrink, strict=False))
        ratio = dict(zip(self.organs, self.volume_ratio_adapted, strict=False))
        if self.collapsed:
            why.append("the fine-tuned model predicts " + ", ".join(
                f"{o} at {shrink.get(o, float('nan')):.2f}" for o in self.collapsed) +
                " of the pretrained model's volume and " + ", ".join(
                f"{ratio.get(o, float('nan')):.2f}" for o in self.collapsed) +
                f" of the labelled volumes' (an organ collapse: both below {COLLAPSE_FLOOR})")
        return "; and ".join(why)


HOLD_BACK_MIN_OTHERS = 3
"""A volume blamed for one discarded round rejoins training once this many other labelled volumes exist."""


def held_back(labelled: list[str], rounds: list[tuple[list[str], bool]],
              min_others: int = HOLD_BACK_MIN_OTHERS) -> list[str]:
    """The labelled ids to leave out of the next round's training (their labels are kept).

    A round the guard discarded blames the volumes it trained on that the last kept round had not (the ones that
    made the difference). A blamed volume stays out while fewer than ``min_others`` unblamed labelled volumes
    exist, and for good once blamed twice; in between it rejoins, and the guard judges that round as any other.

    Args:
        labelled: every labelled id so far.
        rounds: per finished round, in order: (the ids it trained on, whether the guard discarded it).
    """
    blame: dict[str, int] = {}
    for ids in blamed(rounds):
        for i in ids:
            blame[i] = blame.get(i, 0) + 1
    others = [i for i in labelled if not blame.get(i)]
    return sorted(i for i in labelled if blame.get(i, 0) >= 2 or (blame.get(i) and len(others) < min_others))


def blamed(rounds: list[tuple[list[str], bool]]) -> list[list[str]]:
    """Per finished round (the ``rounds`` of `held_back`), the ids it blames: for a round the guard discarded, the
    volumes it trained on that the last kept round before it had not (sorted); for a kept round, none."""
    out: list[list[str]] = []
    kept: set[str] = set()
    for trained, discarded in rounds:
        out.append(sorted(set(trained) - kept) if discarded else [])
        if not discarded:
            kept = set(trained)
    return out
