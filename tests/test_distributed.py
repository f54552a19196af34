"""Sharded pool scoring (`asfda.distributed`, ``torchrun``): two local CPU ranks (gloo on loopback, one torch thread
each) give the same CSV, embeddings and query as one process, and the per-volume score cache works across both."""

from __future__ import annotations

import csv
import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

import asfda.scoring.pool as pool_module
from asfda.adapter import Adapter
from asfda.adapter.scoring import _needs_key, _PoolJob
from asfda.distributed import DistContext, rank_context
from asfda.io import load_dataset
from asfda.models import load_model
from asfda.query import query_dataset, score_dataset
from asfda.scoring.needs import ScoringNeeds
from asfda.scoring.pool import finish_pool
from asfda.selection import STRATEGIES, get_strategy, needs_of
from conftest import write_bundle, write_nnunet

N_CASES = 5  # odd: the two shards differ in size (3 and 2)
# name -> query_dataset keywords (asfda: T fitted on labelled cases; the pool-referenced norm_kl gap)
QUERIES: dict[str, dict[str, Any]] = {
    "fitted": {"labelled": ["case01"], "seed": 3},
    "norm_kl": {"round0_gap": "norm_kl", "seed": 0},
}
_TORCHRUN_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _no_volume_scored(*args, **kwargs):
    raise AssertionError("a volume was scored although the cache holds it")


def _rank_main(rank: int, world: int, ports: list[int], model: str, data: str, out: str) -> None:
    """One rank, as torchrun would start it: its environment, then the library calls (each joins and leaves the
    process group; every call gets its own port)."""
    torch.set_num_threads(1)
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1")
    root = Path(out)
    port = iter(ports)

    def call(fn, *args, **kwargs):
        os.environ["MASTER_PORT"] = str(next(port))
        result = fn(*args, **kwargs, device="auto", progress=False)
        assert (result is None) == (rank != 0), "only rank 0 returns (and writes) the result"
        assert not torch.distributed.is_initialized(), "the process group is left at the end"
        return result

    call(score_dataset, model, data, root / "sharded.csv", cache_dir=None)
    for name, kwargs in QUERIES.items():
        call(query_dataset, model, data, "asfda", 2, root / f"q_{name}.json", cache_dir=None, **kwargs)
    call(score_dataset, model, data, root / "cached.csv", cache_dir=str(root / "cache"))
    pool_module._score_one = _no_volume_scored  # a restarted sharded job: every rank reads its volumes back
    call(score_dataset, model, data, root / "cached_again.csv", cache_dir=str(root / "cache"))


def _table(path: Path) -> tuple[list[str], list[str], np.ndarray]:
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    return rows[0], [r[0] for r in rows[1:]], np.array([[float(v) for v in r[1:]] for r in rows[1:]])


def _assert_same_scores(a: Path, b: Path) -> None:
    cols_a, ids_a, values_a = _table(a)
    cols_b, ids_b, values_b = _table(b)
    assert cols_a == cols_b and ids_a == ids_b
    np.testing.assert_allclose(values_a, values_b, rtol=0, atol=1e-5)
    for suffix in (".embeddings.npy", ".badge.npy"):
        np.testing.assert_allclose(np.load(a.with_name(a.stem + suffix)), np.load(b.with_name(b.stem + suffix)),
                                   rtol=0, atol=1e-5)


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The single-process references and one 2-rank job (torch.multiprocessing.spawn) doing the same calls."""
    root = tmp_path_factory.mktemp("distributed")
    data, model = write_nnunet(root / "ds", n=N_CASES), write_bundle(root / "bundle")
    single = root / "single"
    single.mkdir()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        score_dataset(model, data, single / "scores.csv", cache_dir=None, progress=False)
        for name, kwargs in QUERIES.items():
            query_dataset(model, data, "asfda", 2, single / f"q_{name}.json", cache_dir=None, progress=False,
                          **kwargs)
    finally:
        torch.set_num_threads(threads)
    sharded = root / "sharded"
    sharded.mkdir()
    env = {k: os.environ.pop(k) for k in _TORCHRUN_ENV if k in os.environ}
    os.environ["OMP_NUM_THREADS"] = os.environ.get("OMP_NUM_THREADS", "1")
    try:
        mp.spawn(_rank_main, args=(2, [_free_port() for _ in range(3 + len(QUERIES))], str(model), str(data),
                                   str(sharded)), nprocs=2, join=True)
    finally:
        os.environ.update(env)
    return {"data": data, "model": model, "single": single, "sharded": sharded}


def test_two_ranks_score_the_same_csv_and_embeddings_as_one_process(runs: dict) -> None:
    _assert_same_scores(runs["single"] / "scores.csv", runs["sharded"] / "sharded.csv")
    one = json.loads((runs["single"] / "scores.json").read_text())
    two = json.loads((runs["sharded"] / "sharded.json").read_text())
    assert two["ids"] == one["ids"] == [f"case{i:02d}" for i in range(N_CASES)]  # the single-process order
    assert two["scoring"] == one["scoring"] and two["columns"] == one["columns"]
    assert "norm_kl" in two["columns"]  # pool-referenced: computed on rank 0 after the gather
    # rank 0 alone wrote: exactly the files of one process (and no per-rank copies)
    assert sorted(p.name for p in runs["sharded"].glob("sharded*")) == \
        ["sharded.badge.npy", "sharded.csv", "sharded.embeddings.npy", "sharded.json"]


@pytest.mark.parametrize("name", list(QUERIES))
def test_two_ranks_pick_the_same_query_as_one_process(runs: dict, name: str) -> None:
    one = json.loads((runs["single"] / f"q_{name}.json").read_text())
    two = json.loads((runs["sharded"] / f"q_{name}.json").read_text())
    assert two["ids"] == one["ids"] and len(two["ids"]) == 2
    np.testing.assert_allclose(two["scores"], one["scores"], rtol=0, atol=1e-5)
    assert two["temperature"] == pytest.approx(one["temperature"], abs=1e-5)
    assert two["temperature_source"] == one["temperature_source"]
    assert two["components"].keys() == one["components"].keys()


def test_the_shards_cache_serves_a_restarted_job(runs: dict, tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    sharded = runs["sharded"]
    # the sharded job re-run with the cache its first run filled: no rank scored a volume again
    _assert_same_scores(sharded / "cached.csv", sharded / "cached_again.csv")
    _assert_same_scores(runs["single"] / "scores.csv", sharded / "cached.csv")
    assert len(list((sharded / "cache" / "scores").glob("*.npz"))) == N_CASES
    # one process restarted on the cache the two ranks wrote: nothing to score either
    cache = tmp_path / "cache"
    shutil.copytree(sharded / "cache", cache)
    monkeypatch.setattr(pool_module, "_score_one", _no_volume_scored)
    torch.set_num_threads(1)
    score_dataset(runs["model"], runs["data"], tmp_path / "restart.csv", cache_dir=str(cache), progress=False)
    _assert_same_scores(runs["single"] / "scores.csv", tmp_path / "restart.csv")


def test_shard_records_gathered_and_finished_equal_the_one_process_pool(runs: dict) -> None:
    """The split itself, in one process: each shard's records, put back by case id and finished, are the pool."""
    torch.set_num_threads(1)
    ds = load_dataset(runs["data"])
    adapter = Adapter(load_model(runs["model"]), ds.class_names, device="cpu", progress=False)
    cases = list(ds.cases)
    needs = ScoringNeeds(norm_stats=True, vectors=frozenset({"anatomy", "badge"}))
    whole = adapter.score_pool(cases, 1.0, needs=needs)
    job = _PoolJob(cases, 1.0, 2, True, needs, 0)
    parts = [adapter._shard_records(DistContext(rank, 3, rank), job) for rank in range(3)]
    by_id = {r.case_id: r for _, records in parts for r in records}
    again = finish_pool([by_id[c.case_id] for c in cases], parts[0][0], 1.0)
    assert again.ids == whole.ids and again.info == whole.info
    assert again.metrics.keys() == whole.metrics.keys() and "norm_kl" in again.metrics
    for k in whole.metrics:
        np.testing.assert_array_equal(again.metrics[k], whole.metrics[k])
    for k in whole.vectors:
        np.testing.assert_array_equal(again.vectors[k], whole.vectors[k])
    np.testing.assert_array_equal(again.embeddings, whole.embeddings)
    # a shard's own norm_kl would be referenced to its shard alone: that is why it is computed after the gather
    shard0 = finish_pool(parts[0][1], parts[0][0], 1.0)
    assert not np.allclose(shard0.metrics["norm_kl"], whole.metrics["norm_kl"][0::3])


def test_single_process_context_runs_no_collective(monkeypatch: pytest.MonkeyPatch) -> None:
    for k in _TORCHRUN_ENV:
        monkeypatch.delenv(k, raising=False)
    with rank_context("cpu") as ctx:
        assert (ctx.rank, ctx.world_size, ctx.is_main, ctx.sharded) == (0, 1, True, False)
        assert ctx.shard([3, 1, 2]) == [3, 1, 2] and ctx.gather_to_main("x") == ["x"]
        assert ctx.broadcast_from_main(7) == 7 and ctx.device("auto") == "auto"
        ctx.barrier()
        assert not torch.distributed.is_initialized()
    monkeypatch.setenv("WORLD_SIZE", "1")
    with rank_context() as ctx:
        assert not ctx.sharded and not torch.distributed.is_initialized()


def test_shards_split_the_items_once_each_and_the_device_follows_the_local_rank(
        monkeypatch: pytest.MonkeyPatch) -> None:
    items = [f"case{i:02d}" for i in range(7)]
    shards = [DistContext(r, 3, r).shard(items) for r in range(3)]
    assert shards == [items[0::3], items[1::3], items[2::3]]
    assert sorted(sum(shards, [])) == items
    ctx = DistContext(3, 4, 1)
    assert not ctx.is_main and ctx.device("cpu") == "cpu" and ctx.device("cuda:0") == "cuda:0"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert ctx.device("auto") == "cuda:1" and ctx.device("cuda") == "cuda:1"
    assert DistContext().device("auto") == "auto"  # one process: what select_device makes of it, as before


@pytest.mark.slow
def test_torchrun_python_m_asfda_score_matches_one_process(runs: dict, tmp_path: Path) -> None:
    """The real launcher: ``torchrun --standalone --nproc_per_node=2 -m asfda score``."""
    torchrun = Path(sys.executable).with_name("torchrun")
    env = {k: v for k, v in os.environ.items() if k not in _TORCHRUN_ENV}
    env.update(OMP_NUM_THREADS="1")
    out = tmp_path / "torchrun.csv"
    proc = subprocess.run([str(torchrun), "--standalone", "--nproc_per_node=2", "-m", "asfda", "score",
                           "--model", str(runs["model"]), "--data", str(runs["data"]), "--out", str(out),
                           "--no-progress"], env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("scored 5 cases") == 1  # rank 0 alone prints
    _assert_same_scores(runs["single"] / "scores.csv", out)


def test_the_score_cache_key_does_not_depend_on_the_string_hash_seed() -> None:
    """Another rank, or a restarted job, is another process with another hash seed: the key sorts the sets (and is
    ``repr(needs)`` itself for one strategy's needs, so those keys are as before)."""
    for name in STRATEGIES:
        assert _needs_key(get_strategy(name).needs) == repr(get_strategy(name).needs)
    union = _needs_key(needs_of(sorted(STRATEGIES)) | ScoringNeeds(vectors=frozenset({"anatomy"})))
    assert "metrics=frozenset({'asd', 'bald', 'enpy', 'mc_entropy', 'tta_variance'})" in union
    assert "vectors=frozenset({'anatomy', 'badge', 'extent'})" in union
