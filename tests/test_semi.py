from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from asfda.adapter import Adapter, reliable_from_scores
from asfda.io import load_dataset
from asfda.models import load_model
from asfda.selection import PoolScores
from asfda.training import TrainConfig, pseudo_label, select_reliable


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
