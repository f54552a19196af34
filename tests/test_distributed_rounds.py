"""Whole rounds under ``torchrun`` (`asfda.distributed`): two local CPU ranks (gloo on loopback, one torch thread each)
run `asfda simulate` (every rank runs the loop: scoring, guard, probe and evaluation sharded, fine-tuning one DDP job;
rank 0 writes) and `asfda next` (rank 0 picks, both score), and give what one process gives."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import socket
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

from asfda.config import RunConfig, SemiConfig
from asfda.project import ProjectSettings, finetune_project, ingest_labels, init_project, next_query
from asfda.simulate import run_simulation
from asfda.training import TrainConfig
from conftest import write_bundle, write_nnunet

_TORCHRUN_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
# no dropout: a dropout mask is drawn per rank, so only a network without it can train to the same weights
NET = {"_target_": "UNet", "spatial_dims": 3, "in_channels": 1, "out_channels": 3, "channels": [4, 8, 16],
       "strides": [2, 2], "num_res_units": 0, "norm": "instance"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _cfg(bundle: Path, data: Path, out: Path) -> RunConfig:
    # asfda scores the pool (sharded), the guard runs on the unlabelled volumes (sharded), batch 2 is one patch a rank
    return RunConfig(model=str(bundle), pool=str(data), test_fraction=0.3, strategies=["asfda", "random"],
                     budget=1, rounds=2, seeds=[0], train=TrainConfig(steps=3, batch_size=2),
                     cache_dir=None,  # type: ignore[arg-type]  # None: no cache (RunConfig.cache_dir says str)
                     out_dir=str(out), progress=False, report=False, device="cpu")


def _env(rank: int, world: int, port: int) -> None:
    torch.set_num_threads(1)
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))


def _semi(cfg: RunConfig) -> RunConfig:
    """asfda alone, with selective semi-supervision (warm-up, the pool re-scored, reliable volumes, pseudo-labels)."""
    return dataclasses.replace(cfg, strategies=["asfda"], semi=SemiConfig(enabled=True, warmup_fraction=0.5),
                               upper_bound=True, upper_bound_steps=2)


def _rank_main(rank: int, world: int, ports: list[int], bundle: str, data: str, out: str, project: str) -> None:
    _env(rank, world, ports[2])
    semi = _semi(_cfg(Path(bundle), Path(data), Path(out + "_semi")))
    first = run_simulation(semi)
    os.environ["MASTER_PORT"] = str(ports[3])
    resumed = run_simulation(semi)  # every round on disk: rank 0 reads the state and weights for both ranks
    assert resumed.rows == first.rows
    os.environ["MASTER_PORT"] = str(ports[0])
    res = run_simulation(_cfg(Path(bundle), Path(data), Path(out)))
    assert not torch.distributed.is_initialized(), "the process group is left at the end"
    Path(out, f"rows_rank{rank}.json.txt").write_text(json.dumps(res.rows))  # the rows every rank returns
    os.environ["MASTER_PORT"] = str(ports[1])
    record = next_query(project, progress=False)
    assert (record == {}) == (rank != 0), "only rank 0 returns (and writes) the query"


def _rank_finetune(rank: int, world: int, port: int, project: str) -> None:
    _env(rank, world, port)
    record = finetune_project(project, progress=False)
    assert (record == {}) == (rank != 0), "only rank 0 returns (and writes) the round"


def _spawn(fn, *args) -> None:
    env = {k: os.environ.pop(k) for k in _TORCHRUN_ENV if k in os.environ}
    os.environ["OMP_NUM_THREADS"] = os.environ.get("OMP_NUM_THREADS", "1")
    try:
        mp.spawn(fn, args=(2, *args), nprocs=2, join=True)
    finally:
        os.environ.update(env)


def _answer(root: Path, project: Path) -> None:
    """The annotators' labels for the project's pending query, ingested."""
    ids = json.loads((project / "annotate" / "round0" / "query.json").read_text())["ids"]
    answers = root / f"answers_{project.name}"
    answers.mkdir()
    for cid in ids:
        shutil.copyfile(root / "truth" / f"{cid}.nii.gz", answers / f"{cid}.nii.gz")
    ingest_labels(project, answers)


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("distributed_rounds")
    data = write_nnunet(root / "ds", n=7)
    bundle = write_bundle(root / "bundle", net=NET)
    unlabelled = write_nnunet(root / "pool", n=5)
    shutil.move(unlabelled / "labelsTr", root / "truth")
    for name in ("project_single", "project_sharded"):
        init_project(root / name, str(bundle), str(unlabelled),
                     ProjectSettings(budget=2, device="cpu", train=TrainConfig(steps=2, batch_size=2)))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        run_simulation(_cfg(bundle, data, root / "single"))
        run_simulation(_semi(_cfg(bundle, data, root / "single_semi")))
        next_query(root / "project_single", progress=False)
        _answer(root, root / "project_single")
        finetune_project(root / "project_single", progress=False)
    finally:
        torch.set_num_threads(threads)
    _spawn(_rank_main, [_free_port() for _ in range(4)], str(bundle), str(data), str(root / "sharded"),
           str(root / "project_sharded"))
    _answer(root, root / "project_sharded")
    _spawn(_rank_finetune, _free_port(), str(root / "project_sharded"))
    return {"root": root, "single": root / "single", "sharded": root / "sharded"}


def _state(run: Path, strategy: str) -> dict:
    return json.loads((run / strategy / "seed0" / "state.json").read_text())


@pytest.mark.parametrize("strategy", ["asfda", "random", "asfda_semi"])
def test_two_ranks_simulate_the_same_rounds_as_one_process(runs: dict, strategy: str) -> None:
    suffix = "_semi" if strategy.endswith("_semi") else ""
    strategy = strategy.removesuffix("_semi")
    one = _state(runs["root"] / f"single{suffix}", strategy)
    two = _state(runs["root"] / f"sharded{suffix}", strategy)
    assert [r["queried"] for r in two["rounds"]] == [r["queried"] for r in one["rounds"]]
    for a, b in zip(one["rounds"], two["rounds"], strict=True):
        np.testing.assert_allclose(b["loss_final"], a["loss_final"], rtol=1e-3, atol=1e-4)
        assert (b["guard"] or {}).get("cases") == (a["guard"] or {}).get("cases")
        np.testing.assert_allclose((b["guard"] or {}).get("plausibility_pretrained", 0.0),
                                   (a["guard"] or {}).get("plausibility_pretrained", 0.0), atol=1e-6)
        assert [c["case_id"] for c in b["per_case"]] == [c["case_id"] for c in a["per_case"]]  # the test set's order
        np.testing.assert_allclose([c["dice_mean"] for c in b["per_case"]], [c["dice_mean"] for c in a["per_case"]],
                                   atol=2e-3)
        assert sorted(b["probe"]) == sorted(a["probe"])
        assert b["reliable"].keys() == a["reliable"].keys()  # semi-supervision: the same reliable volumes
    if suffix:  # the upper bound (DDP on the whole pool) and the rows rank 0 wrote
        rows = [json.loads((runs["root"] / f"{run}{suffix}" / "results.json").read_text())["rows"]
                for run in ("single", "sharded")]
        assert [r["strategy"] for r in rows[1]] == [r["strategy"] for r in rows[0]] and "upper_bound" in \
            {r["strategy"] for r in rows[0]}
        np.testing.assert_allclose([r["dice_mean"] for r in rows[1]], [r["dice_mean"] for r in rows[0]], atol=2e-3)


def test_two_ranks_write_once_and_every_rank_returns_the_rows(runs: dict) -> None:
    sharded = runs["sharded"]
    assert json.loads((sharded / "run.json").read_text())["world_size"] == 2
    one = json.loads((runs["single"] / "results.json").read_text())["rows"]
    two = json.loads((sharded / "results.json").read_text())["rows"]
    assert [(r["strategy"], r["n_labelled"]) for r in two] == [(r["strategy"], r["n_labelled"]) for r in one]
    np.testing.assert_allclose([r["dice_mean"] for r in two], [r["dice_mean"] for r in one], atol=2e-3)
    rank0 = json.loads((sharded / "rows_rank0.json.txt").read_text())
    rank1 = json.loads((sharded / "rows_rank1.json.txt").read_text())
    assert rank0 == rank1  # the same rounds on every rank
    assert sorted(p.name for p in (sharded / "asfda" / "seed0").glob("weights_round*")) == \
        ["weights_round1.safetensors"]


def test_two_ranks_next_picks_the_query_of_one_process(runs: dict) -> None:
    root = runs["root"]
    one = json.loads((root / "project_single" / "annotate" / "round0" / "query.json").read_text())
    two = json.loads((root / "project_sharded" / "annotate" / "round0" / "query.json").read_text())
    assert two["ids"] == one["ids"] and len(two["ids"]) == 2
    np.testing.assert_allclose(two["scores"], one["scores"], rtol=0, atol=1e-5)


def test_two_ranks_finetune_a_project_round_as_one_process(runs: dict) -> None:
    from safetensors.torch import load_file

    root = runs["root"]
    one = json.loads((root / "project_single" / "project.json").read_text())["rounds"][0]
    two = json.loads((root / "project_sharded" / "project.json").read_text())["rounds"][0]
    assert two["labelled_ids"] == one["labelled_ids"] and two["trained_ids"] == one["trained_ids"]
    np.testing.assert_allclose(two["loss_final"], one["loss_final"], rtol=1e-4, atol=1e-5)
    assert (two["guard"] or {}).get("reverted") == (one["guard"] or {}).get("reverted")
    w1 = load_file(str(root / "project_single" / one["weights"]))
    w2 = load_file(str(root / "project_sharded" / two["weights"]))
    assert w1.keys() == w2.keys()
    for k in w1:
        torch.testing.assert_close(w2[k], w1[k], rtol=1e-4, atol=1e-5)
    # one copy of the round's files: rank 0 wrote them
    assert sorted(p.name for p in (root / "project_sharded" / "weights").iterdir()) == ["round0.safetensors"]


def test_a_command_that_does_not_shard_runs_on_rank_0_alone(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                            capsys: pytest.CaptureFixture) -> None:
    from asfda.cli import main

    args = ["phantom", "--n-source", "1", "--n-target", "2", "--no-progress"]
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    assert main([*args[:1], str(tmp_path / "rank1"), *args[1:]]) == 0
    assert not (tmp_path / "rank1").exists()  # the other ranks write nothing
    monkeypatch.setenv("RANK", "0")
    assert main([*args[:1], str(tmp_path / "rank0"), *args[1:]]) == 0
    assert (tmp_path / "rank0" / "target" / "dataset.json").exists()  # rank 0 ran it, as one process
    assert os.environ["WORLD_SIZE"] == "1"
    assert "rank 0 runs it alone" in capsys.readouterr().err


def test_a_batch_smaller_than_the_job_is_refused_before_any_work() -> None:
    from asfda.distributed import DistContext
    from asfda.errors import AsfdaError

    DistContext(0, 2, 0).check_batch(2)
    DistContext().check_batch(1)  # one process: any batch
    with pytest.raises(AsfdaError, match="train.batch_size 1 is smaller than the 2 processes") as err:
        DistContext(1, 2, 1).check_batch(1, "run.yaml")
    assert err.value.fix is not None and "at least 2" in err.value.fix
