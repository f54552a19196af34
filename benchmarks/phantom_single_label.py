"""What one label teaches: fine-tune the shipped phantom model on a single target volume, test on a fixed split.

Shows that the phantom's misleading sub-population (``asfda phantom --n-misleading``, cystic livers modelled on the
real pool's outlier chaos_036) teaches far less when learned alone than a typical volume does.

    .venv/bin/python benchmarks/phantom_single_label.py tgt_041 tgt_000 tgt_040 tgt_022 \
        [--data .cache/bench_phantom_adaptation/n40_seed0_mis3] [--steps 60]
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

from asfda.config import RunConfig
from asfda.demo import phantom_model_path
from asfda.phantom import generate_benchmark
from asfda.simulate import run_simulation
from asfda.training import TrainConfig

REPO = Path(__file__).resolve().parents[1]


def _subset(src: Path, dst: Path, ids: list[str]) -> Path:
    """A small nnU-Net dataset holding copies of ``ids`` (phantom volumes are small)."""
    if dst.exists():
        return dst
    (dst / "imagesTr").mkdir(parents=True)
    (dst / "labelsTr").mkdir()
    for i in ids:
        shutil.copy(src / "imagesTr" / f"{i}_0000.nii.gz", dst / "imagesTr")
        shutil.copy(src / "labelsTr" / f"{i}.nii.gz", dst / "labelsTr")
    meta = json.loads((src / "dataset.json").read_text())
    (dst / "dataset.json").write_text(json.dumps({**meta, "numTraining": len(ids)}))
    return dst


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("cases", nargs="+", help="target case ids, each trained on alone")
    ap.add_argument("--data", default=str(REPO / ".cache" / "bench_phantom_adaptation" / "n40_seed0_mis3"))
    ap.add_argument("--test", default="tgt_030-tgt_039", help="test ids as a range FIRST-LAST")
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--work", default=str(REPO / ".cache" / "phantom_single_label"))
    args = ap.parse_args()
    target = generate_benchmark(args.data, seed=0, n_source=1, n_target=40, n_misleading=3)["target"]
    meta = json.loads((target / "phantom_meta.json").read_text())
    first, last = (int(x.split("_")[1]) for x in args.test.split("-"))
    work = Path(args.work)
    test = _subset(target, work / "test", [f"tgt_{i:03d}" for i in range(first, last + 1)])
    for cid in args.cases:
        pool = _subset(target, work / f"pool_{cid}", [cid])
        cfg = RunConfig(model=str(phantom_model_path()), pool=str(pool), test=str(test), strategies=[], rounds=1,
                        budget=1, upper_bound=True, upper_bound_steps=args.steps,
                        train=TrainConfig(steps=args.steps, batch_size=2, lr=1e-3), report=False,
                        out_dir=str(work / f"run_{cid}"), cache_dir=str(work / "cache"), progress=False, threads=1)
        dice = run_simulation(cfg).summary["upper_bound"]["dice"]
        print(f"{cid}\t{meta[cid]['subgroup']}\t{dice:.3f}", flush=True)


if __name__ == "__main__":
    main()
