"""What a second label teaches after a given first one: the 2-label oracle of the selection issue.

The single-label table (`single_label_utility.py`) judges a rule's first pick; this judges its second. Given the
first label A (a rule's first pick), the pretrained model is fine-tuned on A alone with the cross-validated run's
round-0 recipe (``--steps`` bf16 steps, batch 2, training seed 0), then, for every other volume B, fine-tuned on
[A, B] from that model with round 1's recipe (training seed 1; rounds continue from the previous round's weights, as
`asfda simulate` does with ``train.restart`` off). Each model is tested on every volume except the labels it saw.
B's *pair utility* = mean over the volumes other than A and B of Dice(A + B) - Dice(A alone): what B adds as the
second label. The table gives the oracle of the second pick (the best B) and what a uniformly random second pick
is expected to add (the mean over B), against which a rule's second pick (its round-1 query after A) is rated.

    python benchmarks/pair_utility.py --model ../shared/models/ct_abdomen_unet --data ../shared/data/mr_chaos_t2 \\
        --first chaos_031 --out benchmarks/results/pair_utility/ct_to_mr_031 --threads 1

With ``--rules`` (``name=strategy[:setting=value,...]``, as `first_picks.py` takes them) each rule's second pick is
made as the cross-validated run makes round 1's query (the first model's scores of every volume but A, A labelled,
query seed 1) and rated against the table (``second_picks`` in the summary): its pair utility and rank.

Resumable: the first model is saved (``OUT/first.safetensors``, with its test Dice in ``OUT/first.json``) and each
pair's test Dice in ``OUT/pairs/<B>.json``; ``--only`` fine-tunes just those B. Writes ``OUT/pair_utility.json``
and ``OUT/README.md`` with the command, machine, commit and date.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

from _machine import code_version, machine
from asfda.io import atomic_write_json, atomic_write_text, load_dataset
from single_label_utility import add_fine_tune_args


def pair_utility(first: dict[str, float], pair: dict[str, float]) -> float:
    """Mean over the volumes both rows tested (NaN left out) of the pair model's Dice minus the first model's."""
    gains = [d - first[c] for c, d in pair.items()
             if c in first and not (math.isnan(d) or math.isnan(first[c]))]
    return float(np.mean(gains)) if gains else math.nan


def summarize(first_id: str, first: dict[str, float], pairs: dict[str, dict[str, float]]) -> dict:
    """``{"utility": {B: pair utility}, "best", "expected_random", "rank"}``: the table and its oracle (the best
    second volume) and the expected gain of a uniformly random second volume (the mean over the measured B)."""
    util = {b: pair_utility(first, rows) for b, rows in pairs.items()}
    finite = {b: u for b, u in util.items() if not math.isnan(u)}
    order = sorted(finite, key=lambda b: (-finite[b], b))
    return {"first": first_id, "utility": util,
            "best": {"id": order[0], "utility": finite[order[0]]} if order else None,
            "expected_random": float(np.mean(list(finite.values()))) if finite else math.nan,
            "rank": {b: k + 1 for k, b in enumerate(order)},
            "first_mean_dice": float(np.nanmean(list(first.values()))) if first else math.nan}


def _read(path: Path) -> list[dict]:
    return json.loads(path.read_text(encoding="utf-8"))["per_case"]


def _dice_rows(rows: list[dict]) -> dict[str, float]:
    return {r["case_id"]: float(r["dice_mean"]) for r in rows}


def rate_picks(picks: dict[str, str], summary: dict) -> dict[str, dict]:
    """Per rule: its second pick with the pick's pair utility and rank in ``summary``'s table (None: unmeasured)."""
    return {rule: {"pick": b, "utility": summary["utility"].get(b), "rank": summary["rank"].get(b)}
            for rule, b in picks.items()}


def _adapter(args: argparse.Namespace):
    import torch

    from asfda.adapter import Adapter
    from asfda.models import load_model

    if args.threads > 0:
        torch.set_num_threads(args.threads)
    ds = load_dataset(args.data, require_labels=True)
    return ds, Adapter(load_model(args.model), ds.class_names, cache_dir=args.cache_dir, device=args.device,
                       progress=False)


def second_picks(args: argparse.Namespace, rules: list[str]) -> dict[str, str]:
    """Each rule's round-1 pick after the first label: the first model's scores of every other volume (A labelled;
    temperature fitted on A, as a round does), query seed 1 (the cross-validated run's round 1 of seed 0)."""
    from safetensors.torch import load_file

    from asfda.rounds import select_batch
    from asfda.selection import build_strategy
    from first_picks import parse_rule

    ds, adapter = _adapter(args)
    adapter.load_current_state(load_file(str(args.out / "first.safetensors")))
    by_id = ds.by_id()
    pool = [c for c in ds.cases if c.case_id != args.first]
    picks = {}
    for text in rules:
        name, strategy, settings = parse_rule(text)
        strat = build_strategy(strategy, **settings)  # type: ignore[arg-type]
        picks[name] = select_batch(adapter, strat, [by_id[args.first]], pool, 1, 1, 1).query.ids[0]
    return picks


def run_pairs(args: argparse.Namespace) -> None:
    """Fine-tunes (or reads back) the first model and every requested pair model; writes their test Dice."""
    from safetensors.torch import load_file, save_file

    from asfda.config import SemiConfig
    from asfda.training import TrainConfig

    ds, adapter = _adapter(args)
    by_id = ds.by_id()
    out: Path = args.out
    train = TrainConfig(steps=args.steps, batch_size=2, precision=args.precision, guard=False)
    semi = SemiConfig()
    first_w, first_json = out / "first.safetensors", out / "first.json"
    if first_w.is_file() and first_json.is_file():
        adapter.load_current_state(load_file(str(first_w)))
    else:
        print(f"fine-tune on {args.first} alone", file=sys.stderr, flush=True)
        adapter.train_round([by_id[args.first]], [], replace(train, seed=0), semi, 1.0, desc=args.first)
        rows = adapter.evaluate([c for c in ds.cases if c.case_id != args.first])
        save_file(adapter.current_state(), str(first_w))
        atomic_write_json(first_json, {"first": args.first, "steps": args.steps, "per_case": rows})
    start = adapter.current_state()
    todo = [b.strip() for b in args.only.split(",")] if args.only else sorted(i for i in by_id if i != args.first)
    for b in todo:
        path = out / "pairs" / f"{b}.json"
        if path.is_file():
            continue
        print(f"fine-tune on {args.first} + {b}", file=sys.stderr, flush=True)
        adapter.load_current_state(start)
        adapter.train_round([by_id[args.first], by_id[b]], [], replace(train, seed=1), semi, 1.0,
                            desc=f"{args.first}+{b}")
        rows = adapter.evaluate([c for c in ds.cases if c.case_id not in (args.first, b)])
        atomic_write_json(path, {"first": args.first, "second": b, "steps": args.steps, "per_case": rows})


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--data", required=True)
    ap.add_argument("--first", required=True, help="the first label's volume id (a rule's first pick)")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--only", help="comma-separated second volumes to fine-tune on here (the rest read from disk)")
    add_fine_tune_args(ap)
    ap.add_argument("--rules", nargs="*", default=[],
                    help="rate these rules' second picks (name=strategy[:key=value,...]; first_picks.py's form)")
    args = ap.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    if not args.summarize_only:
        run_pairs(args)
    first = _dice_rows(_read(args.out / "first.json"))
    pairs = {p.stem: _dice_rows(_read(p)) for p in sorted((args.out / "pairs").glob("*.json"))}
    n_pool = len(load_dataset(args.data, require_labels=True).cases) - 1
    summary = {**summarize(args.first, first, pairs), "measured": len(pairs), "of": n_pool, "steps": args.steps,
               "precision": args.precision,
               "command": "python " + " ".join(["benchmarks/pair_utility.py",
                                                *(sys.argv[1:] if argv is None else argv)]),
               "machine": machine(), "commit": code_version(), "date": datetime.now(UTC).isoformat(timespec="minutes")}
    if args.rules:
        summary["second_picks"] = rate_picks(second_picks(args, args.rules), summary)
    atomic_write_json(args.out / "pair_utility.json", summary)
    atomic_write_text(args.out / "README.md", readme(summary))
    print((args.out / "README.md").read_text())
    return summary


def readme(s: dict) -> str:
    lines = [f"# What a second label adds after {s['first']}", "",
             f"Command: `{s['command']}`  ", f"Machine: {s['machine']}  ", f"Code: {s['commit']}  ",
             f"Date: {s['date']}  ",
             f"Second volumes measured: {s['measured']} of {s['of']} ({s['steps']} steps, {s['precision']}, batch 2, "
             "guard off; the first model trained on the first volume alone, each pair model continued from it)", "",
             f"{s['first']} alone: mean Dice {s['first_mean_dice']:.3f} over the other volumes. Pair utility = mean "
             f"over the volumes other than both labels of Dice({s['first']} + B) - Dice({s['first']} alone). "
             f"Expected for a uniformly random second volume: {s['expected_random']:+.4f}"
             + (f"; the best: {s['best']['id']} {s['best']['utility']:+.4f}." if s["best"] else "."), "",
             "| second volume | pair utility | rank |", "|---|---|---|"]
    for b in sorted(s["utility"], key=lambda v: s["rank"].get(v, 10**6)):
        u = s["utility"][b]
        lines.append(f"| {b} | {u:+.4f} | {s['rank'].get(b, '-')} |")
    if s.get("second_picks"):
        lines += ["", f"Second picks after {s['first']} (round 1's query with the first model, seed 1):", "",
                  "| rule | second pick | its pair utility | its rank |", "|---|---|---|---|"]
        for rule, r in s["second_picks"].items():
            u = "-" if r["utility"] is None else f"{r['utility']:+.4f}"
            lines.append(f"| {rule} | {r['pick']} | {u} | {r['rank'] or '-'} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
