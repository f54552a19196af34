"""The phantom benchmark's folder: a cache hit rewrites nothing, a parameter mismatch is refused, a crash leaves
nothing, arguments are checked, and an overwrite removes only the generator's own files."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from _phantom_helpers import _meta
from asfda import phantom
from asfda.errors import AsfdaError
from asfda.phantom import generate_benchmark, make_case


# --------------------------------------------------------------------------- caching / atomicity
def test_cache_hit_does_not_rewrite(tmp_path: Path) -> None:
    out = tmp_path / "cache"
    paths = generate_benchmark(out, seed=2, n_source=1, n_target=1)
    watched = [out / "phantom_meta.json", paths["source"] / "dataset.json",
               paths["target"] / "imagesTr" / "tgt_000_0000.nii.gz"]
    before = [p.stat().st_mtime_ns for p in watched]
    inode = out.stat().st_ino
    assert generate_benchmark(out, seed=2, n_source=1, n_target=1) == paths
    assert [p.stat().st_mtime_ns for p in watched] == before and out.stat().st_ino == inode
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache"]  # no temp leftovers


def test_parameter_mismatch_raises_and_overwrite_replaces(tmp_path: Path) -> None:
    out = tmp_path / "mismatch"
    generate_benchmark(out, seed=2, n_source=1, n_target=1)
    with pytest.raises(ValueError, match=r"mismatch.*overwrite=True") as err:
        generate_benchmark(out, seed=3, n_source=1, n_target=1)
    assert isinstance(err.value, AsfdaError)  # printed on one line by the CLI
    with pytest.raises(ValueError, match="overwrite=True"):
        generate_benchmark(out, seed=2, n_source=2, n_target=1)
    generate_benchmark(out, seed=3, n_source=2, n_target=1, overwrite=True)
    assert json.loads((out / "phantom_meta.json").read_text())["seed"] == 3
    assert len(_meta(out / "source")) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mismatch"]


def test_foreign_folder_is_not_clobbered(tmp_path: Path) -> None:
    out = tmp_path / "foreign"
    out.mkdir()
    (out / "precious.txt").write_text("keep")
    with pytest.raises(ValueError, match="overwrite=True"):
        generate_benchmark(out, n_source=1, n_target=1)
    assert (out / "precious.txt").read_text() == "keep"
    empty = tmp_path / "empty"
    empty.mkdir()
    assert generate_benchmark(empty, n_source=1, n_target=1)["source"].is_dir()


def test_crash_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real = phantom.make_case
    calls = {"n": 0}

    def flaky(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("simulated crash")
        return real(*args, **kwargs)

    monkeypatch.setattr(phantom, "make_case", flaky)
    with pytest.raises(RuntimeError, match="simulated crash"):
        generate_benchmark(tmp_path / "crash", n_source=2, n_target=2)
    assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------- validation
@pytest.mark.parametrize(("kwargs", "name"), [
    ({"n_source": 0}, "n_source"), ({"n_target": 0}, "n_target"),
    ({"n_source": -3}, "n_source"), ({"seed": -1}, "seed"), ({"n_target": 2.5}, "n_target"),
])
def test_invalid_arguments(tmp_path: Path, kwargs: dict, name: str) -> None:
    with pytest.raises(ValueError, match=name):
        generate_benchmark(tmp_path / "x", **kwargs)
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize(("domain", "subgroup"), [
    ("ct", "common"), ("target", "nope"), ("source", "rare_protocol"),
])
def test_make_case_rejects_bad_arguments(domain: str, subgroup: str) -> None:
    with pytest.raises(ValueError):
        make_case(np.random.default_rng(0), domain, subgroup)


def test_overwrite_refuses_a_folder_that_is_not_a_phantom_benchmark(tmp_path: Path) -> None:
    precious = tmp_path / "my_data"
    precious.mkdir()
    (precious / "scan.nii.gz").write_bytes(b"patient data")
    with pytest.raises(ValueError, match="not a phantom benchmark"):
        generate_benchmark(precious, seed=0, n_source=1, n_target=1, overwrite=True)
    assert (precious / "scan.nii.gz").read_bytes() == b"patient data"


# --------------------------------------------------------------------------- overwrite removes only its own files
def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_the_root_meta_lists_every_file_written(tmp_path: Path) -> None:
    out = tmp_path / "b"
    generate_benchmark(out, seed=1, n_source=1, n_target=2, n_misleading=1)
    written = sorted(k for k in _snapshot(out) if k != "phantom_meta.json")
    assert json.loads((out / "phantom_meta.json").read_text())["files"] == written
    assert phantom.writer._written_files(phantom.writer._params(1, 1, 2, 1)) == written  # derived the same


def test_overwrite_replaces_the_generators_files_and_leaves_the_rest(tmp_path: Path) -> None:
    """The hostile case: a benchmark folder that also holds the user's notes, predictions and labels."""
    out = tmp_path / "bench"
    generate_benchmark(out, seed=1, n_source=1, n_target=1)
    (out / "notes.txt").write_text("mine")
    (out / "labels").mkdir()
    (out / "labels" / "tgt_000.nii.gz").write_bytes(b"an annotator's label")
    (out / "cache").mkdir()
    (out / "cache" / "x.npz").write_bytes(b"prepared volume")
    generate_benchmark(out, seed=2, n_source=2, n_target=1, overwrite=True)
    assert (out / "notes.txt").read_text() == "mine"
    assert (out / "labels" / "tgt_000.nii.gz").read_bytes() == b"an annotator's label"
    assert (out / "cache" / "x.npz").read_bytes() == b"prepared volume"
    meta = json.loads((out / "phantom_meta.json").read_text())
    assert meta["seed"] == 2 and "incomplete" not in meta and len(_meta(out / "source")) == 2
    assert sorted(k for k in _snapshot(out) if k.startswith(("source/", "target/"))) == meta["files"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bench"]  # no temporary or old copy left
    # a file inside one of its datasets that the generator did not write: refused, nothing touched
    (out / "target" / "imagesTr" / "mine_0000.nii.gz").write_bytes(b"a scan of the user's")
    before = _snapshot(out)
    with pytest.raises(AsfdaError, match=r"did not write \(target/imagesTr/mine_0000.nii.gz\)"):
        generate_benchmark(out, seed=3, n_source=1, n_target=1, overwrite=True)
    assert _snapshot(out) == before and sorted(p.name for p in tmp_path.iterdir()) == ["bench"]
    # a link where a dataset folder goes (to the user's own dataset): refused, the dataset untouched
    (out / "target" / "imagesTr" / "mine_0000.nii.gz").unlink()
    mine = tmp_path / "mine"
    (out / "source").rename(mine)
    (out / "source").symlink_to(mine, target_is_directory=True)
    before = _snapshot(mine)
    with pytest.raises(AsfdaError, match=r"did not write \(source\)"):
        generate_benchmark(out, seed=3, n_source=1, n_target=1, overwrite=True)
    assert _snapshot(mine) == before and (out / "source").is_symlink()


def test_overwrite_refuses_a_folder_whose_meta_is_not_the_generators(tmp_path: Path) -> None:
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "phantom_meta.json").write_text('{"my": "notes"}')
    (mine / "notes.txt").write_text("keep")
    before = _snapshot(mine)
    with pytest.raises(AsfdaError, match="not a phantom benchmark"):
        generate_benchmark(mine, n_source=1, n_target=1, overwrite=True)
    assert _snapshot(mine) == before
    (mine / "phantom_meta.json").write_text(json.dumps(phantom.writer._params(0, 1, 1)))
    (mine / "project.json").write_text('{"format": 1, "pool": "p", "labelled": {}}')  # an asfda project
    with pytest.raises(AsfdaError, match="asfda project"):
        generate_benchmark(mine, n_source=1, n_target=1, overwrite=True)
    assert sorted(_snapshot(mine)) == ["notes.txt", "phantom_meta.json", "project.json"]


def test_a_benchmark_without_a_file_list_and_an_interrupted_overwrite(tmp_path: Path) -> None:
    out = tmp_path / "old"
    generate_benchmark(out, seed=0, n_source=1, n_target=1)
    meta = json.loads((out / "phantom_meta.json").read_text())
    del meta["files"]  # written before the list existed: the files are derived from the parameters
    (out / "phantom_meta.json").write_text(json.dumps(meta))
    assert generate_benchmark(out, seed=0, n_source=1, n_target=1)["source"].is_dir()  # still a cache hit
    generate_benchmark(out, seed=5, n_source=1, n_target=1, overwrite=True)
    meta = json.loads((out / "phantom_meta.json").read_text())
    (out / "phantom_meta.json").write_text(json.dumps({**meta, "incomplete": True}))  # killed mid-overwrite
    with pytest.raises(AsfdaError, match="incomplete"):
        generate_benchmark(out, seed=5, n_source=1, n_target=1)
    generate_benchmark(out, seed=5, n_source=1, n_target=1, overwrite=True)
    assert generate_benchmark(out, seed=5, n_source=1, n_target=1)["target"].is_dir()
