"""Does selective semi-supervision pay, and how good is what it trains on? Semi on against off, picks fixed.

Reads two ``asfda crossval`` folders made with the same folds, strategy and seeds (random's picks depend on the seed
and the pool alone, so both arms label the same volumes round for round): ``--off`` (the decisive run) and ``--on``
(the same command with ``--set semi.enabled=true``). Per number of labels: the mean test Dice of either arm, their
paired difference per test volume and seed with its bootstrap 95% interval (`asfda.crossval.stats.paired_difference`),
and what the semi arm trained on (its reliable volumes: how many, their pseudo-labels' Dice against the true labels,
whole and over the voxels kept by the confidence mask, per organ; `asfda.training.pseudo_label_quality`, recorded in
each round's ``reliable``).

Either arm may be several folders (folds made at different commits): a round of the on arm is paired with the first
off folder's round of the same fold, seed and number of labels that had the same labelled volumes; a
round with no such partner is left out and named on stderr, so a changed draw can never pair different picks.
Pairs are made on the labels (``queried``), not on what the rounds trained: a guard decision that differs between
the arms stays in the comparison.

    python benchmarks/semi_quality.py --off benchmarks/results/semi/ct_to_mr_off \\
        --on benchmarks/results/semi/ct_to_mr --strategy random
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from asfda.crossval.stats import paired_difference
from asfda.results import read_run


def rounds_by_key(folder: Path, strategy: str) -> dict[tuple[str, int, int], dict]:
    """(fold, seed, n labelled) -> the round record, over every ``fold<k>/`` of a crossval folder."""
    out = {}
    for fold in sorted(p for p in folder.glob("fold*") if p.is_dir()):
        run = read_run(fold, strategies=[strategy])
        for seed, state in run.states.get(strategy, {}).items():
            labelled: list[str] = []
            for rec in state.get("rounds", []):
                labelled += rec.get("queried") or []
                out[(fold.name, seed, rec["n_labelled"])] = {**rec, "labelled_ids": sorted(labelled)}
    return out


def match_off(on: dict, offs: list[dict]) -> tuple[dict, list[tuple[str, int, int]]]:
    """The off arm's round for each on round: the first of ``offs`` (folders in the order given) with the same key
    whose labels so far (``labelled_ids``: every round's ``queried``, up to this one) are the same; also the on keys
    with no such round. The labels, not ``trained_ids``: what each arm then trains on (the guard may discard a round
    in one arm and hold its label back) is part of that arm's outcome, so pairing on it would leave out exactly the
    rounds where semi-supervision changed what happened."""
    out, missing = {}, []
    for key, rec in on.items():
        same = [o[key] for o in offs if key in o and o[key].get("labelled_ids") == rec.get("labelled_ids")]
        if same:
            out[key] = same[0]
        else:
            missing.append(key)
    return out, missing


def _quality(rec: dict) -> dict[str, float]:
    """Mean over a round's reliable volumes of each recorded quality figure, and their count."""
    vols = [v for v in (rec.get("reliable") or {}).values() if "pseudo_dice" in v]
    keys = sorted({k for v in vols for k in v if k.startswith(("pseudo_dice", "kept_fraction"))})
    out = {"reliable": float(len(rec.get("reliable") or {}))}
    out.update({k: float(np.nanmean([v.get(k, np.nan) for v in vols])) for k in keys} if vols else {})
    return out


def _per_volume(arm: dict, keys: list[tuple[str, int, int]]) -> dict[str, float]:
    """``{"fold/seed/case": test Dice}`` of one arm's rounds ``keys``."""
    return {f"{k[0]}/{k[1]}/{c['case_id']}": c["dice_mean"] for k in keys for c in arm[k]["per_case"]}


def compare(off: dict, on: dict) -> list[dict]:
    """One row per number of labels that both arms reached on some (fold, seed)."""
    rows = []
    for n in sorted({k[2] for k in on} & {k[2] for k in off}):
        keys = sorted(k for k in on if k[2] == n and k in off)
        nothing: dict = {"mean": np.nan, "ci95": [np.nan, np.nan]}
        diff = paired_difference(_per_volume(on, keys), _per_volume(off, keys)) or nothing
        qual = [_quality(on[k]) for k in keys]
        names = sorted({q for d in qual for q in d})
        rows.append({"n": n, "pairs": len(keys), "off": float(np.mean([off[k]["dice_mean"] for k in keys])),
                     "on": float(np.mean([on[k]["dice_mean"] for k in keys])), "diff": diff["mean"],
                     "ci": tuple(diff["ci95"]), **{q: float(np.nanmean([d.get(q, np.nan) for d in qual]))
                                                   for q in names}})
    return rows


def table(rows: list[dict]) -> list[str]:
    organs = sorted({k for r in rows for k in r if k.startswith("pseudo_dice:")})
    head = ["n", "runs", "off", "semi on", "on - off [95% CI]", "reliable", "pseudo Dice", "masked", "kept",
            *[o.split(":", 1)[1] for o in organs]]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [str(r["n"]), str(r["pairs"]), f"{r['off']:.4f}", f"{r['on']:.4f}",
                 f"{r['diff']:+.4f} [{r['ci'][0]:+.4f}, {r['ci'][1]:+.4f}]", f"{r.get('reliable', 0):.1f}",
                 *[f"{r.get(k, float('nan')):.3f}" for k in ("pseudo_dice", "pseudo_dice_masked", "kept_fraction")],
                 *[f"{r.get(o, float('nan')):.3f}" for o in organs]]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def per_round(off: dict, on: dict) -> list[str]:
    """One line per paired round: its labels, either arm's test Dice, and the guard's decision where it discarded
    the round in either arm (with the discarded weights' Dice, ``guard.dice_discarded``, where recorded)."""
    lines = []
    for key in sorted(k for k in on if k in off):
        notes = []
        for arm, rec in (("off", off[key]), ("on", on[key])):
            guard = rec.get("guard") or {}
            lost = guard.get("dice_discarded")
            if guard.get("reverted"):
                notes.append(f"{arm}: discarded by the guard" + (f" (its weights {lost:.3f})" if lost else "")
                             + ("; its labelled half failed too" if guard.get("labelled_half") else ""))
            elif guard.get("semi_discarded"):
                notes.append(f"{arm}: the guard kept the labelled half, discarded the pseudo-labelled one"
                             + (f" (whose weights {lost:.3f})" if lost else ""))
        lines.append(f"- {key[0]} seed {key[1]} n={key[2]} (+{', '.join(on[key].get('queried') or [])}): "
                     f"{off[key]['dice_mean']:.3f} -> {on[key]['dice_mean']:.3f}" + (f"; {'; '.join(notes)}"
                                                                                   if notes else ""))
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--off", type=Path, nargs="+", required=True,
                    help="crossval folder(s) with semi-supervision off (first match wins)")
    ap.add_argument("--on", type=Path, nargs="+", required=True,
                    help="the same folds and seeds with semi.enabled=true (folders with disjoint folds)")
    ap.add_argument("--strategy", default="random", help="the strategy both arms ran (default: random)")
    args = ap.parse_args()
    on = {k: v for folder in args.on for k, v in rounds_by_key(folder, args.strategy).items()}
    off, missing = match_off(on, [rounds_by_key(folder, args.strategy) for folder in args.off])
    for key in missing:
        print(f"no off round trained the same volumes as on {key}: left out", file=sys.stderr)
    paired = {k: v for k, v in on.items() if k in off}
    print("\n".join(table(compare(off, paired)) + ["", "Per round (test Dice, off -> on):"] + per_round(off, paired)))


if __name__ == "__main__":
    main()
