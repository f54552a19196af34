"""What a whole adaptation round costs on the real pair: seconds (scoring, training, the rest), forward passes by model.

The CT bundle adapted to CHAOS MR with the default recipe of the cross-validated benchmark (200 bf16 steps, batch
2, guard and when-to-stop probe on, budget 1): a pool of 12 volumes and a test set of 2 (simulate's seeded split of
the 14, ``--split-seed``), asfda for 2 rounds (its first round and a later one) and random for 2 rounds (the later
one is the figure), each strategy in its own run with a fresh cache folder (nothing carried over between them).

Counted from outside the library, so that the same script measures any commit (``--label before`` in a worktree of
the old commit, ``PYTHONPATH=that/src``): every sliding-window sweep of an `InferenceEngine` over a volume is one
forward pass, attributed to the pretrained model when the network's weights are the pretrained ones; a round runs
from its `select_batch` call to the write of its record.

    python benchmarks/round_cost.py --label after [--threads 2] [--model ../shared/models/ct_abdomen_unet] \\
        [--data ../shared/data/mr_chaos_t2] [--out benchmarks/results/round_cost]

Writes OUT/<label>.json (rounds, picks, per-case Dice) and merges OUT/summary.json:
``{"machine", "commit", "threads", "date", "before": ROUNDS, "after": ROUNDS}`` with
``ROUNDS = {"asfda_first", "asfda_later", "random"}`` of ``{"seconds", "seconds_score", "seconds_train",
"forward_passes": {"pretrained", "adapted"}, "steps_per_s"}``, and OUT/README.md with both tables and the
comparison of picks and Dice.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

from _machine import code_version, machine

REPO = Path(__file__).resolve().parents[1]
ROUND_OF = {"asfda_first": ("asfda", 0), "asfda_later": ("asfda", 1), "random": ("random", 1)}


class _RoundClock:
    """Counts forward passes by model and times rounds, by wrapping the library from outside."""

    def __init__(self) -> None:
        self.passes = {"pretrained": 0, "adapted": 0}
        self.pretrained_hash: str | None = None
        self.marks: list[tuple[float, dict]] = []  # (time, passes) at each round start, then at the end

    def install(self) -> None:
        import asfda.simulate as simulate
        import asfda.simulate_state as simulate_state
        from asfda.engine import InferenceEngine
        from asfda.models import state_dict_hash
        from asfda.results import RunLayout

        clock = self
        window = InferenceEngine._window

        def counted(engine, x):
            weights = state_dict_hash(engine.network.state_dict())
            if clock.pretrained_hash is None:  # the first pass of a run is the pretrained model's (zero-shot)
                clock.pretrained_hash = weights
            clock.passes["pretrained" if weights == clock.pretrained_hash else "adapted"] += 1
            return window(engine, x)

        InferenceEngine._window = counted  # type: ignore[method-assign]  # counting the passes
        select = simulate.select_batch

        def timed_select(*args, **kwargs):
            clock.marks.append((time.perf_counter(), dict(clock.passes)))
            return select(*args, **kwargs)

        simulate.select_batch = timed_select
        write = simulate_state.atomic_write_json

        def timed_write(path, data, *args, **kwargs):
            if Path(path).name == RunLayout.STATE:  # a round's checkpoint
                clock.marks.append((time.perf_counter(), dict(clock.passes)))
            return write(path, data, *args, **kwargs)

        simulate_state.atomic_write_json = timed_write  # type: ignore[assignment]  # marking the round's end

    def rounds(self) -> list[dict]:
        """Per round: seconds and passes from its start to its record (the marks alternate start, end)."""
        out = []
        for (t0, p0), (t1, p1) in zip(self.marks[0::2], self.marks[1::2], strict=False):
            out.append({"seconds": round(t1 - t0, 2), "forward_passes": {k: p1[k] - p0[k] for k in p0}})
        return out


def run_strategy(name: str, args: argparse.Namespace, work: Path) -> dict:
    """One strategy's 2 rounds in a fresh run and cache folder: per round its cost, pick and per-case Dice."""
    import torch

    from asfda.config import RunConfig
    from asfda.results import read_run
    from asfda.simulate import run_simulation
    from asfda.training import TrainConfig

    torch.set_num_threads(args.threads)
    clock = _RoundClock()
    clock.install()
    n = 14  # CHAOS: 12 pool + 2 test
    cfg = RunConfig(model=str(args.model), pool=str(args.data), test_fraction=2 / n, strategies=[name], budget=1,
                    rounds=2, seeds=[args.split_seed], representativeness="density",
                    train=TrainConfig(steps=args.steps, batch_size=2, precision="bf16", hold_back_discarded=True),
                    threads=args.threads, upper_bound=False, report=False, cache_dir=str(work / "cache"),
                    out_dir=str(work / "run"), progress=False)
    run_simulation(cfg)
    rounds = []
    recorded = read_run(work / "run", [name], [args.split_seed]).rounds(name, args.split_seed)
    for cost, rec in zip(clock.rounds(), recorded, strict=True):
        rounds.append({**cost, "seconds_score": rec["seconds_score"], "seconds_train": rec["seconds_train"],
                       "steps_per_s": round(args.steps / rec["seconds_train"], 3) if rec["seconds_train"] else None,
                       "queried": rec["queried"], "dice_mean": rec["dice_mean"],
                       "per_case": {r["case_id"]: r["dice_mean"] for r in rec["per_case"]},
                       "guard_reverted": bool((rec.get("guard") or {}).get("reverted")),
                       **({"recorded_forward_passes": rec["forward_passes"]} if "forward_passes" in rec else {})})
    return {"rounds": rounds}


def _table(label: str, rounds: dict) -> list[str]:
    lines = [f"### {label}", "", "| round | seconds | scoring s | training s | steps/s | passes pretrained | "
             "passes adapted |", "|---|---|---|---|---|---|---|"]
    for key, r in rounds.items():
        p = r["forward_passes"]
        lines.append(f"| {key} | {r['seconds']:.1f} | {r['seconds_score']:.1f} | {r['seconds_train']:.1f} | "
                     f"{r['steps_per_s']} | {p['pretrained']} | {p['adapted']} |")
    return [*lines, ""]


def _compare(before: dict, after: dict) -> list[str]:
    """Picks and test Dice of the two runs, round by round."""
    lines = ["### Same picks, same Dice?", "", "| strategy | round | picks before -> after | Dice before | "
             "Dice after | largest per-case difference |", "|---|---|---|---|---|---|"]
    for name in ("asfda", "random"):
        for rb, ra in zip(before["runs"][name]["rounds"], after["runs"][name]["rounds"], strict=True):
            diff = max(abs(rb["per_case"][c] - ra["per_case"][c]) for c in rb["per_case"])
            lines.append(f"| {name} | {before['runs'][name]['rounds'].index(rb)} | {rb['queried']} -> {ra['queried']}"
                         f" | {rb['dice_mean']:.4f} | {ra['dice_mean']:.4f} | {diff:.4f} |")
    return [*lines, ""]


def write_summary(out: Path) -> dict:
    """OUT/summary.json and OUT/README.md from the label files there."""
    parts = {p.stem: json.loads(p.read_text()) for p in sorted(out.glob("*.json")) if p.stem in ("before", "after")}
    summary: dict = {"machine": None, "commit": None, "threads": None, "date": None}
    readme = ["# Round cost on the real pair (CT bundle -> CHAOS MR)", "",
              "`benchmarks/round_cost.py` (see its docstring for what is counted). Pool 12, test 2, 200 bf16 steps, "
              "batch 2, guard and probe on, budget 1; each strategy in its own process-fresh cache.", ""]
    for label, part in parts.items():
        summary.update({k: part[k] for k in ("machine", "commit", "threads", "date")})
        summary[label] = {key: {k: part["runs"][s]["rounds"][r][k] for k in
                                ("seconds", "seconds_score", "seconds_train", "forward_passes", "steps_per_s")}
                          for key, (s, r) in ROUND_OF.items()}
        readme += [f"{label}: commit {part['commit']}, {part['machine']}, {part['date']}, command `{part['command']}`",
                   ""]
        readme += _table(label, summary[label])
    if "before" in parts and "after" in parts:
        readme += _compare(parts["before"], parts["after"])
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    (out / "README.md").write_text("\n".join(readme))
    return summary


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--label", choices=["before", "after"], required=True)
    ap.add_argument("--model", default=str(REPO.parent / "shared/models/ct_abdomen_unet"))
    ap.add_argument("--data", default=str(REPO.parent / "shared/data/mr_chaos_t2"))
    ap.add_argument("--out", default=str(REPO / "benchmarks/results/round_cost"))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--split-seed", type=int, default=0)
    ap.add_argument("--strategy", choices=["asfda", "random"], help="(internal) run one strategy and print it")
    ap.add_argument("--summarize-only", action="store_true")
    args = ap.parse_args(argv)
    out = Path(args.out)
    if args.summarize_only:
        print(json.dumps(write_summary(out), indent=2))
        return
    if args.strategy:  # one strategy in this process (its own fresh state)
        work = Path(tempfile.mkdtemp(prefix=f"round_cost_{args.strategy}_"))
        try:
            print(json.dumps(run_strategy(args.strategy, args, work)))
        finally:
            shutil.rmtree(work, ignore_errors=True)
        return
    import subprocess

    runs = {}
    for name in ("asfda", "random"):
        cmd = [sys.executable, __file__, "--label", args.label, "--strategy", name, "--model", args.model, "--data",
               args.data, "--threads", str(args.threads), "--steps", str(args.steps), "--split-seed",
               str(args.split_seed)]
        done = subprocess.run(cmd, capture_output=True, text=True, check=True)
        runs[name] = json.loads(done.stdout.strip().splitlines()[-1])
    import torch

    torch.set_num_threads(args.threads)
    out.mkdir(parents=True, exist_ok=True)
    record = {"machine": machine(), "commit": code_version(), "threads": args.threads,
              "date": datetime.now(UTC).isoformat(timespec="minutes"),
              "command": "python benchmarks/round_cost.py " + " ".join(sys.argv[1:] if argv is None else argv),
              "runs": runs}
    (out / f"{args.label}.json").write_text(json.dumps(record, indent=2) + "\n")
    print(json.dumps(write_summary(out), indent=2))


if __name__ == "__main__":
    main()
