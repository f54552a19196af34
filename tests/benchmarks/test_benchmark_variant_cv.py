"""benchmarks/variant_cv.py on hand-made crossval folders: the rows it pairs and the differences it reports."""

from __future__ import annotations

import json
from pathlib import Path

from variant_cv import fold_rows, table


def _state(path: Path, picks: list[str], dice: list[dict[str, float]]) -> None:
    path.mkdir(parents=True)
    rounds = [{"n_labelled": i + 1, "queried": [p], "dice_mean": sum(d.values()) / len(d),
               "per_case": [{"case_id": v, "dice_mean": x} for v, x in d.items()]} for i, (p, d) in
              enumerate(zip(picks, dice))]
    (path / "state.json").write_text(json.dumps({"rounds": rounds}))


def test_pairs_each_test_volume_with_the_reference_and_randoms_mean(tmp_path: Path) -> None:
    var, ref = tmp_path / "var", tmp_path / "ref"
    _state(var / "fold0/asfda/seed0", ["a", "b"], [{"t1": 0.6, "t2": 0.8}, {"t1": 0.7, "t2": 0.9}])
    _state(ref / "fold0/asfda/seed0", ["a", "c"], [{"t1": 0.6, "t2": 0.8}, {"t1": 0.6, "t2": 0.7}])
    _state(ref / "fold0/random/seed0", ["d", "e"], [{"t1": 0.5, "t2": 0.5}, {"t1": 0.6, "t2": 0.6}])
    _state(ref / "fold0/random/seed1", ["e"], [{"t1": 0.3, "t2": 0.7}])  # one round only: n = 2 is left out
    lines, by_n = fold_rows(var, ref, 0, [0, 1])
    assert lines == ["| 0 | a, b: 0.700 / 0.800 | a, c: 0.700 / 0.650 |"]
    assert sorted(by_n) == [1]
    assert by_n[1] == [("t1", 0.6, 0.6, 0.4), ("t2", 0.8, 0.8, 0.6)]
    _, by_n = fold_rows(var, ref, 0, [0])
    assert by_n[2] == [("t1", 0.7, 0.6, 0.6), ("t2", 0.9, 0.7, 0.6)]
    rows = table(by_n, "v", resamples=200)
    assert rows[0].startswith("| n | test volumes | v | reference asfda | random | v - reference [95%]")
    # n = 2: the variant 0.8, the reference 0.65, random 0.6; differences +0.15 (0.1 and 0.2) and +0.2 (0.1 and 0.3)
    assert rows[3].startswith("| 2 | 2 | 0.800 | 0.650 | 0.600 | +0.150 [+0.100, +0.200] | +0.200 [+0.100, +0.300]")
