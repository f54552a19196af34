"""`asfda demo`: the whole loop on the embedded phantom benchmark, asfda against random, one seed, with the
zero-shot lower bound, the full-pool upper bound and the HTML report."""

from __future__ import annotations

import time
from importlib import resources
from pathlib import Path

from asfda.config import RunConfig
from asfda.simulate import SimulationResult, results_table, run_simulation
from asfda.training import TrainConfig

__all__ = ["PHANTOM_MODEL", "demo_config", "run_demo"]


def phantom_model_path() -> Path:
    """The shipped phantom model bundle (trained by ``scripts/train_phantom_model.py``)."""
    return Path(str(resources.files("asfda") / "assets" / "phantom_unet"))


PHANTOM_MODEL = phantom_model_path


def demo_config(out_dir: str | Path, data_dir: str | Path, seed: int = 0) -> RunConfig:
    return RunConfig(
        model=str(phantom_model_path()), pool=str(Path(data_dir) / "target"), test_fraction=0.25,
        strategies=["asfda", "random"], budget=2, rounds=3, seeds=[seed],
        train=TrainConfig(steps=60, batch_size=2, lr=1e-3), cache_dir=str(Path(data_dir) / "cache"),
        out_dir=str(out_dir))


def run_demo(out_dir: str | Path = "runs/demo", data_dir: str | Path = ".cache/phantom", seed: int = 0,
             progress: bool = True) -> SimulationResult:
    from asfda.phantom import generate_benchmark

    t0 = time.perf_counter()
    print(f"[1/2] phantom benchmark (two domains) in {data_dir} ...", flush=True)
    generate_benchmark(data_dir, seed=seed)
    cfg = demo_config(out_dir, data_dir, seed)
    cfg.progress = progress
    print(f"[2/2] adapting the shipped phantom model: strategies {cfg.strategies}, {cfg.rounds} rounds of "
          f"{cfg.budget} labels, seed {seed} ...", flush=True)
    result = run_simulation(cfg)
    print()
    print("Mean Dice on the held-out target test split vs number of labelled target volumes")
    print("(n=0 is the zero-shot pretrained model; AUC = area under the curve / n range):")
    print(results_table(result.summary))
    print(f"\nReport: {(Path(out_dir) / 'report.html').resolve()}")
    print(f"Results: {Path(out_dir).resolve()} (results.md, results.csv, results.json, learning_curve.png, "
          f"run.json); wall time {time.perf_counter() - t0:.0f} s")
    return result
