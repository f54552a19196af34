"""Writing the phantom benchmark: the two nnU-Net v2 raw datasets, the root ``phantom_meta.json``, and the
benchmark folder itself (validated arguments, cache hits, built aside and moved into place atomically)."""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path

import nibabel as nib
import numpy as np

import asfda.phantom as _package  # make_case is looked up on asfda.phantom at call time (a patched one runs)
from asfda.phantom.generators import _subgroup_counts, assign_subgroups, case_seed
from asfda.phantom.spec import DOMAINS, GENERATOR_VERSION, LABELS, MISLEADING, SUBGROUPS_TARGET, PhantomError

logger = logging.getLogger("asfda.phantom")

META_FILENAME = "phantom_meta.json"
_CASE_PREFIX = {"source": "src", "target": "tgt"}


def _save_nifti(array: np.ndarray, affine: np.ndarray, path: Path, dtype: type) -> None:
    """Save ``array`` as NIfTI with qform/sform set to ``affine``."""
    img = nib.Nifti1Image(array.astype(dtype), affine)
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    img.header.set_xyzt_units("mm")
    img.header.set_data_dtype(dtype)
    nib.save(img, str(path))


def _dataset_json(domain: str, n: int) -> dict:
    """nnU-Net v2 raw ``dataset.json`` content."""
    modality = "CT" if domain == "source" else "MR"
    description = (
        "asfda phantom source domain: CT-like HU intensities, RAS, 5 mm isotropic."
        if domain == "source" else
        "asfda phantom target domain: MR-like (T2-like, rare T1-like protocol), LPS, "
        "4x4x8 mm, bias field, blur, Rician noise; heterogeneous subgroups in phantom_meta.json."
    )
    return {
        "name": f"asfda_phantom_{domain}",
        "description": description,
        "channel_names": {"0": modality},
        "labels": dict(LABELS),
        "numTraining": n,
        "file_ending": ".nii.gz",
        "generator_version": GENERATOR_VERSION,
    }


def _write_json(path: Path, data: dict) -> None:
    """Write pretty, key-stable JSON."""
    path.write_text(json.dumps(data, indent=2) + "\n")


def _write_dataset(folder: Path, domain: str, seed: int, subgroups: Sequence[str]) -> None:
    """Generate and write one nnU-Net raw dataset into ``folder``."""
    (folder / "imagesTr").mkdir(parents=True)
    (folder / "labelsTr").mkdir()
    meta: dict[str, dict] = {}
    image_dtype = np.float32 if domain == "source" else np.int16
    for i, subgroup in enumerate(subgroups):
        case_id = f"{_CASE_PREFIX[domain]}_{i:03d}"
        cseed = case_seed(seed, domain, i)
        image, label, affine = _package.make_case(np.random.default_rng(cseed), domain, subgroup)
        _save_nifti(image, affine, folder / "imagesTr" / f"{case_id}_0000.nii.gz", image_dtype)
        _save_nifti(label, affine, folder / "labelsTr" / f"{case_id}.nii.gz", np.uint8)
        meta[case_id] = {"subgroup": subgroup, "seed": cseed}
    _write_json(folder / "dataset.json", _dataset_json(domain, len(subgroups)))
    _write_json(folder / META_FILENAME, meta)


def _params(seed: int, n_source: int, n_target: int, n_misleading: int = 0) -> dict:
    """Generation parameters recorded in the root ``phantom_meta.json`` (``n_misleading`` only when used, so
    benchmarks generated before it existed stay valid cache hits)."""
    params = {"generator_version": GENERATOR_VERSION, "seed": seed, "n_source": n_source, "n_target": n_target}
    if n_misleading:
        params["n_misleading"] = n_misleading
    return params


def _result_paths(out_dir: Path) -> dict[str, Path]:
    return {domain: out_dir / domain for domain in DOMAINS}


def _check_existing(out_dir: Path, params: dict) -> bool:
    """Return True on a valid cache hit; raise PhantomError otherwise."""
    meta_path = out_dir / META_FILENAME
    fix = "pass overwrite=True (CLI: --overwrite) or choose another folder"
    if not meta_path.is_file():
        raise PhantomError("folder exists and is not a phantom benchmark", out_dir, fix)
    try:
        stored = json.loads(meta_path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise PhantomError(f"unreadable {META_FILENAME}", out_dir, fix) from exc
    recorded = {k: stored.get(k) for k in params}
    if recorded != params:
        raise PhantomError(f"phantom benchmark was generated with {recorded}, "
                           f"which differs from the requested {params}", out_dir, fix)
    if not all((p / "dataset.json").is_file() for p in _result_paths(out_dir).values()):
        raise PhantomError("incomplete phantom benchmark", out_dir, fix)
    return True


def _validate_args(seed: int, n_source: int, n_target: int, n_misleading: int = 0) -> None:
    """Raise PhantomError naming the first invalid argument."""
    checks = (("seed", seed, 0), ("n_source", n_source, 1), ("n_target", n_target, 1),
              ("n_misleading", n_misleading, 0))
    for name, value, minimum in checks:
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
            raise PhantomError(f"{name} must be an integer, got {value!r}")
        if value < minimum:
            raise PhantomError(f"{name} must be >= {minimum}, got {value}")


def _install(tmp: Path, out_dir: Path, overwrite: bool) -> None:
    """Atomically move the finished ``tmp`` tree to ``out_dir``."""
    trash = None
    if overwrite and out_dir.exists():
        if any(out_dir.iterdir()) and not (out_dir / "phantom_meta.json").exists():
            raise PhantomError(f"{out_dir} is not a phantom benchmark folder; refusing to replace it with "
                               "overwrite=True (choose an empty or new folder)")
        trash = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old-", dir=out_dir.parent))
        os.replace(out_dir, trash / out_dir.name)
    os.replace(tmp, out_dir)  # succeeds if out_dir is absent or an empty folder
    if trash is not None:
        shutil.rmtree(trash, ignore_errors=True)


def generate_benchmark(out_dir: str | Path, seed: int = 0, n_source: int = 24, n_target: int = 40,
                       overwrite: bool = False, n_misleading: int = 0) -> dict[str, Path]:
    """Generate (or reuse) the two-domain phantom benchmark.

    Writes ``out_dir/source`` and ``out_dir/target`` as nnU-Net v2 raw
    datasets (``dataset.json``, ``imagesTr/<case>_0000.nii.gz``,
    ``labelsTr/<case>.nii.gz`` and a ``phantom_meta.json`` mapping case id ->
    ``{"subgroup", "seed"}``), plus ``out_dir/phantom_meta.json`` holding the
    generation parameters. Everything is built in a temporary sibling folder
    and moved into place with ``os.replace``.

    Args:
        out_dir: Benchmark root folder.
        seed: Non-negative benchmark seed; same seed -> identical data.
        n_source: Number of source (CT-like) cases, all subgroup ``common``.
        n_target: Number of target (MR-like) cases, split by ``SUBGROUPS_TARGET``.
        overwrite: Replace an existing ``out_dir`` instead of reusing it.
        n_misleading: Extra target cases of the misleading sub-population ``MISLEADING`` (cystic livers),
            appended after the ``n_target`` regular ones (ids ``tgt_<n_target>`` on); 0 (the default) leaves the
            benchmark exactly as before.

    Returns:
        ``{"source": out_dir / "source", "target": out_dir / "target"}``.

    Raises:
        PhantomError: (a ``ValueError``) on invalid arguments, or if
            ``out_dir`` exists, is not empty and does not hold a benchmark with
            the same parameters, while ``overwrite`` is False.
    """
    _validate_args(seed, n_source, n_target, n_misleading)
    seed, n_source, n_target, n_misleading = int(seed), int(n_source), int(n_target), int(n_misleading)
    out_dir = Path(out_dir)
    params = _params(seed, n_source, n_target, n_misleading)
    if out_dir.exists() and not overwrite:
        if out_dir.is_dir() and not any(out_dir.iterdir()):
            pass  # empty folder: generate into it
        elif _check_existing(out_dir, params):
            return _result_paths(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        os.chmod(tmp, 0o755)
        _write_dataset(tmp / "source", "source", seed, ["common"] * n_source)
        _write_dataset(tmp / "target", "target", seed,
                       assign_subgroups(n_target, seed) + [MISLEADING] * n_misleading)
        counts = _subgroup_counts(n_target) | ({MISLEADING: n_misleading} if n_misleading else {})
        _write_json(tmp / META_FILENAME, {**params, "subgroups_target": dict(SUBGROUPS_TARGET),
                                          "subgroup_counts": counts})
        try:
            _install(tmp, out_dir, overwrite)
        except OSError:
            # A concurrent generator may have installed the same benchmark.
            if not overwrite and out_dir.is_dir() and _check_existing(out_dir, params):
                shutil.rmtree(tmp, ignore_errors=True)
                return _result_paths(out_dir)
            raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    logger.info("phantom benchmark written to %s", out_dir)
    return _result_paths(out_dir)
