"""`asfda demo`: the whole loop on the embedded phantom benchmark, asfda against random, one seed, with the
zero-shot lower bound, the full-pool upper bound and the HTML report."""

from __future__ import annotations

import shutil
import time
from importlib import resources
from pathlib import Path

from asfda.config import RunConfig
from asfda.errors import RunSettingsChanged
from asfda.phantom import generate_benchmark
from asfda.project import ProjectSettings, finetune_project, ingest_labels, init_project, next_query, project_status
from asfda.simulate import SimulationResult, results_table, run_simulation
from asfda.training import TrainConfig

__all__ = ["DEMO_STEPS", "demo_config", "phantom_model_path", "run_demo"]

DEMO_STEPS = 60
"""Fine-tuning steps of each demo round, the simulation's and the annotation project's: the demo's own choice (a
short run on the small phantom), not the settings' default (`asfda.config.TrainConfig.steps`)."""


def phantom_model_path() -> Path:
    """The shipped phantom model bundle (trained by ``scripts/train_phantom_model.py``)."""
    return Path(str(resources.files("asfda") / "assets" / "phantom_unet"))


def demo_config(out_dir: str | Path, data_dir: str | Path, seed: int = 0) -> RunConfig:
    return RunConfig(
        model=str(phantom_model_path()), pool=str(Path(data_dir) / "target"), test_fraction=0.25,
        strategies=["asfda", "random"], budget=2, rounds=3, seeds=[seed],
        train=TrainConfig(steps=DEMO_STEPS, batch_size=2, lr=1e-3), cache_dir=str(Path(data_dir) / "cache"),
        out_dir=str(out_dir))


def annotation_round(project_dir: Path, pool: Path, seed: int, progress: bool, steps: int = DEMO_STEPS) -> dict:
    """One round of the hospital workflow on a demo project (re-running it continues where it stopped)."""
    if not (project_dir / "project.json").exists():
        init_project(project_dir, str(phantom_model_path()), str(pool),
                     ProjectSettings(budget=2, seed=seed, train=TrainConfig(steps=steps, batch_size=2)))
    st = project_status(project_dir)
    if st["rounds_finished"] == 0:
        query = next_query(project_dir, progress=progress)
        answers = project_dir.parent / "annotator" / f"round{query['round']}"
        answers.mkdir(parents=True, exist_ok=True)
        for cid in query["ids"]:  # the "annotator": the dataset's own label files
            shutil.copyfile(pool / "labelsTr" / f"{cid}.nii.gz", answers / f"{cid}.nii.gz")
        print(f"  asfda next   -> annotate {', '.join(query['ids'])} ({project_dir / query['folder']})")
        res = ingest_labels(project_dir, answers)
        print(f"  asfda ingest -> accepted {', '.join(res['accepted']) or 'none new'}; refused {len(res['refused'])}")
        rec = finetune_project(project_dir, progress=progress)
        print(f"  asfda finetune -> round {rec['round']} on {len(rec['labelled_ids'])} labels "
              f"in {rec['seconds']:.0f} s; "
              f"adapted bundle {project_dir / 'model'}")
    st = project_status(project_dir)
    rounds = st["rounds_finished"]
    print(f"  asfda status -> {rounds} round{'' if rounds == 1 else 's'}, "
          f"{st['labelled']} of {st['pool_cases']} labelled; "
          f"next: {st['next']}")
    return st


def run_demo(out_dir: str | Path = "runs/demo", data_dir: str | Path = ".cache/phantom", seed: int = 0,
             progress: bool = True) -> SimulationResult:
    t0 = time.perf_counter()
    print(f"[1/3] phantom benchmark (two domains) in {data_dir} ...", flush=True)
    generate_benchmark(data_dir, seed=seed)
    cfg = demo_config(out_dir, data_dir, seed)
    cfg.progress = progress
    print(f"[2/3] simulation: adapting the shipped phantom model with strategies {cfg.strategies}, {cfg.rounds} "
          f"rounds of {cfg.budget} labels, seed {seed}, plus the zero-shot and full-pool bounds ...", flush=True)
    try:
        result = run_simulation(cfg)
    except RunSettingsChanged as exc:  # a demo folder left by another version: keep it, start afresh
        aside = Path(out_dir).with_name(f"{Path(out_dir).name}.before-{time.strftime('%Y%m%d-%H%M%S')}")
        Path(out_dir).rename(aside)
        print(f"note: {out_dir} held a demo run with other settings ({exc.problem}); moved it to {aside} and "
              "starting again", flush=True)
        result = run_simulation(cfg)
    print()
    print("Mean Dice on the held-out target test split vs number of labelled target volumes")
    print("(n=0 is the zero-shot pretrained model; AUC = area under the curve / n range):")
    print(results_table(result.summary))
    print(f"\nReport: {(Path(out_dir) / 'report.html').resolve()}")
    print("\n[3/3] the annotation workflow on the same pool (asfda init / next / ingest / finetune / status), one "
          "round; the phantom's own labels stand in for the annotator ...", flush=True)
    annotation_round(Path(out_dir) / "project", Path(data_dir) / "target", seed, progress, cfg.train.steps)
    print(f"\nResults: {Path(out_dir).resolve()} (report.html, results.md, results.csv, per_case.csv, results.json, "
          f"learning_curve.png, run.json; project/ is the annotation project); wall time "
          f"{time.perf_counter() - t0:.0f} s")
    return result
