"""benchmarks/stop_fit.py: leave-one-fold-out fits of the next round's gain, per pair or pooled over pairs (a fold
is then a pair's fold, so a held-out fold's own rounds are never in its fit, and another pair's fold of the same
index is)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

import stop_fit as bench


def _row(pair: str, fold: int, gain: float, change: float = 0.5) -> dict:
    return {"pair": pair, "fold": fold, "round": 0, "n": 1, "change": change, "gain": gain, "rule": 0.1 * change}


def test_pooled_leave_one_fold_out_keeps_the_held_out_pair_fold_out_only() -> None:
    a0, a1, b0 = _row("a", 0, 0.01), _row("a", 1, 0.03), _row("b", 0, 0.10)
    mean_fit = bench.CANDIDATES["median gain (a constant)"]
    per_pair = bench.leave_one_fold_out([a0, a1], mean_fit)
    assert per_pair == pytest.approx([0.03, 0.01])
    pooled = bench.leave_one_fold_out([a0, a1], mean_fit, train_on=[a0, a1, b0])
    # a0 is fitted on a1 and b0 (b's fold 0 is another pair's fold), a1 on a0 and b0
    assert pooled == pytest.approx([np.median([0.03, 0.10]), np.median([0.01, 0.10])])


def test_a_times_change_is_least_squares_through_zero() -> None:
    train = [_row("a", 0, 0.02, change=0.2), _row("a", 1, 0.04, change=0.4)]
    f = bench.CANDIDATES["a x change"](train)
    assert f(_row("a", 2, 0.0, change=0.3)) == pytest.approx(0.03)


def _state(path: Path, dice: list[float], changes: list[float]) -> None:
    rounds = [{"round": i, "n_labelled": i + 1, "dice_mean": d, "guard": None,
               "stopping": {"change": c, "predicted_gain": 0.1 * c}} for i, (d, c) in enumerate(zip(dice, changes))]
    path.mkdir(parents=True)
    (path / "state.json").write_text(json.dumps({"rounds": rounds, "strategy": "random", "seed": 0}))


def test_main_prints_a_table_per_folder_pooled(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    for pair, gains in (("ct_to_mr", [0.5, 0.52]), ("mr_to_ct", [0.4, 0.5])):
        for k in (0, 1):
            _state(tmp_path / pair / f"fold{k}" / "random" / "seed0", gains, [0.6, 0.1])
    bench.main(["--pooled", str(tmp_path / "ct_to_mr"), str(tmp_path / "mr_to_ct")])
    out = capsys.readouterr().out
    assert "pooled fit: 4 rounds from 2 folders" in out
    (tmp_path / "linked").mkdir()  # a third folder whose fold links ct_to_mr's: its runs are not fitted twice
    (tmp_path / "linked" / "fold0").symlink_to(tmp_path / "ct_to_mr" / "fold0", target_is_directory=True)
    bench.main(["--pooled", str(tmp_path / "ct_to_mr"), str(tmp_path / "mr_to_ct"), str(tmp_path / "linked")])
    assert "pooled fit: 4 rounds from 3 folders" in capsys.readouterr().out
    # a variant's rerun that trained the same models (a copy, not a link): its rounds are the same rounds
    shutil.copytree(tmp_path / "ct_to_mr" / "fold1", tmp_path / "variant" / "ct_to_mr" / "fold1")
    bench.main(["--pooled", str(tmp_path / "ct_to_mr"), str(tmp_path / "mr_to_ct"),
                str(tmp_path / "variant" / "ct_to_mr")])
    assert "pooled fit: 4 rounds from 3 folders" in capsys.readouterr().out
    assert out.count("| predict 0 |") == 4  # one table per pair (its distinct rounds), one per folder
    assert "## pair ct_to_mr: every folder's distinct rounds (2)" in out and "least squares through 0" in out
    assert "| predict 0 | 0.0200 |" in out and "| predict 0 | 0.1000 |" in out


def test_the_shipped_scale_and_reliability_follow_every_committed_real_round() -> None:
    """`asfda.stopping.GAIN_PER_CHANGE` is the least-squares scale through 0 over every distinct committed
    cross-validated round of both real pairs (`stop_fit.py --pooled --all`: the decisive rows, the baselines and the
    selection variants), and `GAIN_ESTIMATE_RELIABLE` says whether "a x change", fitted with each pair's fold left out,
    errs less than predicting 0 on both pairs' distinct rounds (benchmarks/results/stopping/README.md: on CT -> MR it
    does not, so `asfda status` shows no number). The rounds it flags "consider stopping" gain less next, by the mean,
    than those it flags "continue" on both pairs: the recommendation stays. Fails when new rounds move these."""
    from asfda.stopping import GAIN_ESTIMATE_RELIABLE, GAIN_PER_CHANGE, STOP_BELOW

    folders = bench.committed_folders(Path(__file__).resolve().parents[2] / "benchmarks" / "results")
    pooled = bench.pooled_rows(list(bench.rounds_by_folder(folders).values()))
    assert len(pooled) >= 300 and {r["pair"] for r in pooled} == set(bench.PAIRS)
    assert GAIN_PER_CHANGE == pytest.approx(bench.scale_through_zero(pooled), abs=0.005)
    beats_zero = []
    for pair in bench.PAIRS:
        rows = [r for r in pooled if r["pair"] == pair]
        pred = bench.leave_one_fold_out(rows, bench.CANDIDATES["a x change"], train_on=pooled)
        true = np.array([r["gain"] for r in rows])
        beats_zero.append(np.mean(np.abs(pred - true)) < np.mean(np.abs(true)))
        stop = pred < STOP_BELOW
        assert stop.any() and (~stop).any() and true[stop].mean() < true[~stop].mean()
    assert beats_zero == [False, True]  # CT -> MR, MR -> CT
    assert GAIN_ESTIMATE_RELIABLE is all(beats_zero)
