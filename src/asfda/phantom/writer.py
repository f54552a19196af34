"""Writing the phantom benchmark: the two nnU-Net v2 raw datasets, the root ``phantom_meta.json``, and the
benchmark folder itself (validated arguments, cache hits, built aside and moved into place atomically).

The root ``phantom_meta.json`` lists every file the generator wrote (``files``, relative paths; derived from the
recorded parameters for a benchmark written before the list existed). ``overwrite`` replaces those files only:
a file inside ``source/`` or ``target/`` that the generator did not write is refused (it would become part of the
new datasets), anything else in the folder (a cache, the user's notes or predictions) is left in place. A folder
without a phantom ``phantom_meta.json`` is never overwritten, and the folder may not be, or lie inside, a dataset,
an asfda project or a model folder (`asfda.io.outputs.refuse_owned_place`)."""

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
from asfda.io.atomic import atomic_write_json
from asfda.io.outputs import refuse_owned_place
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


def _written_files(params: dict) -> list[str]:
    """Every file the generator writes for ``params`` (relative paths, the root phantom_meta.json excluded)."""
    counts = {"source": params["n_source"], "target": params["n_target"] + params.get("n_misleading", 0)}
    files = []
    for domain, n in counts.items():
        files += [f"{domain}/dataset.json", f"{domain}/{META_FILENAME}"]
        for i in range(n):
            case_id = f"{_CASE_PREFIX[domain]}_{i:03d}"
            files += [f"{domain}/imagesTr/{case_id}_0000.nii.gz", f"{domain}/labelsTr/{case_id}.nii.gz"]
    return sorted(files)


def _phantom_meta(out_dir: Path) -> dict | None:
    """The root phantom_meta.json of a benchmark folder, None when there is none or it is not the generator's."""
    try:
        meta = json.loads((out_dir / META_FILENAME).read_text())
    except (OSError, ValueError):
        return None
    keys = ("generator_version", "seed", "n_source", "n_target")
    if not isinstance(meta, dict) or not all(isinstance(meta.get(k), int) for k in keys[1:]) or keys[0] not in meta:
        return None
    return meta


def _owned_files(meta: dict) -> set[str]:
    files = meta.get("files")
    if isinstance(files, list) and all(isinstance(f, str) for f in files):
        return set(files)
    return set(_written_files(meta))


def _foreign_files(out_dir: Path, owned: set[str]) -> list[str]:
    """Files (and links) inside the benchmark's datasets that the generator did not write."""
    found = []
    for domain in DOMAINS:
        top = out_dir / domain
        if os.path.lexists(top) and (top.is_symlink() or not top.is_dir()):
            found.append(domain)  # a file or a link where a dataset folder goes: not the generator's
            continue
        for folder, dirs, names in os.walk(top):
            rel = Path(folder).relative_to(out_dir)
            links = [d for d in dirs if (Path(folder) / d).is_symlink()]
            found += [str(rel / n) for n in [*names, *links] if str(rel / n) not in owned]
    return sorted(found)


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
    if stored.get("incomplete"):
        raise PhantomError("incomplete phantom benchmark (an overwrite of it was interrupted)", out_dir, fix)
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
    """Moves the finished ``tmp`` tree to ``out_dir``: one rename when ``out_dir`` is absent or empty; with
    ``overwrite``, the generator's own files of an existing benchmark are replaced (see the module docstring)."""
    if overwrite and out_dir.is_dir() and any(out_dir.iterdir()):
        _replace_benchmark(tmp, out_dir)
        return
    os.replace(tmp, out_dir)  # succeeds if out_dir is absent or an empty folder


def _replace_benchmark(tmp: Path, out_dir: Path) -> None:
    old = _phantom_meta(out_dir)
    if old is None:
        raise PhantomError(f"{out_dir} is not a phantom benchmark folder (no phantom_meta.json of the generator); "
                           "refusing to replace it with overwrite=True (choose an empty or new folder)")
    owned = _owned_files(old)
    foreign = _foreign_files(out_dir, owned)
    if foreign:
        shown = ", ".join(foreign[:3]) + (f" and {len(foreign) - 3} more" if len(foreign) > 3 else "")
        raise PhantomError(f"the benchmark's datasets hold files the generator did not write ({shown}); overwrite "
                           "would mix them into the new datasets", out_dir,
                           "move them out of source/ and target/, or choose another folder")
    new = json.loads((tmp / META_FILENAME).read_text())
    # first the record that the folder is being replaced, listing the old and the new files: a run interrupted
    # from here on leaves a folder that is no cache hit and that the next overwrite still recognises as its own
    atomic_write_json(out_dir / META_FILENAME, {**old, "files": sorted(owned | set(new["files"])), "incomplete": True})
    trash = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old-", dir=out_dir.parent))
    try:
        for domain in DOMAINS:
            if os.path.lexists(out_dir / domain):
                os.replace(out_dir / domain, trash / domain)
            os.replace(tmp / domain, out_dir / domain)
        os.replace(tmp / META_FILENAME, out_dir / META_FILENAME)
        tmp.rmdir()
    finally:
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
            the same parameters, while ``overwrite`` is False; with ``overwrite``,
            if it is not a benchmark or its datasets hold files the generator
            did not write (see the module docstring).
        AsfdaError: ``out_dir`` is, or lies inside, a dataset, an asfda project
            or a model folder.
    """
    _validate_args(seed, n_source, n_target, n_misleading)
    seed, n_source, n_target, n_misleading = int(seed), int(n_source), int(n_target), int(n_misleading)
    out_dir = Path(out_dir)
    refuse_owned_place(out_dir, flag="benchmark folder")
    if out_dir.exists() and not out_dir.is_dir():
        raise PhantomError("the benchmark folder is a file", out_dir, "choose a new or empty folder")
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
                                          "subgroup_counts": counts, "files": _written_files(params)})
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
