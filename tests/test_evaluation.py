"""Evaluation on hand-made label maps with hand-computed values."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from asfda.evaluation import (
    compute_dice,
    compute_hd95,
    largest_component_per_class,
    mean_ignoring_nan,
    per_class_scores,
)


def test_largest_component_keeps_each_class_biggest_piece() -> None:
    label = np.zeros((10, 10, 4), np.uint8)
    label[0:4, 0:4, 0:2] = 1   # 32 voxels
    label[7:9, 7:9, 0:1] = 1   # 4 voxels, apart: removed
    label[0:2, 7:9, 2:4] = 2   # 8 voxels
    label[5, 5, 3] = 2         # 1 voxel: removed
    label[9, 0, 0] = 3         # a single piece stays
    out = largest_component_per_class(label, (1, 2, 3))
    assert (out == 1).sum() == 32 and (out == 2).sum() == 8 and (out == 3).sum() == 1
    assert out[8, 8, 0] == 0 and out[5, 5, 3] == 0
    # a class left out of ``classes`` keeps every piece; diagonal neighbours are one piece (26-connectivity)
    assert (largest_component_per_class(label, (2,)) == 1).sum() == 36
    diag = np.zeros((3, 3, 3), np.uint8)
    diag[0, 0, 0] = diag[1, 1, 1] = 1
    assert (largest_component_per_class(diag, (1,)) == 1).sum() == 2


def test_adapter_evaluate_reports_tta_and_largest_component_dice(tmp_path, tiny_bundle) -> None:
    """Adapter.evaluate: plain and TTA rows differ only through the logits; lcc columns are present."""
    from asfda.adapter import Adapter
    from asfda.io import load_dataset
    from asfda.models import load_model
    from conftest import write_nnunet

    ds = load_dataset(write_nnunet(tmp_path / "d", n=2))
    adapter = Adapter(load_model(tiny_bundle), ds.class_names, progress=False)
    plain = adapter.evaluate(list(ds.cases))
    tta = adapter.evaluate(list(ds.cases), tta=True)
    assert [r["case_id"] for r in plain] == [r["case_id"] for r in tta]
    assert {"dice_mean", "lcc_dice_mean", "lcc_dice_liver", "lcc_dice_spleen"} <= set(plain[0])
    assert plain[0]["dice_mean"] != tta[0]["dice_mean"] or plain[1]["dice_mean"] != tta[1]["dice_mean"]


# --- Dice and HD95 on hand-made label maps, values computed by hand -------------------------------------------


def _maps() -> tuple[torch.Tensor, torch.Tensor]:
    label = torch.zeros(6, 6, 6, dtype=torch.long)
    pred = torch.zeros(6, 6, 6, dtype=torch.long)
    label[0:2, 0:2, 0:2] = 1  # 8 voxels
    pred[0:2, 0:2, 0:1] = 1  # 4 voxels, all inside: Dice 2*4 / (4 + 8) = 2/3
    label[4:6, 4:6, 4:6] = 2  # class 2 in the reference only: Dice 0
    pred[3, 0, 0] = 3  # class 3 predicted only: Dice 0
    return pred, label  # class 4 in neither: NaN


def test_dice_by_hand_with_the_empty_label_rule() -> None:
    pred, label = _maps()
    dice = compute_dice(pred, label, n_classes=5)
    assert dice[0].item() == pytest.approx(2 / 3)
    assert dice[1].item() == 0.0 and dice[2].item() == 0.0
    assert math.isnan(dice[3].item())
    scores = per_class_scores(dice, ["background", "a", "b", "c", "d"])
    assert scores["dice_a"] == pytest.approx(2 / 3) and math.isnan(scores["dice_d"])
    assert scores["dice_mean"] == pytest.approx((2 / 3 + 0 + 0) / 3)  # NaN left out of the mean, zeros kept
    assert math.isnan(mean_ignoring_nan([math.nan, math.nan]))


def test_dice_is_symmetric_and_one_on_identity() -> None:
    pred, label = _maps()
    assert torch.allclose(compute_dice(pred, label, 5), compute_dice(label, pred, 5), equal_nan=True)
    same = compute_dice(label, label, 5)
    assert same[0].item() == 1.0 and same[1].item() == 1.0 and math.isnan(same[2].item())


def test_dice_refuses_shape_mismatch() -> None:
    with pytest.raises(ValueError, match="shape"):
        compute_dice(torch.zeros(2, 2, 2), torch.zeros(2, 2, 3), 2)


def test_hd95_single_voxels_with_anisotropic_spacing() -> None:
    label = torch.zeros(8, 8, 8, dtype=torch.long)
    pred = torch.zeros(8, 8, 8, dtype=torch.long)
    label[2, 2, 2] = 1
    pred[2, 2, 4] = 1  # two slices apart along the 3 mm axis: 6 mm
    label[5, 5, 5] = 2
    pred[7, 5, 5] = 2  # two voxels apart along the 1 mm axis: 2 mm
    label[6, 1, 1] = 3  # class 3 in the reference only: NaN
    hd = compute_hd95(pred, label, n_classes=5, spacing_mm=(1.0, 1.0, 3.0))
    assert hd[0].item() == pytest.approx(6.0)
    assert hd[1].item() == pytest.approx(2.0)
    assert math.isnan(hd[2].item()) and math.isnan(hd[3].item())
    iso = compute_hd95(pred, label, n_classes=3, spacing_mm=(1.0, 1.0, 1.0))
    assert iso[0].item() == pytest.approx(2.0)  # same maps, isotropic grid: the spacing is what changed it


def test_hd95_zero_for_identical_maps() -> None:
    _, label = _maps()
    hd = compute_hd95(label, label, n_classes=3, spacing_mm=(1.5, 1.5, 4.0))
    assert hd[0].item() == 0.0 and hd[1].item() == 0.0


# --- Adapter.evaluate's per-case numbers, recorded before Dice moved to asfda.metrics (issue 36) ----------------
_KEYS = ("dice_{}", "lcc_dice_{}")
# per case: (Dice per class, Dice per class after the largest-component cut), classes in the dataset's order
_PINNED_PHANTOM = {  # the shipped phantom model on generate_benchmark(seed=99, n_source=1, n_target=2)
    "src_000": ((0.9940417594943267, 0.9951014695591323, 0.9973247726056714, 0.964068209500609),
                (0.9940932642487047, 0.9951014695591323, 0.9973247726056714, 0.964068209500609)),
    "tgt_000": ((0.00010716964955524595, 0.0, 0.0967032967032967, 0.18453959833270178),
                (0.0001282051282051282, 0.0, 0.0, 0.0)),
    "tgt_001": ((0.6807429130009776, 0.009911894273127754, 0.001386001386001386, 0.005373936408419167),
                (0.7002936325972406, 0.0, 0.0, 0.006557377049180328)),
}
_PINNED_TINY = {  # the tiny bundle (seed 0) on write_nnunet(n=2)
    "case00": ((0.08865860679332183, 0.040973111395646605), (0.08881199538638986, 0.038560411311053984)),
    "case01": ((0.08876080691642652, 0.04381443298969072), (0.08881199538638986, 0.04129032258064516)),
}


def _check_pinned(rows: list[dict], pinned: dict, classes: list[str]) -> None:
    assert [r["case_id"] for r in rows] == list(pinned)
    for row in rows:
        for key, values in zip(_KEYS, pinned[row["case_id"]]):
            got = [row[key.format(c)] for c in classes]
            assert got == pytest.approx(list(values), rel=1e-12, abs=0), (row["case_id"], key)
            assert row[key.format("mean")] == pytest.approx(float(np.mean(values)), rel=1e-12, abs=0)


def test_adapter_evaluate_per_case_dice_unchanged(tmp_path) -> None:
    """The per-case Dice of two small evaluations, as recorded before the one Dice (`asfda.metrics`) replaced the
    three: moving the implementation changed no number."""
    from asfda.adapter import Adapter
    from asfda.demo import phantom_model_path
    from asfda.io import load_dataset
    from asfda.models import load_model
    from asfda.phantom import generate_benchmark
    from conftest import write_bundle, write_nnunet

    bench = generate_benchmark(tmp_path / "b", seed=99, n_source=1, n_target=2)
    rows = []
    for part in ("source", "target"):
        ds = load_dataset(bench[part], require_labels=True)
        rows += Adapter(load_model(phantom_model_path()), ds.class_names, progress=False).evaluate(list(ds.cases))
    _check_pinned(rows, _PINNED_PHANTOM, ds.class_names[1:])
    ds = load_dataset(write_nnunet(tmp_path / "t", n=2))
    adapter = Adapter(load_model(write_bundle(tmp_path / "bundle")), ds.class_names, progress=False)
    _check_pinned(adapter.evaluate(list(ds.cases)), _PINNED_TINY, ds.class_names[1:])
