"""Hostile project.json files and project trust (issue 30): every setting of the JSON type asfda writes, case ids
that are plain names, file names that stay inside the project, and trust in a model's code given on the command
line each time, never read from project.json nor stored by `asfda set`. Each refusal is one line, exit 2, nothing
written. A damaged project.json (not JSON, not UTF-8, entries of the wrong kind) or a deleted one names its .bak.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest

from _project_helpers import N_POOL, _answer, _settings, make_pool
from asfda.cli import build_parser, main
from asfda.errors import AsfdaError
from asfda.project import Project, finetune_project, ingest_labels, init_project, next_query, project_status
from conftest import write_bundle, write_nnunet


@pytest.fixture
def pool(tmp_path: Path) -> dict[str, Path]:
    return make_pool(tmp_path)


@pytest.fixture(scope="module")
def made(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One project made once (init loads the model); each test works on its own copy."""
    root = tmp_path_factory.mktemp("made")
    proj = root / "proj"
    init_project(proj, str(write_bundle(root / "bundle")), str(write_nnunet(root / "pool", n=4)), _settings())
    return proj


@pytest.fixture
def proj(made: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(made, tmp_path / "proj", symlinks=True))


def _edit(proj: Path, change) -> None:
    """Applies ``change`` to project.json and its .bak alike (so the restore hint does not apply)."""
    for name in ("project.json", "project.json.bak"):
        state = json.loads((proj / name).read_text())
        change(state)
        (proj / name).write_text(json.dumps(state))


def _files(proj: Path) -> dict[str, bytes]:
    return {str(p): p.read_bytes() for p in sorted(proj.rglob("*")) if p.is_file() and p.name != ".asfda.lock"}


def _refused_in_one_line(proj: Path, capsys: pytest.CaptureFixture, *words: str) -> str:
    before = _files(proj)
    capsys.readouterr()
    assert main(["status", str(proj)]) == 2
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and "Traceback" not in err and "fix:" in lines[0], err
    assert all(w in lines[0] for w in words), lines[0]
    assert _files(proj) == before
    return lines[0]


def _setter(dotted: str, value: object):
    def change(state: dict) -> None:
        node = state
        *parents, last = dotted.split(".")
        for part in parents:
            node = node[part]
        node[last] = value
    return change


# ---------------------------------------------------------------------------------------------- types
WRONG_TYPES = [("settings.budget", "3", "an int"), ("settings.seed", 1.5, "an int"),
               ("settings.alpha", "0.5", "a finite number"), ("settings.alpha", float("nan"), "a finite number"),
               ("settings.temperature0", None, "a finite number"), ("settings.strategy", 3, "a str"),
               ("settings.allow_empty_labels", "yes", "a bool"), ("settings.class_map", ["a"], "a str or null"),
               ("settings.train.steps", "200", "an int"), ("settings.train.guard", "false", "a bool"),
               ("settings.train.lr", float("inf"), "a finite number"),
               ("settings.train.patch_size", [16, 16], "a list of 3 int or null"),
               ("settings.semi.enabled", 1, "a bool"), ("settings.train", "fast", "an object"),
               ("pool_cases", "4", "an int"), ("labelled", [], "an object"), ("rounds", {}, "a list")]


@pytest.mark.parametrize("field, value, kind", WRONG_TYPES, ids=[f"{f}={v!r}" for f, v, _ in WRONG_TYPES])
def test_a_project_json_entry_of_the_wrong_type_is_refused(proj: Path, field: str, value: object, kind: str,
                                                          capsys: pytest.CaptureFixture) -> None:
    """Before: settings went through the command line's text conversion, so a budget of "3" (and "200" steps, a
    guard of "false") was taken silently."""
    _edit(proj, _setter(field, value))
    _refused_in_one_line(proj, capsys, field.removeprefix("settings.") if field.startswith("settings.") else field,
                         kind)


OUT_OF_RANGE = [("settings.seed", -1), ("settings.seed", 2 ** 64), ("settings.train.seed", -5),
                ("settings.train.weight_decay", -1.0), ("settings.train.warmup_fraction", 5.0),
                ("settings.train.lr", 1e300), ("settings.semi.confident_fraction", -1.0),
                ("settings.semi.prob_threshold", 2.0)]


@pytest.mark.parametrize("field, value", OUT_OF_RANGE, ids=[f"{f}={v!r}" for f, v in OUT_OF_RANGE])
def test_a_project_json_setting_out_of_range_is_refused(proj: Path, field: str, value: object,
                                                        capsys: pytest.CaptureFixture) -> None:
    """Before: a negative seed, a negative weight decay, a learning rate past float32 or a fraction below 0 stopped
    next or finetune with a traceback (numpy's and torch's own ValueError)."""
    _edit(proj, _setter(field, value))
    _refused_in_one_line(proj, capsys, field.removeprefix("settings."), "must be")


def test_a_project_json_number_past_python_s_digit_limit_is_one_line(proj: Path,
                                                                     capsys: pytest.CaptureFixture) -> None:
    """Before: a 5000-digit number (json's int() limit) was a ValueError traceback."""
    for name in ("project.json", "project.json.bak"):
        text = (proj / name).read_text()
        assert '"pool_cases": 4' in text
        (proj / name).write_text(text.replace('"pool_cases": 4', '"pool_cases": ' + "9" * 5000))
    _refused_in_one_line(proj, capsys, "not valid JSON")


def test_set_refuses_a_negative_seed(proj: Path, capsys: pytest.CaptureFixture) -> None:
    before = _files(proj)
    assert main(["set", str(proj), "seed=-1"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "seed must be a whole number" in err
    assert _files(proj) == before


# ---------------------------------------------------------------------------------------------- paths and ids
OUTSIDE = [("weights", "../../../etc/passwd"), ("weights", "/etc/passwd"), ("weights", "."),
           ("labelled.case00.file", "../../outside.nii.gz"), ("query.folder", "/tmp")]


@pytest.mark.parametrize("field, value", OUTSIDE, ids=[f"{f}={v}" for f, v in OUTSIDE])
def test_a_file_name_outside_the_project_is_refused(proj: Path, field: str, value: str,
                                                    capsys: pytest.CaptureFixture) -> None:
    """Before: `weights: ../../../etc/passwd` was opened by next and finetune."""
    def change(state: dict) -> None:
        state["labelled"]["case00"] = {"file": "labels/case00.nii.gz", "sha256": "0", "ingested": "t"}
        state["query"] = {"round": 0, "ids": ["case00"], "folder": "annotate/round0", "strategy": "asfda",
                          "temperature": 1.0, "components": {}}
        if field == "labelled.case00.file":
            state["labelled"]["case00"]["file"] = value
        else:
            _setter(field, value)(state)

    _edit(proj, change)
    _refused_in_one_line(proj, capsys, "not a file inside the project folder", field.split(".")[0])


def test_a_link_that_leads_out_of_the_project_is_refused(proj: Path, tmp_path: Path,
                                                         capsys: pytest.CaptureFixture) -> None:
    (tmp_path / "elsewhere.safetensors").write_bytes(b"x")
    (proj / "weights" / "round0.safetensors").symlink_to(tmp_path / "elsewhere.safetensors")
    _edit(proj, _setter("weights", "weights/round0.safetensors"))
    _refused_in_one_line(proj, capsys, "weights", "not a file inside the project folder")


@pytest.mark.parametrize("cid", ["../../x", "a/b", "..", ".hidden", "a\\b", ""])
def test_a_labelled_id_that_is_not_a_plain_name_is_refused(proj: Path, cid: str,
                                                           capsys: pytest.CaptureFixture) -> None:
    """Before: a labelled id `../../x` was counted by `status`."""
    _edit(proj, lambda s: s["labelled"].update({cid: {"file": "labels/x.nii.gz", "sha256": "0", "ingested": "t"}}))
    _refused_in_one_line(proj, capsys, "is not a case id")


def test_query_and_round_ids_are_checked_alike(proj: Path, capsys: pytest.CaptureFixture) -> None:
    _edit(proj, lambda s: s["rounds"].append({"round": 0, "labelled_ids": ["../x"], "weights": "weights/r.st"}))
    _refused_in_one_line(proj, capsys, "rounds[0].labelled_ids", "is not a case id")


def test_damaged_weights_inside_the_project_are_one_line(proj: Path) -> None:
    (proj / "weights" / "round0.safetensors").write_bytes(b"not safetensors")
    _edit(proj, _setter("weights", "weights/round0.safetensors"))
    with pytest.raises(AsfdaError, match="cannot read the adapted weights"):
        Project(proj).adapter(progress=False, device="cpu")


# ---------------------------------------------------------------------------------------------- trust
def test_project_json_cannot_grant_trust_in_model_code(proj: Path, monkeypatch: pytest.MonkeyPatch,
                                                       caplog: pytest.LogCaptureFixture) -> None:
    """Before: `trust_model_code: true` in project.json (a hand edit, or `asfda set`) ran a bundle's `$` expressions
    with no flag on the command line. Now it is ignored with a warning (false, what older projects hold: silently),
    and dropped at the next save."""
    from asfda.models import load_model as real

    seen: list[bool] = []

    def spy(*args, allow_code: bool = False, **kwargs):
        seen.append(allow_code)
        return real(*args, allow_code=allow_code, **kwargs)

    monkeypatch.setattr("asfda.project.state.load_model", spy)
    assert "trust_model_code" not in json.loads((proj / "project.json").read_text())["settings"]  # init stores none
    _edit(proj, _setter("settings.trust_model_code", False))
    with caplog.at_level(logging.WARNING):
        Project(proj).adapter(progress=False, device="cpu")
    assert seen == [False] and not caplog.records
    _edit(proj, _setter("settings.trust_model_code", True))
    with caplog.at_level(logging.WARNING):
        project = Project(proj)
        project.adapter(progress=False, device="cpu")
    assert seen == [False, False]
    assert any("trust_model_code = true is ignored" in r.getMessage() and "--trust-model-code" in r.getMessage()
               for r in caplog.records)
    project.save("test")
    assert "trust_model_code" not in json.loads((proj / "project.json").read_text())["settings"]
    Project(proj).adapter(progress=False, device="cpu", trust_model_code=True)  # the command line's flag
    assert seen == [False, False, True]


def test_set_refuses_to_store_trust(proj: Path, capsys: pytest.CaptureFixture) -> None:
    before = _files(proj)
    capsys.readouterr()
    assert main(["set", str(proj), "trust_model_code=true"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "trust_model_code is not a project setting" in err and "--trust-model-code" in err
    assert _files(proj) == before


@pytest.mark.parametrize("command", ["next", "finetune"])
@pytest.mark.parametrize("trust", [False, True])
def test_next_and_finetune_take_trust_from_the_command_line(proj: Path, command: str, trust: bool,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[bool] = []

    def fake(root, *, trust_model_code: bool = False, **kwargs):
        seen.append(trust_model_code)
        raise AsfdaError("stop here")

    monkeypatch.setattr(f"asfda.project.{'next_query' if command == 'next' else 'finetune_project'}", fake)
    assert main([command, str(proj), *(["--trust-model-code"] if trust else []), "--no-progress"]) == 2
    assert seen == [trust]
    assert not hasattr(build_parser().parse_args(["status", str(proj)]), "trust_model_code")  # status loads no model


def test_next_hands_the_flag_to_the_model_loader(proj: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from asfda.project import next_query

    seen: list[bool] = []

    def fake_load_model(*args, allow_code: bool = False, **kwargs):
        seen.append(allow_code)
        raise AsfdaError("stop here")

    monkeypatch.setattr("asfda.project.state.load_model", fake_load_model)
    for trust in (True, False):
        with pytest.raises(AsfdaError, match="stop here"):
            next_query(proj, progress=False, trust_model_code=trust)
    assert seen == [True, False]


# ---------------------------------------------------------------------------------------------- project.json damage
def _damage(proj: Path, how: str) -> None:
    path = proj / "project.json"
    if how == "not_json":
        path.write_text(path.read_text()[:-20])
    elif how == "not_utf8":
        path.write_bytes(path.read_bytes().replace(b'"asfda"', b'"\xff\xfe"', 1))
    else:
        state = json.loads(path.read_text())
        if how == "budget_text":
            state["settings"]["budget"] = "two"
        elif how == "labelled_number":
            state["labelled"] = 5
        elif how == "rounds_text":
            state["rounds"] = "none"
        elif how == "strategy_number":
            state["settings"]["strategy"] = [1]
        elif how == "labels_list":
            state["labels"] = ["background"]
        elif how == "array":
            state = [state]
        path.write_text(json.dumps(state))


DAMAGE = ["not_json", "not_utf8", "budget_text", "labelled_number", "rounds_text", "strategy_number", "labels_list",
          "array"]


@pytest.mark.parametrize("how", DAMAGE)
def test_a_damaged_project_json_is_one_line_naming_the_bak(pool: dict, tmp_path: Path, how: str,
                                                           capsys: pytest.CaptureFixture) -> None:
    proj = tmp_path / "proj"
    init_project(proj, str(pool["model"]), str(pool["pool"]), _settings())
    _damage(proj, how)
    capsys.readouterr()
    for command in (["status", str(proj)], ["next", str(proj), "--no-progress"]):
        assert main(command) == 2
        err = capsys.readouterr().err
        lines = [ln for ln in err.splitlines() if ln.strip()]
        assert len(lines) == 1 and "Traceback" not in err, err
        assert str(proj / "project.json") in lines[0]
        assert f"cp {proj.resolve() / 'project.json.bak'} {proj.resolve() / 'project.json'}" in lines[0]
    # the advice works: the .bak is a valid copy of the last state asfda wrote
    shutil.copyfile(proj / "project.json.bak", proj / "project.json")
    assert project_status(proj)["pool_cases"] == N_POOL


def test_a_deleted_project_json_names_its_bak(pool: dict, tmp_path: Path) -> None:
    proj = tmp_path / "proj"
    init_project(proj, str(pool["model"]), str(pool["pool"]), _settings())
    (proj / "project.json").unlink()
    with pytest.raises(AsfdaError) as e:
        project_status(proj)
    assert "project.json.bak" in str(e.value) and "cp " in str(e.value)
    assert "not an asfda project" not in str(e.value)
    with pytest.raises(AsfdaError, match="already"):  # init does not start over on top of it
        init_project(proj, str(pool["model"]), str(pool["pool"]), _settings())


def test_restoring_the_bak_after_finetune_keeps_the_round(pool: dict, tmp_path: Path) -> None:
    proj = tmp_path / "proj"
    init_project(proj, str(pool["model"]), str(pool["pool"]), _settings())
    q = next_query(proj, progress=False)
    ingest_labels(proj, _answer(pool["truth"], q["ids"], tmp_path / "ann"))
    finetune_project(proj, progress=False)
    assert project_status(proj)["rounds_finished"] == 1
    _damage(proj, "not_json")  # a hand edit gone wrong
    with pytest.raises(AsfdaError, match=r"project\.json\.bak"):
        project_status(proj)
    shutil.copyfile(proj / "project.json.bak", proj / "project.json")  # as the message advises
    st = project_status(proj)
    assert st["rounds_finished"] == 1 and st["labelled"] == 2 and st["labelled_not_trained"] == []
    (proj / "project.json").unlink()  # deleted: the same
    shutil.copyfile(proj / "project.json.bak", proj / "project.json")
    assert project_status(proj)["rounds_finished"] == 1
    assert Project(proj).state["weights"] == "weights/round0.safetensors"
