"""Fine-tuning step time on the real pair, split into data (patch sampling + augmentation) and compute.

    .venv/bin/python benchmarks/train_step.py [--model ../shared/models/ct_abdomen_unet]
        [--data ../shared/data/mr_chaos_t2] [--steps 10] [--batch-size 2]
"""

from __future__ import annotations

import argparse
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch

from asfda.io import load_dataset
from asfda.loop import Adapter
from asfda.models import load_model
from asfda.training import TrainVolume
from asfda.training.losses import masked_dice_ce
from asfda.training.trainer import _augment, sample_patch
from _machine import cpu_model

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=str(REPO.parent / "shared/models/ct_abdomen_unet"))
    ap.add_argument("--data", default=str(REPO.parent / "shared/data/mr_chaos_t2"))
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--batch-size", type=int, default=2)
    args = ap.parse_args()
    model = load_model(args.model)
    ds = load_dataset(args.data, require_labels=True)
    adapter = Adapter(model, ds.class_names, cache_dir=str(REPO / ".cache"), progress=False)
    vols = [adapter.prepare(c) for c in ds.cases[:2]]
    train = [TrainVolume(v.image, v.label.long()) for v in vols]
    net = adapter.current.train()
    opt = torch.optim.AdamW(net.parameters(), lr=1e-4)
    rng = np.random.default_rng(0)
    t_data = t_compute = 0.0
    for step in range(args.steps + 1):
        t0 = time.perf_counter()
        xs, ys, ms = [], [], []
        for _ in range(args.batch_size):
            x, y, m = sample_patch(train[int(rng.integers(len(train)))], model.roi_size, rng, 0.67)
            xs.append(_augment(x, rng))
            ys.append(y)
            ms.append(m)
        x, y, m = torch.stack(xs), torch.stack(ys), torch.stack(ms)
        t1 = time.perf_counter()
        loss = masked_dice_ce(net(x), y, m)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        t2 = time.perf_counter()
        if step:  # the first step warms up
            t_data += t1 - t0
            t_compute += t2 - t1
    print(f"date {datetime.now(timezone.utc).isoformat(timespec='minutes')}; machine {cpu_model()}, "
          f"{torch.get_num_threads()} torch threads; patch {model.roi_size}, batch {args.batch_size}")
    print(f"per step: data {t_data / args.steps:.3f} s, forward+backward+step {t_compute / args.steps:.3f} s, "
          f"total {(t_data + t_compute) / args.steps:.3f} s")


if __name__ == "__main__":
    main()
