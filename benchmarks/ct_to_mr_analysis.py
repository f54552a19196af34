"""Reads a finished (or partly finished) `ct_to_mr.py` results folder and writes ANALYSIS.md beside it: the
issue's targets checked against the numbers, what each strategy queried and what it gave per seed, per-class and
per-case Dice, the score components of asfda's picks, the best curve any strategy reached (how much room selection
has at all on this pool), and the cost per round. It trains nothing: every figure comes from the run's files.

    .venv/bin/python benchmarks/ct_to_mr_analysis.py [benchmarks/results/ct_to_mr_full]
"""

from __future__ import annotations

import argparse
from pathlib import Path
from statistics import mean, median

from asfda.io import atomic_write_text
from asfda.results import area_under_curve, read_run

REPO = Path(__file__).resolve().parents[1]
ORDER = ["asfda", "random", "enpy", "coreset", "mc_entropy", "badge"]


def load_runs(out: Path) -> dict:
    """{seed: {"zero": per_case, "ub": per_case | None, "runs": {strategy: rounds}}} from the folder's files."""
    got = read_run(out)
    return {seed: {"zero": zero["per_case"],
                   "ub": got.upper_bound[seed]["per_case"] if seed in got.upper_bound else None,
                   "runs": {name: got.rounds(name, seed) for name in sorted(got.states)
                            if seed in got.states[name]}}
            for seed, zero in sorted(got.zero_shot.items())}


def _mean(per_case: list[dict], key: str = "dice_mean") -> float:
    return mean(c[key] for c in per_case)


def curve(seed_data: dict, name: str) -> list[float]:
    """Mean test Dice at n = 0 (zero-shot), 1, 2, ... for one strategy and seed."""
    return [_mean(seed_data["zero"])] + [r["dice_mean"] for r in seed_data["runs"][name]]


def _detail_lines(data: dict, seeds: list[int], names: list[str], rounds: int, full: list[int]) -> list[str]:
    """Per class, per test case, asfda's score components and the cost per round."""
    lines: list[str] = []
    classes = [k.removeprefix("dice_") for k in data[seeds[0]]["zero"][0] if k.startswith("dice_") and k != "dice_mean"]
    lines += ["## Per class (mean over seeds and test cases)", "",
              "| strategy | n | " + " | ".join(classes) + " |", "|---" * (len(classes) + 2) + "|"]
    lines.append("| zero-shot | 0 | " + " | ".join(
        f"{mean(_mean(data[s]['zero'], 'dice_' + c) for s in seeds):.3f}" for c in classes) + " |")
    for k in sorted({1, min(4, rounds)}):
        for n in names:
            lines.append(f"| {n} | {k} | " + " | ".join(
                f"{mean(_mean(data[s]['runs'][n][k - 1]['per_case'], 'dice_' + c) for s in seeds):.3f}"
                for c in classes) + " |")
    if full:
        lines.append("| upper bound | all | " + " | ".join(
            f"{mean(_mean(data[s]['ub'], 'dice_' + c) for s in full):.3f}" for c in classes) + " |")
    lines += ["", "## Per test case at n=" + str(min(4, rounds)) + " (mean over strategies)", ""]
    for s in seeds:
        per: dict[str, list[float]] = {c["case_id"]: [] for c in data[s]["zero"]}
        for n in names:
            for c in data[s]["runs"][n][min(4, rounds) - 1]["per_case"]:
                per[c["case_id"]].append(c["dice_mean"])
        lines.append(f"- seed {s}: " + ", ".join(f"{cid} {mean(v):.3f}" for cid, v in per.items()))

    if "asfda" in names:
        lines += ["", "## asfda's picks: score components", "",
                  "| seed | round | picked | rank score | ASD | DKD part (kd / feature_gap) | min distance |",
                  "|---|---|---|---|---|---|---|"]
        for s in seeds:
            for r in data[s]["runs"]["asfda"][:rounds]:
                for cid, comp in r["query_components"].items():
                    gap = comp.get("kd", comp.get("feature_gap", float("nan")))
                    lines.append(f"| {s} | {r['round']} | {cid} | {comp.get('rank_score', float('nan')):.3f} | "
                                 f"{comp.get('asd', float('nan')):.3f} | {gap:.4g} | "
                                 f"{comp.get('min_distance', float('nan')):.4f} |")

    lines += ["", "## Cost per round (median seconds; the machine of each seed is in the README)", "",
              "| strategy | " + " | ".join(f"seed {s}: score / train" for s in seeds) + " |",
              "|---" * (len(seeds) + 1) + "|"]
    for n in names:
        lines.append(f"| {n} | " + " | ".join(
            f"{median(r['seconds_score'] for r in data[s]['runs'][n]):.0f} / "
            f"{median(r['seconds_train'] for r in data[s]['runs'][n]):.0f}" for s in seeds) + " |")
    return lines


def analyse(out: Path) -> str:
    data = load_runs(out)
    seeds = sorted(s for s, d in data.items() if d["runs"])
    names = [n for n in ORDER if all(n in data[s]["runs"] for s in seeds)]
    rounds = min(len(data[s]["runs"][n]) for s in seeds for n in names)
    full = [s for s in seeds if data[s]["ub"] is not None]
    lines = [f"# CT -> MR: analysis of `{out.relative_to(REPO) if out.is_relative_to(REPO) else out}`", "",
             f"Written by `python benchmarks/ct_to_mr_analysis.py` from the run's per-round files; seeds {seeds}, "
             f"labelled 1..{rounds}, strategies {names}.", ""]
    auc = {n: {s: area_under_curve(list(range(rounds + 1)), curve(data[s], n)[:rounds + 1]) for s in seeds}
           for n in names}
    at = {n: [mean(curve(data[s], n)[k] for s in seeds) for k in range(rounds + 1)] for n in names}
    ub = mean(_mean(data[s]["ub"]) for s in full) if full else None

    lines += ["## The targets", ""]
    if ub is not None and "asfda" in at:
        best4 = max(range(1, min(4, rounds) + 1), key=lambda k: at["asfda"][k])
        frac = at["asfda"][best4] / ub
        lines.append(f"- asfda with <= 4 labels reaches {at['asfda'][best4]:.3f} (n={best4}) = {frac:.0%} of the upper "
                     f"bound {ub:.3f} (mean over seeds {full}): **{'met' if frac >= 0.95 else 'missed'}** (>= 95%).")
    others = []
    if "asfda" in auc and "random" in auc:
        gain = mean(auc["asfda"][s] - auc["random"][s] for s in seeds)
        lines.append(f"- AUC asfda - random: {100 * gain:+.1f} Dice points (mean over seeds; per seed "
                     + ", ".join(f"{100 * (auc['asfda'][s] - auc['random'][s]):+.1f}" for s in seeds)
                     + f"): **{'met' if gain >= 0.03 else 'missed'}** (>= +3).")
        others = [n for n in names if n not in ("asfda", "random")]
    if "asfda" in auc and others:
        beaten = [n for n in others if mean(auc["asfda"].values()) > mean(auc[n].values())]
        not_beaten = [n for n in others if n not in beaten]
        lines.append(f"- asfda's mean AUC beats {len(beaten)} of {len(others)} other baselines"
                     + (f" (not: {', '.join(not_beaten)})" if not_beaten else "")
                     + f": **{'met' if len(beaten) == len(others) else 'missed'}**.")
    if "asfda" in at:
        lines.append(f"- 1 label: asfda {at['asfda'][1]:.3f} against zero-shot {at['asfda'][0]:.3f} "
                     f"({100 * (at['asfda'][1] - at['asfda'][0]):+.1f} points).")
    lines += ["", "## AUC per seed (mean Dice level over n = 0.." + str(rounds) + ")", "",
              "| strategy | " + " | ".join(f"seed {s}" for s in seeds) + " | mean |",
              "|---" * (len(seeds) + 2) + "|"]
    for n in names:
        lines.append(f"| {n} | " + " | ".join(f"{auc[n][s]:.3f}" for s in seeds) + f" | {mean(auc[n].values()):.3f} |")
    env = {s: [max(curve(data[s], n)[k] for n in names) for k in range(rounds + 1)] for s in seeds}
    env_auc = mean(area_under_curve(list(range(rounds + 1)), env[s]) for s in seeds)
    lines += ["", f"Room for selection: the curve that takes, at each n, the best Dice *any* strategy reached on that "
              f"seed has a mean AUC of {env_auc:.3f}; random's is {mean(auc['random'].values()):.3f}"
              if "random" in auc else "", ""]

    lines += ["## What each strategy queried, and the Dice it gave", ""]
    for s in seeds:
        d = data[s]
        test = ", ".join(c["case_id"] for c in d["zero"])
        lines += [f"Seed {s}: test {test}; zero-shot {_mean(d['zero']):.3f}"
                  + (f"; upper bound {_mean(d['ub']):.3f}" if d["ub"] else "; upper bound not run") + ".", "",
                  "| strategy | " + " | ".join(f"n={k}" for k in range(1, rounds + 1)) + " |",
                  "|---" * (rounds + 1) + "|"]
        for n in names:
            cells = []
            for r in d["runs"][n][:rounds]:
                mark = " discarded" if (r.get("guard") or {}).get("reverted") else ""
                picked = ", ".join(q.removeprefix("chaos_") for q in r["queried"])
                cells.append(f"{r['dice_mean']:.3f} ({picked}{mark})")
            lines.append(f"| {n} | " + " | ".join(cells) + " |")
        lines.append("")

    lines += _detail_lines(data, seeds, names, rounds, full)
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", nargs="?", type=Path, default=REPO / "benchmarks/results/ct_to_mr_full",
                    help="a ct_to_mr.py results folder (default: benchmarks/results/ct_to_mr_full)")
    out = ap.parse_args().out
    text = analyse(out.resolve())
    atomic_write_text(out / "ANALYSIS.md", text)
    print(text)


if __name__ == "__main__":
    main()
