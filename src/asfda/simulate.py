"""Simulated active adaptation: every strategy x seed through the same rounds, labels from the dataset.

Resumable: each (strategy, seed) run keeps ``state.json`` (pool state + finished rounds) and the
weights after its last finished round, both written atomically (`asfda.simulate_state`); a restarted run skips
finished rounds. Where the files live: `asfda.results.RunLayout`.
"""

from __future__ import annotations

import json
import platform
import time
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import torch

from asfda import stopping
from asfda.adapter import Adapter, mean_of
from asfda.config import RunConfig, config_to_dict
from asfda.distributed import rank_context
from asfda.engine import describe_device
from asfda.errors import AsfdaError
from asfda.io import atomic_write_json, atomic_write_text, load_dataset
from asfda.io.datasets import Case
from asfda.io.outputs import (
    CACHE_FLAG,
    check_writable_folder,
    dataset_folders,
    dataset_input_folders,
    refuse_output_inside_inputs,
)
from asfda.models import load_model, parse_class_map_override
from asfda.report.curves import plot_learning_curves
from asfda.report.html import write_run_report
from asfda.results import (
    UPPER_BOUND,
    RunLayout,
    area_under_curve,
    csv_text,
    results_table,
    summarise,
    write_per_case,
    write_stopping,
)
from asfda.rounds import PoolState, select_batch, train_on_labels
from asfda.run_previews import write_previews
from asfda.selection import build_strategy
from asfda.selection.strategies import Strategy
from asfda.simulate_state import RoundRecord, RunKey, checkpoint, resume, saved_json, without_later_defaults

__all__ = ["SimulationResult", "area_under_curve", "run_simulation", "split_pool"]


@dataclass
class SimulationResult:
    out_dir: Path
    rows: list[dict]  # one per (strategy, seed, n_labelled)
    summary: dict[str, dict]
    written: bool = True  # False on the ranks of a torchrun job other than 0 (rank 0 writes the files)


def split_pool(ids: list[str], test_fraction: float, seed: int) -> tuple[list[str], list[str]]:
    """Seeded pool/test split; at least one test case and two pool cases."""
    if not 0.0 < test_fraction < 1.0:
        raise AsfdaError(f"test_fraction must be in (0, 1), got {test_fraction}")
    ids = sorted(ids)
    perm = np.random.default_rng(seed).permutation(len(ids))
    n_test = min(len(ids) - 2, max(1, int(round(test_fraction * len(ids)))))
    if n_test < 1:
        raise AsfdaError(f"{len(ids)} cases are too few to split into a pool and a test set")
    test = sorted(ids[i] for i in perm[:n_test])
    pool = sorted(ids[i] for i in perm[n_test:])
    return pool, test




def _versions() -> dict:
    import monai

    from asfda import __version__

    return {"asfda": __version__, "torch": torch.__version__, "monai": monai.__version__, "numpy": np.__version__,
            "python": platform.python_version(), "machine": f"{platform.machine()} {platform.system()}",
            "cpu_threads": torch.get_num_threads()}


def run_simulation(cfg: RunConfig) -> SimulationResult:
    """Runs every strategy with the same seeds, splits, budgets and recipe; writes results under ``out_dir``."""
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    out = Path(cfg.out_dir)
    for name in cfg.strategies:
        build_strategy(name, settings=cfg)  # fail early on a typo
    if cfg.budget <= 0:
        raise AsfdaError(f"budget must be >= 1, got {cfg.budget}")
    # the results folder: never inside the pool, the test set or the model, and writable (before any work)
    inputs = {"the pool": dataset_folders(cfg.pool), "the test set": dataset_folders(cfg.test), "the model": cfg.model}
    refuse_output_inside_inputs(out, inputs)
    check_writable_folder(out)
    if cfg.cache_dir is not None:  # prepared volumes, forward outputs (None: a temporary folder)
        refuse_output_inside_inputs(cfg.cache_dir, inputs, flag=CACHE_FLAG)
    pretrained = load_model(cfg.model, allow_code=cfg.trust_model_code, output_activation=cfg.output_activation)
    pool_ds = load_dataset(cfg.pool, require_labels=True)
    test_ds = load_dataset(cfg.test, require_labels=True) if cfg.test else None
    refuse_output_inside_inputs(out, {"the pool": dataset_input_folders(pool_ds),
                                      "the test set": dataset_input_folders(test_ds) if test_ds else None})
    if test_ds is not None:
        assert cfg.test is not None  # test_ds is read from it
        if test_ds.labels != pool_ds.labels:
            raise AsfdaError(f"test labels {test_ds.labels} differ from the pool's {pool_ds.labels}",
                             Path(cfg.test) / "dataset.json", "use the same label names and values in both")
        overlap = set(pool_ds.by_id()) & set(test_ds.by_id())
        if overlap:
            raise AsfdaError(f"case ids {sorted(overlap)[:5]} are in both the pool and the test set", cfg.test)
    splits = {seed: _split(cfg, pool_ds, test_ds, seed) for seed in cfg.seeds}  # budget checked: nothing written yet
    with rank_context(cfg.device) as dist:  # torchrun's ranks (every rank runs this; rank 0 writes), or one process
        dist.check_batch(cfg.train.batch_size, cfg.model)
        adapter = Adapter(pretrained, pool_ds.class_names, class_map_override=parse_class_map_override(cfg.class_map),
                          cache_dir=cfg.cache_dir, device=dist.device(cfg.device),
                          progress=cfg.progress and dist.is_main)
        adapter.class_map.refuse_new_classes(Path(cfg.pool) / "dataset.json")
        cases = [*pool_ds.cases, *(test_ds.cases if test_ds is not None else ())]
        with adapter.all_ranks(dist):
            rows = _run_all(adapter, cfg, out, splits, cases)
        if not dist.is_main:
            return SimulationResult(out, rows, summarise(rows), written=False)
        summary = summarise(rows)
        write_results(out, rows, summary)
        write_per_case(out, cfg)
        write_stopping(out, cfg)
        if cfg.report:
            previews = write_previews(out, adapter, pool_ds, list(cfg.strategies), cfg.seeds[0], cfg.previews)
            write_run_report(out, cfg, summary, rows, previews)
    return SimulationResult(out, rows, summary)


def _run_all(adapter: Adapter, cfg: RunConfig, out: Path, splits: dict[int, tuple[list[Case], list[Case]]],
             cases: list[Case]) -> list[dict]:
    """Every seed's zero-shot, strategies and upper bound (the rows of the results table). Under torchrun every rank
    runs this (`Adapter.all_ranks`: scoring, guard and evaluation sharded, fine-tuning one DDP job); rank 0 writes."""
    main = adapter.dist.is_main
    # every image is read once before anything is written (a constant one is refused); with a cache this is the
    # preparation the rounds would do anyway
    def read(case: Case) -> None:
        adapter.prepare(case, with_label=False)

    adapter.map_cases(cases, read, "read")  # each rank reads its shard
    pretrained_state = adapter.current_state()
    if main:
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_json(RunLayout(out).run_json, {
            "config": config_to_dict(cfg), "versions": _versions(),
            "model_weights_sha256_16": adapter.pretrained.weights_hash, "class_map": adapter.class_map.to_dict(),
            "started": datetime.now(UTC).isoformat(timespec="seconds"),
            **({"world_size": adapter.dist.world_size} if adapter.dist.sharded else {})})
    rows: list[dict] = []
    from tqdm.auto import tqdm

    overall = tqdm(total=len(cfg.seeds) * len(cfg.strategies) * cfg.rounds, desc="rounds", unit="round",
                   disable=not (cfg.progress and main), dynamic_ncols=True)
    for seed in cfg.seeds:
        pool_cases, test_cases = splits[seed]
        zero = _zero_shot(adapter, test_cases, RunLayout(out).zero_shot(seed), cfg.evaluate_tta)
        for name in cfg.strategies:
            adapter.load_current_state(pretrained_state)
            rows += _run_strategy(adapter, cfg, name, seed, pool_cases, test_cases, zero, overall)
        if cfg.upper_bound:
            adapter.load_current_state(pretrained_state)
            rows.append(_upper_bound(adapter, cfg, seed, pool_cases, test_cases))
        adapter.load_current_state(pretrained_state)
    overall.close()
    return rows


def _split(cfg: RunConfig, pool_ds, test_ds, seed: int) -> tuple[list[Case], list[Case]]:
    """One seed's pool and test cases (a seeded split of the pool when there is no test set); refuses a budget the
    pool cannot give for every round."""
    by_id = pool_ds.by_id()
    if test_ds is None:
        pool_ids, test_ids = split_pool(list(by_id), cfg.test_fraction, seed)
        test_cases = [by_id[i] for i in test_ids]
    else:
        pool_ids = sorted(by_id)
        test_cases = list(test_ds.cases)
    need = cfg.budget * cfg.rounds
    if need > len(pool_ids):
        split = f" ({len(test_cases)} of its {len(by_id)} cases are the test set)" if test_ds is None else ""
        raise AsfdaError(f"budget x rounds = {cfg.budget} x {cfg.rounds} = {need} exceeds the pool of {len(pool_ids)} "
                         f"volumes{split}", cfg.pool, f"lower --budget or --rounds to at most {len(pool_ids)} in all")
    return [by_id[i] for i in pool_ids], test_cases




def _upper_bound(adapter: Adapter, cfg: RunConfig, seed: int, pool: list[Case], test: list[Case]) -> dict:
    """Fine-tunes the pretrained model on the whole pool (all labelled) and evaluates it; cached per seed."""
    steps = cfg.upper_bound_steps or cfg.train.steps * cfg.rounds
    train = replace(cfg.train, steps=steps, seed=seed * 1000 + 999)
    path = RunLayout(Path(cfg.out_dir)).upper_bound(seed)
    key = {"model": adapter.pretrained.weights_hash, "pool": [c.case_id for c in pool],
           "test": [c.case_id for c in test],
           "train": {k: v for k, v in without_later_defaults(config_to_dict(train), ("train",)).items()
                     if k not in ("guard", "guard_volumes")}, **({"evaluate_tta": True} if cfg.evaluate_tta else {})}
    per_case = None
    saved = saved_json(adapter, path)
    if saved is not None and saved.get("key") == key:
        per_case, seconds = saved["per_case"], saved["seconds_train"]
    if per_case is None:
        t0 = time.perf_counter()
        adapter.finetune(pool, train, desc=f"upper bound seed{seed} ({len(pool)} labelled)")
        seconds = round(time.perf_counter() - t0, 2)
        per_case = adapter.evaluate(test, tta=cfg.evaluate_tta)
        if adapter.dist.is_main:
            atomic_write_json(path, {"key": key, "per_case": per_case, "seconds_train": seconds, "steps": steps})
    return {"strategy": UPPER_BOUND, "seed": seed, "round": -1, "n_labelled": len(pool),
            "dice_mean": mean_of(per_case, "dice_mean"),
            **{k: mean_of(per_case, k) for k in per_case[0] if k.startswith("dice_") and k != "dice_mean"},
            "steps": steps}


def _zero_shot(adapter: Adapter, test_cases: list[Case], path: Path, tta: bool = False) -> list[dict]:
    key = {"model": adapter.pretrained.weights_hash, "test": [c.case_id for c in test_cases],
           **({"evaluate_tta": True} if tta else {})}
    saved = saved_json(adapter, path)
    if saved is not None and saved.get("key") == key:
        return saved["per_case"]
    per_case = adapter.evaluate(test_cases, pretrained=True, tta=tta)
    if adapter.dist.is_main:
        atomic_write_json(path, {"key": key, "per_case": per_case})
    return per_case


def _run_strategy(adapter: Adapter, cfg: RunConfig, name: str, seed: int, pool: list[Case], test: list[Case],
                  zero: list[dict], overall=None) -> list[dict]:
    """One strategy and seed: resumes its finished rounds, runs the others (a checkpoint after each), exports the
    adapted model; its rows of the results table (zero-shot first)."""
    layout = RunLayout(Path(cfg.out_dir))
    strategy = build_strategy(name, settings=cfg)
    key = RunKey.of(cfg, name, strategy, seed, [c.case_id for c in pool], [c.case_id for c in test],
                    adapter.pretrained)
    state, rounds = resume(adapter, layout, key, cfg.rounds)
    by_id = {c.case_id: c for c in pool}
    # when to stop (asfda.stopping): the same seeded unlabeled volumes are predicted before and after every round
    probe_before: dict = {}  # the probe's outputs under the model as the next round starts (none after a restart)
    if overall is not None and rounds:
        overall.update(len(rounds))  # finished before a restart
    for r in range(len(rounds), cfg.rounds):
        record, probe_before = _one_round(adapter, cfg, strategy, key, by_id, test, state, rounds, r, probe_before)
        rounds.append(record.to_dict())
        checkpoint(adapter, layout, key, state, rounds)
        if overall is not None:
            overall.update(1)
            overall.set_postfix(strategy=name, seed=seed, dice=f"{record.dice_mean:.3f}")
    _export_bundle(adapter, layout, key, state, rounds)
    base = {"strategy": name, "seed": seed}
    rows = [{**base, "round": -1, "n_labelled": 0, "dice_mean": mean_of(zero, "dice_mean"),
             **{k: mean_of(zero, k) for k in zero[0] if k.startswith("dice_")}}]
    for rec in rounds:
        pc = rec["per_case"]
        rows.append({**base, "round": rec["round"], "n_labelled": rec["n_labelled"], "dice_mean": rec["dice_mean"],
                     **{k: mean_of(pc, k) for k in pc[0] if k.startswith("dice_") and k != "dice_mean"},
                     "queried": " ".join(rec["queried"])})
    return rows


def _one_round(adapter: Adapter, cfg: RunConfig, strategy: Strategy, key: RunKey, by_id: dict[str, Case],
               test: list[Case], state: PoolState, rounds: list[dict], r: int, probe_before: dict
               ) -> tuple[RoundRecord, dict]:
    """Round ``r``: the query (added to ``state``), fine-tuning on every label so far, the test Dice and the
    when-to-stop estimate. Returns its record and the probe's outputs under the new model (the next round's
    ``probe_before``)."""
    passes_before = adapter.forward_passes()
    labelled = [by_id[i] for i in state.labelled_ids()]
    unlabelled = [by_id[i] for i in state.unlabelled(sorted(by_id))]
    batch = select_batch(adapter, strategy, labelled, unlabelled, cfg.budget, r, key.seed * 1000 + r,
                         t0=cfg.temperature0, grow_voxels=cfg.grow_voxels, always_score=cfg.semi.enabled)
    query, temp = batch.query, batch.temperature
    state.add(query.ids, r)
    # the learning curve where labels exist: the model that made this query on the volumes it queried (what
    # correcting its pre-segmentations would start from); the pool's labels, never the test set's
    t_queried = time.perf_counter()
    queried_before = adapter.evaluate([by_id[i] for i in query.ids])
    t_queried = time.perf_counter() - t_queried
    trained = train_on_labels(
        adapter, [by_id[i] for i in state.labelled_ids()], [by_id[i] for i in state.unlabelled(sorted(by_id))],
        rounds, replace(cfg.train, seed=key.seed * 1000 + r), cfg.semi, temp.temperature,
        probe_ids=stopping.probe_ids(by_id, stopping.PROBE_VOLUMES, key.seed, exclude=state.labelled),
        probe_before=probe_before, scores=batch.scores, queried=query.ids, desc=f"{key.name} seed{key.seed} round{r}")
    per_case = adapter.evaluate(test, tta=cfg.evaluate_tta)
    guard = trained.training.guard
    guard_record = guard.to_dict() if guard else None
    if guard_record is not None and trained.training.discarded_state is not None:
        # what the discarded weights would have scored: the guard's recall and precision are measured on it
        guard_record["dice_discarded"] = _discarded_dice(adapter, trained.training.discarded_state, test, cfg)
    record = RoundRecord(
        round=r, n_labelled=len(state.labelled), queried=query.ids, trained_ids=trained.trained_ids,
        held_back=trained.held_back, query_scores=query.scores, query_components=query.components,
        reliable=trained.training.reliable, guard=guard_record,
        temperature=temp.temperature, ece_before=temp.ece_before, ece_after=temp.ece_after,
        seconds_score=round(batch.seconds, 2), seconds_train=round(trained.seconds_train, 2),
        device=describe_device(adapter.device), loss_final=float(np.mean(trained.training.history["loss"][-10:])),
        per_case=per_case, dice_mean=mean_of(per_case, "dice_mean"), probe=trained.probe,
        queried_dice_before={row["case_id"]: row["dice_mean"] for row in queried_before},
        seconds_stopping=round(t_queried + trained.seconds_probe, 2),
        forward_passes={k: n - passes_before[k] for k, n in adapter.forward_passes().items()})
    # the estimate reads no test Dice; stopping.csv sets it beside the true gain once the next round is done
    so_far = [*rounds, record.to_dict()]
    record.stopping = stopping.estimate_from_records(so_far, _queried_curve(so_far), cfg.stop_gain).to_dict()
    return record, trained.probe_after


def _discarded_dice(adapter: Adapter, discarded: dict, test: list[Case], cfg: RunConfig) -> float:
    """The test Dice of the weights the guard discarded (the kept weights are put back, bit for bit)."""
    kept = adapter.current_state()
    adapter.load_current_state(discarded)
    try:
        return mean_of(adapter.evaluate(test, tta=cfg.evaluate_tta), "dice_mean")
    finally:
        adapter.load_current_state(kept)


def _export_bundle(adapter: Adapter, layout: RunLayout, key: RunKey, state: PoolState, rounds: list[dict]) -> None:
    """The adapted model of a run, as a bundle (again when it has seen fewer rounds than the run has finished)."""
    bundle = layout.bundle(key.name, key.seed)
    if adapter.dist.is_main and rounds and _bundle_rounds(bundle) != len(rounds) \
            and layout.weights(key.name, key.seed, len(rounds) - 1).is_file():
        adapter.export_bundle(bundle, {
            "strategy": key.name, "seed": key.seed, "rounds": len(rounds), "labelled": state.labelled_ids(),
            "rounds_discarded_by_guard": [r["round"] for r in rounds if (r.get("guard") or {}).get("reverted")]})


def _queried_curve(records: list[dict]) -> dict[int, list[float]]:
    """Per round, the Dice of the model that made its query on the volumes it queried (``queried_dice_before``)."""
    return {rec["round"]: list(rec["queried_dice_before"].values()) for rec in records
            if rec.get("queried_dice_before")}


def _bundle_rounds(bundle: Path) -> int:
    """How many rounds the exported bundle of a run has seen (0: none exported)."""
    meta = bundle / "configs" / "metadata.json"
    if not meta.exists():
        return 0
    return int(json.loads(meta.read_text()).get("asfda", {}).get("rounds", 0))


def write_results(out: Path, rows: list[dict], summary: dict) -> None:
    layout = RunLayout(out)
    atomic_write_text(layout.file("results.csv"), csv_text(rows))
    atomic_write_json(layout.file("results.json"), {"rows": rows, "summary": summary})
    atomic_write_text(layout.file("results.md"), results_table(summary) + "\n")
    plot_learning_curves(rows, layout.file("learning_curve.png"))
