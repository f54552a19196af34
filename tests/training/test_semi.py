"""Selective semi-supervision: which unlabeled volumes `select_reliable` keeps (hand-computed, at fractions of 1/2
and others), pseudo-labels, the reliable volumes from pool scores, the unlabeled loss `finetune` records with and
without pseudo-labelled volumes, the frozen encoder, and a round that continues from the previous one's weights."""

from __future__ import annotations

from pathlib import Path
from typing import Any, cast

import numpy as np
import pytest
import torch

from asfda.adapter import Adapter, reliable_from_scores
from asfda.io import load_dataset
from asfda.models import load_model
from asfda.selection import PoolScores
from asfda.training import TrainConfig, TrainVolume, finetune, pseudo_label, pseudo_label_quality, select_reliable

IDS = ["a", "b", "c", "d", "e", "f", "g", "h", "i", "j"]
CONFIDENCE = np.array([0.95, 0.60, 0.90, 0.90, 0.40, 0.85, 0.70, 0.90, 0.20, 0.50])
DISTANCE = np.array([0.10, 0.05, 0.10, 0.50, 0.20, 0.15, 0.10, 0.10, 0.90, 0.60])
# most confident first (ties by id): a .95, c .90, d .90, h .90, f .85, g .70, b .60, j .50, e .40, i .20
# closest first (ties by id):        b .05, a .10, c .10, g .10, h .10, f .15, e .20, d .50, j .60, i .90


def test_reliable_is_the_intersection_of_confident_and_close() -> None:
    ids = ["a", "b", "c", "d", "e", "f"]
    confidence = np.array([0.9, 0.8, 0.7, 0.6, 0.5, 0.4])  # top 50%: a, b, c
    distance = np.array([0.5, 0.1, 0.6, 0.2, 0.3, 0.9])  # closest 50%: b, d, e
    assert select_reliable(ids, confidence, distance) == ["b"]
    # fractions are configurable: top 4 confident (a-d) & closest 4 (b, d, e, a) -> a, b, d
    assert select_reliable(ids, confidence, distance, confident_fraction=4 / 6, close_fraction=4 / 6) == ["a", "b", "d"]
    assert select_reliable(ids, confidence, distance, confident_fraction=0.0) == []
    assert select_reliable([], np.array([]), np.array([])) == []
    # independent of the pool's order
    perm = [3, 0, 5, 1, 4, 2]
    assert select_reliable([ids[i] for i in perm], confidence[perm], distance[perm]) == ["b"]
    with pytest.raises(ValueError):
        select_reliable(ids, confidence, distance, close_fraction=1.5)


def test_pseudo_label_masks_unconfident_voxels() -> None:
    logits = torch.zeros(3, 2, 1, 1)
    logits[1, 0] = 10.0  # voxel 0: class 1 with p ~ 1
    logits[2, 1] = 0.5  # voxel 1: class 2 with p ~ 0.45
    label, mask = pseudo_label(logits, temperature=1.0, threshold=0.9)
    assert label[:, 0, 0].tolist() == [1, 2]
    assert mask[:, 0, 0].tolist() == [True, False]
    # a high temperature flattens the distribution: nothing passes
    assert not pseudo_label(logits, temperature=100.0, threshold=0.9)[1].any()


def test_reliable_from_scores_counts_just_queried_volumes_as_labelled() -> None:
    emb = np.array([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9]])
    scores = PoolScores(["p", "q", "r", "s"], {"confidence": np.array([0.9, 0.9, 0.9, 0.2])}, emb,
                        np.zeros((0, 0)), None, 0)
    kept = reliable_from_scores(scores, ["p"], confident_fraction=1.0, close_fraction=0.33)
    assert list(kept) == ["q"]  # closest to the just-queried p
    assert kept["q"]["distance"] < 0.01


@pytest.mark.parametrize(("confident", "close", "expected"), [
    # ceil(0.3 * 10) = 3 confident: a, c, d (h is cut by the id tie-break at .90); ceil(0.5 * 10) = 5 closest:
    # b, a, c, g, h -> both: a, c
    (0.3, 0.5, ["a", "c"]),
    # ceil(3.5) = 4 confident: a, c, d, h -> h is in now
    (0.35, 0.5, ["a", "c", "h"]),
    # 3 confident; ceil(0.2 * 10) = 2 closest: b, a -> a
    (0.3, 0.2, ["a"]),
    # 7 confident: a, c, d, h, f, g, b; 6 closest: b, a, c, g, h, f -> a, b, c, f, g, h
    (0.7, 0.6, ["a", "b", "c", "f", "g", "h"]),
    # one of each (ceil(0.01 * 10) = 1): a is the most confident, b the closest -> none
    (0.01, 0.01, []),
    (1.0, 0.3, ["a", "b", "c"]),
])
def test_reliable_is_the_intersection_at_non_trivial_fractions(confident: float, close: float,
                                                               expected: list[str]) -> None:
    assert select_reliable(IDS, CONFIDENCE, DISTANCE, confident_fraction=confident, close_fraction=close) == expected
    perm = np.random.default_rng(5).permutation(len(IDS))  # the pool's order changes nothing
    assert select_reliable([IDS[i] for i in perm], CONFIDENCE[perm], DISTANCE[perm], confident_fraction=confident,
                           close_fraction=close) == expected


def _net() -> torch.nn.Module:
    from monai.networks.nets import UNet

    torch.manual_seed(0)
    return UNet(3, 1, 3, (4, 8), (2,), num_res_units=0)


def _volume(seed: int) -> TrainVolume:
    g = torch.Generator().manual_seed(seed)
    label = torch.zeros(12, 12, 8, dtype=torch.long)
    label[2:6, 2:6, 2:5] = 1
    label[7:11, 6:10, 3:7] = 2
    return TrainVolume((label.float() * 0.5 + torch.randn(12, 12, 8, generator=g) * 0.05)[None], label)


def _train(pseudo: list[TrainVolume] | None, **cfg: Any) -> dict[str, list[float]]:
    config = TrainConfig(**{"steps": 8, "batch_size": 1, "seed": 0, "rampup_fraction": 0.5, "lambda_u": 1.0, **cfg})
    return finetune(_net(), [_volume(1)], config, patch_size=(8, 8, 8), pseudo=pseudo, progress=False)


def test_no_pseudo_volumes_means_an_unlabeled_loss_of_exactly_zero() -> None:
    for pseudo in (None, cast(list[TrainVolume], [])):
        h = _train(pseudo)
        assert set(h) == {"loss", "loss_l", "loss_u"} and all(len(v) == 8 for v in h.values())
        assert h["loss_u"] == [0.0] * 8
        assert h["loss"] == h["loss_l"]  # nothing added to the labelled loss


def test_pseudo_volumes_add_a_positive_unlabeled_loss_after_step_0() -> None:
    vol = _volume(2)
    pseudo = [TrainVolume(vol.image, vol.label, torch.rand(vol.label.shape, generator=torch.Generator().manual_seed(0))
                          < 0.7)]
    h = _train(pseudo)
    ramp = 4  # rampup_fraction 0.5 of 8 steps: lambda_u * min(1, step / 4)
    assert h["loss_u"][0] == 0.0  # lambda is 0 at step 0: the pseudo volume is not even drawn
    assert all(u > 0.0 for u in h["loss_u"][1:])
    for step, (total, lab, unl) in enumerate(zip(h["loss"], h["loss_l"], h["loss_u"])):
        assert total == pytest.approx(lab + min(1.0, step / ramp) * unl, rel=1e-6)
    # lambda_u 0: the pseudo volumes are given but never enter
    assert _train(pseudo, lambda_u=0.0)["loss_u"] == [0.0] * 8


def _adapter(tiny_bundle: Path, data: Path) -> tuple[Adapter, list]:
    ds = load_dataset(data, require_labels=True)
    return Adapter(load_model(tiny_bundle), ds.class_names, progress=False), list(ds.cases)


def test_frozen_encoder_is_unchanged_and_decoder_trains(tiny_bundle: Path, tiny_dataset: Path) -> None:
    adapter, cases = _adapter(tiny_bundle, tiny_dataset)
    encoder = set(adapter.encoder_parameters())
    assert encoder and len(encoder) < len(dict(adapter.current.named_parameters()))
    before = adapter.current_state()
    adapter.finetune(cases[:1], TrainConfig(steps=3, batch_size=1, freeze_encoder=True, lr=1e-2))
    after = adapter.current_state()
    for name in encoder:
        assert torch.equal(before[name], after[name]), name
    changed = [n for n in after if n not in encoder and not torch.equal(before[n], after[n])]
    assert changed
    assert all(p.requires_grad for p in adapter.current.parameters())  # restored for later rounds


def test_a_round_continues_from_the_previous_rounds_weights(tiny_bundle: Path, tiny_dataset: Path) -> None:
    a, cases = _adapter(tiny_bundle, tiny_dataset)
    a.finetune(cases[:1], TrainConfig(steps=3, batch_size=1, seed=0))
    after_round0 = a.current_state()
    a.finetune(cases[:2], TrainConfig(steps=3, batch_size=1, seed=1))
    b, _ = _adapter(tiny_bundle, tiny_dataset)
    b.load_current_state(after_round0)  # what a resumed run does
    b.finetune(cases[:2], TrainConfig(steps=3, batch_size=1, seed=1))
    sa, sb = a.current_state(), b.current_state()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not all(torch.equal(sa[k], after_round0[k]) for k in sa)


def test_pseudo_label_quality_against_the_true_label() -> None:
    truth = torch.zeros(4, 4, 4, dtype=torch.uint8)
    truth[0, :, :2] = 1  # 8 voxels of organ 1
    label = truth.clone()
    label[0, :, 2] = 1  # 4 more predicted: Dice 16/20 on organ 1
    label[3, 3, 3] = 2  # organ 2 predicted where it is not: Dice 0
    mask = torch.zeros(4, 4, 4, dtype=torch.bool)
    mask[0] = True  # only slice 0 kept: organ 1 there has Dice 16/20, organ 2 in neither map there
    q = pseudo_label_quality(label, mask, truth.numpy(), ["background", "liver", "spleen"])
    assert q["pseudo_dice:liver"] == pytest.approx(0.8) and q["pseudo_dice:spleen"] == 0.0
    assert q["pseudo_dice"] == pytest.approx(0.4) and q["pseudo_dice_masked"] == pytest.approx(0.8)
    assert q["kept_fraction"] == pytest.approx(16 / 64)
    assert np.isnan(pseudo_label_quality(label, torch.zeros_like(mask), truth, ["background", "liver"])[
        "pseudo_dice_masked"])


def test_a_semi_round_records_the_pseudo_labels_quality_of_labelled_pool_volumes(tiny_bundle: Path,
                                                                                   tiny_dataset: Path) -> None:
    """In a simulation the pool's true labels exist: each reliable volume's record gets its pseudo-label's Dice."""
    from asfda.config import SemiConfig

    a, cases = _adapter(tiny_bundle, tiny_dataset)
    semi = SemiConfig(enabled=True, confident_fraction=1.0, close_fraction=1.0, prob_threshold=0.0)
    out = a.train_round(cases[:1], cases[1:], TrainConfig(steps=2, batch_size=1, guard=False), semi, 1.0)
    assert out.reliable and all(0.0 <= rec["pseudo_dice"] <= 1.0 and rec["kept_fraction"] == 1.0
                                for rec in out.reliable.values())
    one = next(iter(out.reliable))
    assert {"pseudo_dice:liver", "pseudo_dice:spleen", "pseudo_dice_masked", "confidence"} <= set(out.reliable[one])
