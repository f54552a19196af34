"""kill -9 at forced points of every command that works for a while: pool scoring (`score`, `next`), selection
(`query`, `next`), evaluation, the bundle export at the end of `finetune` and of `simulate`, `predict` mid-way
through the cases, and `simulate` between rounds. After each kill, the same command run again finishes with what an
uninterrupted run gives (same files, same numbers); no label, score or finished round is lost; no file is ever
half-written under its own name, and the hidden temporary file a kill inside a write leaves is removed by the next
write into that folder."""

from __future__ import annotations

import json
import shutil
import signal
from pathlib import Path

import numpy as np
import pytest

from asfda.project import Project, ProjectSettings, finetune_project, ingest_labels, init_project, next_query
from asfda.training import TrainConfig
from conftest import load_nifti, run_cli_killed_at, write_bundle, write_nnunet

N = 4
RUN = "asfda.engine:InferenceEngine.run"  # one sliding-window pass of one volume


@pytest.fixture
def tiny(tmp_path: Path) -> dict[str, Path]:
    return {"data": write_nnunet(tmp_path / "ds", n=N), "model": write_bundle(tmp_path / "bundle"), "root": tmp_path}


def _killed(proc) -> None:
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]


def _ok(proc) -> None:
    assert proc.returncode == 0, proc.stderr[-3000:]


def _temp_files(folder: Path) -> list[Path]:
    """Temporary files of atomic writes (``.NAME.*.tmp*``) under ``folder``."""
    return [p for p in Path(folder).rglob(".*") if ".tmp" in p.name]


def _visible(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(Path(folder).rglob("*"))
            if p.is_file() and not p.name.startswith(".")}


def _cwd(root: Path, name: str) -> Path:
    """A working folder per run: each has its own ./.cache, so a reference run shares nothing with a killed one."""
    (root / name).mkdir(exist_ok=True)
    return root / name


# ---------------------------------------------------------------------------------------------- score
def test_kill_9_mid_pool_scoring_then_score_again_gives_the_same_files(tiny: dict) -> None:
    root = tiny["root"]
    argv = ["score", "--model", str(tiny["model"]), "--data", str(tiny["data"]), "--strategies", "asfda,coreset"]
    _ok(run_cli_killed_at(RUN, 99, "before", *argv, "--out", str(root / "ref" / "s.csv"), cwd=_cwd(root, "a")))
    out = root / "killed" / "s.csv"
    _killed(run_cli_killed_at(RUN, 3, "before", *argv, "--out", str(out), cwd=_cwd(root, "b")))  # volume 3 of 4
    assert not out.parent.exists() or _visible(out.parent) == {}  # nothing written but whole files
    _ok(run_cli_killed_at(RUN, 99, "before", *argv, "--out", str(out), cwd=root / "b"))
    assert out.read_text() == (root / "ref" / "s.csv").read_text()
    np.testing.assert_array_equal(np.load(root / "killed" / "s.embeddings.npy"),
                                  np.load(root / "ref" / "s.embeddings.npy"))
    meta, ref = (json.loads((root / d / "s.json").read_text()) for d in ("killed", "ref"))
    assert {k: v for k, v in meta.items() if k != "files"} == {k: v for k, v in ref.items() if k != "files"}
    assert _temp_files(root) == []


# ---------------------------------------------------------------------------------------------- query: selection
def test_kill_9_mid_selection_then_query_again_gives_the_same_pick(tiny: dict) -> None:
    root = tiny["root"]
    argv = ["query", "--model", str(tiny["model"]), "--data", str(tiny["data"]), "--budget", "2"]
    pick = "asfda.selection.strategies:greedy_diverse_pick"
    _ok(run_cli_killed_at(pick, 99, "before", *argv, "--out", str(root / "ref.json"), cwd=_cwd(root, "a")))
    _killed(run_cli_killed_at(pick, 1, "before", *argv, "--out", str(root / "q.json"), cwd=_cwd(root, "b")))
    assert not (root / "q.json").exists()
    _ok(run_cli_killed_at(pick, 99, "before", *argv, "--out", str(root / "q.json"), cwd=root / "b"))
    assert json.loads((root / "q.json").read_text()) == json.loads((root / "ref.json").read_text())


# ------------------------------------------------------------------------------------------ next: scoring, selection
@pytest.fixture
def pool(tmp_path: Path) -> dict[str, Path]:
    ds = write_nnunet(tmp_path / "pool", n=6)
    shutil.move(ds / "labelsTr", tmp_path / "truth")
    return {"pool": ds, "truth": tmp_path / "truth", "model": write_bundle(tmp_path / "bundle"), "root": tmp_path}


def _settings() -> ProjectSettings:
    return ProjectSettings(budget=2, device="cpu", train=TrainConfig(steps=4, batch_size=1))


def _project(pool: dict, name: str) -> Path:
    proj = pool["root"] / name
    init_project(proj, str(pool["model"]), str(pool["pool"]), _settings())
    return proj


def _answer(pool: dict, ids: list[str], out: Path) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    for cid in ids:
        shutil.copyfile(pool["truth"] / f"{cid}.nii.gz", out / f"{cid}.nii.gz")
    return out


def _project_state(proj: Path) -> dict:
    state = json.loads((proj / "project.json").read_text())
    return {k: v for k, v in state.items() if k not in ("events", "created")}


@pytest.mark.parametrize(("target", "kill_at"), [(RUN, 4), ("asfda.selection.strategies:greedy_diverse_pick", 1)],
                         ids=["mid-scoring", "mid-selection"])
def test_kill_9_in_next_then_next_again_gives_the_same_query(pool: dict, target: str, kill_at: int) -> None:
    ref, proj = _project(pool, "ref"), _project(pool, "killed")
    q_ref = next_query(ref, progress=False)
    before = _project_state(proj)
    _killed(run_cli_killed_at(target, kill_at, "before", "next", str(proj)))
    assert _project_state(proj) == before and not (proj / "annotate" / "round0").exists()
    _ok(run_cli_killed_at(target, 99, "before", "next", str(proj)))
    q = Project(proj).state["query"]
    assert q["ids"] == q_ref["ids"] and q["components"] == q_ref["components"]
    assert (proj / "annotate" / "round0" / "cases.txt").read_text().split() == q_ref["ids"]
    assert _temp_files(proj) == []


# ---------------------------------------------------------------------------------------------- evaluate
@pytest.mark.parametrize(("target", "kill_at", "when", "match"), [
    (RUN, 3, "before", ""),  # the third case of four
    ("asfda.evaluate:atomic_write_json", 1, "before", "summary.json"),  # per_case.csv written, summary.json not yet
], ids=["mid-cases", "between-its-two-files"])
def test_kill_9_in_evaluate_then_evaluate_again_gives_the_same_numbers(tiny: dict, target: str, kill_at: int,
                                                                       when: str, match: str) -> None:
    root = tiny["root"]
    argv = ["evaluate", "--model", str(tiny["model"]), "--data", str(tiny["data"])]
    _ok(run_cli_killed_at(RUN, 99, "before", *argv, "--out", str(root / "ref"), cwd=_cwd(root, "a")))
    _killed(run_cli_killed_at(target, kill_at, when, *argv, "--out", str(root / "ev"), match=match,
                              cwd=_cwd(root, "b")))
    assert not (root / "ev" / "summary.json").exists()
    _ok(run_cli_killed_at(RUN, 99, "before", *argv, "--out", str(root / "ev"), cwd=root / "b"))
    assert (root / "ev" / "per_case.csv").read_text() == (root / "ref" / "per_case.csv").read_text()
    summary, ref_summary = (json.loads((root / d / "summary.json").read_text()) for d in ("ev", "ref"))
    assert summary == ref_summary
    assert _temp_files(root) == []


# ---------------------------------------------------------------------------------------------- predict
def _maps(folder: Path) -> dict[str, tuple]:
    out = {}
    for p in sorted(folder.glob("[!.]*.nii.gz")):  # hidden temporary files are not outputs
        img = load_nifti(str(p))
        out[p.name] = (np.asarray(img.dataobj).tobytes(), img.affine.tobytes(), str(img.get_data_dtype()))
    return out


@pytest.mark.parametrize(("target", "kill_at", "when"), [
    ("asfda.predict:write_label_map", 2, "after"),  # between a case's label map and its sidecar
    ("nibabel:save", 3, "after"),  # inside the atomic write of case 3: written to its temporary file, not renamed
    ("asfda.predict:atomic_write_json", 3, "before"),  # before case 2's sidecar (case 1's sidecar, labels.json)
], ids=["after-a-label-map", "inside-a-write", "before-a-sidecar"])
def test_kill_9_mid_predict_then_predict_again_finishes_the_same_maps(tiny: dict, target: str, kill_at: int,
                                                                      when: str) -> None:
    root = tiny["root"]
    argv = ["predict", "--model", str(tiny["model"]), "--images", str(tiny["data"])]
    _ok(run_cli_killed_at(RUN, 99, "before", *argv, "--out", str(root / "ref")))
    _killed(run_cli_killed_at(target, kill_at, when, *argv, "--out", str(root / "out")))
    done = _maps(root / "out")
    assert 0 < len(done) < N
    assert all(done[k] == _maps(root / "ref")[k] for k in done)  # every visible map is whole and right
    _ok(run_cli_killed_at(RUN, 99, "before", *argv, "--out", str(root / "out")))
    assert _maps(root / "out") == _maps(root / "ref")
    for p in (root / "ref").glob("*.json"):
        assert json.loads((root / "out" / p.name).read_text()) == json.loads(p.read_text()), p.name
    assert sorted(p.name for p in (root / "out").iterdir()) == sorted(p.name for p in (root / "ref").iterdir())
    # a third run has nothing left to do: the interrupted case was not mistaken for a finished one
    proc = run_cli_killed_at(RUN, 1, "before", *argv, "--out", str(root / "out"))
    _ok(proc)
    assert f"0 cases segmented, {N} skipped" in proc.stdout


# ---------------------------------------------------------------------------------------------- finetune: bundle export
def test_kill_9_mid_bundle_export_of_finetune_keeps_the_previous_bundle_whole(pool: dict) -> None:
    from safetensors.torch import load_file

    ref, proj = _project(pool, "ref"), _project(pool, "killed")
    for p in (ref, proj):  # round 0 in both, the same way
        q = next_query(p, progress=False)
        ingest_labels(p, _answer(pool, q["ids"], pool["root"] / f"ann0_{p.name}"))
        finetune_project(p, progress=False)
        q = next_query(p, progress=False)
        ingest_labels(p, _answer(pool, q["ids"], pool["root"] / f"ann1_{p.name}"))
    bundle0 = _visible(proj / "model")
    finetune_project(ref, progress=False)
    # round 1: killed right after the new model.pt is written into the bundle, before its safetensors and metadata
    _killed(run_cli_killed_at("asfda.models.bundle:atomic_write", 1, "after", "finetune", str(proj),
                              match="model.pt"))
    assert _visible(proj / "model") == bundle0  # the round-0 bundle, whole: never a mix of two rounds
    st = Project(proj).state
    assert len(st["rounds"]) == 1 and len(st["labelled"]) == 4  # labels kept, round 1 not recorded
    _ok(run_cli_killed_at(RUN, 10**6, "before", "finetune", str(proj)))
    assert [r["round"] for r in Project(proj).state["rounds"]] == [0, 1]
    a, b = (load_file(str(p / "model" / "models" / "model.safetensors")) for p in (proj, ref))
    assert all(np.array_equal(a[k].numpy(), b[k].numpy()) for k in a)
    meta_a, meta_b = (json.loads((p / "model" / "configs" / "metadata.json").read_text())["asfda"] for p in (proj, ref))
    assert meta_a["round"] == meta_b["round"] == 1 and meta_a["weights_sha256_16"] == meta_b["weights_sha256_16"]
    assert sorted(_visible(proj / "model")) == sorted(_visible(ref / "model"))
    assert not [p for p in proj.iterdir() if p.name.startswith(".model")]  # no leftover of the interrupted export


# ---------------------------------------------------------------------------------------------- simulate
def _sim_argv(tiny: dict, out: Path) -> list[str]:
    return ["simulate", "--model", str(tiny["model"]), "--pool", str(tiny["data"]), "--out", str(out),
            "--strategies", "asfda,random", "--budget", "1", "--rounds", "2", "--steps", "2", "--no-upper-bound"]


def _rounds(out: Path) -> dict:
    """Every finished round of a simulation with its numbers (timings and forward-pass counts left out: a run that
    finds the pretrained model's outputs of an earlier run in the cache folder makes fewer passes, same numbers)."""
    keep = {}
    for state in sorted(out.glob("*/seed*/state.json")):
        keep[str(state.parent.relative_to(out))] = [
            {k: v for k, v in r.items() if not k.startswith("seconds") and k != "forward_passes"}
            for r in json.loads(state.read_text())["rounds"]]
    return keep


@pytest.mark.parametrize(("target", "kill_at", "when", "match"), [
    ("asfda.simulate_state:atomic_write_json", 1, "after", "state.json"),  # asfda's round 0 recorded, round 1 not begun
    ("asfda.models.bundle:atomic_write", 1, "after", "model.pt"),  # inside asfda's bundle export, after 2 rounds
], ids=["between-rounds", "mid-bundle-export"])
def test_kill_9_in_simulate_then_simulate_again_gives_the_same_results(tiny: dict, target: str, kill_at: int,
                                                                       when: str, match: str) -> None:
    root = tiny["root"]
    (root / "cfg.yaml").write_text(f"cache_dir: {root / 'cache'}\nreport: false\n")
    extra = ["--config", str(root / "cfg.yaml")]
    _ok(run_cli_killed_at(RUN, 10**6, "before", *_sim_argv(tiny, root / "ref"), *extra))
    out = root / "killed"
    _killed(run_cli_killed_at(target, kill_at, when, *_sim_argv(tiny, out), *extra, match=match))
    finished = _rounds(out)
    assert finished["asfda/seed0"] and finished == {k: v[: len(finished[k])] for k, v in _rounds(root / "ref").items()
                                                    if k in finished}
    bundle = out / "asfda" / "seed0" / "bundle"
    if bundle.exists():  # an export never leaves a bundle that mixes two models
        meta = json.loads((bundle / "configs" / "metadata.json").read_text())["asfda"]
        from safetensors.torch import load_file

        from asfda.models.loading import state_dict_hash

        assert state_dict_hash(load_file(str(bundle / "models" / "model.safetensors"))) == meta["weights_sha256_16"]
    _ok(run_cli_killed_at(RUN, 10**6, "before", *_sim_argv(tiny, out), *extra))
    assert _rounds(out) == _rounds(root / "ref")
    for name in ("results.csv", "per_case.csv", "results.md"):
        assert (out / name).read_text() == (root / "ref" / name).read_text(), name
    for strategy in ("asfda", "random"):
        a, b = (p / strategy / "seed0" / "bundle" for p in (out, root / "ref"))
        assert (a / "models" / "model.pt").read_bytes() == (b / "models" / "model.pt").read_bytes() or \
            _same_weights(a, b)
        assert json.loads((a / "configs" / "metadata.json").read_text())["asfda"]["weights_sha256_16"] == \
            json.loads((b / "configs" / "metadata.json").read_text())["asfda"]["weights_sha256_16"]
    assert _temp_files(out) == [] and not [p for p in out.rglob(".bundle*")]


def _same_weights(a: Path, b: Path) -> bool:
    from safetensors.torch import load_file

    x, y = (load_file(str(p / "models" / "model.safetensors")) for p in (a, b))
    return x.keys() == y.keys() and all(np.array_equal(x[k].numpy(), y[k].numpy()) for k in x)


# ---------------------------------------------------------------------------------------------- the atomic writes
_HALF_WRITE = """
import os, signal, sys
from asfda.io.atomic import atomic_write
def half(p):
    with open(p, "wb") as f:
        f.write(b"half of the new")
        f.flush()
        os.kill(os.getpid(), signal.SIGKILL)
atomic_write(sys.argv[1], half)
"""


def test_a_kill_inside_a_write_leaves_the_old_file_and_a_hidden_temporary_the_next_write_removes(tmp_path: Path
                                                                                                  ) -> None:
    import subprocess
    import sys

    from asfda.io.atomic import atomic_write_text

    target = tmp_path / "state.json"
    atomic_write_text(target, "old, whole\n")
    proc = subprocess.run([sys.executable, "-c", _HALF_WRITE, str(target)], capture_output=True)
    assert proc.returncode == -signal.SIGKILL
    assert target.read_text() == "old, whole\n"  # never half-written under its own name
    left = [p for p in tmp_path.iterdir() if p.name != "state.json"]
    assert len(left) == 1 and left[0].name.startswith(".state.json.") and left[0].read_bytes() == b"half of the new"
    # the next write into the folder by any asfda process (here a new one, as a re-run is) sweeps what dead writers left
    subprocess.run([sys.executable, "-c", "import sys; from asfda.io.atomic import atomic_write_text; "
                    "atomic_write_text(sys.argv[1], 'x')", str(tmp_path / "other.txt")], check=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["other.txt", "state.json"]


def test_the_sweep_leaves_the_temporaries_of_live_processes_and_other_hosts(tmp_path: Path) -> None:
    import os

    from asfda.io.atomic import _HOST, sweep_stale_temporaries

    live = tmp_path / f".a.json.asfda-{_HOST}-{os.getppid()}-abc.tmp.json"  # the parent: alive
    mine = tmp_path / f".b.json.asfda-{_HOST}-{os.getpid()}-abc.tmp.json"
    other_host = tmp_path / ".c.json.asfda-elsewhere-999999999-abc.tmp.json"
    dead = tmp_path / f".d.asfda-{_HOST}-999999999-abc.tmp"  # no such pid: a folder a killed export left
    unrelated = tmp_path / ".e.json.tmp"
    for p in (live, mine, other_host, unrelated):
        p.write_text("x")
    (dead / "models").mkdir(parents=True)
    assert sweep_stale_temporaries(tmp_path) == [dead]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(p.name for p in (live, mine, other_host, unrelated))


@pytest.mark.parametrize("exchange", [True, False], ids=["renameat2", "two-renames"])
def test_atomic_write_folder_replaces_a_folder_as_a_whole(tmp_path: Path, exchange: bool,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    import asfda.io.atomic as atomic

    if not exchange:
        monkeypatch.setattr(atomic, "_exchange", lambda a, b: False)
    out = tmp_path / "bundle"

    def version(files: dict[str, str]):
        def write(folder: Path) -> None:
            for name, text in files.items():
                (folder / name).parent.mkdir(parents=True, exist_ok=True)
                (folder / name).write_text(text)
        return write

    atomic.atomic_write_folder(out, version({"models/model.pt": "1", "configs/old_only.json": "1"}))
    atomic.atomic_write_folder(out, version({"models/model.pt": "2", "configs/metadata.json": "2"}))
    assert _visible(out) == {"models/model.pt": b"2", "configs/metadata.json": b"2"}
    assert [p.name for p in tmp_path.iterdir()] == ["bundle"]  # no temporary left

    def fails(folder: Path) -> None:
        (folder / "models").mkdir()
        (folder / "models" / "model.pt").write_text("3")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        atomic.atomic_write_folder(out, fails)
    assert _visible(out) == {"models/model.pt": b"2", "configs/metadata.json": b"2"}
    assert [p.name for p in tmp_path.iterdir()] == ["bundle"]
