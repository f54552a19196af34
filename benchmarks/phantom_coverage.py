"""Sub-population coverage of a query on the phantom target pool: asfda vs ENPY top-k (and others).

The phantom target pool mixes sub-populations (``target/phantom_meta.json``: case id -> {"subgroup"}):
a common majority and rare ones (rare protocol, enlarged liver, missing kidney, lesions). A batch that
covers more of them gives the fine-tuning more of the target domain's variety. This script scores the
pool once with the shipped phantom model (via `Adapter.pool_scores`) and, for each budget and seed, draws
a seeded sub-pool (``--subpool`` of the cases) and counts the distinct subgroups each strategy's batch
covers; "[whole pool]" uses every case. Repeated for several phantom generation seeds (different pools).

``--round 0`` (default): the first query, zero-shot, T = 1. ``--round 1``: the second query, after
fine-tuning on ``--labels`` seeded-random pool volumes (the demo's recipe: 60 steps, batch 2, lr 1e-3)
with T fitted on them; the labelled volumes leave the pool and anchor the diversity terms.

    .venv/bin/python benchmarks/phantom_coverage.py [--round 0|1] [--n-target 120]
        [--data-seeds 0 1 2 3 4 5 6 7 8] [--seeds 0 1 2 3 4] [--tta] [--mc] [--out ...]

Runs on one intra-op thread (on a shared 2-core machine two threads were ~5x slower).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch

from _machine import cpu_model
from asfda.adapter import Adapter
from asfda.demo import phantom_model_path
from asfda.io import load_dataset
from asfda.models import load_model
from asfda.phantom import generate_benchmark
from asfda.selection import DIVERSITY_SPACES, ROUND0_GAPS, PoolScores, ScoringNeeds, build_strategy
from asfda.training import TrainConfig

# one forward pass each (two once adapted); "asfda" is the package default (diversity in METHOD.md's pooled
# bottleneck embedding space), "asfda[anatomy]" picks in the anatomy-composition space, "asfda[none]" has no
# diversity term (the top-k of its rank score: what the diversity term adds), "asfda[norm_kl]" uses
# round0_gap=norm_kl
BASE_STRATEGIES = ["asfda", "asfda[anatomy]", "asfda[none]", "asfda[norm_kl]", "enpy", "asd", "coreset", "badge",
                   "random"]
MC_STRATEGIES = ["mc_entropy", "bald"]
ROUND1_TRAIN = TrainConfig(steps=60, batch_size=2, lr=1e-3)  # the demo's recipe


def strategy_of(label: str):
    """``name`` or ``name[option,...]``: options are a round-0 gap or a diversity space (asfda only)."""
    name, _, opts = label.partition("[")
    kwargs: dict[str, Any] = {}
    for opt in filter(None, opts.rstrip("]").split(",")):
        if opt in ROUND0_GAPS:
            kwargs["round0_gap"] = opt
        elif opt in DIVERSITY_SPACES:
            kwargs["diversity"] = opt
        else:
            raise ValueError(f"unknown option {opt!r} in {label!r}")
    return build_strategy(name, **kwargs)


def subset(pool: PoolScores, keep: list[int]) -> PoolScores:
    return PoolScores([pool.ids[i] for i in keep], {k: np.asarray(v)[keep] for k, v in pool.metrics.items()},
                      np.asarray(pool.embeddings)[keep], pool.labelled_embeddings,
                      None if pool.embeddings0 is None else np.asarray(pool.embeddings0)[keep], pool.round_index,
                      {k: np.asarray(v)[keep] for k, v in pool.vectors.items()}, pool.labelled_vectors)


def score_phantom_pool(data_dir: Path, n_target: int, data_seed: int, strategies: list[str], progress: bool = False,
                       round_index: int = 0, n_labels: int = 2) -> tuple[PoolScores, dict[str, str], dict]:
    """Generates (or reuses) the phantom benchmark and scores its target pool for ``strategies``: zero-shot
    (``round_index`` 0) or after fine-tuning on ``n_labels`` seeded-random volumes (1), which leave the pool.
    Returns the scores, case id -> subgroup (every case) and timings (plus the labelled ids)."""
    t0 = time.perf_counter()
    paths = generate_benchmark(data_dir, seed=data_seed, n_source=1, n_target=n_target)
    t_gen = time.perf_counter() - t0
    meta = json.loads((paths["target"] / "phantom_meta.json").read_text())
    subgroup = {cid: m["subgroup"] for cid, m in meta.items()}
    ds = load_dataset(paths["target"])
    adapter = Adapter(load_model(phantom_model_path()), ds.class_names, cache_dir=str(Path(data_dir) / "cache"),
                      device="cpu", progress=progress)
    needs = ScoringNeeds.union([strategy_of(s).needs for s in strategies])
    cases, labelled = list(ds.cases), []
    t1 = time.perf_counter()
    if round_index == 0:
        pool = adapter.pool_scores(cases, [], 1.0, 0, None, needs=needs, seed=0)
        t_train = 0.0
    else:
        pick = set(np.random.default_rng(500 + data_seed).permutation(len(cases))[:n_labels].tolist())
        labelled = [c for i, c in enumerate(cases) if i in pick]
        adapter.finetune(labelled, TrainConfig(**{**ROUND1_TRAIN.__dict__, "seed": data_seed}))
        t_train = time.perf_counter() - t1
        temp, anchors = adapter.fit_temperature(labelled, 1.0, data_seed)
        rest = [c for i, c in enumerate(cases) if i not in pick]
        pool = adapter.pool_scores(rest, labelled, temp.temperature, 1, anchors, needs=needs, seed=0)
    return pool, subgroup, {"generate_s": t_gen, "train_s": t_train,
                            "score_s": time.perf_counter() - t1 - t_train, "labelled": [c.case_id for c in labelled]}


def coverage_table(pool: PoolScores, subgroup: dict[str, str], strategies: list[str], budgets: list[int],
                   seeds: list[int], subpool: float) -> dict:
    """strategy -> budget -> seed ("full" or int) -> (n subgroups covered, picked subgroups)."""
    out: dict = {s: {b: {} for b in budgets} for s in strategies}
    n = len(pool.ids)
    every: list[str | int] = ["full", *seeds]
    for seed in every:
        if isinstance(seed, str):  # "full": the whole pool
            sub, sel_seed = pool, 0
        else:
            keep = sorted(np.random.default_rng(1000 + seed).permutation(n)[: int(round(subpool * n))].tolist())
            sub, sel_seed = subset(pool, keep), seed
        for name in strategies:
            strat = strategy_of(name)
            for b in budgets:
                q = strat.select(sub, b, sel_seed)
                groups = [subgroup[i] for i in q.ids]
                out[name][b][seed] = (len(set(groups)), groups)
    return out


def separation(vectors: np.ndarray, ids: list[str], subgroup: dict[str, str]) -> tuple[float, float, float]:
    """In one space (cosine distance): mean pairwise distance within a subgroup, between subgroups, and the
    fraction of volumes whose nearest neighbour is in their own subgroup."""
    from asfda.scoring.metrics import cosine_distance

    x = torch.as_tensor(np.asarray(vectors), dtype=torch.float64)
    d = cosine_distance(x, x).numpy()
    g = np.array([subgroup[i] for i in ids])
    same = g[:, None] == g[None, :]
    off_diag = ~np.eye(len(g), dtype=bool)
    np.fill_diagonal(d, np.inf)
    nn_same = float(np.mean(g[d.argmin(1)] == g))
    np.fill_diagonal(d, 0.0)
    return float(d[same & off_diag].mean()), float(d[~same].mean()), nn_same


def _machine() -> str:
    return f"{cpu_model()}, {torch.get_num_threads()} torch thread(s) (machine: 2 cores shared with other jobs)"


def _run_one(args: argparse.Namespace, data_seed: int, strategies: list[str]) -> tuple[list[str], dict]:
    """Scores one generated pool and returns its markdown section and the summary numbers."""
    t0 = time.perf_counter()
    pool, subgroup, timing = score_phantom_pool(Path(args.data) / f"seed{data_seed}", args.n_target, data_seed,
                                                strategies, round_index=args.round, n_labels=args.labels)
    table = coverage_table(pool, subgroup, strategies, args.budgets, args.seeds, args.subpool)
    sizes = Counter(subgroup[i] for i in pool.ids)
    seeds = ["full", *args.seeds]
    labelled = ", ".join(f"{i} ({subgroup[i]})" for i in timing["labelled"])
    lines = [
        f"## Data seed {data_seed}",
        "",
        "Pool subgroups: " + ", ".join(f"{k} {v}" for k, v in sizes.most_common())
        + (f". Labelled: {labelled}" if labelled else "")
        + f". Time: generate {timing['generate_s']:.0f} s (0 when cached)"
        + (f", fine-tune {timing['train_s']:.0f} s" if args.round else "")
        + f", score {timing['score_s']:.0f} s, total {time.perf_counter() - t0:.0f} s.",
        "",
        "Distinct subgroups covered (of 5): mean over the sub-pool seeds [whole pool] (min, max):",
        "",
        "| strategy | " + " | ".join(f"b={b}" for b in args.budgets) + " |",
        "|---|" + "---|" * len(args.budgets),
    ]
    summary: dict = {}
    for name in strategies:
        cells = []
        for b in args.budgets:
            vals = [table[name][b][s][0] for s in args.seeds]
            summary[(name, b)] = (float(np.mean(vals)), table[name][b]["full"][0])
            cells.append(f"{np.mean(vals):.2f} [{table[name][b]['full'][0]}] ({min(vals)}, {max(vals)})")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += ["", "asfda vs enpy, subgroups covered per seed:", "",
              "| budget | " + " | ".join(str(s) for s in seeds) + " |", "|---|" + "---|" * len(seeds)]
    for b in args.budgets:
        lines.append(f"| {b} | " + " | ".join(
            f"{table['asfda'][b][s][0]} vs {table['enpy'][b][s][0]}" for s in seeds) + " |")
    lines += ["", "What the diversity terms see (cosine distance; mean within a subgroup / between subgroups; share "
              "of volumes whose nearest neighbour is in their subgroup):", ""]
    for space, vectors in (("pooled bottleneck embedding", pool.embeddings),
                           ("anatomy composition", pool.vectors.get("anatomy"))):
        if vectors is not None and np.asarray(vectors).size:
            w, bt, nn = separation(vectors, pool.ids, subgroup)
            lines.append(f"- {space}: {w:.4f} / {bt:.4f} (ratio {bt / max(w, 1e-12):.2f}); nearest neighbour "
                         f"{nn:.0%}")
    b_show = args.budgets[len(args.budgets) // 2]
    lines += ["", f"Subgroups picked on the whole pool, budget {b_show} (pick order):", ""]
    for name in strategies:
        lines.append(f"- {name}: {', '.join(table[name][b_show]['full'][1])}")
    return lines + [""], summary


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--round", type=int, choices=[0, 1], default=0,
                    help="0: first query, zero-shot; 1: second query, after fine-tuning on --labels volumes")
    ap.add_argument("--labels", type=int, default=2, help="round 1: seeded-random labelled volumes")
    ap.add_argument("--n-target", type=int, default=120)
    ap.add_argument("--data-seeds", type=int, nargs="+", default=list(range(9)), help="phantom generation seeds")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4], help="sub-pool / selection seeds")
    ap.add_argument("--budgets", type=int, nargs="+", default=[3, 5, 8])
    ap.add_argument("--subpool", type=float, default=0.8, help="fraction of the pool each seed draws")
    ap.add_argument("--tta", action="store_true", help="also the tta strategy (2 more passes per volume)")
    ap.add_argument("--mc", action="store_true", help="also mc_entropy and bald (5 more passes per volume)")
    ap.add_argument("--data", default=".cache/bench_phantom_coverage")
    ap.add_argument("--out", help="default: benchmarks/results/phantom_coverage[_round1].md")
    args = ap.parse_args(argv)
    args.out = args.out or f"benchmarks/results/phantom_coverage{'_round1' if args.round else ''}.md"
    torch.set_num_threads(1)
    strategies = BASE_STRATEGIES + (["tta"] if args.tta else []) + (MC_STRATEGIES if args.mc else [])
    if args.round:  # once adapted, asfda's divergence is kd whatever the round-0 gap
        strategies = [s for s in strategies if s != "asfda[norm_kl]"]
    t0 = time.perf_counter()
    sections, summaries = [], []
    for ds in args.data_seeds:
        lines, summary = _run_one(args, ds, strategies)
        sections += lines
        summaries.append(summary)
    what = ("the first query (round 0, zero-shot)" if args.round == 0 else
            f"the second query (round 1, after fine-tuning on {args.labels} labelled volumes)")
    model = ("zero-shot, T = 1" if args.round == 0 else
             f"fine-tuned on {args.labels} seeded-random pool volumes (60 steps, batch 2, lr 1e-3; they leave the "
             "pool and anchor the diversity terms), T fitted on them, asfda's divergence `kd`")
    head = [
        f"# Phantom coverage: sub-populations covered by {what}",
        "",
        f"- command: `{' '.join([Path(sys.executable).name, *sys.argv])}`",
        f"- date (UTC): {datetime.now(UTC).strftime('%Y-%m-%d %H:%M:%S')}",
        f"- machine: {_machine()}; total {time.perf_counter() - t0:.0f} s",
        f"- pools: phantom target, n_target={args.n_target}, data seeds {args.data_seeds}; 5 subgroups "
        "(common 60%, rare_protocol 15%, enlarged_liver 10%, missing_kidney 8%, lesions 7%)",
        f"- model: shipped phantom UNet (`asfda.demo.phantom_model_path()`), {model}; scored with "
        "`Adapter.pool_scores`. `asfda` is the default: greedy diverse pick in METHOD.md's pooled bottleneck "
        "embedding space; `asfda[anatomy]` picks in the anatomy-composition space instead, `asfda[none]` takes the "
        "top-k of asfda's rank score (no diversity term)"
        + ("; InstanceNorm network, so asfda's round-0 divergence is `feature_gap` (METHOD.md's fallback, the "
           "default), and `asfda[norm_kl]` uses `round0_gap=norm_kl` (Gaussian KL of each volume's channel statistics "
           "at the normalisation layers against the whole pool's; sub-pools reuse the whole-pool values)"
           if args.round == 0 else ""),
        f"- seeds: a seeded {args.subpool:.0%} sub-pool per seed {args.seeds}, the same seed for the selection; "
        "[whole pool] uses selection seed 0",
        "",
        "## Summary: mean subgroups covered over data seeds x sub-pool seeds",
        "",
        "| strategy | " + " | ".join(f"b={b}" for b in args.budgets) + " | mean |",
        "|---|" + "---|" * (len(args.budgets) + 1),
    ]
    for name in strategies:
        per_b = [np.mean([s[(name, b)][0] for s in summaries]) for b in args.budgets]
        head.append(f"| {name} | " + " | ".join(f"{v:.2f}" for v in per_b) + f" | {np.mean(per_b):.2f} |")
    head += ["", "Minus enpy per data seed (subgroups covered, mean over budgets and sub-pool seeds):", ""]
    for name in (s for s in strategies if s.startswith("asfda")):
        diffs = [round(float(np.mean([s[(name, b)][0] - s[("enpy", b)][0] for b in args.budgets])), 9) + 0.0
                 for s in summaries]  # rounded: equal coverage is a tie, not a float-noise loss (+ 0.0: no "-0.00")
        head.append(f"- {name}: " + ", ".join(f"{d}: {x:+.2f}" for d, x in zip(args.data_seeds, diffs))
                    + f"; mean {np.mean(diffs):+.2f}; ahead on {sum(x > 0 for x in diffs)} of {len(diffs)} pools, "
                    f"behind on {sum(x < 0 for x in diffs)}")
    head += ["", "asfda vs enpy on the whole pool, per data seed (subgroups covered):", "",
             "| budget | " + " | ".join(f"data seed {d}" for d in args.data_seeds) + " |",
             "|---|" + "---|" * len(args.data_seeds)]
    for b in args.budgets:
        head.append(f"| {b} | " + " | ".join(f"{s[('asfda', b)][1]} vs {s[('enpy', b)][1]}" for s in summaries)
                    + " |")
    text = "\n".join(head + [""] + sections)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
