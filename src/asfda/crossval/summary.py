"""A cross-validation's summary, from the fold folders on disk (`asfda.crossval.read`): per test volume its Dice
per strategy and number labelled (mean over the strategy's seeds), per strategy the mean curve, its AUC
(`asfda.results.area_under_curve`) and the paired difference against random per test volume with a bootstrap
interval (`asfda.crossval.stats`); zero-shot, the upper bound, what is missing, and the single-label oracle."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

from asfda.crossval.folds import fold_dir, read_json
from asfda.crossval.read import PROVENANCE, ZERO_SHOT, Seeds, provenance_lines, ranges, read_fold
from asfda.crossval.stats import BOOTSTRAP_RESAMPLES, BOOTSTRAP_SEED, bootstrap_mean, curve_auc, paired_difference
from asfda.results import UPPER_BOUND

__all__ = ["RANDOM", "clean", "first_picks", "oracle_1", "pp_strategies", "read_utility_table", "summarize"]

RANDOM = "random"
"""The strategy every other one is compared with."""


def _mean(values: Iterable[float | None]) -> float | None:
    vals = [float(v) for v in values if v is not None and not math.isnan(float(v))]
    return float(np.mean(vals)) if vals else None


def clean(obj):
    """JSON without NaN (null instead), every key a string."""
    if isinstance(obj, float):
        return None if math.isnan(obj) else obj
    if isinstance(obj, dict):
        return {str(k): clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [clean(v) for v in obj]
    return obj


def read_utility_table(path: str | Path | None) -> dict[str, float]:
    """``single_label_utility.py``'s ``utility.json`` as ``{volume: utility}`` (NaN and missing left out; {} without a
    file)."""
    table = read_json(Path(path)) if path else None
    return {v: float(u) for v, u in ((table or {}).get("utility") or {}).items()
            if u is not None and not math.isnan(float(u))}


def oracle_1(path: str | Path | None, volumes: Sequence[str] = ()) -> dict | None:
    """What one label can do at best and on average, from a single-label utility table
    (``benchmarks/single_label_utility.py``'s ``utility.json``: per volume v, the mean Dice over the other volumes of
    the model fine-tuned on v alone minus their zero-shot Dice). ``best``: the highest utility, ``expected_random``:
    their mean (what a uniformly random first label gains on average). None without a table."""
    if not path:
        return None
    util = read_utility_table(path)
    if not util:
        return {"best": None, "expected_random": None, "source": str(path), "problem": "no utility table there"}
    best = max(util, key=lambda v: util[v])
    return {"best": util[best], "best_volume": best, "expected_random": float(np.mean(list(util.values()))),
            "volumes": len(util), "not_in_this_cv": sorted(set(util) - set(volumes)) if volumes else [],
            "source": str(path),
            "what": "gain of the mean Dice over zero-shot from 1 label, measured on every volume as that label "
                    "(tested on all the others): the best volume, and the mean over volumes (a random first label)"}


def first_picks(out: str | Path, assignment: Sequence[Sequence[str]], seeds: Seeds,
                utility: str | Path | None) -> dict | None:
    """Per strategy, each run's first labelled volume set against the single-label utility table (`oracle_1`'s): its
    utility, its rank in the fold's pool (1: the best) and the pool's median utility; and the counts the selection
    issue asks for: first picks below zero (harmful), and at or above the pool's median. None without a table."""
    util = read_utility_table(utility)
    if not util:
        return None
    cases = sorted({c for test in assignment for c in test})
    out_rows: dict[str, dict] = {}
    for name, ss in seeds.items():
        rows = []
        for k, test in enumerate(assignment):
            pool = sorted((set(cases) - set(test)) & set(util))
            for s in ss:
                state = read_json(fold_dir(Path(out), k) / name / f"seed{s}" / "state.json") or {}
                first = next((r.get("queried") or [] for r in state.get("rounds", []) if r.get("round") == 0), [])
                if not first or first[0] not in util or not pool:
                    continue
                ranked = sorted(pool, key=lambda v: -util[v])
                rows.append({"fold": k, "seed": s, "pick": first[0], "utility": util[first[0]],
                             "rank": ranked.index(first[0]) + 1 if first[0] in ranked else None,
                             "pool": len(pool), "pool_median": float(np.median([util[v] for v in pool]))})
        out_rows[name] = {"runs": rows, "below_zero": sum(r["utility"] < 0 for r in rows),
                          "at_or_above_median": sum(r["utility"] >= r["pool_median"] for r in rows)}
    return out_rows


def _fold(out: Path, k: int, test_ids: Sequence[str], ns: list[int], seeds: Seeds, upper_seeds: Sequence[int],
          vols: dict, missing: list[str], checks: dict, metric: str, pp: Sequence[str]) -> dict:
    """Reads fold ``k`` into ``vols`` (per volume: zero/upper per seed, runs per strategy, n and seed), adds what it
    lacks to ``missing``; returns the fold's entry of the summary (before its curves)."""
    fdir = fold_dir(out, k)
    zero_seeds = sorted({s for ss in seeds.values() for s in ss})
    got = read_fold(fdir, seeds, metric, pp, zero_seeds=zero_seeds, upper_seeds=upper_seeds)
    test_set = set(test_ids)
    warnings: list[str] = []
    for case in test_ids:
        vols[case] = {"fold": k, "zero": {}, "upper": {}, "runs": {name: {n: {} for n in ns} for name in seeds}}

    def usable(dice: dict[str, float], what: str) -> bool:
        if set(dice) == test_set:
            return True
        warnings.append(f"{what}: on disk for test cases {sorted(dice)}, not this fold's {sorted(test_set)}")
        return False

    for s in zero_seeds:
        z = got["zero"].get(s)
        if z is not None and usable(z, f"{ZERO_SHOT} seed{s}"):
            for c, d in z.items():
                vols[c]["zero"][s] = d
        else:
            missing.append(f"fold{k} {ZERO_SHOT} seed{s}")
    for name, ss in seeds.items():
        for s in ss:
            by_n = got["runs"][name].get(s, {})
            lacking = []
            for n in ns:
                rec = by_n.get(n)
                if rec is not None and usable(rec["dice"], f"{name} seed{s} n={n}"):
                    for c, d in rec["dice"].items():
                        vols[c]["runs"][name][n][s] = d
                else:
                    lacking.append(n)
            if lacking:
                missing.append(f"fold{k} {name} seed{s} n={ranges(lacking)}")
    for s in upper_seeds:
        ub = got["upper"].get(s)
        ok = ub is not None and usable(ub["dice"], f"{UPPER_BOUND} seed{s}")
        if ok and checks.get("upper_bound_steps") and ub["steps"] not in (None, checks["upper_bound_steps"]):
            warnings.append(f"{UPPER_BOUND} seed{s}: trained {ub['steps']} steps, not {checks['upper_bound_steps']}")
            ok = False
        if ok:
            for c, d in ub["dice"].items():
                vols[c]["upper"][s] = d
        else:
            missing.append(f"fold{k} {UPPER_BOUND} seed{s}")
    train = got["config"].get("train", {})
    for what in ("steps", "precision"):
        want, have = checks.get(what), train.get(what)
        if want is not None and have is not None and want != have:
            warnings.append(f"run.json (the last run of this fold) has train.{what}={have!r}, not {want!r}")
    log = (read_json(fdir / PROVENANCE) or {}).get("entries", [])
    ub_pool: list[str] = next((u["pool"] for u in got["upper"].values()), [])
    reverted = {name: sum(rec["reverted"] for by_n in got["runs"][name].values() for n, rec in by_n.items()
                          if n <= ns[-1]) for name in seeds}
    return {"test": list(test_ids), "upper_bound_pool": len(ub_pool) or None, "reverted": reverted,
            "provenance": provenance_lines(got, log),
            "runs": [{key: e[key] for key in ("machine", "commit", "start", "wall_s", "status")} for e in log],
            "config": {"steps": train.get("steps"), "precision": train.get("precision"),
                       "upper_bound_steps": got["config"].get("upper_bound_steps")} if train else {},
            "warnings": warnings}


def _volume_curves(vols: dict, seeds: Seeds, ns: list[int]) -> dict[str, dict[int, dict[str, float | None]]]:
    """Per strategy and n (0: zero-shot), each volume's Dice: the mean over the strategy's seeds."""
    return {name: {0: {c: _mean(v["zero"].values()) for c, v in vols.items()},
                   **{n: {c: _mean(v["runs"][name][n].values()) for c, v in vols.items()} for n in ns}}
            for name in seeds}


def zero_shot_by_seed(vols: dict, seeds: list[int]) -> dict[int, float | None]:
    """Per seed, the mean zero-shot Dice over every volume. The pretrained model's Dice does not depend on the seed,
    so a volume whose zero-shot file for a seed is missing (a partial run) counts with its value under the other
    seeds: the mean is then over the same volumes for every seed, not over whichever folds that seed reached."""
    def one(v: dict, s: int) -> float | None:
        got = v["zero"].get(s)
        return got if got is not None else _mean(v["zero"].values())
    return {s: _mean(one(v, s) for v in vols.values()) for s in seeds}


def _strategy(name: str, seeds: Seeds, vols: dict, ns: list[int], per_vol: dict, zero_by_seed: dict,
              resamples: int, seed: int) -> dict:
    cases = sorted(vols)
    per_seed = {s: {0: zero_by_seed.get(s), **{n: _mean(vols[c]["runs"][name][n].get(s) for c in cases) for n in ns}}
                for s in seeds[name]}
    mine = per_vol[name]
    # the mean over test volumes of each volume's mean over seeds: the mean of the per-seed curves once every seed
    # has run every fold, and not biased towards the folds a partial seed reached before then
    dice_by_n = {n: _mean(mine[n].values()) for n in [0, *ns]}
    ci = {n: (bootstrap_mean(list(mine[n].values()), resamples, seed) or {}).get("ci95") for n in [0, *ns]}
    entry = {"dice_by_n": dice_by_n, "auc": curve_auc(dice_by_n), "dice_ci95_by_n": ci,
             "dice_by_n_per_seed": per_seed, "auc_per_seed": {s: curve_auc(c) for s, c in per_seed.items()},
             "diff_vs_random": None, "auc_diff_vs_random": None}
    if name != RANDOM and RANDOM in per_vol:
        rnd = per_vol[RANDOM]
        entry["diff_vs_random"] = {n: paired_difference(mine[n], rnd[n], resamples, seed) for n in ns}

        def auc_by_volume(curves: dict) -> dict[str, float | None]:
            return {c: curve_auc({n: curves[n][c] for n in curves}) for c in cases}

        entry["auc_diff_vs_random"] = paired_difference(auc_by_volume(mine), auc_by_volume(rnd), resamples, seed)
    return entry


def summarize(out: str | Path, assignment: Sequence[Sequence[str]], *, seeds: Seeds, rounds: int, budget: int,
              upper_seeds: Sequence[int] = (), upper_bound_steps: int | None = None, steps: int | None = None,
              precision: str | None = None, metric: str = "dice_mean", pp: Sequence[str] = (),
              utility: str | Path | None = None, resamples: int = BOOTSTRAP_RESAMPLES, seed: int = BOOTSTRAP_SEED,
              command: str = "", machine_line: str = "", commit: str = "") -> dict:
    """Reads every fold folder ``out/fold<k>`` and returns the summary (nothing is written). Only files on disk are
    read: a fold, strategy, seed or n not run (yet) is listed under "missing" and "complete" is false; results on
    disk for other test cases than ``assignment`` says (another fold assignment) count as missing. ``steps`` /
    ``precision`` / ``upper_bound_steps``, when given, are checked against each fold's run.json (mismatches become
    warnings). Case Dice under ``metric`` (`asfda.crossval.read.case_dice`; ``pp`` the classes cut for
    ``pp_dice_mean``)."""
    out = Path(out)
    seeds = {name: list(ss) for name, ss in seeds.items()}
    ns = [budget * r for r in range(1, rounds + 1)]
    missing: list[str] = []
    vols: dict[str, dict] = {}
    checks = {"steps": steps, "precision": precision, "upper_bound_steps": upper_bound_steps}
    per_fold = {k: _fold(out, k, test_ids, ns, seeds, upper_seeds, vols, missing, checks, metric, pp)
                for k, test_ids in enumerate(assignment)}
    vols = dict(sorted(vols.items()))
    cases = list(vols)
    per_vol = _volume_curves(vols, seeds, ns)
    zero_by_seed = zero_shot_by_seed(vols, sorted({s for ss in seeds.values() for s in ss}))
    strategies = {name: _strategy(name, seeds, vols, ns, per_vol, zero_by_seed, resamples, seed) for name in seeds}
    for f in per_fold.values():
        test = f["test"]
        f["pool_size"] = len(cases) - len(test)
        f["zero_shot"] = _mean(_mean(vols[c]["zero"].values()) for c in test)
        f["upper_bound"] = _mean(_mean(vols[c]["upper"].values()) for c in test)
        f["strategies"] = {}
        for name in seeds:
            curve = {n: _mean(per_vol[name][n][c] for c in test) for n in [0, *ns]}
            f["strategies"][name] = {"dice_by_n": curve, "auc": curve_auc(curve),
                                     "rounds_discarded_by_guard": f["reverted"][name]}
        del f["reverted"]
    per_volume = {c: {"fold": v["fold"], "zero_shot": _mean(v["zero"].values()),
                      "upper_bound": _mean(v["upper"].values()),
                      **{name: {n: per_vol[name][n][c] for n in ns} for name in seeds}} for c, v in vols.items()}
    summary = {
        "folds": len(assignment), "seeds": seeds, "upper_bound_seeds": list(upper_seeds), "metric": metric,
        "budget": budget, "rounds": rounds,
        **({"postprocessing": list(pp)} if metric == "pp_dice_mean" else {}),
        "zero_shot": _mean(_mean(v["zero"].values()) for v in vols.values()),
        "upper_bound": _mean(_mean(vols[c]["upper"].get(s) for c in cases) for s in upper_seeds) if cases else None,
        "complete": not missing, "missing": missing,
        "strategies": strategies,
        "auc": "trapezoid area under mean Dice vs n over n = 0..N, divided by N (asfda.results.area_under_curve)",
        "bootstrap": {"resamples": resamples, "seed": seed, "unit": "test volume", "interval": "percentile 95%"},
        "oracle_1": oracle_1(utility, cases), "first_picks": first_picks(out, assignment, seeds, utility),
        "per_fold": per_fold, "per_volume": per_volume,
        "machine": machine_line, "commit": commit, "command": command,
        "date": datetime.now(UTC).isoformat(timespec="minutes"),
    }
    return clean(summary)


def pp_strategies(pp_summary: Mapping) -> dict:
    """The curves and AUCs of a ``pp_dice_mean`` summary, for the plain summary's ``postprocessing`` entry."""
    return {name: {"dice_by_n": s["dice_by_n"], "auc": s["auc"], "diff_vs_random": s["diff_vs_random"]}
            for name, s in pp_summary["strategies"].items()}
