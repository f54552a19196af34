"""Each selection rule's first pick in every fold of a cross-validation, against the single-label utility table.

The first label is where a bad pick costs most (pair 2's btcv_014 drops the model below zero-shot) and it needs no
training to find: a round-0 `asfda query` on each fold's pool. Forward outputs are cached per volume, so after the
first fold the others cost seconds; every rule reads the same cached passes. With ``--utility`` (the table of
`single_label_utility.py`) each pick gets its utility, its rank in the fold's pool and the pool's median: the
selection issue's "first pick never below zero, at or above the median", for any rule, without a benchmark run.

    python benchmarks/first_picks.py --model ../shared/models/mr_abdomen_unet --data ../shared/data/ct_btcv4 \\
        --folds 6 --utility benchmarks/results/single_label_utility/mr_to_ct/utility.json \\
        --out benchmarks/results/selection/first_picks_mr_to_ct.json

Rules: ``name=strategy[:setting=value,...]``; the default set is asfda with each representativeness term, and the
paper's baselines that need no extra passes (ENPY, coreset, BADGE).
"""

from __future__ import annotations

import argparse
import json
import tempfile
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

from _machine import code_version, machine
from asfda.crossval.folds import fold_assignment, fold_datasets_root, make_fold_datasets
from asfda.crossval.summary import read_utility_table
from asfda.io import atomic_write_json, load_dataset

RULES = ["asfda-density=asfda:representativeness=density", "asfda-typical=asfda:representativeness=typical",
         "asfda-complete=asfda:representativeness=complete", "asfda-method=asfda:representativeness=none",
         "enpy=enpy", "coreset=coreset", "badge=badge"]


def parse_rule(text: str) -> tuple[str, str, dict[str, object]]:
    """``name=strategy[:key=value,...]`` -> (name, strategy, settings)."""
    name, _, rest = text.partition("=")
    strategy, _, opts = rest.partition(":")
    settings: dict[str, object] = {}
    for kv in (kv for kv in opts.split(",") if kv):
        key, _, value = kv.partition("=")
        try:
            settings[key] = float(value)  # alpha
        except ValueError:
            settings[key] = value
    if not name or not strategy:
        raise SystemExit(f"a rule is name=strategy[:key=value,...], got {text!r}")
    return name, strategy, settings


def first_pick(model: str, pool: Path, strategy: str, settings: dict[str, object], *, cache_dir: str, device: str,
               precision: str) -> str:
    from asfda.query import query_dataset

    with tempfile.TemporaryDirectory() as tmp:
        run = query_dataset(model, pool, strategy, 1, Path(tmp) / "query.json", cache_dir=cache_dir, device=device,
                            progress=False, precision=precision, **settings)  # type: ignore[arg-type]
        assert run is not None
        return str(run.ids[0])


def annotate(pick: str, pool: list[str], util: dict[str, float]) -> dict:
    """The pick's utility, rank among the pool volumes in the table (1: best) and the pool's median utility."""
    known = sorted((v for v in pool if v in util), key=lambda v: -util[v])
    if pick not in known:  # not in the table, or not in this pool
        return {"pick": pick}
    return {"pick": pick, "utility": util[pick], "rank": known.index(pick) + 1, "of": len(known),
            "pool_median": float(np.median([util[v] for v in known]))}


def table(rows: dict[str, list[dict]]) -> list[str]:
    lines = ["| rule | first picks (fold 0..K-1) | below zero | at or above the pool's median | mean rank |",
             "|---|---|---|---|---|"]
    for name, picks in rows.items():
        rated = [p for p in picks if "utility" in p]
        below = sum(p["utility"] < 0 for p in rated)
        above = sum(p["utility"] >= p["pool_median"] for p in rated)
        rank = f"{np.mean([p['rank'] for p in rated]):.1f}" if rated else "–"
        lines.append(f"| {name} | {', '.join(p['pick'] for p in picks)} | {below}/{len(rated)} | "
                     f"{above}/{len(rated)} | {rank} |")
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--data", required=True, type=Path)
    ap.add_argument("--folds", type=int, required=True)
    ap.add_argument("--fold-seed", type=int, default=0)
    ap.add_argument("--rules", default=";".join(RULES), help="';'-separated rules (see the module docstring)")
    ap.add_argument("--utility", type=Path, help="single_label_utility.py's utility.json")
    ap.add_argument("--out", type=Path, required=True, help="JSON of every pick (a .md table is written beside it)")
    ap.add_argument("--cache-dir", default=".cache")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--precision", default="fp32", help="inference precision of the scoring passes")
    ap.add_argument("--rerate", type=Path, help="an earlier --out JSON: rate its picks against --utility again, no "
                    "query (a utility table that grew since)")
    args = ap.parse_args()
    ids = sorted(c.case_id for c in load_dataset(args.data, require_labels=True).cases)
    assignment = fold_assignment(ids, args.folds, args.fold_seed)
    util = read_utility_table(args.utility)
    rows: dict[str, list[dict]] = {}
    if args.rerate:
        earlier = json.loads(args.rerate.read_text(encoding="utf-8"))
        rows = {name: [{"fold": p["fold"], **annotate(p["pick"], [i for i in ids if i not in assignment[p["fold"]]],
                                                      util)} for p in picks]
                for name, picks in earlier["rules"].items()}
        args.rules = ""
    else:
        dirs = make_fold_datasets(args.data, assignment, fold_datasets_root(args.cache_dir, args.data, args.folds,
                                                                             args.fold_seed))
    for name, strategy, settings in (parse_rule(r) for r in args.rules.split(";") if r):
        for k, test in enumerate(assignment):
            pool = [i for i in ids if i not in test]
            pick = first_pick(args.model, dirs[k][0], strategy, settings, cache_dir=args.cache_dir,
                              device=args.device, precision=args.precision)
            rows.setdefault(name, []).append({"fold": k, **annotate(pick, pool, util)})
            print(f"{name} fold {k}: {pick}", flush=True)
    record = {"rules": rows, "folds": assignment, "utility": str(args.utility) if args.utility else None,
              "command": "python benchmarks/first_picks.py " + " ".join(f"--{k.replace('_', '-')} {v}" for k, v in
                                                                          vars(args).items() if v is not None),
              "machine": machine(), "commit": code_version(),
              "date": datetime.now(UTC).isoformat(timespec="minutes")}
    atomic_write_json(args.out, record)
    md = "\n".join([f"Command: `{record['command']}`  ",
                    f"Machine: {record['machine']}, commit {record['commit']}, {record['date']}", "", *table(rows), ""])
    args.out.with_suffix(".md").write_text(md, encoding="utf-8")
    print(md)


if __name__ == "__main__":
    main()
