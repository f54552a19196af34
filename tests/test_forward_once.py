"""Every forward pass once (asfda.adapter.outputs): no volume goes through the same weights twice in a run."""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from pathlib import Path

import pytest

from asfda.config import RunConfig
from asfda.engine import InferenceEngine
from asfda.models import state_dict_hash
from asfda.simulate import run_simulation
from asfda.training import TrainConfig
from conftest import write_nnunet


def _counting_engine(monkeypatch: pytest.MonkeyPatch) -> Counter:
    """Wraps `InferenceEngine.run`: counts each deterministic pass by (weights, volume)."""
    seen: Counter = Counter()
    original = InferenceEngine.run

    def run(self, image, *, mc_dropout=False, tta=False):
        if not (mc_dropout or tta):
            x = image.as_tensor() if hasattr(image, "as_tensor") else image
            volume = hashlib.sha256(x.detach().cpu().contiguous().numpy().tobytes()).hexdigest()[:16]
            seen[(state_dict_hash(self.network.state_dict()), volume)] += 1
        return original(self, image, mc_dropout=mc_dropout, tta=tta)

    monkeypatch.setattr(InferenceEngine, "run", run)
    return seen


@pytest.mark.parametrize("strategy", ["asfda", "random"])
@pytest.mark.parametrize("guard_keeps", [True, False])
def test_no_volume_goes_through_the_same_weights_twice(tmp_path: Path, tiny_bundle: Path, strategy: str,
                                                       guard_keeps: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """A 2-round simulation, guard and when-to-stop probe on, rounds kept or discarded by the guard: each volume goes
    through each weights once (scoring, guard, probe, the queried volumes' Dice, evaluation), and ``state.json``
    records the passes per round by model."""
    import asfda.adapter.training as training

    monkeypatch.setattr(training, "discards", lambda before, after, *collapse: not guard_keeps)
    seen = _counting_engine(monkeypatch)
    data = write_nnunet(tmp_path / "ds", n=7)
    cfg = RunConfig(model=str(tiny_bundle), pool=str(data), test_fraction=0.3, strategies=[strategy], budget=1,
                    rounds=2, seeds=[0], train=TrainConfig(steps=3, batch_size=1, guard=True, guard_volumes=3),
                    cache_dir=str(tmp_path / "cache"), out_dir=str(tmp_path / "run"), progress=False, report=False,
                    upper_bound=False)
    run_simulation(cfg)
    assert seen, "the wrapper saw no pass"
    twice = {k: n for k, n in seen.items() if n > 1}
    assert not twice, f"{len(twice)} (weights, volume) pairs ran more than once: {sorted(twice.values())}"

    state = json.loads((tmp_path / "run" / strategy / "seed0" / "state.json").read_text())
    pool = 5  # 7 volumes, 2 of them the test set
    for record in state["rounds"]:
        assert record["guard"]["reverted"] is (not guard_keeps)
        passes = record["forward_passes"]
        assert set(passes) == {"pretrained", "adapted"}
        if record["round"] > 0:
            assert passes["pretrained"] == 0, passes  # the pretrained outputs of round 0 serve every later round
        assert passes["adapted"] <= pool + 2, passes
    first = state["rounds"][0]["forward_passes"]
    assert first["pretrained"] >= 1


def test_pretrained_outputs_are_kept_across_runs(tmp_path: Path, tiny_bundle: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """A second run on the same volumes with the same cache folder runs the pretrained model on none of them."""
    data = write_nnunet(tmp_path / "ds", n=6)

    def cfg(out: str) -> RunConfig:
        return RunConfig(model=str(tiny_bundle), pool=str(data), test_fraction=0.34, strategies=["asfda"], budget=1,
                         rounds=1, seeds=[0], train=TrainConfig(steps=2, batch_size=1),
                         cache_dir=str(tmp_path / "cache"), out_dir=str(tmp_path / out), progress=False,
                         report=False, upper_bound=False)

    run_simulation(cfg("a"))
    seen = _counting_engine(monkeypatch)
    run_simulation(cfg("b"))
    assert seen  # the adapted model still runs
    state = json.loads((tmp_path / "b" / "asfda" / "seed0" / "state.json").read_text())
    assert state["rounds"][0]["forward_passes"]["pretrained"] == 0


def test_a_one_shot_query_without_cache_keeps_no_outputs(tmp_path: Path, tiny_bundle: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """``asfda query --no-cache`` reads no pass twice, so it writes none to disk (no temporary output folder), and
    picks what a query with a cache folder picks."""
    import tempfile

    from asfda.query import query_dataset

    made: list[str] = []
    original = tempfile.TemporaryDirectory.__init__

    def spy(self, *args, **kwargs):
        made.append(str(kwargs.get("prefix", args[1] if len(args) > 1 else "")))
        original(self, *args, **kwargs)

    monkeypatch.setattr(tempfile.TemporaryDirectory, "__init__", spy)
    data = write_nnunet(tmp_path / "ds", n=5)
    without = query_dataset(tiny_bundle, data, "asfda", 2, tmp_path / "q1", cache_dir=None, progress=False)
    assert not [p for p in made if p.startswith("asfda-outputs")], made
    with_cache = query_dataset(tiny_bundle, data, "asfda", 2, tmp_path / "q2", cache_dir=str(tmp_path / "cache"),
                               progress=False)
    assert without is not None and with_cache is not None
    assert without.ids == with_cache.ids and without.scores == with_cache.scores
    assert (tmp_path / "cache" / "outputs").is_dir()  # with a cache folder the pretrained outputs are kept


def test_a_discarded_round_records_what_its_weights_would_have_scored(tmp_path: Path, tiny_bundle: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """The guard's recall and precision need the test Dice of the weights it discarded: ``guard.dice_discarded``
    equals the test Dice the same round reaches when the guard keeps it; the kept weights (and so the later rounds)
    are those of the round before, bit for bit."""
    import asfda.adapter.training as training

    data = write_nnunet(tmp_path / "ds", n=6)

    def run(keep: bool, out: str) -> list[dict]:
        monkeypatch.setattr(training, "discards", lambda before, after, *collapse: not keep)
        cfg = RunConfig(model=str(tiny_bundle), pool=str(data), test_fraction=0.34, strategies=["random"], budget=1,
                        rounds=1, seeds=[0], train=TrainConfig(steps=3, batch_size=1, guard=True, guard_volumes=2),
                        cache_dir=str(tmp_path / "cache"), out_dir=str(tmp_path / out), progress=False, report=False,
                        upper_bound=False)
        run_simulation(cfg)
        return json.loads((tmp_path / out / "random" / "seed0" / "state.json").read_text())["rounds"]

    kept, discarded = run(True, "kept"), run(False, "discarded")
    assert "dice_discarded" not in kept[0]["guard"]
    assert discarded[0]["guard"]["reverted"] is True
    assert discarded[0]["guard"]["dice_discarded"] == pytest.approx(kept[0]["dice_mean"], abs=1e-9)
    zero_shot = json.loads((tmp_path / "discarded" / "zero_shot_seed0.json").read_text())["per_case"]
    zero_shot_mean = sum(c["dice_mean"] for c in zero_shot) / len(zero_shot)
    assert discarded[0]["dice_mean"] == pytest.approx(zero_shot_mean, abs=1e-9)  # the kept (pretrained) weights
