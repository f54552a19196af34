"""When to stop annotating: after each round, an estimate of what the next round will add, from signals that need
no test labels (pure functions on arrays and tensors; the callers run the model).

The signals, per fine-tuning round r (the model before it: r - 1, the pretrained model before round 0):

- **prediction change** ``change_r = 1 - agreement_r``: the mean Dice between the label maps of the model before and
  after round r on a seeded sample of unlabeled pool volumes (the *probe*: `PROBE_VOLUMES` of them, the same every
  round; one that gets labelled is replaced by the next in the seeded order). A round that moves the predictions on
  volumes it never saw little has taught the model little that transfers.
- **score change**: the relative change of the probe volumes' mean predictive entropy (ENPY) between the two models.
- **the learning curve so far, where labels exist**: the Dice of the model before round k on round k's newly
  labelled volumes (in a project: the edit Dice between `asfda next`'s pre-segmentation and the annotator's label;
  in `simulate`: the same Dice from the pool's labels), with its standard error over those volumes. Its
  differences are gains measured on fresh volumes, one round behind the prediction change.

The estimate (`estimate_next_gain`) is a fixed fraction of the prediction change of the last kept round:
``gain_{r+1} = GAIN_PER_CHANGE * change_r``. Proportional, because retraining moves predictions even when it no longer
improves them, so the first rule tried, which extrapolated the change's decay (``change_r * change_r /
change_{r-1}``), overestimated the late rounds. The fraction is fitted on the real cross-validated rounds of both pairs
(CT bundle -> CHAOS MR, MR bundle -> BTCV CT; least squares through 0 over every distinct round,
``benchmarks/stop_fit.py --pooled --all``): fitted with each fold left out in turn and scored on it, it errs less
than assuming the next round adds nothing on MR -> CT but more on CT -> MR, so `asfda status` shows the
recommendation without a number (`GAIN_ESTIMATE_RELIABLE`); on both pairs the rounds it flags "consider stopping"
gained less next than those it flags "continue" (``benchmarks/results/stopping/README.md``). The first fraction,
0.1, came from a phantom calibration run (``benchmarks/results/stopping/calibration``). The recommendation is
"continue" while the predicted gain is at least `STOP_BELOW` mean Dice (the ``stop_gain`` setting), else
"diminishing returns: consider stopping".
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass

import numpy as np
import torch

from asfda.config import default_of
from asfda.metrics import mean_dice, mean_ignoring_nan
from asfda.scoring.metrics import mean_entropy

__all__ = [
    "CONTINUE",
    "GAIN_ESTIMATE_RELIABLE",
    "GAIN_PER_CHANGE",
    "NO_ESTIMATE",
    "PROBE_VOLUMES",
    "STOP",
    "STOP_BELOW",
    "UNRELIABLE_NOTE",
    "ProbeOutput",
    "StopEstimate",
    "class_fractions",
    "curve_points",
    "estimate_error",
    "estimate_from_records",
    "estimate_next_gain",
    "estimate_rows",
    "label_agreement",
    "probe_ids",
    "probe_output",
    "probe_outputs",
    "probe_record",
    "relative_change",
]

PROBE_VOLUMES = 4
"""Unlabeled volumes whose predictions are compared between rounds (one forward pass each per model)."""

STOP_BELOW: float = default_of("stop_gain")
"""A predicted next-round gain below this (mean Dice, one point) recommends considering to stop: the default of the
``stop_gain`` setting (`asfda set PROJECT stop_gain=0.02`, ``--set stop_gain=...`` in a simulation)."""

GAIN_PER_CHANGE = 0.102
"""The predicted next-round gain (mean Dice) per unit of the last round's prediction change: the least-squares scale
through 0 over every distinct cross-validated round of both real pairs (``benchmarks/stop_fit.py --pooled --all``:
the decisive rows, the paper's baselines and the selection variants; ``benchmarks/results/stopping/README.md``,
checked against the committed rounds by ``tests/benchmarks/test_benchmark_stop_fit.py``). The pairs alone want 0.045
(CT -> MR) and 0.145 (MR -> CT). It was 0.08 until 2026-12-07 06:20 UTC, 0.087 until 09:30 UTC, then 0.083 (fitted on
the decisive rows alone) until 2026-12-07 evening."""

GAIN_ESTIMATE_RELIABLE = False
"""Whether `asfda status` shows the predicted gain as a number. No: fitted with each fold left out, the scale above
errs less than predicting 0 on MR -> CT's rounds but more on CT -> MR's (every distinct round of both pairs,
``benchmarks/results/stopping/README.md``), so the recommendation is shown with ``UNRELIABLE_NOTE`` instead of a
number (the rounds it flags "consider stopping" did gain less next than those it flags "continue", on both pairs).
It was True from 2026-12-07 01:20 UTC, judged on the decisive rows alone, where random's rounds carried it on
CT -> MR."""

UNRELIABLE_NOTE = ("no number: on one of the two real pairs' cross-validated rounds the gain estimate erred more than "
                   "assuming no further gain, so the recommendation is a rough guide")

CONTINUE = "continue"
STOP = "diminishing returns: consider stopping"
NO_ESTIMATE = "no estimate yet"


# ---------------------------------------------------------------------------------------------- signals
def label_agreement(a: np.ndarray | torch.Tensor, b: np.ndarray | torch.Tensor, n_classes: int) -> float:
    """Mean Dice between two label maps of the same volume over the foreground classes 1..n_classes-1
    (`asfda.metrics.mean_dice`: a class in neither map is left out, as in evaluation); NaN when neither map has any
    foreground (no evidence of agreement or change: `probe_record` leaves such a volume out)."""
    return mean_dice(a, b, n_classes)


def class_fractions(label_map: np.ndarray | torch.Tensor, n_classes: int) -> list[float]:
    """The fraction of the volume's voxels predicted as each foreground class 1..n_classes-1."""
    lab = label_map.cpu().numpy() if isinstance(label_map, torch.Tensor) else np.asarray(label_map)
    counts = np.bincount(lab.ravel().astype(np.int64), minlength=n_classes)[1:n_classes]
    return [float(c) / max(lab.size, 1) for c in counts]


@dataclass
class ProbeOutput:
    """What the stopping estimate keeps of one probe volume under one model: its label map (model grid) and ENPY."""

    label_map: np.ndarray
    entropy: float


def probe_output(logits: torch.Tensor) -> ProbeOutput:
    """Reduces a volume's logits ``[C, X, Y, Z]`` to its `ProbeOutput` (argmax label map, mean normalised entropy)."""
    if logits.ndim != 4 or logits.shape[0] < 2:
        raise ValueError(f"expected logits [C >= 2, X, Y, Z], got shape {tuple(logits.shape)}")

    z = logits.float()
    return ProbeOutput(z.argmax(0).to(torch.uint8).cpu().numpy(), mean_entropy(torch.softmax(z, 0)))


def probe_ids(pool_ids: Iterable[str], n: int, seed: int, exclude: Iterable[str] = ()) -> list[str]:
    """The probe: the first ``n`` pool ids not in ``exclude`` (the labelled ones) in a seeded order of the whole pool,
    independent of the order of ``pool_ids`` (sorted). A probe volume that gets labelled is replaced by the next one
    in that order, and the others stay, so consecutive rounds compare mostly the same volumes."""
    ordered = sorted(set(pool_ids))
    skip = set(exclude)
    perm = np.random.default_rng(seed + 7919).permutation(len(ordered))
    return sorted([ordered[i] for i in perm if ordered[i] not in skip][:max(n, 0)])


def probe_outputs(ids: Sequence[str], logits_of: Callable[[str], torch.Tensor]) -> dict[str, ProbeOutput]:
    """`probe_output` of each id, ``logits_of(id)`` giving its logits (the caller runs the model)."""
    return {i: probe_output(logits_of(i)) for i in ids}


def relative_change(before: Mapping[str, float], after: Mapping[str, float]) -> float | None:
    """``|mean(after) - mean(before)| / mean(before)`` over the ids both have (None when there are none or the
    mean before is 0)."""
    common = sorted(set(before) & set(after))
    if not common:
        return None
    b = float(np.mean([before[i] for i in common]))
    a = float(np.mean([after[i] for i in common]))
    return abs(a - b) / b if b > 0 else None


def probe_record(before: Mapping[str, ProbeOutput], after: Mapping[str, ProbeOutput], n_classes: int,
                 exclude: Iterable[str] = ()) -> dict:
    """What a round records of its probe: per volume unlabeled at the end of the round (not in ``exclude``) the
    agreement of the label maps before and after the round, the entropy and class fractions after; their means, the
    change ``1 - agreement`` and the entropy's relative change. The agreement's mean leaves out a volume where
    neither model predicts foreground (its agreement is NaN); ``agreement`` and ``change`` are None when no probe
    volume is left to compare."""
    skip = set(exclude)
    ids = sorted(i for i in set(before) & set(after) if i not in skip)
    per_case = {i: label_agreement(before[i].label_map, after[i].label_map, n_classes) for i in ids}
    mean = mean_ignoring_nan(list(per_case.values()))
    agreement = None if math.isnan(mean) else mean
    return {"cases": ids, "agreement": agreement, "change": None if agreement is None else 1.0 - agreement,
            "agreement_per_case": per_case,
            "entropy_before": {i: before[i].entropy for i in ids}, "entropy": {i: after[i].entropy for i in ids},
            "entropy_change": relative_change({i: before[i].entropy for i in ids}, {i: after[i].entropy for i in ids}),
            "fractions": {i: class_fractions(after[i].label_map, n_classes) for i in ids}}


def curve_points(values_by_round: Mapping[int, Sequence[float]]) -> list[dict]:
    """The learning curve where labels exist: per query round (ascending) the mean of its values (the Dice of the model
    that made the query on the volumes it queried), their standard error (NaN for one value) and their number."""
    out = []
    for r in sorted(values_by_round):
        v = np.asarray([x for x in values_by_round[r] if x is not None and math.isfinite(x)], dtype=float)
        if v.size == 0:
            continue
        se = float(v.std(ddof=1) / math.sqrt(v.size)) if v.size > 1 else float("nan")
        out.append({"round": int(r), "mean": float(v.mean()), "se": se, "n": int(v.size)})
    return out


# ---------------------------------------------------------------------------------------------- the estimate
@dataclass
class StopEstimate:
    """What the next round is expected to add, and the plain recommendation that follows.

    Attributes:
        after_round: the last fine-tuned round (None: none yet).
        predicted_gain: expected change of mean Dice from the next round (None: no estimate).
        change: ``1 - agreement`` of the last measured round's predictions before and after it, on the probe.
        change_before: the same for the measured round before it (None when there is none).
        entropy_change: relative change of the probe's mean entropy in the last measured round.
        curve_gain: the last difference of the learning curve on newly labelled volumes (None with fewer than 2
            points), and ``curve_gain_se`` its standard error (NaN when a point has a single volume).
        recommendation: `CONTINUE`, `STOP` or `NO_ESTIMATE`; ``reason`` says why in one sentence.
    """

    after_round: int | None
    predicted_gain: float | None
    change: float | None
    change_before: float | None
    entropy_change: float | None
    curve_gain: float | None
    curve_gain_se: float | None
    recommendation: str
    reason: str
    threshold: float = STOP_BELOW
    reliable: bool = False  # False: `message` shows no predicted gain; an estimate stored without it was unreliable

    def to_dict(self) -> dict:
        return asdict(self)

    def message(self) -> str:
        """One line for `asfda status`."""
        text = f"when to stop: {self.recommendation}"
        if self.predicted_gain is not None and self.reliable:
            text += (f" (the next round is expected to add {self.predicted_gain:+.3f} mean Dice; "
                     f"threshold {self.threshold:.3f})")
        elif self.predicted_gain is not None:
            text += f" ({UNRELIABLE_NOTE})"
        text += f". {self.reason}"
        if self.curve_gain is not None:
            se = ("" if self.curve_gain_se is None or not math.isfinite(self.curve_gain_se)
                  else f" ± {self.curve_gain_se:.3f}")
            text += (f" On newly labelled volumes the Dice of the model that queried them changed by "
                     f"{self.curve_gain:+.3f}{se} between the last two queries.")
        return text


def estimate_next_gain(rounds: Sequence[Mapping], curve: Sequence[Mapping] = (),
                       threshold: float = STOP_BELOW, gain_per_change: float = GAIN_PER_CHANGE) -> StopEstimate:
    """The estimate after the last of ``rounds``.

    Args:
        rounds: per fine-tuned round, in order: ``{"change": float | None, "entropy_change": float | None,
            "discarded": bool}`` (a `probe_record` plus the guard's decision). A discarded round (its weights thrown
            away) and a round without a probe measurement are skipped: the estimate rests on the last kept, measured
            round (the change of the measured round before it is reported beside it, as the trend).
        curve: `curve_points` of the labelled volumes so far (shown beside the estimate, not mixed into it).
        threshold: `STOP_BELOW`.
        gain_per_change: `GAIN_PER_CHANGE`.
    """
    for name, value in (("threshold", threshold), ("gain_per_change", gain_per_change)):
        if not math.isfinite(value) or value < 0:
            raise ValueError(f"{name} must be a finite number >= 0, got {value}")
    curve_gain = curve_se = None
    if len(curve) >= 2:
        a, b = curve[-2], curve[-1]
        curve_gain = float(b["mean"] - a["mean"])
        curve_se = float(math.sqrt(a["se"] ** 2 + b["se"] ** 2)) if math.isfinite(a["se"]) and math.isfinite(b["se"]) \
            else float("nan")
    after = len(rounds) - 1 if rounds else None
    measured = [(i, r) for i, r in enumerate(rounds) if not r.get("discarded") and r.get("change") is not None]

    def result(gain, change, before, entropy, rec, reason):
        return StopEstimate(after, gain, change, before, entropy, curve_gain, curve_se, rec, reason, threshold,
                            GAIN_ESTIMATE_RELIABLE)

    if not rounds:
        return result(None, None, None, None, NO_ESTIMATE, "No round is fine-tuned yet.")
    if not measured:
        why = ("every round so far was discarded by the guard" if all(r.get("discarded") for r in rounds)
               else "no round measured its predictions on unlabeled volumes")
        return result(None, None, None, None, NO_ESTIMATE, f"No estimate: {why}.")
    i, last = measured[-1]
    change = float(last["change"])
    before = float(measured[-2][1]["change"]) if len(measured) >= 2 else None
    gain = gain_per_change * change
    note = ("" if i == len(rounds) - 1
            else f" (round {len(rounds) - 1} was discarded by the guard: round {i} is the last kept one)")
    how = (f"Round {i} changed {100 * change:.1f}% of the predicted anatomy on unlabeled volumes"
           + (f", round {measured[-2][0]} {100 * before:.1f}%" if before is not None else "") + note + ".")
    rec = CONTINUE if gain >= threshold else STOP
    return result(gain, change, before, last.get("entropy_change"), rec, how)


def estimate_from_records(records: Sequence[Mapping], curve_values: Mapping[int, Sequence[float]] | None = None,
                          threshold: float = STOP_BELOW) -> StopEstimate:
    """`estimate_next_gain` after the last of the round records of a simulated run or a project (each may hold
    ``probe``, a `probe_record`, and ``guard``, the guard's decision), with ``curve_values`` (round -> the Dice of
    that round's query model on the volumes it queried; `curve_points`). Reads no test Dice."""
    return estimate_next_gain(_signals(records), curve_points(curve_values or {}), threshold)


def _signals(records: Sequence[Mapping]) -> list[dict]:
    """The `estimate_next_gain` inputs of round records: the probe's change and entropy change, the guard's decision."""
    return [{"change": (r.get("probe") or {}).get("change"),
             "entropy_change": (r.get("probe") or {}).get("entropy_change"),
             "discarded": bool((r.get("guard") or {}).get("reverted"))} for r in records]


# ---------------------------------------------------------------------------------------------- validation
def estimate_rows(records: Sequence[Mapping], curve_key: str = "queried_dice_before",
                  threshold: float = STOP_BELOW, gain_per_change: float = GAIN_PER_CHANGE) -> list[dict]:
    """Per round of a simulated run (its ``state.json`` ``rounds``): the estimate made after it (recomputed from the
    records up to it: probe changes, guard decisions and ``curve_key``'s Dice on queried volumes, never test Dice)
    beside the true next-round gain (the next round's test Dice minus this one's; None after the last round)."""
    out = []
    for k, rec in enumerate(records):
        prefix = records[: k + 1]
        curve = {r["round"]: list(r[curve_key].values()) for r in prefix if r.get(curve_key)}
        est = estimate_next_gain(_signals(prefix), curve_points(curve), threshold, gain_per_change)
        true = float(records[k + 1]["dice_mean"] - rec["dice_mean"]) if k + 1 < len(records) else None
        out.append({"round": rec["round"], "n_labelled": rec.get("n_labelled"), "dice_mean": rec["dice_mean"],
                    "discarded": bool((rec.get("guard") or {}).get("reverted")), "change": est.change,
                    "entropy_change": est.entropy_change, "predicted_next_gain": est.predicted_gain,
                    "curve_gain": est.curve_gain, "curve_gain_se": est.curve_gain_se,
                    "recommendation": est.recommendation, "true_next_gain": true})
    return out


def estimate_error(rows: Sequence[Mapping], key: str = "predicted_next_gain") -> dict:
    """Mean absolute error of ``key`` against ``true_next_gain`` over the rows that have both, beside that of always
    predicting 0 (the "stop now" estimate) and the Pearson correlation (NaN below 3 rows)."""
    pairs = [(float(r[key]), float(r["true_next_gain"])) for r in rows
             if r.get(key) is not None and r.get("true_next_gain") is not None
             and math.isfinite(float(r[key])) and math.isfinite(float(r["true_next_gain"]))]
    if not pairs:
        return {"n": 0, "mae": float("nan"), "mae_of_zero": float("nan"), "correlation": float("nan")}
    est, true = np.asarray(pairs).T
    corr = float(np.corrcoef(est, true)[0, 1]) if len(pairs) >= 3 and est.std() > 0 and true.std() > 0 else float("nan")
    return {"n": len(pairs), "mae": float(np.mean(np.abs(est - true))), "mae_of_zero": float(np.mean(np.abs(true))),
            "correlation": corr}
