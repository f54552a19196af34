"""A cross-validation's folds read back from what `asfda.simulate.run_simulation` wrote in each (no model needed):
each test volume's Dice per strategy, seed and number labelled, zero-shot and the upper bound; and the
post-processing the cross-validation chooses per class (nnU-Net's rule)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from asfda.crossval.folds import fold_dir
from asfda.results import UPPER_BOUND, ZERO_SHOT, read_run

__all__ = ["METRICS", "POSTPROCESSING", "PROVENANCE", "ZERO_SHOT", "case_dice", "choose_postprocessing", "done_items",
           "provenance_lines", "ranges", "read_fold"]

METRICS = ("dice_mean", "lcc_dice_mean", "pp_dice_mean")
"""Case Dice read from the per-case rows: as predicted, after cutting each organ to its largest component, or after
cutting only the organs the cross-validation chose (`choose_postprocessing`: nnU-Net's rule)."""
POSTPROCESSING = "postprocessing.json"
PROVENANCE = "cv_provenance.json"
"""Per fold: one entry per invocation that computed something there (machine, commit, command, what)."""

Seeds = Mapping[str, Sequence[int]]
"""Per strategy, its seeds."""


def _classes(row: dict) -> list[str]:
    return [k[len("dice_"):] for k in row if k.startswith("dice_") and k != "dice_mean"]


def case_dice(row: dict, metric: str = "dice_mean", pp: Sequence[str] = ()) -> float:
    """A per-case row's Dice under ``metric``; ``pp_dice_mean``: the mean over classes of the Dice after cutting the
    classes in ``pp`` to their largest component, the others as predicted (NaN classes left out, as simulate does)."""
    if metric != "pp_dice_mean":
        return float(row.get(metric, math.nan))
    vals = [float(row.get(f"lcc_dice_{c}" if c in pp else f"dice_{c}", math.nan)) for c in _classes(row)]
    vals = [v for v in vals if not math.isnan(v)]
    return float(np.mean(vals)) if vals else math.nan


def _dice_by_case(per_case: list[dict], metric: str, pp: Sequence[str]) -> dict[str, float]:
    return {r["case_id"]: case_dice(r, metric, pp) for r in per_case}


def _states(out: Path, folds: int, seeds: Seeds):
    for k in range(folds):
        got = read_run(fold_dir(out, k), list(seeds))
        for name, ss in seeds.items():
            for seed in ss:
                yield got.states.get(name, {}).get(seed, {})


def choose_postprocessing(out: str | Path, folds: int, seeds: Seeds) -> dict:
    """nnU-Net's choice of post-processing by cross-validation, per class: cut a class to its largest connected
    component when that raises the class's mean Dice over every fine-tuned prediction of the cross-validation (each
    test volume in its fold, every strategy, seed and labelled count n >= 1; NaN Dice left out). Returns
    ``{"classes": [chosen], "per_class": {class: {"dice": x, "lcc_dice": y, "predictions": k}}, "rule", "predict"}``.
    """
    pairs: dict[str, list[tuple[float, float]]] = {}
    for st in _states(Path(out), folds, seeds):
        for rec in st.get("rounds", []):
            for row in rec.get("per_case") or []:
                for c in _classes(row):
                    a, b = float(row.get(f"dice_{c}", math.nan)), float(row.get(f"lcc_dice_{c}", math.nan))
                    if not (math.isnan(a) or math.isnan(b)):
                        pairs.setdefault(c, []).append((a, b))
    per_class = {c: {"dice": float(np.mean([v[0] for v in vals])), "lcc_dice": float(np.mean([v[1] for v in vals])),
                     "predictions": len(vals)} for c, vals in pairs.items()}
    chosen = [c for c, v in per_class.items() if v["lcc_dice"] > v["dice"]]
    return {"classes": chosen, "per_class": per_class,
            "rule": "largest component for a class when it raises the class's mean Dice over every fine-tuned "
                    "prediction of the cross-validation (nnU-Net's rule, per class)",
            "predict": f"asfda predict --largest-component {','.join(chosen)}" if chosen else "no post-processing"}


def read_fold(out: str | Path, seeds: Seeds, metric: str = "dice_mean", pp: Sequence[str] = (),
              zero_seeds: Sequence[int] | None = None, upper_seeds: Sequence[int] = ()) -> dict:
    """What fold folder ``out`` holds, straight from simulate's files.

    ``{"zero": {seed: {case: dice}}, "upper": {seed: {"dice": {case: dice}, "steps": int, "pool": [ids]}},
    "runs": {name: {seed: {n: {"dice": {case: dice}, "device": str | None, "round": int, "reverted": bool}}}},
    "config": run.json's config or {}}``. Case Dice under ``metric`` (`case_dice`). Zero-shot is read for
    ``zero_seeds`` (default: every strategy's seeds), the upper bound for ``upper_seeds``.
    """
    got = read_run(out, list(seeds))
    res: dict = {"zero": {}, "upper": {}, "runs": {n: {} for n in seeds}, "config": got.config}
    for seed in sorted({s for ss in seeds.values() for s in ss} if zero_seeds is None else set(zero_seeds)):
        zs = got.zero_shot.get(seed)
        if zs and zs.get("per_case"):
            res["zero"][seed] = _dice_by_case(zs["per_case"], metric, pp)
    for seed in upper_seeds:
        ub = got.upper_bound.get(seed)
        if ub and ub.get("per_case"):
            res["upper"][seed] = {"dice": _dice_by_case(ub["per_case"], metric, pp), "steps": ub.get("steps"),
                                  "pool": (ub.get("key") or {}).get("pool", [])}
    for name, ss in seeds.items():
        for seed in ss:
            st = got.states.get(name, {}).get(seed)
            if st:
                res["runs"][name][seed] = {
                    int(r["n_labelled"]): {"dice": _dice_by_case(r["per_case"], metric, pp), "device": r.get("device"),
                                           "round": r["round"],
                                           "reverted": bool((r.get("guard") or {}).get("reverted"))}
                    for r in st.get("rounds", []) if r.get("per_case")}
    return res


def done_items(out: Path, seeds: Seeds, upper_seeds: Sequence[int] = ()) -> set[str]:
    """The parts a fold folder holds, as ``zero_shot/seed0``, ``upper_bound/seed0``, ``asfda/seed1/n=3``."""
    got = read_fold(out, seeds, upper_seeds=upper_seeds)
    items = {f"{ZERO_SHOT}/seed{s}" for s in got["zero"]} | {f"{UPPER_BOUND}/seed{s}" for s in got["upper"]}
    items |= {f"{name}/seed{s}/n={n}" for name, by_seed in got["runs"].items() for s, by_n in by_seed.items()
              for n in by_n}
    return items


def ranges(ns: Sequence[int]) -> str:
    """``[1, 2, 3, 5]`` -> ``"1-3,5"``."""
    ns = sorted(ns)
    parts, i = [], 0
    while i < len(ns):
        j = i
        while j + 1 < len(ns) and ns[j + 1] == ns[j] + 1:
            j += 1
        parts.append(str(ns[i]) if i == j else f"{ns[i]}-{ns[j]}")
        i = j + 1
    return ",".join(parts)


def provenance_lines(got: dict, log: list[dict]) -> dict[str, str]:
    """Per strategy (and zero-shot, upper bound) of a fold read by `read_fold`: where each seed's rounds ran, from
    the devices simulate recorded per round and the machine lines logged in the fold's `PROVENANCE` file."""
    def who(item_prefix: str) -> str:
        hits = [e for e in log if any(c == item_prefix or c.startswith(item_prefix + "/") for c in e["computed"])]
        return "; ".join(sorted({f"{e['machine']}, commit {e['commit']}, {e['start'][:16]}" for e in hits}))

    def grouped(descr: dict[int, str]) -> str:
        by: dict[str, list[int]] = {}
        for s, d in descr.items():
            by.setdefault(d, []).append(s)
        return "; ".join(f"seed{'s' if len(ss) > 1 else ''} {','.join(map(str, ss))}: {d}" for d, ss in by.items())

    lines = {}
    for name, by_seed in got["runs"].items():
        descr = {}
        for s, by_n in by_seed.items():
            if not by_n:
                continue
            devices: dict[str, list[int]] = {}
            for n, rec in by_n.items():
                devices.setdefault(rec["device"] or "device not recorded", []).append(n)
            where = ", ".join(f"n={ranges(ns)} on {d}" for d, ns in sorted(devices.items()))
            logged = who(f"{name}/seed{s}")
            descr[s] = where + (f" [{logged}]" if logged else "")
        lines[name] = grouped(descr) or "nothing on disk"
    for name, key in ((ZERO_SHOT, "zero"), (UPPER_BOUND, "upper")):
        descr = {s: who(f"{name}/seed{s}") or "machine not recorded (simulate keeps no device for it)"
                 for s in got[key]}
        if descr:
            lines[name] = grouped(descr)
    return lines
