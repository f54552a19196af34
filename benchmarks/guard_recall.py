"""Does the guard catch the harmful rounds? Recall and precision over every round of cross-validated runs.

A round is *harmful* when the weights it trained lowered the test Dice by more than ``--drop`` (default 0.02) from
the Dice the round started at (the zero-shot Dice for round 0, else the previous round's): for a kept round its own
test Dice, for a round the guard discarded the test Dice of the discarded weights (``guard.dice_discarded``, recorded
since the guard's recall was asked for; older discarded rounds without it are counted apart as "unknown").
Recall = harmful rounds discarded / harmful rounds; precision = discarded rounds that were harmful / discarded rounds
with a known outcome. Reads ``asfda crossval`` folders (``FOLDER/fold<k>/``), every strategy and seed.

Rounds of different folds that trained the same model (the same labelled volumes in the same order, round after
round, with the same keep/discard decisions: training reads nothing else, so the weights are identical) differ only in
their 2-4 test volumes; on pair 1 one such model "lowered the Dice" by 0.030 in one fold and by 0.004-0.008 in two
others. ``--pool-identical`` judges each distinct model once, on the union of those folds' test volumes.

Also, for the rounds that recorded it (``guard.volume_ratio_adapted``: each organ's predicted volume on the guard's
unlabeled volumes over the labelled volumes' annotated volume), what a floor on the smallest ratio would add to the
guard: the rule "discard also when an organ's ratio is below F", its recall and precision beside today's.

And a signal the guard does not read, tried as one (``--query-floors``): the Dice of the previous round's model on the
volume this round labelled (``queried_dice_before``, the project's edit Dice; from round 1 on, where the previous
model is an adapted one). A label the adapted model gets badly wrong is an atypical volume (chaos_036's cyst); the
rule "discard when it is below F" is scored like the floors above.

And whether any label-free reading a round records could tell harmful rounds at all (``--signals``): per signal
(`SIGNALS`), the AUROC of "higher reads harmful" over the guarded rounds of known outcome, per folder and over all
the folders together. 0.5 is chance; below 0.5 the signal reads the other way.

    python benchmarks/guard_recall.py benchmarks/results/crossval/ct_to_mr benchmarks/results/crossval/mr_to_ct
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from asfda.results import read_run
from asfda.training.guard import collapse_levels, organ_shrink


def round_outcomes(fold: Path) -> list[dict]:
    """Per round of every run in one fold folder: start Dice, the trained weights' Dice (None: unknown), discarded?"""
    run = read_run(fold)
    out = []
    for name, by_seed in run.states.items():
        for seed, state in by_seed.items():
            zero = run.zero_shot.get(seed)
            start = float(np.mean([c["dice_mean"] for c in zero["per_case"]])) if zero else None
            history: tuple | None = ()
            for rec in state["rounds"]:
                guard = rec.get("guard") or {}
                reverted = bool(guard.get("reverted"))
                ratios = [r for r in guard.get("volume_ratio_adapted") or [] if r == r]  # NaN: organ never labelled
                trained = guard.get("dice_discarded") if reverted else rec["dice_mean"]
                history = None if history is None or not rec.get("trained_ids") else (
                    history + ((tuple(rec["trained_ids"]), reverted),))
                if start is not None:
                    out.append({"fold": fold.name, "strategy": name, "seed": seed, "round": rec["round"],
                                "start": start, "trained": trained, "reverted": reverted,
                                "guarded": guard != {}, "min_ratio": min(ratios) if ratios else None,
                                "collapse_level": _collapse_level(guard),
                                "queried_dice": _queried_dice(rec), **_signals(rec, guard),
                                "history": history,
                                "n_test": len(rec.get("per_case") or ())})
                start = rec["dice_mean"]
    return out


def _collapse_level(guard: dict) -> float | None:
    """The guard's organ-collapse rule as one number per round: the smallest of its organs' `collapse_levels` (the
    round has a collapsed organ at floor F exactly when this is below F); None when the ratios were not recorded."""
    p, a = guard.get("volume_ratio_pretrained") or [], guard.get("volume_ratio_adapted") or []
    if not p or len(p) != len(a):
        return None
    levels = [v for v in collapse_levels(organ_shrink(p, a), a) if v == v]
    return min(levels) if levels else None


def _queried_dice(rec: dict) -> float | None:
    """Mean Dice of the previous round's model on this round's labels; None at round 0 (the pretrained model's) or
    when not recorded."""
    q = [v for v in (rec.get("queried_dice_before") or {}).values() if v is not None and v == v]
    return float(np.mean(q)) if q and rec.get("round", 0) > 0 else None


SIGNALS = {
    "plausibility_adapted": "the guard's anatomical plausibility of the adapted model on its unlabeled volumes",
    "plausibility_gain": "that plausibility minus the pretrained model's",
    "collapse_level": "the guard's organ-collapse level (`_collapse_level`)",
    "probe_change": "the stop probe's share of changed predictions on the pool since the previous round",
    "probe_min_agreement": "its smallest per-volume agreement with the previous round's model",
    "loss_final": "the training loss of the round's last steps",
    "temperature": "the dynamic temperature fitted after the round",
    "queried_dice": "the previous model's Dice on the round's labels (a label, not label-free: for comparison)",
}
"""The per-round readings ``--signals`` scores; each row of `round_outcomes` has them (None: not recorded)."""


def _signals(rec: dict, guard: dict) -> dict:
    probe = rec.get("probe") or {}
    agree = [v for v in (probe.get("agreement_per_case") or {}).values() if v == v]
    p0, p1 = guard.get("plausibility_pretrained"), guard.get("plausibility_adapted")
    return {"plausibility_adapted": p1, "plausibility_gain": None if p0 is None or p1 is None else p1 - p0,
            "probe_change": probe.get("change"), "probe_min_agreement": min(agree) if agree else None,
            "loss_final": rec.get("loss_final"), "temperature": rec.get("temperature")}


def auroc(scores: list[float], positive: list[bool]) -> float | None:
    """P(a positive's score > a negative's), ties counting half; None without both classes."""
    x, y = np.asarray(scores, dtype=float), np.asarray(positive, dtype=bool)
    pos, neg = x[y], x[~y]
    if not len(pos) or not len(neg):
        return None
    return float(np.mean([(p > neg).mean() + 0.5 * (p == neg).mean() for p in pos]))


def signal_table(by_folder: dict[str, list[dict]], drop: float) -> list[str]:
    """AUROC of each of `SIGNALS` for "harmful" (test Dice down by more than ``drop``), per folder and over all."""
    groups = {**by_folder, "all": [r for rows in by_folder.values() for r in rows]} if len(by_folder) > 1 \
        else dict(by_folder)
    lines = ["| signal (higher reads harmful) | " + " | ".join(groups) + " |", "|---" * (len(groups) + 1) + "|"]
    for key, what in SIGNALS.items():
        cells = []
        for rows in groups.values():
            known = [r for r in rows if r["trained"] is not None and r["guarded"] and r.get(key) is not None
                     and r[key] == r[key]]
            harm = [r["trained"] - r["start"] < -drop for r in known]
            a = auroc([r[key] for r in known], harm)
            cells.append(f"{a:.2f} ({sum(harm)}/{len(known)})" if a is not None else f"- ({sum(harm)}/{len(known)})")
        lines.append(f"| `{key}`: {what} | " + " | ".join(cells) + " |")
    return lines


def pool_identical(rows: list[dict]) -> list[dict]:
    """One row per distinct trained model: rows with the same ``history`` (the ordered ids each round trained on, and
    whether the guard discarded it, up to this round) trained identical weights in different folds, so their start and
    trained Dice are averaged over the union of their test volumes (weighted by ``n_test``); ``fold`` lists the folds.
    Rows without a history (records older than ``trained_ids``) or with an unknown outcome stay as they are."""
    groups: dict[tuple, list[dict]] = {}
    out = []
    for r in rows:
        if r.get("history") is None or r["trained"] is None or not r.get("n_test"):
            out.append(r)
        else:
            groups.setdefault(r["history"], []).append(r)
    for same in groups.values():
        w = np.array([r["n_test"] for r in same], dtype=float)
        out.append({**same[0], "fold": "+".join(r["fold"] for r in same),
                    "strategy": "/".join(sorted({r["strategy"] for r in same})),
                    "start": float(np.average([r["start"] for r in same], weights=w)),
                    "trained": float(np.average([r["trained"] for r in same], weights=w)), "n_test": int(w.sum())})
    return out


def table(rows: list[dict], drop: float) -> list[str]:
    known = [r for r in rows if r["trained"] is not None and r["guarded"]]
    harmful = [r for r in known if r["trained"] - r["start"] < -drop]
    reverted = [r for r in known if r["reverted"]]
    caught = [r for r in harmful if r["reverted"]]
    unknown = [r for r in rows if r["trained"] is None]
    lines = [f"rounds with the guard on: {len(known) + len(unknown)}; harmful (test Dice down by more than {drop}): "
             f"{len(harmful)}; discarded: {len(reverted)} (+{len(unknown)} discarded before dice_discarded was "
             "recorded: outcome unknown)",
             f"recall: {len(caught)}/{len(harmful)}" + (f" = {len(caught) / len(harmful):.2f}" if harmful else ""),
             f"precision: {len(caught)}/{len(reverted)}" + (f" = {len(caught) / len(reverted):.2f}" if reverted
                                                          else "")]
    for r in harmful + [r for r in reverted if r not in harmful]:
        lines.append(f"- {r['fold']} {r['strategy']} seed {r['seed']} round {r['round']}: {r['start']:.3f} -> "
                     f"{r['trained']:.3f} ({'discarded' if r['reverted'] else 'kept'})")
    return lines


def floor_table(rows: list[dict], drop: float, floors: list[float], key: str = "min_ratio") -> list[str]:
    """Recall and precision of "the guard, or an organ's ``key`` below F" for each F in ``floors``, over the
    guarded rounds of known outcome that recorded the ratios. ``key``: ``min_ratio`` (predicted over annotated
    volume) or ``collapse_level`` (`_collapse_level`: the guard's organ-collapse rule, F = `COLLAPSE_FLOOR`, decides
    rounds since it exists)."""
    known = [r for r in rows if r["trained"] is not None and r["guarded"] and r.get(key) is not None]
    if not known:
        return [f"no round recorded {key} yet"]
    harmful = [r for r in known if r["trained"] - r["start"] < -drop]
    lines = [f"rounds with {key} recorded: {len(known)}, harmful: {len(harmful)}",
             "| floor F | discarded | harmful caught (recall) | discarded that were harmful (precision) |",
             "|---|---|---|---|"]
    for f in floors:
        flagged = [r for r in known if r["reverted"] or r[key] < f]
        caught = [r for r in harmful if r in flagged]
        lines.append(f"| {f:g} | {len(flagged)} | {len(caught)}/{len(harmful)} | {len(caught)}/{len(flagged)} |")
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("folders", nargs="+", type=Path, help="asfda crossval output folders (one per pair)")
    ap.add_argument("--drop", type=float, default=0.02, help="a harmful round lowers the test Dice by more than this")
    ap.add_argument("--pool-identical", action="store_true",
                    help="judge each distinct trained model once, over the test volumes of every fold that trained it")
    ap.add_argument("--floors", default="0,0.3,0.5,0.7", help="organ volume-ratio floors to try (0: today's guard)")
    ap.add_argument("--query-floors", default="0.5,0.6",
                    help="floors on the previous model's Dice on the round's labels to try as a discard rule")
    ap.add_argument("--signals", action="store_true",
                    help="only the AUROC of each recorded label-free round signal for harmful rounds")
    args = ap.parse_args()
    if args.signals:
        by_folder = {}
        for folder in args.folders:
            rows = [r for fold in sorted(folder.glob("fold*")) if fold.is_dir() for r in round_outcomes(fold)]
            by_folder[str(folder)] = pool_identical(rows) if args.pool_identical else rows
        print("AUROC (harmful rounds / guarded rounds of known outcome):\n")
        print("\n".join(signal_table(by_folder, args.drop)))
        return
    floors, query_floors = ([float(f) for f in text.split(",")] for text in (args.floors, args.query_floors))
    for folder in args.folders:
        rows = [r for fold in sorted(folder.glob("fold*")) if fold.is_dir() for r in round_outcomes(fold)]
        if args.pool_identical:
            rows = pool_identical(rows)
        print(f"\n## {folder}\n")
        print("\n".join(table(rows, args.drop)))
        print()
        print("\n".join(floor_table(rows, args.drop, floors)))
        print("\nOrgan collapse (the collapse level: over the organs, the smallest max(shrink, predicted over "
              "annotated volume)) below F:\n")
        print("\n".join(floor_table(rows, args.drop, floors, "collapse_level")))
        print("\nThe previous model's Dice on the round's labels (rounds >= 1) below F:\n")
        print("\n".join(floor_table(rows, args.drop, query_floors, "queried_dice")))


if __name__ == "__main__":
    main()
