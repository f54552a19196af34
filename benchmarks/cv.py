"""Cross-validated active adaptation on a real pair: every labelled target volume is a test volume exactly once.

The target dataset's volumes are split into K folds (sorted ids, a permutation seeded by --fold-seed, then
``np.array_split``). For fold k the pool is the other folds' volumes and the test set fold k's; each fold runs
``asfda.simulate.run_simulation`` (strategies x seeds, 1 label per round, rounds 1..R, optionally the full-pool
upper bound) under OUT/fold<k>, resumable per round. The per-fold datasets are folders of symlinks under
``.cache/cv/`` (no image data is copied). The summary reads every fold's per-round files back and gives each
test volume's Dice per strategy, seed and number labelled; a fold that has not run (yet) is listed as missing.

    # CT model -> CHAOS MR (14 volumes, 7 folds of 2)
    .venv/bin/python benchmarks/cv.py
    # MR model -> BTCV CT (24 volumes, 6 folds of 4)
    .venv/bin/python benchmarks/cv.py --model ../shared/models/mr_abdomen_unet --data ../shared/data/ct_btcv4 \\
        --folds 6 --out benchmarks/results/mr_to_ct_cv
    # parts on different machines: --only-folds 0,1,2 here, --only-folds 3,4,5,6 there (same --out, then copy the
    # fold folders together); --summarize-only re-reads what is on disk and writes the summary

Writes OUT/summary.json, OUT/README.md (tables, provenance, what is missing) and OUT/learning_curve.png.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import time
from collections.abc import Iterable, Sequence
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))  # _machine, when imported from the tests

from _machine import code_version, machine  # noqa: E402

from asfda.io import atomic_write_json, atomic_write_text, load_dataset  # noqa: E402
from asfda.io.datasets import LINKED_FROM_KEY  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
UPPER = "upper_bound"
ZERO = "zero_shot"
PROVENANCE = "cv_provenance.json"  # per fold: one entry per invocation that computed something there
FOLDS_FILE = "folds.json"

__all__ = ["fold_assignment", "fold_datasets_root", "make_fold_datasets", "run_fold", "summarize", "main"]


# ------------------------------------------------------------------------------------------------- folds
def fold_assignment(ids: Iterable[str], folds: int, seed: int = 0) -> list[list[str]]:
    """K disjoint folds covering every id once: sorted ids, a permutation seeded by ``seed``, ``np.array_split``.

    Each fold's ids are returned sorted. Deterministic: the same ids (in any order), K and seed give the same folds.
    """
    ids = sorted(ids)
    if len(set(ids)) != len(ids):
        raise ValueError("case ids are not unique")
    if not 2 <= folds <= len(ids):
        raise ValueError(f"--folds must be between 2 and the number of volumes ({len(ids)}), got {folds}")
    perm = np.random.default_rng(seed).permutation(len(ids))
    return [sorted(ids[i] for i in part) for part in np.array_split(perm, folds)]


def fold_datasets_root(cache_dir: str | Path, data: str | Path, folds: int, seed: int) -> Path:
    """Where the per-fold symlink datasets of ``data`` live: ``CACHE/cv/<dataset>/<K>folds_seed<S>``."""
    return Path(cache_dir) / "cv" / Path(data).resolve().name / f"{folds}folds_seed{seed}"


def _link(dst: Path, target: Path) -> None:
    """``dst`` -> ``target`` (absolute), replaced atomically when it points elsewhere; left alone when right."""
    if dst.is_symlink() and os.readlink(dst) == str(target):
        return
    tmp = dst.with_name(f".{dst.name}.tmp{os.getpid()}")  # dot files are skipped by the dataset reader
    tmp.unlink(missing_ok=True)
    os.symlink(target, tmp)
    os.replace(tmp, dst)


def _write_dataset(folder: Path, meta: dict, cases: list, ending: str, source: Path) -> Path:
    """One nnU-Net raw dataset of symlinks: dataset.json (numTraining adjusted, the ``source`` dataset the links
    point into named as ``asfda_linked_from``, without which asfda refuses links to outside a dataset) +
    imagesTr/labelsTr links."""
    want = {"imagesTr": {f"{c.case_id}_0000{ending}": c.image_path for c in cases},
            "labelsTr": {f"{c.case_id}{ending}": c.label_path for c in cases}}
    for sub, files in want.items():
        d = folder / sub
        d.mkdir(parents=True, exist_ok=True)
        for name, src in files.items():
            _link(d / name, Path(src).resolve())
        for entry in d.iterdir():  # what an earlier assignment left
            if entry.name not in files:
                if entry.is_dir() and not entry.is_symlink():
                    shutil.rmtree(entry)
                else:
                    entry.unlink()
    meta = dict(meta, numTraining=len(cases), **{LINKED_FROM_KEY: str(Path(source).resolve())})
    if isinstance(meta.get("training"), list):  # nnU-Net v1 style case list
        keep = {c.case_id for c in cases}
        meta["training"] = [t for t in meta["training"] if isinstance(t, dict)
                            and Path(str(t.get("label", ""))).name.removesuffix(ending) in keep]
    meta.pop("test", None)
    meta.pop("numTest", None)
    text = json.dumps(meta, indent=2) + "\n"
    path = folder / "dataset.json"
    if not path.is_file() or path.read_text() != text:
        atomic_write_text(path, text)
    return folder


def make_fold_datasets(data: str | Path, assignment: Sequence[Sequence[str]], root: str | Path,
                       folds: Iterable[int] | None = None) -> dict[int, tuple[Path, Path]]:
    """Builds ``root/fold<k>/{pool,test}`` (symlinks to ``data``'s files, no copies) for the folds asked
    (default all); idempotent: a second call changes nothing, a changed assignment is corrected in place.

    Returns ``{k: (pool_dir, test_dir)}``.
    """
    data, root = Path(data), Path(root)
    ds = load_dataset(data, require_labels=True)
    meta = json.loads((data / "dataset.json").read_text(encoding="utf-8"))
    ending = meta.get("file_ending", ".nii.gz")
    by_id = ds.by_id()
    every = sorted(i for fold in assignment for i in fold)
    if every != sorted(by_id):
        raise ValueError(f"the fold assignment does not cover the dataset's {len(by_id)} cases exactly once")
    out = {}
    for k in (range(len(assignment)) if folds is None else folds):
        test = set(assignment[k])
        pool_dir = _write_dataset(root / f"fold{k}" / "pool", meta,
                                  [by_id[i] for i in sorted(by_id) if i not in test], ending, data)
        test_dir = _write_dataset(root / f"fold{k}" / "test", meta, [by_id[i] for i in sorted(test)], ending, data)
        out[k] = (pool_dir, test_dir)
    return out


# -------------------------------------------------------------------------------------------- reading back
def _jload(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


METRICS = ("dice_mean", "lcc_dice_mean", "pp_dice_mean")
"""Case Dice read from the per-case rows: as predicted, after cutting each organ to its largest component, or after
cutting only the organs the cross-validation chose (`choose_postprocessing`: nnU-Net's rule)."""
POSTPROCESSING = "postprocessing.json"


def _classes(row: dict) -> list[str]:
    return [k[len("dice_"):] for k in row if k.startswith("dice_") and k != "dice_mean"]


def _case_dice(row: dict, metric: str, pp: Sequence[str] = ()) -> float:
    """A per-case row's Dice under ``metric``; ``pp_dice_mean``: the mean over classes of the Dice after cutting the
    classes in ``pp`` to their largest component, the others as predicted (NaN classes left out, as simulate does)."""
    if metric != "pp_dice_mean":
        return float(row.get(metric, math.nan))
    vals = [float(row.get(f"lcc_dice_{c}" if c in pp else f"dice_{c}", math.nan)) for c in _classes(row)]
    vals = [v for v in vals if not math.isnan(v)]
    return float(np.mean(vals)) if vals else math.nan


def _dice_by_case(per_case: list[dict], metric: str = "dice_mean", pp: Sequence[str] = ()) -> dict[str, float]:
    return {r["case_id"]: _case_dice(r, metric, pp) for r in per_case}


def choose_postprocessing(out: str | Path, folds: int, strategies: Sequence[str], seeds: Sequence[int]) -> dict:
    """nnU-Net's choice of post-processing by cross-validation, per class: cut a class to its largest connected
    component when that raises the class's mean Dice over every fine-tuned prediction of the cross-validation (each
    test volume in its fold, every strategy, seed and labelled count n >= 1; NaN Dice left out). Returns
    ``{"classes": [chosen], "per_class": {class: {"dice": x, "lcc_dice": y, "predictions": k}}, "rule": str}``."""
    out = Path(out)
    sums: dict[str, list[list[float]]] = {}
    for k in range(folds):
        for name in strategies:
            for seed in seeds:
                st = _jload(out / f"fold{k}" / name / f"seed{seed}" / "state.json") or {}
                for rec in st.get("rounds", []):
                    for row in rec.get("per_case") or []:
                        for c in _classes(row):
                            a, b = float(row.get(f"dice_{c}", math.nan)), float(row.get(f"lcc_dice_{c}", math.nan))
                            if not (math.isnan(a) or math.isnan(b)):
                                sums.setdefault(c, []).append([a, b])
    per_class = {c: {"dice": float(np.mean([v[0] for v in vals])), "lcc_dice": float(np.mean([v[1] for v in vals])),
                     "predictions": len(vals)} for c, vals in sums.items()}
    chosen = [c for c, v in per_class.items() if v["lcc_dice"] > v["dice"]]
    return {"classes": chosen, "per_class": per_class,
            "rule": "largest component for a class when it raises the class's mean Dice over every fine-tuned "
                    "prediction of the cross-validation (nnU-Net's rule, per class)",
            "predict": f"asfda predict --largest-component {','.join(chosen)}" if chosen else "no post-processing"}


def read_fold(out: str | Path, strategies: Sequence[str], seeds: Sequence[int], metric: str = "dice_mean",
              pp: Sequence[str] = ()) -> dict:
    """What fold folder ``out`` holds, straight from simulate's files (no model needed).

    ``{"zero": {seed: {case: dice}}, "upper": {seed: {"dice": {case: dice}, "steps": int, "pool": [ids]}},
    "runs": {name: {seed: {n: {"dice": {case: dice}, "device": str | None, "round": int, "reverted": bool}}}},
    "config": run.json's config or {}}``. Case Dice is simulate's ``dice_mean`` (mean over foreground classes).
    """
    out = Path(out)
    res: dict = {"zero": {}, "upper": {}, "runs": {n: {} for n in strategies}, "config": {}}
    run = _jload(out / "run.json")
    if run:
        res["config"] = run.get("config", {})
    for seed in seeds:
        zs = _jload(out / f"zero_shot_seed{seed}.json")
        if zs and zs.get("per_case"):
            res["zero"][seed] = _dice_by_case(zs["per_case"], metric, pp)
        ub = _jload(out / UPPER / f"seed{seed}.json")
        if ub and ub.get("per_case"):
            res["upper"][seed] = {"dice": _dice_by_case(ub["per_case"], metric, pp), "steps": ub.get("steps"),
                                  "pool": (ub.get("key") or {}).get("pool", [])}
        for name in strategies:
            st = _jload(out / name / f"seed{seed}" / "state.json")
            if st:
                res["runs"][name][seed] = {
                    int(r["n_labelled"]): {"dice": _dice_by_case(r["per_case"], metric, pp), "device": r.get("device"),
                                           "round": r["round"],
                                           "reverted": bool((r.get("guard") or {}).get("reverted"))}
                    for r in st.get("rounds", []) if r.get("per_case")}
    return res


def _done_items(out: Path, strategies: Sequence[str], seeds: Sequence[int]) -> set[str]:
    got = read_fold(out, strategies, seeds)
    items = {f"{ZERO}/seed{s}" for s in got["zero"]} | {f"{UPPER}/seed{s}" for s in got["upper"]}
    items |= {f"{name}/seed{s}/n={n}" for name, by_seed in got["runs"].items() for s, by_n in by_seed.items()
              for n in by_n}
    return items


# ----------------------------------------------------------------------------------------------- running
def run_fold(k: int, model: str | Path, pool: str | Path, test: str | Path, out_dir: str | Path, *,
             strategies: Sequence[str] = ("asfda", "random"), seeds: Sequence[int] = (0, 1), rounds: int = 4,
             steps: int = 200, precision: str = "bf16", augmentation: str = "intensity", threads: int = 0,
             restart: bool = False, evaluate_tta: bool = False, representativeness: str = "none",
             hold_back: bool = False,
             upper_bound: bool = True, upper_bound_steps: int = 1000,
             cache_dir: str | Path | None = None, progress: bool = False, report: bool = True,
             command: str = "", machine_line: str | None = None, commit: str | None = None):
    """Runs (or resumes) fold ``k``: ``run_simulation`` on the fold's pool and test folders, 1 label per round.

    Appends to ``out_dir/cv_provenance.json`` which machine and commit computed which parts in this call
    (written even when the run stops with an exception). Returns the `SimulationResult`.
    """
    from asfda.config import RunConfig
    from asfda.simulate import run_simulation
    from asfda.training import TrainConfig

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    cfg = RunConfig(model=str(model), pool=str(pool), test=str(test), strategies=list(strategies),
                    seeds=list(seeds), budget=1, rounds=rounds,
                    train=TrainConfig(steps=steps, batch_size=2, precision=precision, augmentation=augmentation,
                                      restart=restart, hold_back_discarded=hold_back),
                    threads=threads, evaluate_tta=evaluate_tta, representativeness=representativeness,
                    upper_bound=upper_bound, upper_bound_steps=upper_bound_steps, report=report,
                    out_dir=str(out_dir), cache_dir=str(cache_dir or REPO / ".cache"), progress=progress)
    before = _done_items(out_dir, strategies, seeds)
    start, t0 = datetime.now(timezone.utc), time.perf_counter()
    status = "interrupted"
    try:
        result = run_simulation(cfg)
        status = "finished"
        return result
    finally:
        computed = sorted(_done_items(out_dir, strategies, seeds) - before)
        if computed or status != "finished":
            log = (_jload(out_dir / PROVENANCE) or {}).get("entries", [])
            log.append({"fold": k, "machine": machine_line or machine(), "commit": commit or code_version(),
                        "command": command, "start": start.isoformat(timespec="seconds"),
                        "wall_s": round(time.perf_counter() - t0, 1), "status": status, "computed": computed})
            atomic_write_json(out_dir / PROVENANCE, {"entries": log})


# --------------------------------------------------------------------------------------------- summary
def _mean(values: Iterable[float | None]) -> float | None:
    vals = [float(v) for v in values if v is not None and not math.isnan(float(v))]
    return float(np.mean(vals)) if vals else None


def _clean(obj):
    """JSON without NaN (null instead)."""
    if isinstance(obj, float):
        return None if math.isnan(obj) else obj
    if isinstance(obj, dict):
        return {str(k): _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    return obj


def _ranges(ns: Sequence[int]) -> str:
    ns = sorted(ns)
    parts, i = [], 0
    while i < len(ns):
        j = i
        while j + 1 < len(ns) and ns[j + 1] == ns[j] + 1:
            j += 1
        parts.append(str(ns[i]) if i == j else f"{ns[i]}-{ns[j]}")
        i = j + 1
    return ",".join(parts)


def _provenance_lines(got: dict, strategies: Sequence[str], seeds: Sequence[int],
                      log: list[dict]) -> dict[str, str]:
    """Per strategy (and zero-shot, upper bound): where each seed's rounds ran, from the devices simulate
    recorded per round and the machine lines this script logged when it computed them."""
    def who(item_prefix: str) -> str:
        hits = [e for e in log if any(c == item_prefix or c.startswith(item_prefix + "/") for c in e["computed"])]
        return "; ".join(sorted({f"{e['machine']}, commit {e['commit']}, {e['start'][:16]}" for e in hits}))

    def grouped(descr: dict[int, str]) -> str:
        by: dict[str, list[int]] = {}
        for s, d in descr.items():
            by.setdefault(d, []).append(s)
        return "; ".join(f"seed{'s' if len(ss) > 1 else ''} {','.join(map(str, ss))}: {d}" for d, ss in by.items())

    lines = {}
    for name in strategies:
        descr = {}
        for s in seeds:
            by_n = got["runs"][name].get(s, {})
            if not by_n:
                continue
            devices: dict[str, list[int]] = {}
            for n, rec in by_n.items():
                devices.setdefault(rec["device"] or "device not recorded", []).append(n)
            where = ", ".join(f"n={_ranges(ns)} on {d}" for d, ns in sorted(devices.items()))
            logged = who(f"{name}/seed{s}")
            descr[s] = where + (f" [{logged}]" if logged else "")
        lines[name] = grouped(descr) or "nothing on disk"
    for name, key in ((ZERO, "zero"), (UPPER, "upper")):
        descr = {s: who(f"{name}/seed{s}") or "machine not recorded (simulate keeps no device for it)"
                 for s in seeds if s in got[key]}
        if descr:
            lines[name] = grouped(descr)
    return lines


def summarize(out: str | Path, assignment: Sequence[Sequence[str]], *, strategies: Sequence[str] = ("asfda", "random"),
              seeds: Sequence[int] = (0, 1), rounds: int = 4, upper_bound: bool = True,
              upper_bound_steps: int | None = None, steps: int | None = None, precision: str | None = None,
              command: str = "", machine_line: str | None = None, commit: str | None = None,
              plot: bool = True, metric: str = "dice_mean", pp: Sequence[str] = ()) -> dict:
    """Reads every fold folder ``out/fold<k>`` and writes ``out/summary.json``, ``out/README.md`` and
    ``out/learning_curve.png``; returns the summary. Only files on disk are read: a fold not run (yet) is listed
    under "missing" and "complete" is false. Results on disk for other test cases than ``assignment`` says (a
    folder of another fold assignment) count as missing. ``steps`` / ``precision`` / ``upper_bound_steps``, when
    given, are checked against each fold's run.json (mismatches become per-fold warnings). ``metric``
    ``lcc_dice_mean`` reads the Dice after largest-component post-processing instead, into
    ``summary.lcc_dice_mean.json`` (and README / curve of the same suffix); ``pp_dice_mean`` cuts only the classes
    ``pp`` (the cross-validation's choice, `choose_postprocessing`)."""
    out = Path(out)
    strategies, seeds = list(strategies), list(seeds)
    ns = list(range(1, rounds + 1))
    missing: list[str] = []
    per_fold: dict[str, dict] = {}
    # per volume: {case: {"fold": k, "zero": {seed: d}, "upper": {seed: d}, "runs": {name: {n: {seed: d}}}}}
    vols: dict[str, dict] = {}
    for k, test_ids in enumerate(assignment):
        fdir = out / f"fold{k}"
        got = read_fold(fdir, strategies, seeds, metric, pp)
        test_set = set(test_ids)
        warnings = []
        for case in test_ids:
            vols[case] = {"fold": k, "zero": {}, "upper": {},
                          "runs": {name: {n: {} for n in ns} for name in strategies}}

        def usable(dice: dict[str, float], what: str) -> bool:
            if set(dice) == test_set:
                return True
            warnings.append(f"{what}: on disk for test cases {sorted(dice)}, not this fold's {sorted(test_set)}")
            return False

        for s in seeds:
            z = got["zero"].get(s)
            if z is not None and usable(z, f"{ZERO} seed{s}"):
                for c, d in z.items():
                    vols[c]["zero"][s] = d
            else:
                missing.append(f"fold{k} {ZERO} seed{s}")
            for name in strategies:
                by_n = got["runs"][name].get(s, {})
                lacking = []
                for n in ns:
                    rec = by_n.get(n)
                    if rec is not None and usable(rec["dice"], f"{name} seed{s} n={n}"):
                        for c, d in rec["dice"].items():
                            vols[c]["runs"][name][n][s] = d
                    else:
                        lacking.append(n)
                if lacking:
                    missing.append(f"fold{k} {name} seed{s} n={_ranges(lacking)}")
            ub = got["upper"].get(s)
            ub_ok = ub is not None and usable(ub["dice"], f"{UPPER} seed{s}")
            if ub_ok and upper_bound_steps and ub["steps"] not in (None, upper_bound_steps):
                warnings.append(f"{UPPER} seed{s}: trained {ub['steps']} steps, not {upper_bound_steps}")
                ub_ok = False
            if ub_ok:
                for c, d in ub["dice"].items():
                    vols[c]["upper"][s] = d
            elif upper_bound:
                missing.append(f"fold{k} {UPPER} seed{s}")
        train = got["config"].get("train", {})
        for what, want in (("steps", steps), ("precision", precision)):
            have = train.get(what)
            if want is not None and have is not None and want != have:
                warnings.append(f"run.json (the last run of this fold) has train.{what}={have!r}, not {want!r}")
        log = (_jload(fdir / PROVENANCE) or {}).get("entries", [])
        fold_curves = {}
        for name in strategies:
            curve = {0: _mean(_mean(vols[c]["zero"].values()) for c in test_ids)}
            curve.update({n: _mean(_mean(vols[c]["runs"][name][n].values()) for c in test_ids) for n in ns})
            reverted = sum(rec["reverted"] for by_n in got["runs"][name].values()
                           for n, rec in by_n.items() if n <= rounds)
            fold_curves[name] = {"dice_by_n": curve, "auc": _auc(curve), "rounds_discarded_by_guard": reverted}
        ub_pool = next((u["pool"] for u in got["upper"].values()), [])
        per_fold[str(k)] = {
            "test": list(test_ids), "pool_size": sum(len(f) for f in assignment) - len(test_ids),
            "zero_shot": _mean(_mean(vols[c]["zero"].values()) for c in test_ids),
            "upper_bound": _mean(_mean(vols[c]["upper"].values()) for c in test_ids),
            "upper_bound_pool": len(ub_pool) or None,
            "strategies": fold_curves,
            "provenance": _provenance_lines(got, strategies, seeds, log),
            "runs": [{key: e[key] for key in ("machine", "commit", "start", "wall_s", "status")} for e in log],
            "config": {"steps": train.get("steps"), "precision": train.get("precision"),
                       "upper_bound_steps": got["config"].get("upper_bound_steps")} if train else {},
            "warnings": warnings,
        }
    cases = sorted(vols)
    zero_by_seed = {s: _mean(vols[c]["zero"].get(s) for c in cases) for s in seeds}
    summary_strategies = {}
    for name in strategies:
        per_seed = {s: {0: zero_by_seed[s], **{n: _mean(vols[c]["runs"][name][n].get(s) for c in cases) for n in ns}}
                    for s in seeds}
        dice_by_n = {n: _mean(per_seed[s][n] for s in seeds) for n in [0, *ns]}
        summary_strategies[name] = {"dice_by_n": dice_by_n, "auc": _auc(dice_by_n),
                                    "dice_by_n_per_seed": per_seed}
    per_volume = {}
    for c in cases:
        v = vols[c]
        per_volume[c] = {"zero_shot": _mean(v["zero"].values()),
                         "upper_bound": _mean(v["upper"].values()),
                         **{name: {n: _mean(v["runs"][name][n].values()) for n in ns} for name in strategies}}
    summary = {
        "folds": len(assignment), "seeds": seeds, "metric": metric,
        **({"postprocessing": list(pp)} if metric == "pp_dice_mean" else {}),
        "zero_shot": _mean(zero_by_seed.values()),
        "upper_bound": _mean(_mean(vols[c]["upper"].get(s) for c in cases) for s in seeds) if cases else None,
        "strategies": summary_strategies, "per_fold": per_fold, "per_volume": per_volume,
        "complete": not missing, "missing": missing,
        "machine": machine_line or machine(), "commit": commit or code_version(), "command": command,
        "date": datetime.now(timezone.utc).isoformat(timespec="minutes"),
    }
    summary = _clean(summary)
    out.mkdir(parents=True, exist_ok=True)
    suffix = "" if metric == "dice_mean" else f".{metric}"
    atomic_write_json(out / f"summary{suffix}.json", summary)
    if plot:
        plot_curves(summary, out / f"learning_curve{suffix}.png")
    atomic_write_text(out / f"README{suffix}.md", readme(summary))
    return summary


def _auc(dice_by_n: dict) -> float | None:
    """The mean Dice over n = 0..R (None while any n has no value)."""
    vals = list(dice_by_n.values())
    if not vals or any(v is None or (isinstance(v, float) and math.isnan(v)) for v in vals):
        return None
    return float(np.mean(vals))


def plot_curves(summary: dict, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    from asfda.io import atomic_write

    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    for name, s in summary["strategies"].items():
        pts = [(int(n), d) for n, d in s["dice_by_n"].items() if d is not None]
        if not pts:
            continue
        x, y = zip(*pts)
        seeds = [ps for ps in s["dice_by_n_per_seed"].values()]
        lo = [min((ps.get(str(n)) for ps in seeds if ps.get(str(n)) is not None), default=d) for n, d in pts]
        hi = [max((ps.get(str(n)) for ps in seeds if ps.get(str(n)) is not None), default=d) for n, d in pts]
        ax.plot(x, y, marker="o", label=f"{name} (AUC {s['auc']:.3f})" if s["auc"] is not None else name)
        if len(seeds) > 1:
            ax.fill_between(x, lo, hi, alpha=0.15)
    if summary["zero_shot"] is not None:
        ax.axhline(summary["zero_shot"], color="0.5", linestyle=":", linewidth=1,
                   label=f"zero-shot {summary['zero_shot']:.3f}")
    if summary["upper_bound"] is not None:
        ax.axhline(summary["upper_bound"], color="0.3", linestyle="--", linewidth=1,
                   label=f"upper bound (whole pool) {summary['upper_bound']:.3f}")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("labelled target volumes")
    ax.set_ylabel("mean Dice over all test volumes")
    n_vol = len(summary["per_volume"])
    ax.set_title(f"{summary['folds']}-fold CV, {n_vol} test volumes, seeds {','.join(map(str, summary['seeds']))}"
                 + ("" if summary["complete"] else " (partial)"), fontsize=10)
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)
    fig.tight_layout()
    atomic_write(path, lambda p: fig.savefig(p, format="png"))
    plt.close(fig)
    return path


def _f(x) -> str:
    return "–" if x is None else f"{x:.3f}"


def readme(summary: dict) -> str:
    names = list(summary["strategies"])
    rounds = max((int(n) for s in summary["strategies"].values() for n in s["dice_by_n"]), default=0)
    ns = [str(n) for n in range(0, rounds + 1)]
    fold_of = {c: k for k, f in summary["per_fold"].items() for c in f["test"]}
    seeds = summary["seeds"]
    have = {name: {n: sum(1 for v in summary["per_volume"].values() if (v.get(name) or {}).get(n) is not None)
                   for n in ns[1:]} for name in names}
    have_zero = sum(1 for v in summary["per_volume"].values() if v.get("zero_shot") is not None)
    partial_note = ("" if summary["complete"] else
                    f" PARTIAL: each number is the mean over the test volumes that have it (zero-shot: {have_zero}; "
                    + "; ".join(f"{name} n={','.join(ns[1:])}: {', '.join(str(have[name][n]) for n in ns[1:])}"
                                for name in names) + f" of {len(summary['per_volume'])}).")
    metric = summary.get("metric", "dice_mean")
    title, what = {
        "dice_mean": ("", "as predicted (`dice_mean`); after largest-component post-processing of every organ: "
                      "README.lcc_dice_mean.md; of the organs the cross-validation chose: README.pp_dice_mean.md"),
        "lcc_dice_mean": (" (Dice after largest-component post-processing)",
                          "after cutting each organ to its largest connected component (`lcc_dice_mean`); the plain "
                          "Dice is in README.md"),
        "pp_dice_mean": (" (Dice after the post-processing the cross-validation chose)",
                         "after cutting the organs the cross-validation chose ("
                         + (", ".join(summary.get("postprocessing") or []) or "none")
                         + ") to their largest connected component, nnU-Net's rule: a class is cut when that raises "
                         "its mean Dice over every fine-tuned prediction of the cross-validation (postprocessing.json; "
                         "the choice is made on these same predictions, as nnU-Net does); the plain Dice is in "
                         "README.md"),
    }[metric]
    lines = [
        f"# {summary['folds']}-fold cross-validated active adaptation{title}", "",
        f"Case Dice {what}.", "",
        f"Command: `{summary['command']}`  ",
        f"Machine (this summary): {summary['machine']}  ",
        f"Code: asfda commit {summary['commit']}  ",
        f"Date: {summary['date']}  ",
        f"Status: {'complete' if summary['complete'] else 'PARTIAL, see Missing below'}; "
        f"{len(summary['per_volume'])} test volumes, each tested once (in its fold); seeds {seeds}", "",
        "Mean Dice over all test volumes of all folds (mean over seeds of the per-seed mean over volumes; a volume's "
        "Dice is its mean over foreground classes; n=0 is zero-shot; AUC = mean Dice over n = 0.."
        f"{rounds}).{partial_note}", "",
        "| strategy | " + " | ".join(f"n={n}" for n in ns) + " | AUC |",
        "|---|" + "---|" * (len(ns) + 1),
    ]
    for name in names:
        s = summary["strategies"][name]
        lines.append(f"| {name} | " + " | ".join(_f(s["dice_by_n"].get(n)) for n in ns) + f" | {_f(s['auc'])} |")
    lines += ["", f"Zero-shot: {_f(summary['zero_shot'])}. Upper bound (each fold's whole pool labelled): "
              f"{_f(summary['upper_bound'])}.", ""]
    if len(seeds) > 1:
        lines += ["Per seed:", "", "| strategy | seed | " + " | ".join(f"n={n}" for n in ns) + " | AUC |",
                  "|---|---|" + "---|" * (len(ns) + 1)]
        for name in names:
            for s, curve in summary["strategies"][name]["dice_by_n_per_seed"].items():
                vals = [curve.get(n) for n in ns]
                auc = None if any(v is None for v in vals) else float(np.mean(vals))
                lines.append(f"| {name} | {s} | " + " | ".join(map(_f, vals)) + f" | {_f(auc)} |")
        lines.append("")
    lines += ["![learning curve](learning_curve.png)", "", "## Per fold", "",
              "| fold | test volumes | zero-shot | " + " | ".join(f"{n} AUC | {n} n={ns[-1]}" for n in names)
              + " | upper bound |", "|---|---|---|" + "---|---|" * len(names) + "---|"]
    for k, f in summary["per_fold"].items():
        cells = [f"{_f(f['strategies'][n]['auc'])} | {_f(f['strategies'][n]['dice_by_n'].get(ns[-1]))}" for n in names]
        lines.append(f"| {k} | {', '.join(f['test'])} | {_f(f['zero_shot'])} | " + " | ".join(cells)
                     + f" | {_f(f['upper_bound'])} |")
    lines += ["", "## Where each part ran", "",
              "From the device simulate records per round, and the machine this script logged when it computed a "
              "part (`fold<k>/cv_provenance.json`).", ""]
    for k, f in summary["per_fold"].items():
        for name, line in f["provenance"].items():
            lines.append(f"- fold {k}, {name}: {line}")
    lines += ["", "Invocations that computed something, per fold (from `cv_provenance.json`):", ""]
    for k, f in summary["per_fold"].items():
        for r in f["runs"]:
            lines.append(f"- fold {k}: {r['start']}, {r['wall_s'] / 60:.1f} min, {r['status']}, {r['machine']}, "
                         f"commit {r['commit']}")
    warn = [(k, w) for k, f in summary["per_fold"].items() for w in f["warnings"]]
    if warn:
        lines += ["", "Warnings:", ""] + [f"- fold {k}: {w}" for k, w in warn]
    lines += ["", "## Per volume", "",
              "Mean over seeds.", "",
              "| volume | fold | zero-shot | " + " | ".join(f"{name} n={n}" for name in names for n in ns[1:])
              + " | upper bound |", "|---|---|---|" + "---|" * (len(names) * (len(ns) - 1)) + "---|"]
    for c, v in summary["per_volume"].items():
        lines.append(f"| {c} | {fold_of.get(c, '')} | {_f(v['zero_shot'])} | "
                     + " | ".join(_f(v[name].get(n)) for name in names for n in ns[1:])
                     + f" | {_f(v['upper_bound'])} |")
    lines += ["", "## Missing", ""]
    lines += [f"- {m}" for m in summary["missing"]] or ["Nothing: every fold, strategy, seed and n is on disk."]
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------------------- main
def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def _assignment_for(out: Path, data: Path, folds: int, fold_seed: int, write: bool) -> list[list[str]]:
    """The fold assignment from the data; checked against (and, when running, written to) OUT/folds.json so
    that parts run elsewhere with another --folds / --fold-seed are not mixed in. Without the data (a
    --summarize-only where the data is absent) the saved one is used."""
    saved = _jload(out / FOLDS_FILE)
    if not (data / "dataset.json").is_file():
        if saved and saved["folds"] == folds and saved["fold_seed"] == fold_seed:
            return saved["assignment"]
        raise SystemExit(f"{data}: no dataset.json, and {out / FOLDS_FILE} does not hold a {folds}-fold assignment "
                         f"with --fold-seed {fold_seed}")
    ids = sorted(load_dataset(data, require_labels=True).by_id())
    assignment = fold_assignment(ids, folds, fold_seed)
    if saved and saved["assignment"] != assignment:
        raise SystemExit(f"{out} holds folds of another assignment ({saved['folds']} folds, fold seed "
                         f"{saved['fold_seed']}, {sum(map(len, saved['assignment']))} volumes): use another --out")
    if write and not saved:
        atomic_write_json(out / FOLDS_FILE, {"data": str(data.resolve()), "folds": folds, "fold_seed": fold_seed,
                                             "assignment": assignment})
    return assignment


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=str(REPO.parent / "shared/models/ct_abdomen_unet"))
    ap.add_argument("--data", default=str(REPO.parent / "shared/data/mr_chaos_t2"),
                    help="labelled target dataset (nnU-Net raw layout)")
    ap.add_argument("--folds", type=int, default=7)
    ap.add_argument("--fold-seed", type=int, default=0)
    ap.add_argument("--strategies", default="asfda,random")
    ap.add_argument("--seeds", default="0,1")
    ap.add_argument("--rounds", type=int, default=4, help="rounds of 1 label each (labelled 1..R)")
    ap.add_argument("--steps", type=int, default=200, help="fine-tuning steps per round")
    ap.add_argument("--precision", choices=["fp32", "bf16"], default="bf16")
    ap.add_argument("--augmentation", default="intensity", help="training augmentation (asfda.training.augment): "
                    "intensity (default), spatial_mr or none")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--restart", action="store_true", help="each round trains from the pretrained weights on every "
                    "label so far (default: continue from the previous round)")
    ap.add_argument("--evaluate-tta", action="store_true", help="test Dice with flip test-time augmentation")
    ap.add_argument("--hold-back", action="store_true", help="leave a volume whose round the guard discarded out of "
                    "training until 3 other labels exist (train.hold_back_discarded)")
    ap.add_argument("--representativeness", default="none", choices=["none", "density", "typical"],
                    help="asfda's typicality term (default: none, METHOD.md's rule)")
    ap.add_argument("--upper-bound-steps", type=int, default=1000)
    ap.add_argument("--no-upper-bound", action="store_true")
    ap.add_argument("--no-report", action="store_true", help="skip each fold's report.html (and its previews)")
    ap.add_argument("--only-folds", help="comma-separated folds to run here (the others are read from disk)")
    ap.add_argument("--out", default=str(REPO / "benchmarks/results/ct_to_mr_cv"))
    ap.add_argument("--cache-dir", default=str(REPO / ".cache"))
    ap.add_argument("--summarize-only", action="store_true", help="run nothing: read what is on disk, summarise")
    args = ap.parse_args(argv)
    out, data = Path(args.out), Path(args.data)
    strategies = [s.strip() for s in args.strategies.split(",") if s.strip()]
    seeds = _ints(args.seeds)
    command = "python " + " ".join([sys.argv[0] if argv is None else "benchmarks/cv.py",
                                    *(sys.argv[1:] if argv is None else argv)])
    version, where = code_version(), machine()  # before the run: the code that produced the numbers
    out.mkdir(parents=True, exist_ok=True)
    assignment = _assignment_for(out, data, args.folds, args.fold_seed, write=not args.summarize_only)
    if not args.summarize_only:
        todo = _ints(args.only_folds) if args.only_folds else list(range(args.folds))
        bad = [k for k in todo if not 0 <= k < args.folds]
        if bad:
            raise SystemExit(f"--only-folds {bad} outside 0..{args.folds - 1}")
        dirs = make_fold_datasets(data, assignment, fold_datasets_root(args.cache_dir, data, args.folds,
                                                                       args.fold_seed), todo)
        for k in todo:
            print(f"fold {k}/{args.folds}: test {', '.join(assignment[k])}", file=sys.stderr, flush=True)
            run_fold(k, args.model, *dirs[k], out / f"fold{k}", strategies=strategies, seeds=seeds,
                     rounds=args.rounds, steps=args.steps, precision=args.precision,
                     augmentation=args.augmentation, threads=args.threads, restart=args.restart,
                     evaluate_tta=args.evaluate_tta, representativeness=args.representativeness,
                     hold_back=args.hold_back,
                     upper_bound=not args.no_upper_bound, upper_bound_steps=args.upper_bound_steps,
                     cache_dir=args.cache_dir, progress=sys.stderr.isatty(), report=not args.no_report,
                     command=command, machine_line=where, commit=version)
    choice = choose_postprocessing(out, len(assignment), strategies, seeds)
    atomic_write_json(out / POSTPROCESSING, choice)
    for metric in reversed(METRICS):  # the plain Dice last: its summary is the one returned
        summary = summarize(out, assignment, strategies=strategies, seeds=seeds, rounds=args.rounds,
                            upper_bound=not args.no_upper_bound, upper_bound_steps=args.upper_bound_steps,
                            steps=args.steps, precision=args.precision, command=command, machine_line=where,
                            commit=version, metric=metric, pp=choice["classes"])
    print((out / "README.md").read_text())
    return summary


if __name__ == "__main__":
    main()
