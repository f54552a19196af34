"""The shipped phantom model: loads safely, segments its source domain well, and the target domain not."""

from __future__ import annotations

from pathlib import Path

import pytest

from asfda.adapter import Adapter, mean_of
from asfda.demo import phantom_model_path
from asfda.io import load_dataset
from asfda.models import load_model
from asfda.phantom import generate_benchmark


@pytest.fixture(scope="module")
def bench(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    # a seed the model was never trained on (it was trained with seed 1234)
    return generate_benchmark(tmp_path_factory.mktemp("phantom") / "b", seed=99, n_source=6, n_target=10)


def test_shipped_bundle_is_small_and_loads() -> None:
    root = phantom_model_path()
    files = [p for p in root.rglob("*") if p.is_file()]
    assert sum(p.stat().st_size for p in files) < 5 * 1024 * 1024
    assert not list(root.rglob("*.pt"))  # safetensors only
    m = load_model(root)
    assert m.class_names == ["background", "liver", "kidney_right", "kidney_left", "spleen"]
    assert m.preprocessing.axcodes == "RAS" and m.preprocessing.pixdim_mm == (5.0, 5.0, 5.0)


def test_source_dice_high_and_target_dice_clearly_lower(bench: dict[str, Path], tmp_path: Path) -> None:
    m = load_model(phantom_model_path())
    src = load_dataset(bench["source"], require_labels=True)
    tgt = load_dataset(bench["target"], require_labels=True)
    adapter = Adapter(m, src.class_names, cache_dir=str(tmp_path / "cache"), progress=False)
    source = mean_of(adapter.evaluate(list(src.cases)), "dice_mean")
    target = mean_of(adapter.evaluate(list(tgt.cases)), "dice_mean")
    assert source >= 0.90, source
    assert target <= source - 0.25, (source, target)
