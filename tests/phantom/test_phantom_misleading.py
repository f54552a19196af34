"""The phantom's misleading sub-population (cystic livers, modelled on the real pool's outlier): scored with the
shipped phantom model, asfda's ``typical`` representativeness keeps every one of them out of the first batch, where
METHOD.md's rule takes one (benchmarks/results/phantom_misleading records the Dice curves)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from asfda.adapter import Adapter
from asfda.demo import phantom_model_path
from asfda.io.datasets import load_dataset
from asfda.models import load_model
from asfda.phantom import MISLEADING, generate_benchmark
from asfda.selection import PoolScores, build_strategy
from asfda.selection.strategies import ASFDAStrategy

pytestmark = pytest.mark.slow  # 43 phantom volumes generated and scored: about a minute on 2 cores


@pytest.fixture(scope="module")
def scored(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("misleading")
    target = generate_benchmark(root / "phantom", seed=0, n_source=1, n_target=40, n_misleading=3)["target"]
    meta = json.loads((target / "phantom_meta.json").read_text())
    loaded = load_model(phantom_model_path())
    ds = load_dataset(target)
    adapter = Adapter(loaded, ds.class_names, cache_dir=str(root / "cache"), device="cpu", progress=False)
    cases = [ds.by_id()[i] for i in sorted(ds.by_id())]
    needs = build_strategy("asfda").needs
    s = adapter.score_pool(cases, 1.0, needs=needs, seed=0)
    anchors = adapter.anchors([], 1.0)
    pool = PoolScores([c.case_id for c in cases], s.metrics, s.embeddings, anchors.embeddings, s.embeddings0, 0,
                      s.vectors, dict(anchors.vectors), False)
    group = {cid for cid, m in meta.items() if m["subgroup"] == MISLEADING}
    assert len(group) == 3
    return pool, group


@pytest.mark.parametrize("budget", [1, 2, 4, 6])
@pytest.mark.parametrize("seed", [0, 1])
def test_typical_first_batch_never_holds_the_misleading_group(scored, budget: int, seed: int) -> None:
    pool, group = scored
    ids = build_strategy("asfda", representativeness="typical").select(pool, budget, seed).ids
    assert len(ids) == budget and not group & set(ids)


def test_methods_rule_takes_one_into_a_batch_of_four(scored) -> None:
    """The contrast that makes the test above mean something: the same scores, METHOD.md's rule."""
    pool, group = scored
    assert group & set(build_strategy("asfda").select(pool, 4, 0).ids)
    typical = build_strategy("asfda", representativeness="typical")
    assert isinstance(typical, ASFDAStrategy)
    comps = typical.pool_components(pool)[1]
    assert np.isclose(comps["outlier"].sum(), int(0.2 * len(pool.ids)))
