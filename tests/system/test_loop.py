from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from asfda.adapter import Adapter
from asfda.io import load_dataset
from asfda.models import load_model
from asfda.selection import get_strategy


def test_pool_scores_are_cached_per_weights_and_reused(tmp_path: Path, tiny_bundle: Path, tiny_dataset: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    ds = load_dataset(tiny_dataset)
    adapter = Adapter(load_model(tiny_bundle), ds.class_names, cache_dir=str(tmp_path / "cache"), progress=False)
    cases = list(ds.cases)
    needs = get_strategy("asfda").needs
    first = adapter.score_pool(cases, 1.0, needs=needs)

    def no_forward(*args, **kwargs):
        raise AssertionError("a cached volume was recomputed")

    monkeypatch.setattr(adapter.engine_current, "run", no_forward)
    again = adapter.score_pool(cases, 1.0, needs=needs)
    assert again.ids == first.ids
    for name in first.metrics:
        np.testing.assert_allclose(again.metrics[name], first.metrics[name])
    np.testing.assert_allclose(again.embeddings, first.embeddings)
    # another temperature is another score-cache key: the numbers are computed again, from the stored pass of the
    # same weights (asfda.adapter.outputs), not from another pass
    hotter = adapter.score_pool(cases, 2.0, needs=needs)
    assert not np.allclose(hotter.metrics["enpy"], first.metrics["enpy"])
    np.testing.assert_allclose(hotter.embeddings, first.embeddings)


def test_adapted_model_is_not_served_stale_scores(tmp_path: Path, tiny_bundle: Path, tiny_dataset: Path) -> None:
    from asfda.training import TrainConfig

    ds = load_dataset(tiny_dataset, require_labels=True)
    adapter = Adapter(load_model(tiny_bundle), ds.class_names, cache_dir=str(tmp_path / "cache"), progress=False)
    cases = list(ds.cases)
    before = adapter.score_pool(cases, 1.0)
    adapter.finetune(cases[:1], TrainConfig(steps=2, batch_size=1, lr=1e-2))
    after = adapter.score_pool(cases, 1.0)
    assert "kd" in after.metrics and "kd" not in before.metrics
    assert not np.allclose(after.embeddings, before.embeddings)


def test_sigmoid_models_are_adapted_in_their_single_label_view(tiny_bundle: Path, tiny_dataset: Path) -> None:
    """A sigmoid head (one independent channel per foreground class, no background channel) is adapted as the
    softmax over [0, z_1, ..., z_K]: background is "no channel on", and for one channel this is the sigmoid itself."""
    import torch

    model = load_model(tiny_bundle)
    model.activation, model.class_names = "sigmoid", ["liver", "spleen", "kidney"]
    assert model.adds_background and model.label_names == ["background", "liver", "spleen", "kidney"]
    adapter = Adapter(model, load_dataset(tiny_dataset).class_names, progress=False, device="cpu")
    x = torch.randn(1, 1, *model.roi_size)
    with torch.no_grad():
        z = model.network(x)
        mapped = adapter.frozen(x)
    assert mapped.shape[1] == 3  # background, liver, spleen of the dataset; kidney folds into background
    torch.testing.assert_close(mapped[:, 1:], z[:, :2])
    torch.testing.assert_close(mapped[:, 0], torch.logsumexp(torch.stack([torch.zeros_like(z[:, 2]), z[:, 2]]), 0))


def test_labelled_anchors_match_the_pool_vectors_of_the_same_volumes(tmp_path: Path, tiny_bundle: Path,
                                                                     tiny_dataset: Path) -> None:
    """The labelled volumes' anatomy anchors (from the temperature fit's pass, at the fitted T; or from their own
    pass when T is given) equal what the scoring stage computes for the same volumes at that T."""
    ds = load_dataset(tiny_dataset, require_labels=True)
    adapter = Adapter(load_model(tiny_bundle), ds.class_names, cache_dir=None, progress=False)
    cases = list(ds.cases)
    temp, anchors = adapter.fit_temperature(cases[:2], 1.0, seed=0)  # tiny volumes: every voxel is sampled
    scored = adapter.score_pool(cases[:2], temp.temperature, needs=get_strategy("asfda", diversity="anatomy").needs)
    np.testing.assert_allclose(anchors.vectors["anatomy"], scored.vectors["anatomy"], rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(anchors.embeddings, scored.embeddings, rtol=1e-5, atol=1e-6)
    given = adapter.anchors(cases[:2], 0.5)
    rescored = adapter.score_pool(cases[:2], 0.5, needs=get_strategy("asfda", diversity="anatomy").needs)
    np.testing.assert_allclose(given.vectors["anatomy"], rescored.vectors["anatomy"], rtol=1e-5, atol=1e-7)
    assert adapter.fit_temperature([], 1.0, 0)[1].embeddings.shape == (0, 0)
    assert not adapter.cold_start  # the tiny model has outputs for the dataset's classes
    monkey = type(adapter.class_map)(adapter.class_map.target_names, adapter.class_map.source_names,
                                     (0,) + (None,) * (len(adapter.class_map.target_names) - 1),
                                     adapter.class_map.background_sources)
    adapter.class_map = monkey  # every target class new, nothing fine-tuned: no head yet
    assert adapter.cold_start and adapter.pool_scores(cases[:2], [], 1.0, 0).cold_start
    assert adapter.anchors([], 1.0).vectors == {}
