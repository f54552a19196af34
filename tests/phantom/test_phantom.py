"""Tests for the deterministic two-domain phantom benchmark generator: structure, determinism, anatomy, domain
shift, sub-groups and the misleading sub-population. (Its folder: caching, validation, overwrite:
test_phantom_folder.py.)"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from _phantom_helpers import _meta
from asfda import phantom
from asfda.errors import AsfdaError
from asfda.phantom import LABELS, SUBGROUPS_TARGET, assign_subgroups, generate_benchmark, make_case
from conftest import load_nifti

N_SOURCE = 3
N_TARGET = len(SUBGROUPS_TARGET) + 1  # >= number of subgroups: each one guaranteed


@pytest.fixture(scope="module")
def bench(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("bench") / "phantom"
    return generate_benchmark(out, seed=0, n_source=N_SOURCE, n_target=N_TARGET)


def _load(folder: Path, case_id: str,
          canonical: bool = False) -> tuple[nib.Nifti1Image, nib.Nifti1Image]:
    img = load_nifti(folder / "imagesTr" / f"{case_id}_0000.nii.gz")
    lbl = load_nifti(folder / "labelsTr" / f"{case_id}.nii.gz")
    if canonical:
        img, lbl = nib.as_closest_canonical(img), nib.as_closest_canonical(lbl)
    return img, lbl


def _centroids_mm(lbl: nib.Nifti1Image) -> dict[str, np.ndarray]:
    """World-space (RAS mm) centroid of every present label."""
    data = np.asarray(lbl.dataobj)
    out = {}
    for name, value in LABELS.items():
        idx = np.argwhere(data == value)
        if value and idx.size:
            out[name] = nib.affines.apply_affine(lbl.affine, idx.mean(axis=0))
    return out


def _volume_mm3(lbl: nib.Nifti1Image, value: int) -> float:
    return float((np.asarray(lbl.dataobj) == value).sum() * np.prod(lbl.header.get_zooms()[:3]))


def _mean_in(img: nib.Nifti1Image, lbl: nib.Nifti1Image, value: int) -> float:
    return float(np.asarray(img.dataobj, dtype=np.float64)[np.asarray(lbl.dataobj) == value].mean())


def _all_cases(bench: dict[str, Path]) -> list[tuple[Path, str, str]]:
    return [(bench[d], cid, m["subgroup"])
            for d in ("source", "target") for cid, m in _meta(bench[d]).items()]


def _tree_digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


# --------------------------------------------------------------------------- structure
def test_returns_paths_and_dataset_json(bench: dict[str, Path]) -> None:
    assert set(bench) == {"source", "target"}
    expected = (("source", N_SOURCE, "CT", "src_"), ("target", N_TARGET, "MR", "tgt_"))
    for domain, n, modality, prefix in expected:
        ds = json.loads((bench[domain] / "dataset.json").read_text())
        assert ds["channel_names"] == {"0": modality}
        assert ds["labels"] == LABELS
        assert ds["numTraining"] == n
        assert ds["file_ending"] == ".nii.gz"
        assert ds["description"]
        meta = _meta(bench[domain])
        assert len(meta) == n and all(cid.startswith(prefix) for cid in meta)
        images = sorted(p.name for p in (bench[domain] / "imagesTr").iterdir())
        labels = sorted(p.name for p in (bench[domain] / "labelsTr").iterdir())
        assert images == sorted(f"{cid}_0000.nii.gz" for cid in meta)
        assert labels == sorted(f"{cid}.nii.gz" for cid in meta)
        for m in meta.values():
            assert set(m) == {"subgroup", "seed"} and isinstance(m["seed"], int)


def test_label_files_match_images(bench: dict[str, Path]) -> None:
    for folder, cid, _ in _all_cases(bench):
        img, lbl = _load(folder, cid)
        assert img.shape == lbl.shape and len(img.shape) == 3
        np.testing.assert_allclose(img.affine, lbl.affine)
        assert lbl.get_data_dtype() == np.uint8
        for nii in (img, lbl):
            assert int(nii.header["qform_code"]) == 1 and int(nii.header["sform_code"]) == 1
            np.testing.assert_allclose(nii.get_qform(), nii.affine, atol=1e-4)
        assert set(np.unique(np.asarray(lbl.dataobj))) <= set(LABELS.values())
    assert _load(bench["source"], "src_000")[0].get_data_dtype() == np.float32
    assert _load(bench["target"], "tgt_000")[0].get_data_dtype() == np.int16


def test_saved_case_reproducible_from_meta_seed(bench: dict[str, Path]) -> None:
    for domain in ("source", "target"):
        cid, info = next(iter(_meta(bench[domain]).items()))
        rng = np.random.default_rng(info["seed"])
        image, label, affine = make_case(rng, domain, info["subgroup"])
        img, lbl = _load(bench[domain], cid)
        np.testing.assert_array_equal(np.asarray(img.dataobj), image)
        np.testing.assert_array_equal(np.asarray(lbl.dataobj), label)
        np.testing.assert_allclose(img.affine, affine)


# --------------------------------------------------------------------------- determinism
def test_same_seed_is_byte_identical(tmp_path: Path, bench: dict[str, Path]) -> None:
    again = generate_benchmark(tmp_path / "again", seed=0, n_source=N_SOURCE, n_target=N_TARGET)
    for domain in ("source", "target"):
        assert _tree_digest(again[domain]) == _tree_digest(bench[domain])
        for cid in _meta(bench[domain]):
            for a, b in zip(_load(again[domain], cid), _load(bench[domain], cid)):
                np.testing.assert_array_equal(np.asarray(a.dataobj), np.asarray(b.dataobj))


def test_different_seed_differs(tmp_path: Path, bench: dict[str, Path]) -> None:
    other = generate_benchmark(tmp_path / "other", seed=1, n_source=N_SOURCE, n_target=N_TARGET)
    for domain, cid in (("source", "src_000"), ("target", "tgt_000")):
        a_img, a_lbl = _load(other[domain], cid)
        b_img, b_lbl = _load(bench[domain], cid)
        assert not np.array_equal(np.asarray(a_img.dataobj), np.asarray(b_img.dataobj))
        assert not np.array_equal(np.asarray(a_lbl.dataobj), np.asarray(b_lbl.dataobj))
    seeds = {m["seed"] for d in ("source", "target") for m in _meta(bench[d]).values()}
    assert len(seeds) == N_SOURCE + N_TARGET


# --------------------------------------------------------------------------- anatomy
def test_laterality_and_position_in_ras(bench: dict[str, Path]) -> None:
    """In RAS+ world space +x is the patient's RIGHT: liver/right kidney have larger x."""
    for folder, cid, _ in _all_cases(bench):
        c = _centroids_mm(_load(folder, cid, canonical=True)[1])
        assert c["liver"][0] > c["spleen"][0], cid
        # Same physical place in both domains (catches a wrong flip/affine pair).
        assert c["liver"][0] > 20.0 and c["spleen"][0] < -40.0, cid
        if "kidney_right" in c and "kidney_left" in c:
            assert c["kidney_right"][0] > 20.0 > -20.0 > c["kidney_left"][0], cid
            assert c["kidney_right"][2] < c["kidney_left"][2], cid  # right kidney lower
        for kidney in ("kidney_right", "kidney_left"):
            if kidney in c:
                assert c[kidney][1] < c["liver"][1] and c[kidney][1] < -30.0, cid  # posterior


def test_all_organs_present_except_missing_kidney(bench: dict[str, Path]) -> None:
    for folder, cid, subgroup in _all_cases(bench):
        present = set(np.unique(np.asarray(_load(folder, cid)[1].dataobj)))
        if subgroup == "missing_kidney":
            assert len({LABELS["kidney_right"], LABELS["kidney_left"]} - present) == 1, cid
            assert {0, LABELS["liver"], LABELS["spleen"]} <= present
        else:
            assert present == set(LABELS.values()), cid


def test_shapes_are_not_bare_ellipsoids() -> None:
    """Warping makes the liver differ clearly from its best-fitting ellipsoid."""
    _, label, _ = make_case(np.random.default_rng(3), "source", "common")
    idx = np.argwhere(label == LABELS["liver"]).astype(float)
    mu, cov = idx.mean(axis=0), np.cov(idx.T)
    d2 = np.einsum("ij,jk,ik->i", idx - mu, np.linalg.inv(cov), idx - mu)
    # A solid ellipsoid has d2 <= 5 everywhere (uniform: E[d2]=3/5*r^2 with r^2=5).
    assert d2.max() > 6.0


# --------------------------------------------------------------------------- domain shift
def test_domain_shift(bench: dict[str, Path]) -> None:
    src_img, src_lbl = _load(bench["source"], "src_000", canonical=True)
    src_liver = _mean_in(src_img, src_lbl, LABELS["liver"])
    assert src_liver > _mean_in(src_img, src_lbl, LABELS["spleen"])
    commons = [cid for cid, m in _meta(bench["target"]).items() if m["subgroup"] == "common"]
    for cid in commons:
        img, lbl = _load(bench["target"], cid)
        assert _mean_in(img, lbl, LABELS["liver"]) < _mean_in(img, lbl, LABELS["spleen"])
        assert float(np.asarray(img.dataobj).min()) >= 0.0  # not HU
    src_zooms = _load(bench["source"], "src_000")[0].header.get_zooms()
    tgt = _load(bench["target"], commons[0])[0]
    assert len(set(np.round(src_zooms, 3))) == 1
    assert len(set(np.round(tgt.header.get_zooms(), 3))) > 1
    assert nib.aff2axcodes(_load(bench["source"], "src_000")[0].affine) == ("R", "A", "S")
    assert nib.aff2axcodes(tgt.affine) != ("R", "A", "S")


def test_rare_protocol_changes_contrast_not_anatomy() -> None:
    _, common_lbl, _ = make_case(np.random.default_rng(11), "target", "common")
    rare_img, rare_lbl, _ = make_case(np.random.default_rng(11), "target", "rare_protocol")
    np.testing.assert_array_equal(common_lbl, rare_lbl)
    liver = rare_img[rare_lbl == LABELS["liver"]].mean()
    assert liver > rare_img[rare_lbl == LABELS["spleen"]].mean()  # order flipped vs common T2-like


def test_lesions_are_labelled_liver() -> None:
    common_img, common_lbl, _ = make_case(np.random.default_rng(5), "target", "common")
    les_img, les_lbl, _ = make_case(np.random.default_rng(5), "target", "lesions")
    np.testing.assert_array_equal(common_lbl, les_lbl)
    liver = les_lbl == LABELS["liver"]
    assert les_img[liver].std() > 1.2 * common_img[liver].std()


# --------------------------------------------------------------------------- subgroups
def test_each_subgroup_present(bench: dict[str, Path]) -> None:
    counts = Counter(m["subgroup"] for m in _meta(bench["target"]).values())
    assert set(counts) == set(SUBGROUPS_TARGET)
    assert counts["common"] == max(counts.values())
    assert {m["subgroup"] for m in _meta(bench["source"]).values()} == {"common"}


def test_enlarged_liver_is_bigger(bench: dict[str, Path]) -> None:
    meta = _meta(bench["target"])
    vols = {cid: _volume_mm3(_load(bench["target"], cid)[1], LABELS["liver"]) for cid in meta}
    common = np.mean([v for cid, v in vols.items() if meta[cid]["subgroup"] == "common"])
    enlarged = [v for cid, v in vols.items() if meta[cid]["subgroup"] == "enlarged_liver"]
    assert enlarged and min(enlarged) > 1.3 * common


def test_default_proportions() -> None:
    counts = Counter(assign_subgroups(40, seed=0))
    assert counts == {"common": 24, "rare_protocol": 6, "enlarged_liver": 4,
                      "missing_kidney": 3, "lesions": 3}


@settings(max_examples=60, deadline=None)
@given(n=st.integers(1, 300), seed=st.integers(0, 2**32 - 1))
def test_assign_subgroups_properties(n: int, seed: int) -> None:
    groups = assign_subgroups(n, seed)
    assert groups == assign_subgroups(n, seed) and len(groups) == n
    counts = Counter(groups)
    assert set(counts) <= set(SUBGROUPS_TARGET)
    if n >= len(SUBGROUPS_TARGET):
        assert set(counts) == set(SUBGROUPS_TARGET)
    for name, p in SUBGROUPS_TARGET.items():
        assert abs(counts[name] - p * n) <= len(SUBGROUPS_TARGET)


# --------------------------------------------------------------------------- the misleading sub-population
def test_misleading_cases_are_appended_and_leave_the_rest_identical(tmp_path: Path, bench: dict[str, Path]) -> None:
    more = generate_benchmark(tmp_path / "mis", seed=0, n_source=N_SOURCE, n_target=N_TARGET, n_misleading=2)
    meta = _meta(more["target"])
    assert [meta[f"tgt_{N_TARGET + i:03d}"]["subgroup"] for i in range(2)] == [phantom.MISLEADING] * 2
    assert json.loads((more["target"] / "dataset.json").read_text())["numTraining"] == N_TARGET + 2
    for cid in _meta(bench["target"]):  # the regular cases are byte-identical to a benchmark without them
        for sub in ("imagesTr", "labelsTr"):
            name = f"{cid}_0000.nii.gz" if sub == "imagesTr" else f"{cid}.nii.gz"
            a = load_nifti(str(bench["target"] / sub / name)).get_fdata()
            b = load_nifti(str(more["target"] / sub / name)).get_fdata()
            np.testing.assert_array_equal(a, b)
    root = json.loads((tmp_path / "mis" / "phantom_meta.json").read_text())
    assert root["n_misleading"] == 2 and root["subgroup_counts"][phantom.MISLEADING] == 2
    # a benchmark without them records no n_misleading, so caches written before the option exist stay valid
    assert "n_misleading" not in json.loads((bench["target"].parent / "phantom_meta.json").read_text())
    with pytest.raises(AsfdaError, match="differs"):
        generate_benchmark(tmp_path / "mis", seed=0, n_source=N_SOURCE, n_target=N_TARGET, n_misleading=1)


def test_misleading_liver_is_enlarged_cystic_and_labelled_liver() -> None:
    common_img, common_lbl, _ = make_case(np.random.default_rng(5), "target", "common")
    cyst_img, cyst_lbl, _ = make_case(np.random.default_rng(5), "target", phantom.MISLEADING)
    liver_c, liver_m = common_lbl == LABELS["liver"], cyst_lbl == LABELS["liver"]
    assert liver_m.sum() > 1.3 * liver_c.sum()  # enlarged
    # cysts: much brighter and far more heterogeneous liver signal, all of it labelled liver
    assert cyst_img[liver_m].mean() > 1.2 * common_img[liver_c].mean()
    assert cyst_img[liver_m].std() > 2 * common_img[liver_c].std()
    with pytest.raises(AsfdaError, match="n_misleading"):
        generate_benchmark(Path("unused"), n_source=1, n_target=1, n_misleading=-1)


def test_the_benchmark_folder_may_not_be_inside_a_dataset(tmp_path: Path, bench: dict[str, Path]) -> None:
    with pytest.raises(AsfdaError, match="a dataset"):
        generate_benchmark(bench["target"] / "nested", n_source=1, n_target=1)
    assert not (bench["target"] / "nested").exists()
    (tmp_path / "afile").write_text("x")
    with pytest.raises(AsfdaError, match="is a file"):
        generate_benchmark(tmp_path / "afile", n_source=1, n_target=1, overwrite=True)
