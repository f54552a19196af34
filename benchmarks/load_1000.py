"""Load: `asfda score` and `asfda predict` on a pool of 1,000 small volumes, and on 100 of them.

Writes N phantom-like volumes (two organs in noise, their size and place varied per volume; 24 x 24 x 16 voxels of
2 x 2 x 3 mm by default) into a temporary nnU-Net raw folder, a tiny MONAI bundle (the tests' UNet), then runs, each in
its own subprocess exactly as a user types them, on the first 100 volumes and on all N:

    asfda score --model BUNDLE --data POOL --out scores.csv      (every strategy's numbers: 9 passes per volume)
    asfda predict --model BUNDLE --images POOL --out labels/

and records the wall time, the peak resident memory of the child (``ru_maxrss`` of ``os.wait4`` on it: VmHWM), that
the progress bar counted to N (the bar's largest count in the child's stderr, with ``TQDM_MININTERVAL=0`` so that
every step is drawn), and that the outputs hold N cases (CSV rows, label maps). The pool is streamed, so the peak
should not grow with the pool: the result gives the ratio N / 100.

    nice -n 19 .venv/bin/python benchmarks/load_1000.py [--n 1000] [--small 100] [--shape 24,24,16]
        [--out benchmarks/results/load_1000.md] [--work DIR] [--keep]
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

from _data import write_bundle, write_nifti
from _machine import code_version, machine

REPO = Path(__file__).resolve().parents[1]

AFFINE = np.diag([2.0, 2.0, 3.0, 1.0])
LABELS = {"background": 0, "liver": 1, "spleen": 2}


def phantom_volume(seed: int, shape: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
    """A small phantom-like volume: two box organs of seeded size and place in noise, and its label map."""
    rng = np.random.default_rng(seed)
    x, y, z = shape
    label = np.zeros(shape, np.uint8)
    for value, (lo, hi) in ((1, (0.1, 0.45)), (2, (0.55, 0.9))):
        a = rng.integers(int(lo * x), int(lo * x) + max(1, x // 8))
        b = rng.integers(int(0.15 * y), int(0.15 * y) + max(1, y // 6))
        c = rng.integers(int(0.15 * z), int(0.15 * z) + max(1, z // 6))
        label[a:int(hi * x), b:b + max(3, y // 3), c:c + max(2, z // 3)] = value
    contrast = rng.uniform(0.3, 0.6)
    image = (rng.normal(0, 0.05, shape) + label * contrast).astype(np.float32)
    return image, label


def write_pool(root: Path, n: int, shape: tuple[int, ...]) -> Path:
    """An nnU-Net raw folder of ``n`` images (no labels: score and predict need none)."""
    (root / "imagesTr").mkdir(parents=True, exist_ok=True)
    for i in range(n):
        image, _ = phantom_volume(i, shape)
        write_nifti(root / "imagesTr" / f"vol{i:04d}_0000.nii.gz", image, AFFINE)
    (root / "dataset.json").write_text(json.dumps({"channel_names": {"0": "MR"}, "labels": LABELS, "numTraining": n,
                                                   "file_ending": ".nii.gz"}))
    return root


def subset(src: Path, dst: Path, n: int) -> Path:
    """The first ``n`` volumes of ``src`` as a dataset of its own (hard links, or copies across file systems)."""
    (dst / "imagesTr").mkdir(parents=True, exist_ok=True)
    for p in sorted((src / "imagesTr").iterdir())[:n]:
        try:
            os.link(p, dst / "imagesTr" / p.name)
        except OSError:
            shutil.copyfile(p, dst / "imagesTr" / p.name)
    meta = json.loads((src / "dataset.json").read_text())
    (dst / "dataset.json").write_text(json.dumps({**meta, "numTraining": n}))
    return dst


def run_child(argv: list[str], cwd: Path, log: Path) -> dict:
    """Runs ``python -m asfda.cli ARGV`` and measures it: wall seconds, peak resident set (MB), exit code, output."""
    env = dict(os.environ, OMP_NUM_THREADS="1", TQDM_MININTERVAL="0", PYTHONUNBUFFERED="1")
    cmd = [sys.executable, "-m", "asfda.cli", *argv]
    with open(log.with_suffix(".out"), "w") as out, open(log.with_suffix(".err"), "w") as err:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=out, stderr=err)
        _, status, usage = os.wait4(proc.pid, 0)
        seconds = time.perf_counter() - t0
        proc.returncode = os.waitstatus_to_exitcode(status)
    stdout, stderr = log.with_suffix(".out").read_text(), log.with_suffix(".err").read_text()
    if proc.returncode != 0:
        raise SystemExit(f"{shlex.join(cmd)} failed ({proc.returncode}):\n{stderr[-3000:]}")
    return {"argv": argv, "seconds": seconds, "peak_mb": usage.ru_maxrss / 1024, "stdout": stdout, "stderr": stderr}


def bar_count(stderr: str, desc: str) -> tuple[int, int]:
    """The largest ``n/total`` a tqdm bar named ``desc`` drew."""
    counts = [(int(a), int(b)) for a, b in re.findall(rf"{re.escape(desc)}:[^\r\n]*?\b(\d+)/(\d+)\b", stderr)]
    return max(counts) if counts else (0, 0)


def measure(pool: Path, bundle: Path, work: Path, n: int) -> dict:
    out = work / f"out{n}"
    out.mkdir(parents=True, exist_ok=True)
    score = run_child(["score", "--model", str(bundle), "--data", str(pool), "--out", str(out / "scores.csv"),
                       "--device", "cpu"], out, out / "score")
    with open(out / "scores.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    score.update(bar=bar_count(score["stderr"], "score pool"), rows=len(rows),
                 embeddings=int(np.load(out / "scores.embeddings.npy").shape[0]))
    predict = run_child(["predict", "--model", str(bundle), "--images", str(pool), "--out", str(out / "labels"),
                         "--device", "cpu"], out, out / "predict")
    predict.update(bar=bar_count(predict["stderr"], "predict"),
                   rows=len([p for p in (out / "labels").glob("[!.]*.nii.gz")]))
    for name, r in (("score", score), ("predict", predict)):
        ok = r["bar"] == (n, n) and r["rows"] == n
        print(f"{name} x {n}: {r['seconds']:.1f} s, peak {r['peak_mb']:.0f} MB, bar {r['bar'][0]}/{r['bar'][1]}, "
              f"{r['rows']} outputs{'' if ok else '  <-- MISMATCH'}", file=sys.stderr)
    return {"score": score, "predict": predict}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=1000)
    ap.add_argument("--small", type=int, default=100)
    ap.add_argument("--shape", default="24,24,16")
    ap.add_argument("--out", default=str(REPO / "benchmarks/results/load_1000.md"))
    ap.add_argument("--work", help="working folder (default: a temporary one, removed at the end)")
    ap.add_argument("--keep", action="store_true", help="keep the working folder")
    args = ap.parse_args()
    shape = tuple(int(s) for s in args.shape.split(","))
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="asfda-load-"))
    load_before = os.getloadavg()
    t0 = time.perf_counter()
    try:
        bundle = write_bundle(work / "bundle")
        t = time.perf_counter()
        pool = write_pool(work / "pool", args.n, shape)
        write_s = time.perf_counter() - t
        small = subset(pool, work / f"pool{args.small}", args.small)
        results = {args.small: measure(small, bundle, work, args.small), args.n: measure(pool, bundle, work, args.n)}
        scored_line = next((ln for ln in results[args.n]["score"]["stdout"].splitlines()
                            if ln.startswith("scored")), "")
    finally:
        if not args.keep and not args.work:
            shutil.rmtree(work, ignore_errors=True)
    total = time.perf_counter() - t0
    load_after = os.getloadavg()
    lines = ["# Load: `asfda score` and `asfda predict` on 1,000 volumes", "",
             f"- command: `nice -n 19 .venv/bin/python {shlex.join(['benchmarks/load_1000.py', *sys.argv[1:]])}`",
             f"- date (UTC): {datetime.now(UTC).strftime('%Y-%m-%d %H:%M')}; code {code_version()}; "
             f"total {total:.0f} s",
             f"- machine: {machine()}; each command in its own process with `OMP_NUM_THREADS=1` (1 torch thread); "
             f"2 cores shared with two long benchmark runs (load average {load_before[0]:.1f} before, "
             f"{load_after[0]:.1f} after), this run at nice 19, so the times are upper bounds",
             f"- pool: {args.n} phantom-like volumes of {'x'.join(map(str, shape))} voxels (2 x 2 x 3 mm), written "
             f"as an nnU-Net raw folder in {write_s:.0f} s; the first {args.small} as a second pool; model: the "
             "tests' tiny UNet bundle (channels 4-8-16, roi 16 x 16 x 8, dropout 0.1)",
             "- `score` runs every strategy's needs (8 forward passes a volume, as it reports below: 1 + 5 MC "
             "dropout + 2 TTA flips; the normalisation hooks and the BADGE vectors ride on the first) and writes its "
             "prepared-volume and score caches under the working folder; `predict`: 1 pass a volume, no cache",
             "- s / volume includes the start (imports, model loading: a few seconds); the marginal cost of a volume "
             f"is the difference between the two pool sizes divided by {args.n - args.small}",
             "- peak memory: `ru_maxrss` of the child (`os.wait4`), the kernel's high-water mark of its resident set; "
             "progress: the largest count the command's own tqdm bar drew", "",
             "| command | volumes | wall s | s / volume | peak resident MB | progress bar | outputs |",
             "|---|---|---|---|---|---|---|"]
    for n, res in results.items():
        for name in ("score", "predict"):
            r = res[name]
            what = "CSV rows" if name == "score" else "label maps"
            lines.append(f"| `asfda {name}` | {n} | {r['seconds']:.1f} | {r['seconds'] / n:.3f} | {r['peak_mb']:.0f} | "
                         f"{r['bar'][0]}/{r['bar'][1]} | {r['rows']} {what} |")
    lines.append("")
    for name in ("score", "predict"):
        big, little = results[args.n][name], results[args.small][name]
        marginal = (big["seconds"] - little["seconds"]) / (args.n - args.small)
        lines.append(f"- `asfda {name}`: peak {args.n} / {args.small} volumes = "
                     f"**{big['peak_mb'] / little['peak_mb']:.2f}**"
                     f"; marginal {marginal:.3f} s a volume")
    ok = all(r[k]["bar"] == (n, n) and r[k]["rows"] == n for n, r in results.items() for k in ("score", "predict"))
    lines += [f"- every bar counted to its pool size and every output holds one row / map per volume: "
              f"**{'yes' if ok else 'NO'}**; `score` printed: `{scored_line[:160]}`", ""]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
