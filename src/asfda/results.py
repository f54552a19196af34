"""A simulation's result files: where they live (`RunLayout`), read back (`read_run`) and summarised (the
learning-curve rows and their summary: Dice per labelled count, spread over seeds, area under the curve, fraction of
the upper bound), ``per_case.csv`` and ``stopping.csv``. Shared by `asfda.simulate` (which writes them),
`asfda.report`, `asfda.crossval` and the benchmarks (which read them)."""

from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from asfda import stopping
from asfda.config import RunConfig
from asfda.io import atomic_write_text

__all__ = ["UPPER_BOUND", "ZERO_SHOT", "RunLayout", "RunRecords", "area_under_curve", "csv_text", "per_case_rows",
           "read_json", "read_run", "results_table", "stopping_rows", "summarise", "write_per_case", "write_stopping"]


def area_under_curve(n_labelled: list[float], dice: list[float]) -> float:
    """Trapezoid area under Dice vs number labelled, divided by the n range (a mean Dice level): asfda's one AUC
    (``simulate``'s results and report, ``crossval``'s summary). Over n = 0..N in steps of 1 it is
    (D_0 / 2 + D_1 + ... + D_(N-1) + D_N / 2) / N, not the plain mean of D_0..D_N."""
    x, y = np.asarray(n_labelled, float), np.asarray(dice, float)
    order = np.argsort(x)
    x, y = x[order], y[order]
    if len(x) < 2 or x[-1] == x[0]:
        return float(y.mean()) if len(y) else math.nan
    return float(np.sum((x[1:] - x[:-1]) * (y[1:] + y[:-1]) / 2) / (x[-1] - x[0]))


UPPER_BOUND = "upper_bound"
"""The strategy name of the full-supervision upper bound's rows (every pool case labelled)."""
ZERO_SHOT = "zero_shot"
"""The strategy name of the pretrained model's rows (nothing labelled)."""


@dataclass(frozen=True)
class RunLayout:
    """Where the files of a simulation's results folder ``out`` live (``asfda simulate --out``, a cross-validation's
    ``fold<k>``): the one place their names are spelled.

    ``out/run.json``, ``zero_shot_seedN.json``, ``upper_bound/seedN.json``, ``results.{csv,json,md}``,
    ``learning_curve.png``, ``per_case.csv``, ``stopping.csv``, ``report.html``, ``previews/NAME/seedN/*.png``, and
    per strategy and seed ``NAME/seedN/``: ``state.json`` (pool state + finished rounds), the weights after its last
    finished round ``weights_roundK.safetensors`` and the adapted model's ``bundle/``."""

    out: Path

    STATE = "state.json"
    WEIGHTS_GLOB = "weights_round*.safetensors"

    def __post_init__(self) -> None:
        object.__setattr__(self, "out", Path(self.out))

    @property
    def run_json(self) -> Path:
        return self.out / "run.json"

    def file(self, name: str) -> Path:
        """A file of the whole run: ``results.csv``, ``results.json``, ``results.md``, ``learning_curve.png``,
        ``per_case.csv``, ``stopping.csv``, ``report.html``."""
        return self.out / name

    def zero_shot(self, seed: int) -> Path:
        return self.out / f"{ZERO_SHOT}_seed{seed}.json"

    def upper_bound(self, seed: int) -> Path:
        return self.out / UPPER_BOUND / f"seed{seed}.json"

    def run_dir(self, strategy: str, seed: int) -> Path:
        return self.out / strategy / f"seed{seed}"

    def state(self, strategy: str, seed: int) -> Path:
        return self.run_dir(strategy, seed) / self.STATE

    @staticmethod
    def weights_name(round_: int) -> str:
        return f"weights_round{round_}.safetensors"

    def weights(self, strategy: str, seed: int, round_: int) -> Path:
        return self.run_dir(strategy, seed) / self.weights_name(round_)

    def bundle(self, strategy: str, seed: int) -> Path:
        return self.run_dir(strategy, seed) / "bundle"

    def preview(self, strategy: str, seed: int, case_id: str, tag: str) -> Path:
        return self.out / "previews" / strategy / f"seed{seed}" / f"{case_id}-{tag}.png"

    def strategies(self) -> list[str]:
        """The strategies with at least one ``NAME/seedN/state.json`` on disk."""
        return sorted({p.parent.parent.name for p in self.out.glob(f"*/seed*/{self.STATE}")
                       if _seed_of(p.parent.name, "seed") is not None} - {UPPER_BOUND, "previews"})

    def seeds(self, strategy: str) -> list[int]:
        """The seeds of ``strategy`` with a ``state.json`` on disk."""
        found = (_seed_of(p.parent.name, "seed") for p in (self.out / strategy).glob(f"seed*/{self.STATE}"))
        return sorted(s for s in found if s is not None)

    def zero_shot_seeds(self) -> list[int]:
        found = (_seed_of(p.stem, f"{ZERO_SHOT}_seed") for p in self.out.glob(f"{ZERO_SHOT}_seed*.json"))
        return sorted(s for s in found if s is not None)

    def upper_bound_seeds(self) -> list[int]:
        found = (_seed_of(p.stem, "seed") for p in (self.out / UPPER_BOUND).glob("seed*.json"))
        return sorted(s for s in found if s is not None)


def _seed_of(name: str, prefix: str) -> int | None:
    rest = name[len(prefix):] if name.startswith(prefix) else ""
    return int(rest) if rest.isdigit() else None


def read_json(path: Path) -> dict | None:
    """``path``'s JSON, or None when it is missing or unreadable (a part not run yet)."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError):
        return None


@dataclass
class RunRecords:
    """What a results folder holds (`read_run`); a file that is missing or unreadable is left out."""

    layout: RunLayout
    run: dict = field(default_factory=dict)  # run.json: config, versions, model hash, class map, start
    zero_shot: dict[int, dict] = field(default_factory=dict)  # seed -> zero_shot_seedN.json (key, per_case)
    upper_bound: dict[int, dict] = field(default_factory=dict)  # seed -> upper_bound/seedN.json (key, per_case, ...)
    states: dict[str, dict[int, dict]] = field(default_factory=dict)  # strategy -> seed -> state.json

    @property
    def config(self) -> dict:
        return self.run.get("config", {})

    def rounds(self, strategy: str, seed: int) -> list[dict]:
        """The finished rounds' records of one run (none when it has no ``state.json``)."""
        return self.states.get(strategy, {}).get(seed, {}).get("rounds", [])

    def runs(self) -> list[tuple[str, int]]:
        """(strategy, seed) of every state read."""
        return [(name, seed) for name, by_seed in self.states.items() for seed in by_seed]


def read_run(out: str | Path, strategies: Iterable[str] | None = None, seeds: Iterable[int] | None = None
             ) -> RunRecords:
    """Reads a results folder's records: ``run.json``, the zero-shot and upper-bound files and every
    ``NAME/seedN/state.json`` of ``strategies`` x ``seeds`` (None: every one on disk; the zero-shot and upper bound
    are read for ``seeds``, or every seed on disk)."""
    layout = RunLayout(Path(out))
    rec = RunRecords(layout, read_json(layout.run_json) or {})
    wanted = None if seeds is None else sorted(set(seeds))
    for seed in layout.zero_shot_seeds() if wanted is None else wanted:
        if (zero := read_json(layout.zero_shot(seed))) is not None:
            rec.zero_shot[seed] = zero
    for seed in layout.upper_bound_seeds() if wanted is None else wanted:
        if (upper := read_json(layout.upper_bound(seed))) is not None:
            rec.upper_bound[seed] = upper
    for name in layout.strategies() if strategies is None else strategies:
        for seed in layout.seeds(name) if wanted is None else wanted:
            if (state := read_json(layout.state(name, seed))) is not None:
                rec.states.setdefault(name, {})[seed] = state
    return rec


def summarise(rows: list[dict]) -> dict[str, dict]:
    """Per strategy: mean Dice per labelled count (over seeds), its spread, the area under the curve and, when
    the upper bound was run, each count's Dice as a fraction of the upper bound's (same seed's, averaged)."""
    out: dict[str, dict] = {}
    upper = {r["seed"]: r["dice_mean"] for r in rows if r["strategy"] == UPPER_BOUND}
    for name in sorted({r["strategy"] for r in rows} - {UPPER_BOUND}):
        mine = [r for r in rows if r["strategy"] == name]
        counts = sorted({r["n_labelled"] for r in mine})
        curve = {n: float(np.nanmean([r["dice_mean"] for r in mine if r["n_labelled"] == n])) for n in counts}
        spread = {n: float(np.nanstd([r["dice_mean"] for r in mine if r["n_labelled"] == n])) for n in counts}
        seeds = sorted({r["seed"] for r in mine})
        aucs = [area_under_curve([r["n_labelled"] for r in mine if r["seed"] == s],
                                 [r["dice_mean"] for r in mine if r["seed"] == s]) for s in seeds]
        out[name] = {"curve": curve, "std": spread, "auc": float(np.mean(aucs)), "auc_per_seed": aucs}
        if upper:
            out[name]["of_upper"] = {n: float(np.nanmean([r["dice_mean"] / upper[r["seed"]] for r in mine
                                                          if r["n_labelled"] == n and r["seed"] in upper]))
                                     for n in counts}
    if upper:
        vals = list(upper.values())
        n_pool = next(r["n_labelled"] for r in rows if r["strategy"] == UPPER_BOUND)
        out[UPPER_BOUND] = {"dice": float(np.mean(vals)), "std": float(np.std(vals)), "per_seed": upper,
                            "n_labelled": n_pool}
    return out


def results_table(summary: dict[str, dict]) -> str:
    """A markdown table: strategy x number labelled (mean Dice over seeds, +- std when several seeds), AUC,
    and the last count's % of the upper bound; then the upper bound's line."""
    curves = {k: v for k, v in summary.items() if k != UPPER_BOUND}
    upper = summary.get(UPPER_BOUND)
    counts = sorted({n for s in curves.values() for n in s["curve"]})
    several = any(len(s["auc_per_seed"]) > 1 for s in curves.values())
    head = ("| strategy | " + " | ".join(f"n={n}" for n in counts) + " | AUC |"
            + (" % of upper bound |" if upper else ""))
    lines = [head, "|" + "---|" * (len(counts) + 2 + bool(upper))]
    for name, s in curves.items():
        cells = [(f"{s['curve'][n]:.3f}" + (f" ± {s['std'][n]:.3f}" if several else "")) if n in s["curve"] else ""
                 for n in counts]
        line = f"| {name} | " + " | ".join(cells) + f" | {s['auc']:.3f} |"
        if upper:
            last = max(s["of_upper"])
            line += f" {100 * s['of_upper'][last]:.0f}% (n={last}) |"
        lines.append(line)
    if upper:
        lines.append("")
        lines.append(f"Upper bound (fine-tuned on all {upper['n_labelled']} pool volumes, labelled): "
                     f"{upper['dice']:.3f}" + (f" ± {upper['std']:.3f}" if len(upper["per_seed"]) > 1 else "") + ".")
    return "\n".join(lines)


def per_case_rows(out: Path, cfg: RunConfig) -> list[dict]:
    """Every test case's Dice (mean and per class) for every evaluated model of the run: zero-shot, each
    strategy x seed x round, the upper bound; read back from what the run wrote."""
    got = read_run(out, cfg.strategies, cfg.seeds)
    rows: list[dict] = []
    for seed in cfg.seeds:
        if seed in got.zero_shot:
            rows += [{"strategy": ZERO_SHOT, "seed": seed, "round": -1, "n_labelled": 0, **pc}
                     for pc in got.zero_shot[seed]["per_case"]]
        for name in cfg.strategies:
            for rec in got.rounds(name, seed):
                rows += [{"strategy": name, "seed": seed, "round": rec["round"], "n_labelled": rec["n_labelled"],
                          **pc} for pc in rec["per_case"]]
        upper = got.upper_bound.get(seed)
        if cfg.upper_bound and upper is not None:
            n_pool = len(upper["key"]["pool"])
            rows += [{"strategy": UPPER_BOUND, "seed": seed, "round": -1, "n_labelled": n_pool, **pc}
                     for pc in upper["per_case"]]
    return rows


def csv_text(rows: list[dict]) -> str:
    keys: list[str] = []
    for r in rows:
        keys += [k for k in r if k not in keys]
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=keys)
    w.writeheader()
    w.writerows(rows)
    return buf.getvalue()


def write_per_case(out: Path, cfg: RunConfig) -> None:
    """``per_case.csv``: see `per_case_rows`."""
    atomic_write_text(RunLayout(out).file("per_case.csv"), csv_text(per_case_rows(out, cfg)))


def stopping_rows(out: Path, cfg: RunConfig) -> list[dict]:
    """Per strategy, seed and round: the when-to-stop estimate made after the round beside the true next-round gain
    (`asfda.stopping.estimate_rows`), read back from what the run wrote."""
    got = read_run(out, cfg.strategies, cfg.seeds)
    return [{"strategy": name, "seed": seed, **r} for name in cfg.strategies for seed in cfg.seeds
            if seed in got.states.get(name, {})
            for r in stopping.estimate_rows(got.rounds(name, seed), threshold=cfg.stop_gain)]


def write_stopping(out: Path, cfg: RunConfig) -> None:
    """``stopping.csv``: see `stopping_rows`."""
    rows = stopping_rows(out, cfg)
    if rows:
        atomic_write_text(RunLayout(out).file("stopping.csv"), csv_text(rows))
