"""A results folder's layout (asfda.results.RunLayout) and its records read back (read_run), on a hand-made folder."""

from __future__ import annotations

import json
from pathlib import Path

from asfda.results import UPPER_BOUND, RunLayout, read_run


def _write(path: Path, data: object) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data) if not isinstance(data, str) else data)


def _folder(out: Path) -> RunLayout:
    layout = RunLayout(out)
    _write(layout.run_json, {"config": {"budget": 1}})
    for seed in (0, 2):
        _write(layout.zero_shot(seed), {"key": {}, "per_case": [{"case_id": "t", "dice_mean": 0.1 * seed}]})
    _write(layout.upper_bound(0), {"key": {"pool": ["a", "b"]}, "per_case": [], "steps": 5})
    _write(layout.state("asfda", 0), {"rounds": [{"round": 0, "n_labelled": 1}]})
    _write(layout.state("asfda", 2), {"rounds": []})
    _write(layout.state("random", 1), "{half a file")  # unreadable: a part not run yet
    _write(layout.preview("asfda", 0, "c1", "r1"), "png")
    return layout


def test_the_layout_spells_every_file_of_a_run(tmp_path: Path) -> None:
    layout = RunLayout(tmp_path)
    assert layout.state("asfda", 3) == tmp_path / "asfda" / "seed3" / "state.json"
    assert layout.weights("asfda", 3, 2) == tmp_path / "asfda" / "seed3" / "weights_round2.safetensors"
    assert layout.weights("asfda", 3, 2).match(RunLayout.WEIGHTS_GLOB)
    assert layout.zero_shot(1) == tmp_path / "zero_shot_seed1.json"
    assert layout.upper_bound(1) == tmp_path / UPPER_BOUND / "seed1.json"
    assert layout.bundle("random", 0) == tmp_path / "random" / "seed0" / "bundle"
    assert layout.preview("asfda", 0, "c1", "r2") == tmp_path / "previews" / "asfda" / "seed0" / "c1-r2.png"


def test_the_layout_finds_what_is_on_disk(tmp_path: Path) -> None:
    layout = _folder(tmp_path)
    assert layout.strategies() == ["asfda", "random"]  # not previews/, not upper_bound/
    assert layout.seeds("asfda") == [0, 2] and layout.seeds("random") == [1] and layout.seeds("badge") == []
    assert layout.zero_shot_seeds() == [0, 2] and layout.upper_bound_seeds() == [0]


def test_read_run_reads_every_record_and_leaves_out_what_it_cannot_read(tmp_path: Path) -> None:
    _folder(tmp_path)
    got = read_run(tmp_path)
    assert got.config == {"budget": 1}
    assert sorted(got.zero_shot) == [0, 2] and got.upper_bound[0]["steps"] == 5
    assert got.runs() == [("asfda", 0), ("asfda", 2)]  # random seed1's state is unreadable
    assert got.rounds("asfda", 0) == [{"round": 0, "n_labelled": 1}] and got.rounds("random", 1) == []
    some = read_run(tmp_path, ["asfda", "badge"], [2])
    assert some.runs() == [("asfda", 2)] and sorted(some.zero_shot) == [2] and not some.upper_bound
    assert read_run(tmp_path / "missing").runs() == [] and read_run(tmp_path / "missing").config == {}
