"""benchmarks/stopping.py: reads simulate run folders (and cross-validation folders of them), pairs each round's
estimate with the true next-round gain, and names the runs written without probe records."""

from __future__ import annotations

import json
from pathlib import Path

import stopping as bench


def _state(path: Path, changes: list[float | None], dice: list[float]) -> None:
    rounds = [{"round": i, "n_labelled": i + 1, "dice_mean": d, "guard": None,
               **({"probe": {"change": c}} if c is not None else {})} for i, (c, d) in enumerate(zip(changes, dice))]
    path.mkdir(parents=True)
    (path / "state.json").write_text(json.dumps({"rounds": rounds}))


def test_reads_cv_folders_and_names_runs_without_probe_records(tmp_path: Path) -> None:
    _state(tmp_path / "fold0" / "random" / "seed0", [0.8, 0.2, 0.05], [0.5, 0.6, 0.62])
    _state(tmp_path / "fold1" / "random" / "seed0", [None, None], [0.4, 0.7])  # written before the probe existed
    rows, lacking = bench.run_rows(tmp_path)
    assert lacking == ["fold1/random/seed0"]
    assert [r["run"] for r in rows] == ["fold0/random/seed0"] * 3
    assert rows[0]["true_next_gain"] is not None and abs(rows[0]["true_next_gain"] - 0.1) < 1e-9
    out = tmp_path / "README.md"
    bench.main(["--runs", str(tmp_path), "--title", "folds", "--out", str(out)])
    text = out.read_text()
    assert "## folds" in text and "1 run(s) have no probe records" in text and "fold1/random/seed0" in text
    assert "| all | 2 |" in text and "MAE of predicting 0" in text
    bench.main(["--runs", str(tmp_path / "fold1"), "--title", "old", "--out", str(out), "--append"])
    assert "## folds" in out.read_text() and "No round with probe records." in out.read_text()
