"""Round folders an annotator can take away (issue 35, item 5): the images copied or relatively linked (never an
absolute link), a palette of distinct colours for every label value in both label files, and a README.txt that names
the real file names."""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import numpy as np
import pytest

from asfda.annotation import PALETTE, itksnap_label_description, slicer_color_table
from asfda.errors import AsfdaError
from asfda.project import ProjectSettings, init_project, next_query
from asfda.training import TrainConfig
from conftest import make_volume, write_bundle, write_nifti, write_nnunet

AFFINE = np.diag([2.0, 2.0, 3.0, 1.0])


def _settings() -> ProjectSettings:
    return ProjectSettings(budget=2, device="cpu", train=TrainConfig(steps=2, batch_size=1))


def _plain_pool(root: Path, n: int = 4) -> Path:
    """A plain folder of images named CASE.nii.gz (no dataset.json, no _0000)."""
    for i in range(n):
        write_nifti(root / f"case{i:02d}.nii.gz", make_volume(i)[0], AFFINE)
    return root


@pytest.fixture
def world(tmp_path: Path) -> Path:
    """Everything under one folder (``world/``): a plain-folder pool, a tiny bundle and the projects."""
    _plain_pool(tmp_path / "world" / "pool")
    write_bundle(tmp_path / "world" / "bundle")
    return tmp_path / "world"


def test_images_are_copied_by_default_and_the_readme_names_the_real_files(world: Path) -> None:
    proj = world / "proj"
    init_project(proj, str(world / "bundle"), str(world / "pool"), _settings())
    q = next_query(proj, progress=False)
    folder = proj / q["folder"]
    images = sorted((folder / "images").iterdir())
    assert [p.name for p in images] == sorted(f"{cid}.nii.gz" for cid in q["ids"])  # the pool's own names
    for p in images:
        assert not p.is_symlink() and p.read_bytes() == (world / "pool" / p.name).read_bytes()
    readme = (folder / "README.txt").read_text()
    assert "_0000" not in readme
    for cid in q["ids"]:
        assert f"images/{cid}.nii.gz" in readme and f"presegmentations/{cid}.nii.gz" in readme
    # the round folder alone works elsewhere: moved away from the pool, its images are still there
    shutil.move(str(folder), str(world.parent / "sent"))
    assert all((world.parent / "sent" / "images" / p.name).is_file() for p in images)


def test_linked_images_are_relative_and_survive_moving_project_and_pool_together(world: Path,
                                                                                 tmp_path: Path) -> None:
    proj = world / "proj"
    init_project(proj, str(world / "bundle"), str(world / "pool"), _settings())
    q = next_query(proj, progress=False, images="link")
    folder = proj / q["folder"]
    links = sorted((folder / "images").iterdir())
    assert len(links) == 2
    for p in links:
        assert p.is_symlink() and not os.path.isabs(os.readlink(p))
        assert p.resolve() == (world / "pool" / p.name).resolve()
    moved = tmp_path / "elsewhere" / "world"
    shutil.move(str(world), str(moved))
    for p in links:
        again = moved / p.relative_to(world)
        assert again.is_symlink() and again.read_bytes() == (moved / "pool" / p.name).read_bytes()


def test_an_unknown_images_mode_is_refused_before_any_work(world: Path) -> None:
    proj = world / "proj"
    init_project(proj, str(world / "bundle"), str(world / "pool"), _settings())
    with pytest.raises(AsfdaError, match="images mode 'absolute' is not one of"):
        next_query(proj, progress=False, images="absolute")
    assert not (proj / "annotate" / "round0").exists()


def test_an_absolute_link_of_an_earlier_version_is_placed_again(tmp_path: Path) -> None:
    from asfda.project.annotate import place_image

    src = write_nifti(tmp_path / "pool" / "a.nii.gz", make_volume(0)[0], AFFINE)
    images = tmp_path / "round0" / "images"
    images.mkdir(parents=True)
    os.symlink(src.resolve(), images / "a.nii.gz")  # what asfda wrote before
    out = place_image(src, images)
    assert not out.is_symlink() and out.read_bytes() == src.read_bytes()


def test_nnunet_pool_readme_names_its_channel_files(tmp_path: Path) -> None:
    pool = write_nnunet(tmp_path / "pool", n=4)
    shutil.rmtree(pool / "labelsTr")
    proj = tmp_path / "proj"
    init_project(proj, str(write_bundle(tmp_path / "bundle")), str(pool), _settings())
    q = next_query(proj, progress=False)
    readme = (proj / q["folder"] / "README.txt").read_text()
    for cid in q["ids"]:
        assert f"images/{cid}_0000.nii.gz" in readme
        assert (proj / q["folder"] / "images" / f"{cid}_0000.nii.gz").is_file()


# ---------------------------------------------------------------------------------------------- palette
def _itksnap_colours(text: str) -> dict[int, tuple[int, int, int]]:
    out = {}
    for line in text.splitlines():
        m = re.match(r"\s*(\d+)\s+(\d+)\s+(\d+)\s+(\d+)\s", line)
        if m and not line.lstrip().startswith("#"):
            out[int(m[1])] = (int(m[2]), int(m[3]), int(m[4]))
    return out


def _slicer_colours(text: str) -> dict[int, tuple[int, int, int]]:
    out = {}
    for line in text.splitlines():
        if line.startswith("#"):
            continue
        value, _name, r, g, b, _a = line.split()
        out[int(value)] = (int(r), int(g), int(b))
    return out


def test_the_palette_gives_every_label_value_its_own_colour_in_both_label_files() -> None:
    assert len(PALETTE) >= 256 and len(set(PALETTE)) == len(PALETTE)
    assert all(0 <= c <= 255 for rgb in PALETTE for c in rgb)
    labels = {"background": 0, **{f"organ {v}": v for v in range(1, 301)}}
    for colours in (_itksnap_colours(itksnap_label_description(labels)), _slicer_colours(slicer_color_table(labels))):
        fg = {v: c for v, c in colours.items() if v}
        assert sorted(fg) == list(range(1, 301))
        assert len(set(fg.values())) == 300  # label 13 is not label 1's colour, nor any other's
        assert fg[13] != fg[1]
    # nearby values are far apart in colour, not shades of one another
    first = np.array(PALETTE[:256], float)
    gaps = np.sqrt(((first[:, None] - first[None]) ** 2).sum(-1)) + np.eye(256) * 1e9
    assert gaps.min() > 20


def test_a_dicom_series_is_copied_whole_under_its_case_id_and_the_readme_says_it_is_a_folder(tmp_path: Path) -> None:
    """Two series folders of the same name (``PAT1/CT``, ``PAT2/CT``) land as ``images/PAT1_CT/`` and
    ``images/PAT2_CT/``, each a whole copy of its slices; README.txt names them as folders."""
    pydicom = pytest.importorskip("pydicom")
    del pydicom
    from _dicom_helpers import ct_volume, oblique_affine, write_series
    from asfda.io import load_dataset
    from asfda.project.annotate import _image_name, place_image, round_readme

    pool = tmp_path / "pool"
    for k, pat in enumerate(("PAT1", "PAT2")):
        write_series(pool / pat / "CT", ct_volume(k), oblique_affine())
    ds = load_dataset(pool)
    images = tmp_path / "round0" / "images"
    images.mkdir(parents=True)
    for case in ds.cases:
        out = place_image(case.image_path, images, name=_image_name(case))
        assert out.name == case.case_id and out.is_dir() and not out.is_symlink()
        assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in case.image_path.iterdir())
    text = round_readme(0, [(c.case_id, _image_name(c)) for c in ds.cases], {"background": 0, "organ": 1}, tmp_path)
    assert "images/PAT1_CT/ (a DICOM series folder" in text
