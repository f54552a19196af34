"""The fine-tuning guard: the plausibility metric on hand-made label maps, and the keep/revert decision."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch

from asfda.adapter import Adapter
from asfda.config import SemiConfig
from asfda.io import load_dataset
from asfda.models import load_model
from asfda.training import TrainConfig
from asfda.training.guard import (
    COLLAPSE_FLOOR,
    GuardResult,
    anatomical_plausibility,
    collapsed,
    discards,
    guard_sample,
    organ_shrink,
    organ_voxels,
    volume_ratios,
)


def test_anatomical_plausibility_averages_classes_and_volumes() -> None:
    a = np.zeros((6, 6, 6), dtype=np.int64)
    a[0:3, 0:3, 0:3] = 1  # class 1 whole: 1.0; class 2 absent: 0.0 -> 0.5
    b = np.zeros((6, 6, 6), dtype=np.int64)
    b[0, 0, 0] = b[5, 5, 5] = 1  # two single voxels: 0.5
    b[2:4, 2:4, 2:4] = 2  # 1.0 -> 0.75
    assert anatomical_plausibility([a, b], 3) == pytest.approx((0.5 + 0.75) / 2)
    assert np.isnan(anatomical_plausibility([], 3))
    with pytest.raises(ValueError, match="3D"):
        anatomical_plausibility([np.zeros((4, 4))], 3)


def test_guard_sample_is_seeded_sized_and_order_free() -> None:
    ids = [f"c{i:02d}" for i in range(20)]
    s = guard_sample(ids, 8, seed=3)
    assert len(s) == 8 and set(s) <= set(ids)
    assert guard_sample(list(reversed(ids)), 8, seed=3) == s
    assert guard_sample(ids, 8, seed=4) != s
    assert guard_sample(ids[:5], 8, seed=3) == sorted(ids[:5])


def _adapter(tiny_bundle: Path, tiny_dataset: Path) -> tuple[Adapter, list]:
    ds = load_dataset(tiny_dataset)
    return Adapter(load_model(tiny_bundle), ds.class_names, progress=False), list(ds.cases)


def _shift_weights(adapter: Adapter) -> None:
    with torch.no_grad():
        for p in adapter.current.parameters():
            p.add_(0.5)
    adapter.is_adapted = True


@pytest.mark.parametrize("adapted_better", [False, True])
def test_train_round_reverts_a_less_plausible_model_and_keeps_a_better_one(
        tiny_bundle: Path, tiny_dataset: Path, monkeypatch, adapted_better: bool) -> None:
    adapter, cases = _adapter(tiny_bundle, tiny_dataset)
    start = adapter.current_state()

    def fake_train(self, *a, **k):
        _shift_weights(self)
        return {"loss": [1.0], "loss_l": [1.0], "loss_u": [0.0]}, {}, None

    def fake_measures(self, cases, *, pretrained=False):
        assert [c.case_id for c in cases] == [c.case_id for c in unlabelled]
        return 0.7 if pretrained else (0.9 if adapted_better else 0.6), [np.array([4.0, 2.0]) for _ in cases]

    monkeypatch.setattr(Adapter, "_train_round", fake_train)
    monkeypatch.setattr(Adapter, "guard_measures", fake_measures)
    labelled, unlabelled = cases[:1], cases[1:]
    out = adapter.train_round(labelled, unlabelled, TrainConfig(steps=1), SemiConfig(), 1.0)
    assert isinstance(out.guard, GuardResult)
    assert out.guard.reverted is (not adapted_better)
    assert out.guard.plausibility_pretrained == 0.7
    same = all(torch.equal(start[k], v) for k, v in adapter.current_state().items())
    assert same is (not adapted_better)
    assert adapter.is_adapted is adapted_better  # a reverted round 0 is the pretrained model again
    assert ("discarded" in out.guard.message()) is (not adapted_better)


def test_guard_off_or_without_unlabeled_volumes_does_not_run(tiny_bundle: Path, tiny_dataset: Path,
                                                              monkeypatch) -> None:
    adapter, cases = _adapter(tiny_bundle, tiny_dataset)
    calls: list[int] = []

    def measures(self, *a, **k) -> tuple[float, list]:
        calls.append(1)
        return 0.0, []

    monkeypatch.setattr(Adapter, "guard_measures", measures)
    out = adapter.train_round(cases[:1], cases[1:], TrainConfig(steps=1, guard=False), SemiConfig(), 1.0)
    assert out.guard is None
    out = adapter.train_round(cases, [], TrainConfig(steps=1), SemiConfig(), 1.0)
    assert out.guard is None and not calls


def test_plausibility_runs_the_models_and_caches_the_pretrained_values(tiny_bundle: Path, tiny_dataset: Path,
                                                                        monkeypatch) -> None:
    adapter, cases = _adapter(tiny_bundle, tiny_dataset)
    p0 = adapter.plausibility(cases, pretrained=True)
    assert 0.0 <= p0 <= 1.0
    assert adapter.plausibility(cases) == pytest.approx(p0)  # not adapted yet: the same network
    monkeypatch.setattr(adapter.engine_frozen, "run", lambda *a, **k: pytest.fail("pretrained values not cached"))
    assert adapter.plausibility(cases, pretrained=True) == p0


def test_loading_the_pretrained_weights_is_not_an_adapted_model(tiny_bundle: Path, tiny_dataset: Path) -> None:
    """A resumed run whose last round the guard discarded holds the pretrained weights: asfda's round-0
    fallback (no f_t vs f_0 divergence yet) must apply to it as it did before the restart."""
    adapter, _ = _adapter(tiny_bundle, tiny_dataset)
    start = adapter.current_state()
    adapter.load_current_state(start)
    assert adapter.is_adapted is False
    _shift_weights(adapter)
    moved = adapter.current_state()
    adapter.load_current_state(start)
    adapter.load_current_state(moved)
    assert adapter.is_adapted is True


def test_plausibility_over_chosen_classes() -> None:
    lab = np.zeros((8, 8, 8), dtype=np.int64)
    lab[0:2, 0:2, 0:2] = 1  # 1.0
    lab[5, 5, 5] = lab[7, 7, 7] = 2  # 0.5; class 3 absent: 0.0
    assert anatomical_plausibility([lab], 4) == pytest.approx(0.5)
    assert anatomical_plausibility([lab], 4, classes=[1, 2]) == pytest.approx(0.75)
    assert np.isnan(anatomical_plausibility([lab], 4, classes=[]))


def test_guard_leaves_out_new_target_classes(tmp_path: Path) -> None:
    """A target class the pretrained model lacks (a new output channel) is never predicted by it: counting it
    would favour any adapted model that predicts it at all."""
    from conftest import write_bundle, write_nnunet

    bundle = write_bundle(tmp_path / "b", class_names=("background", "liver"))
    ds = load_dataset(write_nnunet(tmp_path / "ds", n=3, labels={"background": 0, "liver": 1, "spleen": 2}))
    adapter = Adapter(load_model(bundle), ds.class_names, progress=False)
    assert adapter.class_map.new_classes == ["spleen"]
    assert adapter._guard_classes() == [1]


def test_held_back_blames_the_volumes_a_discarded_round_added() -> None:
    from asfda.training.guard import held_back

    # round 0 trained on the outlier alone and was discarded: it stays out while < 3 other labels exist
    assert held_back(["o", "a"], [(["o"], True)]) == ["o"]
    assert held_back(["o", "a", "b"], [(["o"], True), (["a"], False)]) == ["o"]
    # with 3 others it rejoins; a kept round clears nothing, a second discarded round keeps it out for good
    hist = [(["o"], True), (["a"], False), (["a", "b"], False)]
    assert held_back(["o", "a", "b", "c"], hist) == []
    hist2 = hist + [(["a", "b", "c", "o"], True)]  # o and c were new to training in the discarded round
    assert held_back(["o", "a", "b", "c", "d"], hist2) == ["o"]  # o blamed twice; c once, with 3 unblamed others
    assert held_back(["o", "a", "b", "c"], hist2) == ["c", "o"]  # c once, with only 2 unblamed others
    # only volumes new to training since the last kept round are blamed
    assert held_back(["a", "b"], [(["a"], False), (["a", "b"], True)]) == ["b"]
    assert held_back(["a", "b"], []) == []


def test_organ_voxels_count_each_foreground_class() -> None:
    lab = np.zeros((4, 4, 4), dtype=np.uint8)
    lab[0, 0, :3] = 1
    lab[3, 3, 3] = 3  # class 2 absent
    assert organ_voxels(lab, 4).tolist() == [3.0, 0.0, 1.0]
    assert organ_voxels(torch.from_numpy(lab), 4).tolist() == [3.0, 0.0, 1.0]


def test_volume_ratios_are_mean_predicted_over_median_annotated() -> None:
    predicted = [np.array([10.0, 0.0, 4.0]), np.array([30.0, 2.0, 4.0])]  # means 20, 1, 4
    annotated = [np.array([20.0, 4.0, 0.0]), np.array([40.0, 4.0, 0.0]), np.array([10.0, 4.0, 0.0])]  # medians 20, 4, 0
    ratios = volume_ratios(predicted, annotated)
    assert ratios[:2] == [1.0, 0.25] and np.isnan(ratios[2])  # no labelled volume has class 3: no ratio
    assert volume_ratios([], annotated) == [] and volume_ratios(predicted, []) == []


def test_a_guarded_round_records_each_organs_volume_ratio(tiny_bundle: Path, tiny_dataset: Path) -> None:
    """The real guard on the tiny bundle: the ratios of both models are the predicted voxels on the guard's volumes
    over the labelled volumes' annotated voxels, organ for organ (recorded for benchmarks/guard_recall.py)."""
    adapter, cases = _adapter(tiny_bundle, tiny_dataset)
    labelled, unlabelled = cases[:1], cases[1:]
    out = adapter.train_round(labelled, unlabelled, TrainConfig(steps=1, batch_size=1), SemiConfig(), 1.0)
    assert out.guard is not None and out.guard.organs == ["liver", "spleen"]
    label = adapter.prepare(labelled[0]).label
    assert label is not None
    ann = organ_voxels(label, 3)
    pred0 = np.mean([organ_voxels(adapter.forward(c, pretrained=True)[0].argmax(0), 3) for c in unlabelled], axis=0)
    assert out.guard.volume_ratio_pretrained == pytest.approx((pred0 / ann).tolist(), abs=1e-4)
    assert len(out.guard.volume_ratio_adapted) == 2 and GuardResult(**out.guard.to_dict()) == out.guard


def test_organ_shrink_divides_the_ratios_and_skips_organs_the_pretrained_model_hardly_predicts() -> None:
    shrink = organ_shrink([1.0, 3.1653, 0.02, float("nan")], [0.9, 0.1263, 0.5, 0.4])
    assert shrink[:2] == [0.9, pytest.approx(0.0399, abs=1e-4)]
    assert np.isnan(shrink[2]) and np.isnan(shrink[3])  # below MIN_PRETRAINED_RATIO; never labelled
    organs = ["liver", "kidney_right", "kidney_left", "spleen"]
    assert collapsed(organs, shrink) == ["kidney_right"]
    assert collapsed(organs, shrink, ratio_adapted=[0.9, 0.1263, 0.5, 0.4]) == ["kidney_right"]  # btcv_007's round
    assert collapsed(["liver"], [COLLAPSE_FLOOR]) == []  # at the floor: kept


def test_an_over_segmenting_pretrained_model_brought_down_to_size_is_no_collapse() -> None:
    """The demo phantom's first asfda round: the pretrained model predicts the kidneys and spleen at 2-4x their
    annotated volume, the round takes them to 0.53-0.97x: a shrink to 0.27-0.34 of the pretrained volume, and no
    collapse (with the shrink below half alone every phantom round was discarded and the demo stayed at zero-shot)."""
    organs = ["liver", "kidney_right", "kidney_left", "spleen"]
    pretrained, adapted = [0.5542, 1.9747, 2.8727, 2.577], [1.0202, 0.5263, 0.9672, 0.8451]
    shrink = organ_shrink(pretrained, adapted)
    assert max(shrink[1:]) < 0.5 and collapsed(organs, shrink, 0.5, ratio_adapted=adapted) == []  # the first form's
    assert collapsed(organs, shrink, ratio_adapted=adapted) == []  # floor, and today's
    # a phantom round whose right kidney fell to 0.07 of the pretrained volume and 0.14 of the annotated one: collapsed;
    # the left kidney, at 0.09 and 0.24, is not
    pretrained, adapted = [0.7011, 1.9019, 2.8503, 2.6422], [0.5459, 0.1351, 0.2427, 0.8855]
    assert collapsed(organs, organ_shrink(pretrained, adapted), ratio_adapted=adapted) == ["kidney_right"]
    # pair 2, random fold 2: btcv_012 left the left kidney at 0.23 of the pretrained volume and 0.14 of the annotated
    # one, and its weights scored 0.037 above the zero-shot a discard keeps: no collapse
    pretrained, adapted = [0.891, 0.3793, 0.6037, 0.5427], [0.662, 0.1751, 0.137, 0.6867]
    assert collapsed(organs, organ_shrink(pretrained, adapted), ratio_adapted=adapted) == []
    # an organ no labelled volume has (NaN ratio) is judged by its shrink alone
    assert collapsed(["spleen"], [0.1], ratio_adapted=[float("nan")]) == ["spleen"]


def test_an_organ_collapse_discards_a_round_whose_fragmentation_improved() -> None:
    """btcv_007's round on the MR-to-CT pair: plausibility up, the right kidney at 0.04 of the pretrained volume."""
    assert discards(0.657, 0.763, ["kidney_right"]) and not discards(0.657, 0.763, [])
    assert discards(0.7, 0.6) and not discards(0.7, 0.8)
    guard = GuardResult(["a"], 0.657, 0.763, True, ["liver", "kidney_right"], [1.48, 3.17], [1.45, 0.13],
                        [0.98, 0.04], ["kidney_right"])
    assert ("kidney_right at 0.04 of the pretrained model's volume and 0.13 of the labelled volumes' (an organ "
            "collapse") in guard.message()
    assert "fragmented" not in guard.reason()
    both = dataclasses.replace(guard, plausibility_adapted=0.6)
    assert "fragmented" in both.reason() and "collapse" in both.reason()
    assert GuardResult.from_dict({**guard.to_dict(), "dice_discarded": 0.29}) == guard  # a simulation's extra key
    assert GuardResult.from_dict({"cases": [], "plausibility_pretrained": 0.7, "plausibility_adapted": 0.6,
                                  "reverted": True}).collapsed == []  # a record from before the rule


@pytest.mark.parametrize(("before", "shrink", "collapse"), [(1.0, 0.125, True), (1.0, 1.0, False), (4.0, 0.25, False)])
def test_train_round_discards_a_round_that_collapses_an_organ(tiny_bundle: Path, tiny_dataset: Path, monkeypatch,
                                                              before: float, shrink: float, collapse: bool) -> None:
    """Plausibility improves every time. The pretrained model predicts the second organ at ``before`` x its annotated
    size; the round takes it to ``shrink`` x the pretrained volume: to 1/8 of its annotated size (discarded), kept at
    it (kept), or from 4x down to 1x (shrink 0.25, and kept: brought to size, not collapsed)."""
    adapter, cases = _adapter(tiny_bundle, tiny_dataset)
    ann = adapter._annotated_voxels(cases[:1])[0]

    def fake_train(self, *a, **k):
        _shift_weights(self)
        return {"loss": [1.0], "loss_l": [1.0], "loss_u": [0.0]}, {}, None

    def fake_measures(self, cases, *, pretrained=False):
        pre = ann * [1.0, before]
        return (0.7, [pre.copy() for _ in cases]) if pretrained else (0.9, [pre * [1.0, shrink] for _ in cases])

    monkeypatch.setattr(Adapter, "_train_round", fake_train)
    monkeypatch.setattr(Adapter, "guard_measures", fake_measures)
    out = adapter.train_round(cases[:1], cases[1:], TrainConfig(steps=1), SemiConfig(), 1.0)
    assert out.guard is not None
    assert out.guard.organ_shrink == [1.0, shrink]
    assert out.guard.collapsed == (["spleen"] if collapse else [])
    assert out.guard.reverted is collapse
    assert (out.discarded_state is not None) is collapse


@pytest.mark.parametrize("warm_passes", [True, False])
def test_a_semi_round_that_fails_keeps_its_labelled_half_when_that_passes(tiny_bundle: Path, tiny_dataset: Path,
                                                                          monkeypatch, warm_passes: bool) -> None:
    """The semi-supervised weights collapse the second organ; the weights after the labelled warm-up are judged
    again: kept when they pass (only the pseudo-labelled half discarded, the label not to blame), else the round is
    discarded as any other."""
    adapter, cases = _adapter(tiny_bundle, tiny_dataset)
    start = adapter.current_state()
    ann = adapter._annotated_voxels(cases[:1])[0]
    warm: dict[str, torch.Tensor] = {}

    def fake_train(self, *a, **k):
        _shift_weights(self)
        warm.update(self.current_state())
        _shift_weights(self)  # the pseudo-labelled half moves the weights again
        return {"loss": [1.0], "loss_l": [1.0], "loss_u": [0.0]}, {}, dict(warm)

    def fake_measures(self, cases, *, pretrained=False):
        if pretrained:
            return 0.7, [ann.copy() for _ in cases]
        at_warm = all(torch.equal(warm[k], v) for k, v in self.current_state().items())
        return 0.9, [ann * [1.0, 1.0 if at_warm and warm_passes else 0.1] for _ in cases]

    monkeypatch.setattr(Adapter, "_train_round", fake_train)
    monkeypatch.setattr(Adapter, "guard_measures", fake_measures)
    out = adapter.train_round(cases[:1], cases[1:], TrainConfig(steps=1), SemiConfig(enabled=True), 1.0)
    assert out.guard is not None and out.discarded_state is not None  # the semi weights, whatever was kept
    assert not any(torch.equal(out.discarded_state[k], v) for k, v in warm.items() if v.is_floating_point())
    kept = adapter.current_state()
    if warm_passes:
        assert not out.guard.reverted and out.guard.collapsed == []
        assert out.guard.semi_discarded is not None and out.guard.semi_discarded["collapsed"] == ["spleen"]
        assert all(torch.equal(warm[k], v) for k, v in kept.items())
        assert "pseudo-labelled half discarded" in out.guard.message()
        assert GuardResult.from_dict(out.guard.to_dict()) == out.guard  # a round record reads back
    else:
        assert out.guard.reverted and out.guard.semi_discarded is None
        assert out.guard.labelled_half is not None and out.guard.labelled_half["collapsed"] == ["spleen"]
        assert all(torch.equal(start[k], v) for k, v in kept.items())
