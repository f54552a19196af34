"""`asfda score` and `asfda query`: the Active Test-Time Sample Query on a real pool, outside a simulation.

- `score_dataset`: stream a pool through the (zero-shot) model once, computing what the requested
  strategies need; write a per-case CSV with every metric and score component, the embeddings as
  ``.npy`` beside it (rows in the CSV's order) and a JSON sidecar saying how the numbers were made.
- `query_dataset`: pick the next batch of ``budget`` volumes to annotate with one strategy, given the
  ids labelled so far; write ``query.json`` and return the chosen ids with their score components (`QueryRun`:
  `asfda query` prints them).

Under ``torchrun`` (``WORLD_SIZE > 1``, `asfda.distributed.rank_context`) both shard the pool's scoring: each rank
scores its share of the volumes (every pass the strategies need), rank 0 gathers the per-volume records, puts them
back in the pool's order and computes what is referenced to the whole pool (`Adapter.score_pool`); the temperature
fit, the selection and every file and message are rank 0's, and the numbers are those of one process. The other
ranks return None once rank 0 is done.
"""

from __future__ import annotations

import contextlib
import csv
import functools
import io
import math
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from torch import nn

from asfda.adapter import Adapter
from asfda.config import StrategySettings, read_config_file
from asfda.distributed import rank_context
from asfda.errors import AsfdaError
from asfda.io import atomic_write_json, load_dataset
from asfda.io.atomic import staged_write, write_failures_as_errors
from asfda.io.datasets import is_nnunet_dataset, model_labels
from asfda.io.outputs import (
    OutputFiles,
    check_output_file,
    csv_header,
    dataset_folders,
    dataset_input_folders,
    is_npy,
    json_object_with,
    refuse_foreign_files,
    refuse_output_inside_inputs,
)
from asfda.models import load_model, parse_class_map_override
from asfda.rounds import PoolState, select_batch
from asfda.scoring.needs import MC_METRICS, ScoringNeeds
from asfda.selection import STRATEGIES, PoolScores, Query, build_strategy, get_strategy, needs_of, typicality
from asfda.selection.strategies import ASFDAStrategy

__all__ = ["QueryRun", "has_dropout", "query_dataset", "read_ids_file", "score_dataset", "score_sidecar"]

_METRIC_ORDER = ["asd", "enpy", "confidence", "kd", "bn_kl", "norm_kl", "mc_entropy", "bald", "tta_variance"]


def has_dropout(network: nn.Module) -> bool:
    """Whether MC dropout can run: some dropout layer with p > 0."""
    return any(isinstance(m, nn.modules.dropout._DropoutNd) and m.p > 0 for m in network.modules())


def read_ids_file(path: str | Path) -> list[str]:
    """Case ids from a text file (one per line; blank lines and ``#`` comments ignored), a JSON list, or a
    ``query.json`` written by `query_dataset` (its ``ids`` plus its ``labelled``, so rounds chain)."""
    p = Path(path)
    if not p.is_file():
        raise AsfdaError("labelled-ids file not found", p, "pass a text file with one case id per line")
    if p.suffix.lower() == ".json":
        data = read_config_file(p, yaml_syntax=False, what="labelled-ids JSON")
        if isinstance(data, dict) and "ids" in data:
            ids = [*_id_list(data.get("labelled", []), p), *_id_list(data["ids"], p)]
        elif isinstance(data, list):
            ids = data
        else:
            raise AsfdaError("a JSON ids file must be a list of ids or a query.json with 'ids'", p, _IDS_FIX)
        ids = [str(i) for i in ids]
    else:
        text = read_config_file(p, yaml_syntax=False, what="labelled-ids", raw_text=True)
        ids = [line.split("#", 1)[0].strip() for line in text.splitlines()]
        ids = [i for i in ids if i]
    dup = sorted(i for i, n in Counter(ids).items() if n > 1)
    if dup:
        raise AsfdaError(f"case ids listed twice: {dup[:5]}", p)
    return ids


_IDS_FIX = "pass a text file with one case id per line, a JSON list of ids, or the query.json asfda query wrote"


def _id_list(value: object, path: Path) -> list:
    if not isinstance(value, list):
        raise AsfdaError(f"a query.json's 'ids' and 'labelled' must be lists of ids, got {str(value)[:60]!r}", path,
                         _IDS_FIX)
    return value


_QUERY_KEYS = ("strategy", "budget", "ids", "labelled", "pool_size")
_SCORE_KEYS = ("strategies", "ids", "columns", "files", "needs")


def _query_outputs(out: Path) -> OutputFiles:
    return [(out, lambda p: json_object_with(p, _QUERY_KEYS))]


def _score_outputs(out: Path) -> OutputFiles:
    """score's CSV, its .npy files and its JSON sidecar: the sidecar is score's by its content, the others by their
    format beside it."""
    meta = _sidecar(out, ".json")

    def has_meta() -> bool:
        return meta.is_file() and not meta.is_symlink() and json_object_with(meta, _SCORE_KEYS)

    return [(out, lambda p: csv_header(p)[:1] == ["case_id"] and has_meta()),
            *((_sidecar(out, s), lambda p: is_npy(p) and has_meta()) for s in (".embeddings.npy", ".badge.npy")),
            (meta, lambda p: json_object_with(p, _SCORE_KEYS))]


def _check_outputs(outputs: OutputFiles, command: str, model: str | Path, data: str | Path,
                   model_config: str | None) -> None:
    """Every file a command will write: not an input (dataset, model, model config), nor in any dataset, project
    or model folder, in a writable folder, and new or this command's own earlier output."""
    for path, _ in outputs:
        refuse_output_inside_inputs(path, {"the dataset": dataset_folders(data), "the model": model,
                                           "the model config": model_config})
        check_output_file(path)
    refuse_foreign_files(outputs, command)


def _adapter(model: str | Path, data: str | Path, *, model_config: str | None, class_map: str | None,
             cache_dir: str | None, device: str, progress: bool, outputs: OutputFiles, command: str,
             trust_model_code: bool = False, cold_start_ok: bool = False, output_activation: str | None = None,
             precision: str = "fp32"):
    """The model and pool, once ``outputs`` are known not to overwrite either and to be writable. ``cold_start_ok``:
    accept a model none of whose classes is a dataset label (`Adapter.cold_start`). A plain folder of NIfTI images
    (no ``dataset.json``) takes its classes from the model (`LoadedModel.label_names`): no label names needed."""
    _check_outputs(outputs, command, model, data, model_config)
    loaded = load_model(model, config=model_config, allow_code=trust_model_code, output_activation=output_activation)
    ds = load_dataset(data)
    if not ds.cases:
        raise AsfdaError("the dataset has no cases", data)
    if not is_nnunet_dataset(data):
        if class_map:
            raise AsfdaError("--class-map needs a dataset with dataset.json (its label names are the targets)",
                             Path(data), "leave --class-map out: a plain folder takes the model's own classes")
        ds = ds.with_labels(model_labels(loaded.label_names))
    for path, _ in outputs:
        refuse_output_inside_inputs(path, {"the dataset": dataset_input_folders(ds)})
    adapter = Adapter(loaded, ds.class_names, class_map_override=parse_class_map_override(class_map),
                      cache_dir=cache_dir, device=device, progress=progress, cold_start_ok=cold_start_ok,
                      precision=precision, keep_outputs=cache_dir is not None)  # one shot: no pass is read again
    return loaded, ds, adapter


def _check_temperature(temperature: float) -> float:
    t = float(temperature)
    if not math.isfinite(t) or t <= 0:
        raise AsfdaError(f"temperature must be a positive number, got {temperature!r}",
                         fix="pass e.g. --temperature 1.0")
    return t


def _sidecar(out: Path, suffix: str) -> Path:
    return out.with_name(out.stem + suffix)


def score_dataset(model: str | Path, data: str | Path, out: str | Path, *, strategies: list[str] | None = None,
                  temperature: float = 1.0, seed: int = 0, model_config: str | None = None,
                  class_map: str | None = None, cache_dir: str | None = ".cache", device: str = "auto",
                  progress: bool = True, trust_model_code: bool = False, output_activation: str | None = None,
                  precision: str = "fp32") -> dict | None:
    """Scores every case of ``data`` with the zero-shot ``model`` for the given strategies; returns the JSON
    sidecar's record (None on the ranks other than 0 of a torchrun job: see the module docstring).

    Writes ``out`` (CSV: ``case_id``, every metric, asfda's components when asfda is asked for (with
    ``anatomy_<class>``, the predicted soft volume fraction of each foreground class: the space of its diverse
    pick), the BADGE gradient norm when badge is), ``<stem>.embeddings.npy`` ``[N, D]`` (rows in the CSV's order),
    ``<stem>.badge.npy`` when badge is asked for, and ``<stem>.json`` (ids, temperature, passes, needs).

    Args:
        strategies: strategy names whose needs decide the passes; None = every strategy, except the
            MC-dropout ones when the network has no dropout (asked for by name, they raise instead).
        temperature: T for ``softmax(z / T)`` (no labelled volumes here to fit it on).
        seed: seeds the MC-dropout passes.
        trust_model_code: build the model config with MONAI's full parser (`load_model`'s ``allow_code``).
        output_activation: ``softmax``, ``sigmoid`` or ``none`` (the network already outputs probabilities):
            overrides what the model declares (`load_model`).
        precision: inference precision, ``fp32`` or ``bf16`` (`InferenceEngine`).

    ``data`` may be an nnU-Net raw dataset or a plain folder of NIfTI images (the model's classes, see `_adapter`).
    None of the files may be, or lie inside, the pool or the model, nor any dataset, project or model folder, nor
    be named like the file that marks one (``--out dataset.csv`` would write ``dataset.json``); their folder must
    be writable, and an existing one must be score's own earlier output (`_score_outputs`): all checked before the
    model is loaded. The files are written as one set (`staged_write`): a full disk leaves the earlier set whole.
    """
    t = _check_temperature(temperature)
    out = Path(out)
    names = [get_strategy(n).name for n in strategies] if strategies else None
    outputs = _score_outputs(out)
    if len({path for path, _ in outputs}) < len(outputs):
        raise AsfdaError("score's CSV would be its own JSON sidecar (OUT-stem.json)", out,
                         "give --out a .csv name, e.g. scores.csv")
    with rank_context(device) as dist:  # torchrun's ranks, or this one process
        loaded, ds, adapter = _adapter(model, data, model_config=model_config, class_map=class_map,
                                       cache_dir=cache_dir, device=dist.device(device),
                                       progress=progress and dist.is_main, outputs=outputs, command="score",
                                       trust_model_code=trust_model_code, output_activation=output_activation,
                                       precision=precision)
        skipped: list[str] = []
        if names is None:
            names = sorted(STRATEGIES)
            if not has_dropout(adapter.current):
                skipped = [n for n in names if get_strategy(n).needs.metrics & MC_METRICS]
                names = [n for n in names if n not in skipped]
        # asfda: both round-0 gaps and both diversity spaces as columns
        needs = needs_of(names) | ScoringNeeds(norm_stats="asfda" in names,
                                               vectors=frozenset({"anatomy"} if "asfda" in names else ()))
        cases = list(ds.cases)
        if not dist.is_main:  # another rank of a torchrun job: score shards for rank 0, which writes the files
            adapter.serve_pool_shards(dist)
            return None
        with adapter.sharded_scoring(dist):
            scored = adapter.score_pool(cases, t, needs=needs, seed=seed)
        ids = [c.case_id for c in cases]
        columns, divergence = _score_columns(scored, ids, names, adapter.target_names)
        arrays, files = _score_arrays(out, scored)
        meta = {"model": str(model), "data": str(data), "model_weights_sha256_16": loaded.weights_hash,
                "class_map": adapter.class_map.to_dict(), "strategies": names, "skipped_strategies": skipped,
                "needs": needs.describe(), "scoring": scored.info, "asfda_divergence": divergence, "seed": seed,
                "precision": precision,
                "ids": ids, "columns": list(columns), "files": files}
        _write_scores(out, ids, columns, arrays, meta)
        return meta


def _score_columns(scored, ids: list[str], names: list[str],
                   target_names: list[str]) -> tuple[dict[str, np.ndarray], str | None]:
    """score's CSV columns (every metric, asfda's components, the BADGE gradient norm, the anatomy fractions) and
    asfda's divergence (None when asfda is not asked for)."""
    columns: dict[str, np.ndarray] = {m: scored.metrics[m] for m in _METRIC_ORDER if m in scored.metrics}
    columns.update({m: v for m, v in scored.metrics.items() if m not in columns})
    divergence = None
    if "asfda" in names:
        pool = PoolScores(ids, scored.metrics, scored.embeddings, embeddings0=scored.embeddings0,
                          vectors=scored.vectors)
        divergence, comps = ASFDAStrategy().pool_components(pool)
        columns.update({f"asfda_{k}": v for k, v in comps.items() if k not in columns})
    if "badge" in scored.vectors:
        columns["badge_gradient_norm"] = np.linalg.norm(scored.vectors["badge"], axis=1)
    if "anatomy" in scored.vectors:  # asfda's diversity space: the predicted foreground composition
        for k, name in enumerate(target_names[1:]):
            columns[f"anatomy_{name}"] = scored.vectors["anatomy"][:, k]
        # what representativeness=trimmed keeps its least typical 20% of out of the candidates (once labels exist)
        columns["typicality_anatomy"] = typicality(scored.vectors["anatomy"])
    return columns, divergence


def _score_arrays(out: Path, scored) -> tuple[dict[Path, np.ndarray], dict[str, str]]:
    """The .npy files beside score's CSV (embeddings, and BADGE's vectors when asked for), and every file's path."""
    emb_path = _sidecar(out, ".embeddings.npy")
    arrays = {emb_path: scored.embeddings}
    files = {"csv": str(out), "embeddings": str(emb_path)}
    if "badge" in scored.vectors:
        badge_path = _sidecar(out, ".badge.npy")
        arrays[badge_path] = scored.vectors["badge"]
        files["badge"] = str(badge_path)
    return arrays, files


def _write_scores(out: Path, ids: list[str], columns: dict[str, np.ndarray], arrays: dict[Path, np.ndarray],
                  meta: dict) -> None:
    """Writes score's CSV, its .npy files and its JSON sidecar as one set: every file complete before any replaces
    an earlier one (a full disk leaves the earlier set)."""
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["case_id", *columns])
    for i, cid in enumerate(ids):
        w.writerow([cid, *(f"{float(v[i]):.8g}" for v in columns.values())])
    with write_failures_as_errors(out.parent, "the scores"), contextlib.ExitStack() as stack:
        stack.enter_context(staged_write(out, lambda p: p.write_text(buf.getvalue(), encoding="utf-8")))
        for path, array in arrays.items():
            stack.enter_context(staged_write(path, functools.partial(_write_npy, array=array)))
        atomic_write_json(_sidecar(out, ".json"), meta)


def _temperature_source(reads_pool: bool, cold: bool, fitted: bool, given: bool) -> str:
    """Where a query's temperature came from (query.json's ``temperature_source``)."""
    if not reads_pool:
        return "unused (the strategy reads no scores)"
    if cold:  # METHOD.md's cold start: no head for any target class, only the pretrained embeddings count
        return "unused (cold start: the model has no output for the dataset's classes)"
    if fitted:
        return "fitted"
    return "given" if given else "default (nothing labelled with label files)"


def score_sidecar(out: str | Path) -> Path:
    """The JSON sidecar `score_dataset` writes beside its CSV ``out`` (``OUT-stem.json``: how the numbers were
    made)."""
    return _sidecar(Path(out), ".json")


@dataclass
class QueryRun(Query):
    """The `Query` `query_dataset` made, with ``record`` (what it wrote to ``out``: temperature and its source,
    pool size, labelled ids, cold start, ...) and the model's classes and the dataset's foreground classes (a cold
    start matches none of them)."""

    record: dict
    out: str | Path
    model_classes: list[str]
    target_classes: list[str]


def _write_npy(tmp: Path, array: np.ndarray) -> None:
    with open(tmp, "wb") as f:  # a file object: np.save would append ".npy" to a bare temp name
        np.save(f, np.asarray(array))


def query_dataset(model: str | Path, data: str | Path, strategy: str, budget: int, out: str | Path, *,
                  labelled: str | Path | list[str] | None = None, seed: int = 0, temperature: float | None = None,
                  settings: StrategySettings | None = None, alpha: float | None = None,
                  round0_gap: str | None = None, diversity: str | None = None, representativeness: str | None = None,
                  model_config: str | None = None, class_map: str | None = None, cache_dir: str | None = ".cache",
                  device: str = "auto", progress: bool = True, trust_model_code: bool = False,
                  output_activation: str | None = None, precision: str = "fp32") -> QueryRun | None:
    """Picks the next ``budget`` cases of ``data`` to annotate with ``strategy`` and the zero-shot ``model``
    (the `Query`, as a `QueryRun` with what was written; None on the ranks other than 0 of a torchrun job: see the
    module docstring).

    Args:
        labelled: ids already labelled (an ids file, see `read_ids_file`, or a list); they leave the pool
            and anchor the diversity term.
        temperature: T; None = fit it on the labelled cases when they all have label files (dynamic
            temperature scaling), else 1.0.
        settings: what asfda's query reads (`asfda.config.StrategySettings`; a `RunConfig` or a project's
            ``ProjectSettings`` is one); None: their defaults. Other strategies read none of it.
        alpha, round0_gap, diversity, representativeness: one of those settings given by name, in place of the
            one in ``settings`` (None: the one in ``settings``; see `asfda.selection.build_strategy`): asfda's
            weight of the divergence rank against the ASD rank; its round-0 divergence without BatchNorm statistics
            (``feature_gap`` or ``norm_kl``); where its batch pick measures diversity (``anatomy``, ``embedding``
            or ``none``); its typicality term (``none``: METHOD.md's rule; ``density``; ``typical``).
        trust_model_code: build the model config with MONAI's full parser (`load_model`'s ``allow_code``).
        output_activation: overrides what the model declares (`load_model`).
        precision: inference precision, ``fp32`` or ``bf16`` (`InferenceEngine`).

    ``data`` may be an nnU-Net raw dataset or a plain folder of NIfTI images (the model's classes, see `_adapter`).
    Writes ``out`` (JSON: ids in pick order, scores, components, temperature and ECE, what was computed): the
    returned `QueryRun`'s ``record`` (`asfda query` prints the chosen ids with their components). ``out`` may not
    be, or lie inside, the pool or the model, nor any dataset, project or model folder; its folder must be writable,
    and an existing ``out`` must be a query record (`_query_outputs`): all checked before the model is loaded.
    """
    if isinstance(budget, bool) or not isinstance(budget, int) or budget <= 0:
        raise AsfdaError(f"budget must be a positive integer, got {budget!r}", fix="pass --budget 1 or more")
    strat = build_strategy(strategy, settings=settings, alpha=alpha, round0_gap=round0_gap, diversity=diversity,
                           representativeness=representativeness)
    labelled_ids = read_ids_file(labelled) if isinstance(labelled, (str, Path)) else list(labelled or [])
    with rank_context(device) as dist:  # torchrun's ranks, or this one process
        loaded, ds, adapter = _adapter(model, data, model_config=model_config, class_map=class_map,
                                       cache_dir=cache_dir, device=dist.device(device),
                                       progress=progress and dist.is_main, outputs=_query_outputs(Path(out)),
                                       command="query", trust_model_code=trust_model_code, cold_start_ok=True,
                                       output_activation=output_activation, precision=precision)
        cold = adapter.cold_start
        if cold:  # before any forward pass: a strategy that reads predictions has nothing to read
            strat.check_cold_start()
        by_id = ds.by_id()
        unknown = [i for i in labelled_ids if i not in by_id]
        if unknown:
            raise AsfdaError(f"{len(unknown)} labelled ids are not in the dataset, e.g. {unknown[:3]}",
                             None if labelled is None or isinstance(labelled, list) else labelled,
                             "list case ids as the dataset names them")
        state = PoolState({i: 0 for i in labelled_ids})
        lab_cases = [by_id[i] for i in labelled_ids]  # in the given order (the temperature fit samples in it)
        pool_cases = [by_id[i] for i in state.unlabelled(sorted(by_id))]
        if budget > len(pool_cases):
            raise AsfdaError(f"budget {budget} is larger than the unlabeled pool ({len(pool_cases)} volumes)",
                             fix="lower the budget or add volumes to the pool")
        t_given = None if temperature is None else _check_temperature(temperature)
        if not dist.is_main:  # another rank of a torchrun job: score shards; rank 0 fits T, picks and writes
            adapter.serve_pool_shards(dist)
            return None
        with adapter.sharded_scoring(dist):
            batch = select_batch(adapter, strat, lab_cases, pool_cases, budget, 1 if lab_cases else 0, seed,
                                 t0=1.0, temperature=t_given)
        query, t, info = batch.query, batch.temperature.temperature, batch.scoring
        ece_before, ece_after = batch.temperature.ece_before, batch.temperature.ece_after
        t_source = _temperature_source(strat.reads_pool, cold, ece_before is not None, temperature is not None)
        record = {"strategy": query.strategy, "budget": budget, "seed": seed, "ids": query.ids,
                  "scores": query.scores, "components": query.components, "labelled": labelled_ids,
                  "pool_size": len(pool_cases), "temperature": t, "temperature_source": t_source,
                  "ece_before": ece_before, "ece_after": ece_after, "model": str(model), "data": str(data),
                  "model_weights_sha256_16": loaded.weights_hash, "needs": strat.needs.describe(),
                  "strategy_settings": strat.settings(), "class_map": adapter.class_map.to_dict(), "cold_start": cold,
                  "scoring": info, "precision": precision}
        with write_failures_as_errors(Path(out).parent, "the query"):
            atomic_write_json(Path(out), record)
        return QueryRun(query.strategy, query.ids, query.scores, query.components, record=record, out=out,
                        model_classes=list(loaded.class_names), target_classes=ds.class_names[1:])
