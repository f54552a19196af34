"""Runs a cross-validation: each fold is `asfda.simulate.run_simulation` on the fold's pool and test folders
(strategies x seeds x rounds as ``asfda simulate`` runs them, resumable per round), then the summary of whatever all
fold folders hold. Folds can be split over processes or machines (``only_folds``) and merged by copying the fold
folders together and summarising (``summarize_only``)."""

from __future__ import annotations

import dataclasses
import platform
import subprocess
import sys
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path

import torch

from asfda import __version__
from asfda.config import RunConfig
from asfda.crossval.folds import assignment_for, fold_datasets_root, fold_dir, make_fold_datasets, read_json
from asfda.crossval.read import METRICS, POSTPROCESSING, PROVENANCE, Seeds, choose_postprocessing, done_items
from asfda.crossval.report import write_summary
from asfda.crossval.summary import RANDOM, pp_strategies, summarize
from asfda.engine import describe_device, select_device
from asfda.errors import AsfdaError
from asfda.io import atomic_write_json
from asfda.io.outputs import CACHE_FLAG, check_writable_folder, dataset_folders, refuse_output_inside_inputs
from asfda.simulate import run_simulation

__all__ = ["RANDOM_SEEDS_AT_LEAST", "code_version", "crossval", "machine_line", "plan_seeds", "run_fold",
           "summarize_folder"]

RANDOM_SEEDS_AT_LEAST = 3
"""Random's curve is a mean over at least this many seeds (its rounds need no scoring pass: they are cheap)."""


def machine_line(device: str | None = "auto") -> str:
    """The machine a figure cites: the CPU and the device runs compute on (a GPU's name)."""
    return f"{platform.processor() or platform.machine()} {platform.system()}; " \
           f"{describe_device(select_device(device))} (torch {torch.__version__})"


def code_version() -> str:
    """The asfda version and, when it runs from a git checkout, the commit (``-dirty`` with uncommitted changes)."""
    try:
        rev = subprocess.run(["git", "describe", "--always", "--dirty", "--abbrev=7"], capture_output=True, text=True,
                             cwd=Path(__file__).resolve().parent, check=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        rev = ""
    return f"{rev} (asfda {__version__})" if rev else f"asfda {__version__}"


def plan_seeds(strategies: Sequence[str], seeds: Sequence[int], random_seeds: Sequence[int] | None = None) -> dict:
    """Per strategy, its seeds: ``seeds`` for each of ``strategies``, and random (added when missing: every strategy
    is compared with it) on ``random_seeds``, by default ``seeds`` continued to `RANDOM_SEEDS_AT_LEAST` seeds."""
    if not seeds:
        raise AsfdaError("no seeds given", fix="pass --seeds, e.g. --seeds 0,1")
    rnd = list(random_seeds or seeds)
    while random_seeds is None and len(rnd) < RANDOM_SEEDS_AT_LEAST:
        rnd.append(max(rnd) + 1)
    return {**{name: list(seeds) for name in strategies if name != RANDOM}, RANDOM: rnd}


def _groups(seeds: Seeds) -> dict[tuple[int, ...], list[str]]:
    """Strategies that share their seeds run in one `run_simulation` call."""
    out: dict[tuple[int, ...], list[str]] = {}
    for name, ss in seeds.items():
        out.setdefault(tuple(ss), []).append(name)
    return out


def run_fold(k: int, base: RunConfig, pool: str | Path, test: str | Path, out_dir: str | Path, *, seeds: Seeds,
             upper_seeds: Sequence[int] = (), command: str = "", machine: str | None = None,
             commit: str | None = None) -> None:
    """Runs (or resumes) fold ``k``: `run_simulation` with ``base``'s recipe on the fold's pool and test folders, once
    per group of strategies that share their seeds (``seeds``: per strategy), and the whole-pool upper bound for
    ``upper_seeds`` (none: no upper bound). Appends to ``out_dir/cv_provenance.json`` which machine and commit
    computed which parts in this call (written even when the run stops with an exception)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    fold_cfg = dataclasses.replace(base, pool=str(pool), test=str(test), out_dir=str(out_dir))
    calls = [dataclasses.replace(fold_cfg, strategies=names, seeds=list(ss),
                                 upper_bound=bool(upper_seeds) and tuple(upper_seeds) == ss)
             for ss, names in _groups(seeds).items()]
    if upper_seeds and not any(c.upper_bound for c in calls):
        calls.append(dataclasses.replace(fold_cfg, strategies=[], seeds=list(upper_seeds), upper_bound=True,
                                         report=False))
    before = done_items(out_dir, seeds, upper_seeds)
    start, t0 = datetime.now(UTC), time.perf_counter()
    status = "interrupted"
    try:
        for cfg in calls:
            run_simulation(cfg)
        status = "finished"
    finally:
        computed = sorted(done_items(out_dir, seeds, upper_seeds) - before)
        if computed or status != "finished":
            log = (read_json(out_dir / PROVENANCE) or {}).get("entries", [])
            log.append({"fold": k, "machine": machine or machine_line(base.device), "commit": commit or code_version(),
                        "command": command, "start": start.isoformat(timespec="seconds"),
                        "wall_s": round(time.perf_counter() - t0, 1), "status": status, "computed": computed})
            atomic_write_json(out_dir / PROVENANCE, {"entries": log})


def summarize_folder(out: str | Path, assignment: Sequence[Sequence[str]], base: RunConfig, seeds: Seeds,
                     upper_seeds: Sequence[int] = (), utility: str | Path | None = None, command: str = "",
                     machine: str = "", commit: str = "", plot: bool = True) -> dict:
    """The post-processing choice (``postprocessing.json``) and the summaries of what ``out`` holds under each of
    `asfda.crossval.read.METRICS`, written by `asfda.crossval.report.write_summary`; returns the plain Dice's."""
    out = Path(out)
    choice = choose_postprocessing(out, len(assignment), seeds)
    atomic_write_json(out / POSTPROCESSING, choice)
    summaries: dict[str, dict] = {}
    for metric in reversed(METRICS):  # the plain Dice last: it names the choice and the Dice under it
        summary = summarize(out, assignment, seeds=seeds, rounds=base.rounds, budget=base.budget,
                            upper_seeds=upper_seeds, upper_bound_steps=base.upper_bound_steps or None,
                            steps=base.train.steps, precision=base.train.precision, metric=metric,
                            pp=choice["classes"], utility=utility, command=command, machine_line=machine,
                            commit=commit)
        if metric == "dice_mean":
            summary["largest_component"] = {**choice, "strategies": pp_strategies(summaries["pp_dice_mean"])}
        write_summary(out, summary, plot=plot)
        summaries[metric] = summary
    return summaries["dice_mean"]


def crossval(base: RunConfig, data: str | Path, out: str | Path, *, folds: int, fold_seed: int = 0,
             seeds: Seeds | None = None, upper_seeds: Sequence[int] | None = None,
             only_folds: Sequence[int] | None = None, summarize_only: bool = False, upper_bound_only: bool = False,
             utility: str | Path | None = None, command: str = "", machine: str | None = None,
             commit: str | None = None) -> dict:
    """K-fold cross-validation of active adaptation on the labelled dataset ``data``: every volume is a test volume
    exactly once (`asfda.crossval.folds.fold_assignment`, seeded by ``fold_seed``; kept in OUT/folds.json), the pool
    of fold k is every other volume. ``base`` is the run config of every fold (recipe, budget, rounds, strategies,
    upper bound, cache, device); ``seeds`` per strategy (its keys are the strategies run; default: ``base.seeds`` for
    each of ``base.strategies``; `plan_seeds` adds random), ``upper_seeds`` the
    upper bound's (default: the first seed; none when ``base.upper_bound`` is off). Runs the folds ``only_folds``
    (default: all; none with ``summarize_only``; with ``upper_bound_only`` only their upper bounds, the strategies'
    rounds neither read nor resumed: an upper bound added to a run made without one), then summarises every fold
    folder found under ``out`` into summary.json, README.md, learning_curve.png and report.html, with ``utility`` (a
    single-label utility table) as the 1-label oracle. Returns the summary."""
    out, data = Path(out), Path(data)
    seeds = {name: list(ss) for name, ss in seeds.items()} if seeds else {name: list(base.seeds)
                                                                           for name in base.strategies}
    if not summarize_only and not base.model:
        raise AsfdaError("crossval needs a model to run folds", fix="pass --model (or --summarize-only)")
    if upper_seeds is None:
        upper_seeds = [next(iter(seeds.values()))[0]] if seeds else [0]
    upper_seeds = list(upper_seeds) if base.upper_bound else []
    if upper_bound_only and not upper_seeds:
        raise AsfdaError("only the upper bound was asked for, and it is off", fix="drop --no-upper-bound")
    version, where = commit or code_version(), machine or machine_line(base.device)  # the code that ran, before
    # the results folder: never inside a dataset, project or model folder, and writable (before anything is written)
    refuse_output_inside_inputs(out, {"the dataset": dataset_folders(data), "the model": base.model})
    check_writable_folder(out)
    if not summarize_only and base.cache_dir is not None:  # the folds' linked datasets, prepared volumes go there
        refuse_output_inside_inputs(base.cache_dir, {"the dataset": dataset_folders(data), "the model": base.model},
                                    flag=CACHE_FLAG)
    out.mkdir(parents=True, exist_ok=True)
    assignment = assignment_for(out, data, folds, fold_seed, write=not summarize_only)
    if not summarize_only:
        todo = list(range(folds)) if only_folds is None else list(only_folds)
        bad = [k for k in todo if not 0 <= k < folds]
        if bad:
            raise AsfdaError(f"folds {bad} are outside 0..{folds - 1}", fix=f"name folds between 0 and {folds - 1}")
        root = fold_datasets_root(base.cache_dir, data, folds, fold_seed)
        dirs = make_fold_datasets(data, assignment, root, todo)
        for k in todo:
            print(f"fold {k}/{folds}: test {', '.join(assignment[k])}", file=sys.stderr, flush=True)
            run_fold(k, base, *dirs[k], fold_dir(out, k), seeds={} if upper_bound_only else seeds,
                     upper_seeds=upper_seeds, command=command,
                     machine=where, commit=version)
    return summarize_folder(out, assignment, base, seeds, upper_seeds, utility, command, where, version)
