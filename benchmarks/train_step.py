"""Fine-tuning step time on the real pair, split into data (patch sampling + augmentation) and compute.

    .venv/bin/python benchmarks/train_step.py [--model ../shared/models/ct_abdomen_unet]
        [--data ../shared/data/mr_chaos_t2] [--steps 10] [--batch-size 2] [--variants fp32,bf16,channels_last]

Variants (timed in interleaved blocks of one step each, after one warm-up step each): ``fp32`` (the default
trainer), ``bf16`` (forward and loss under ``torch.autocast("cpu", torch.bfloat16)``; weights, gradients and
the optimiser stay fp32), ``channels_last`` (``torch.channels_last_3d`` memory format for weights and patches).
"""

from __future__ import annotations

import argparse
import time
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import torch

from _machine import cpu_model
from asfda.adapter import Adapter
from asfda.io import load_dataset
from asfda.models import load_model
from asfda.training import TrainVolume
from asfda.training.augment import PatchAugmenter
from asfda.training.losses import masked_dice_ce
from asfda.training.trainer import sample_patch

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=str(REPO.parent / "shared/models/ct_abdomen_unet"))
    ap.add_argument("--data", default=str(REPO.parent / "shared/data/mr_chaos_t2"))
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--batch-size", type=int, default=2)
    ap.add_argument("--augmentation", default="intensity", help="intensity (default), spatial_mr or none")
    ap.add_argument("--variants", default="fp32", help="comma-separated: fp32, bf16, channels_last")
    args = ap.parse_args()
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    model = load_model(args.model)
    ds = load_dataset(args.data, require_labels=True)
    adapter = Adapter(model, ds.class_names, cache_dir=str(REPO / ".cache"), progress=False)
    vols = [adapter.prepare(c) for c in ds.cases[:2]]
    train = []
    for v in vols:
        assert v.label is not None, "a dataset loaded with require_labels=True has a label for every case"
        train.append(TrainVolume(v.image, v.label.long()))
    import copy

    nets = {v: copy.deepcopy(adapter.current).train() for v in variants}
    for v, net in nets.items():
        if v == "channels_last":
            net.to(memory_format=torch.channels_last_3d)  # type: ignore[call-overload]  # torch's stub lacks it
    opts = {v: torch.optim.AdamW(nets[v].parameters(), lr=1e-4) for v in variants}
    rng = np.random.default_rng(0)
    augmenter = PatchAugmenter(args.augmentation, model.roi_size, 0)
    t_data = {v: 0.0 for v in variants}
    t_compute = {v: 0.0 for v in variants}
    for step in range(args.steps + 1):
        for v in (variants if step % 2 == 0 else variants[::-1]):
            t0 = time.perf_counter()
            xs, ys, ms = [], [], []
            for _ in range(args.batch_size):
                x, y, m = augmenter(*sample_patch(train[int(rng.integers(len(train)))], augmenter.region, rng, 0.67),
                                    rng)
                xs.append(x)
                ys.append(y)
                ms.append(m)
            x, y, m = torch.stack(xs), torch.stack(ys), torch.stack(ms)
            if v == "channels_last":
                x = x.contiguous(memory_format=torch.channels_last_3d)
            t1 = time.perf_counter()
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=v == "bf16"):
                loss = masked_dice_ce(nets[v](x).float(), y, m)
            opts[v].zero_grad(set_to_none=True)
            loss.backward()
            opts[v].step()
            t2 = time.perf_counter()
            if step:  # the first step of each variant warms up
                t_data[v] += t1 - t0
                t_compute[v] += t2 - t1
    print(f"date {datetime.now(UTC).isoformat(timespec='minutes')}; machine {cpu_model()}, "
          f"{torch.get_num_threads()} torch threads; patch {model.roi_size}, batch {args.batch_size}, "
          f"{args.steps} timed steps per variant")
    for v in variants:
        print(f"{v}: per step: data {t_data[v] / args.steps:.3f} s, forward+backward+step "
              f"{t_compute[v] / args.steps:.3f} s, total {(t_data[v] + t_compute[v]) / args.steps:.3f} s")


if __name__ == "__main__":
    main()
