"""Speed of `asfda.engine.InferenceEngine.run` (logits + embedding in one pass) against a bare MONAI
`sliding_window_inference` loop: same network, same preprocessed volumes, same sliding-window settings,
both under `torch.inference_mode()` with the logits brought back to the CPU.

Preprocessing is done once, before any timing. Each method is warmed up once on the first volume,
then the two are timed ``--repeats`` times each over all volumes, interleaved volume by volume (the
order alternating), so that a slow spell of a shared machine hits both. The goal is engine / bare <= 1.2
(best repeat of each).

    python benchmarks/engine_speed.py                      # ../shared CT UNet on 4 CHAOS T2 volumes
    python benchmarks/engine_speed.py --phantom            # shipped phantom model on generated phantoms
    python benchmarks/engine_speed.py --out benchmarks/results/engine_speed.md
"""

from __future__ import annotations

import argparse
import datetime
import shlex
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path

import torch
from monai.inferers import sliding_window_inference

from _machine import cpu_model
from asfda.engine import InferenceEngine, select_device
from asfda.io import load_dataset
from asfda.models import load_model, prepare_case

REPO = Path(__file__).resolve().parents[1]



def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _parse(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    ap.add_argument("--model", default=str(REPO.parent / "shared" / "models" / "ct_abdomen_unet"),
                    help="model bundle (default: ../shared/models/ct_abdomen_unet)")
    ap.add_argument("--data", default=str(REPO.parent / "shared" / "data" / "mr_chaos_t2"),
                    help="dataset whose first --n images are used (default: ../shared/data/mr_chaos_t2)")
    ap.add_argument("--phantom", action="store_true",
                    help="use the shipped phantom model on generated phantoms (no shared data needed)")
    ap.add_argument("--phantom-dir", default=str(REPO / ".cache" / "phantom_bench"),
                    help="where --phantom generates its data")
    ap.add_argument("--n", type=int, default=4, help="number of volumes (default 4)")
    ap.add_argument("--repeats", type=int, default=2, help="timed repeats of each method (default 2)")
    ap.add_argument("--device", default="auto", help="auto, cpu, cuda")
    ap.add_argument("--out", help="also write the results as markdown to this file")
    return ap.parse_args(argv)


def _model_and_data(args: argparse.Namespace) -> tuple[Path, Path] | None:
    """The model and the dataset timed: the shipped phantom model on generated phantoms (--phantom), or the shared
    ones (None, said on stderr, when they are not there)."""
    if args.phantom:
        from asfda.demo import phantom_model_path
        from asfda.phantom import generate_benchmark

        n_target = max(args.n, 1)
        data_path = generate_benchmark(Path(args.phantom_dir) / f"n{n_target}", n_source=1, n_target=n_target)["target"]
        return phantom_model_path(), data_path
    model_path, data_path = Path(args.model), Path(args.data)
    if not model_path.exists() or not data_path.exists():
        print(f"shared model or data not found ({model_path}, {data_path}); use --phantom", file=sys.stderr)
        return None
    return model_path, data_path


def _time_interleaved(methods: Mapping[str, Callable[[torch.Tensor], None]], images: list[torch.Tensor], repeats: int,
                      device: torch.device) -> dict[str, list[float]]:
    """Seconds per repeat of each method over all images, after one warm-up each; interleaved volume by volume,
    alternating which method goes first."""
    for fn in methods.values():  # warm-up
        fn(images[0])
    _sync(device)
    times: dict[str, list[float]] = {k: [0.0] * repeats for k in methods}
    order = list(methods)
    for r in range(repeats):
        for i, image in enumerate(images):  # interleaved per volume, alternating which method goes first
            for name in (order if (r * len(images) + i) % 2 == 0 else order[::-1]):
                _sync(device)
                t = time.perf_counter()
                methods[name](image)
                _sync(device)
                times[name][r] += time.perf_counter() - t
        print(f"repeat {r + 1}/{repeats}: " + ", ".join(f"{k} {v[r]:.2f} s" for k, v in times.items()),
              file=sys.stderr, flush=True)
    return times


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    found = _model_and_data(args)
    if found is None:
        return 2
    model_path, data_path = found
    device = select_device(args.device)
    loaded = load_model(model_path)
    cases = list(load_dataset(data_path).cases)[: args.n]
    t0 = time.perf_counter()
    images = [prepare_case(c, loaded.preprocessing, with_label=False).image for c in cases]
    prep_s = time.perf_counter() - t0
    network = loaded.network.to(device).eval()
    roi, swb, overlap = loaded.roi_size, loaded.sw_batch_size, loaded.overlap
    engine = InferenceEngine(network, roi, sw_batch_size=swb, overlap=overlap,
                             embedding_layer=loaded.embedding_layer, device=device)

    def run_engine(image: torch.Tensor) -> None:
        engine.run(image)

    def run_bare(image: torch.Tensor) -> None:
        with torch.inference_mode():
            out = sliding_window_inference(image.to(device)[None], roi, swb, network, overlap=overlap,
                                           mode="constant")
            out[0].float().cpu()

    methods = {"engine": run_engine, "bare": run_bare}
    times = _time_interleaved(methods, images, args.repeats, device)

    best = {k: min(v) for k, v in times.items()}
    ratio = best["engine"] / best["bare"]
    shapes = sorted({tuple(im.shape[1:]) for im in images})
    dev_name = torch.cuda.get_device_name(device) if device.type == "cuda" else (
        f"{cpu_model()}, {torch.get_num_threads()} torch threads")
    lines = [
        f"- command: `python {shlex.join(['benchmarks/engine_speed.py', *(sys.argv[1:] if argv is None else argv)])}`",
        f"- date (UTC): {datetime.datetime.now(datetime.UTC).strftime('%Y-%m-%d %H:%M')}",
        f"- device: {device.type} ({dev_name}); torch {torch.__version__}",
        f"- model: {model_path} ({type(network).__name__}, {len(loaded.class_names)} classes, roi {list(roi)}, "
        f"sw_batch_size {swb}, overlap {overlap}); embedding layer `{engine.embedding_layer}`",
        f"- data: {len(images)} volumes of {data_path}, model-grid shapes {shapes} "
        f"(preprocessing {prep_s:.1f} s, not timed)",
        f"- protocol: 1 warm-up run per method, then {args.repeats} timed repeats over all volumes, interleaved "
        "volume by volume (order alternating)",
        "",
        "| method | time per repeat (s) | best (s) | volumes / s (best) |",
        "|---|---|---|---|",
    ]
    labels = {"engine": "InferenceEngine.run (logits + embedding)", "bare": "bare sliding_window_inference"}
    for name in methods:
        lines.append(f"| {labels[name]} | {', '.join(f'{t:.2f}' for t in times[name])} | {best[name]:.2f} | "
                     f"{len(images) / best[name]:.3f} |")
    lines += ["", f"**engine / bare time ratio: {ratio:.3f}** (goal <= 1.2: {'met' if ratio <= 1.2 else 'NOT met'})"]
    text = "\n".join(lines)
    print(text)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text("# Engine speed\n\n" + text + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
