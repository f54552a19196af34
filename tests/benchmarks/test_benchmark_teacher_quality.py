"""benchmarks/teacher_quality.py: each teacher's pseudo-labels scored against the true labels, without training."""

from __future__ import annotations

from pathlib import Path

import pytest

import teacher_quality as tq
from conftest import write_nnunet


def test_summary_averages_each_teacher_and_threshold_over_volumes() -> None:
    rows = [{"key": "model @ 0.9", "quality": {"pseudo_dice": 0.8, "kept_fraction": 0.5}},
            {"key": "model @ 0.9", "quality": {"pseudo_dice": 0.6, "kept_fraction": float("nan")}},
            {"key": "flip_average @ 0.9", "quality": {"pseudo_dice": 0.9, "kept_fraction": 0.7}}]
    s = tq.summarize(rows)
    assert s["model @ 0.9"] == pytest.approx({"pseudo_dice": 0.7, "kept_fraction": 0.5})
    assert list(s) == ["flip_average @ 0.9", "model @ 0.9"]


def test_every_unlabeled_volume_scored_for_each_teacher(tmp_path: Path, tiny_bundle: Path) -> None:
    data = write_nnunet(tmp_path / "ds", n=3)
    out = tmp_path / "q.json"
    rec = tq.main(["--model", str(tiny_bundle), "--data", str(data), "--labelled", "case00", "--thresholds", "0.5,0.9",
                   "--out", str(out), "--device", "cpu", "--cache-dir", str(tmp_path / "cache"), "--threads", "1"])
    assert rec["volumes"] == 2 and {r["case_id"] for r in rec["rows"]} == {"case01", "case02"}
    assert set(rec["summary"]) == {"model @ 0.5", "model @ 0.9", "flip_average @ 0.5", "flip_average @ 0.9"}
    for s in rec["summary"].values():  # a higher threshold keeps fewer voxels
        assert 0.0 <= s["kept_fraction"] <= 1.0
    assert rec["summary"]["model @ 0.9"]["kept_fraction"] <= rec["summary"]["model @ 0.5"]["kept_fraction"]
    assert "| teacher @ threshold |" in out.with_suffix(".md").read_text()
