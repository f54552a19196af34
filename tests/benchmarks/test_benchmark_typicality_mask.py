"""benchmarks/typicality_mask.py on a hand-made pool: which volumes each space's least-typical mask keeps out."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from typicality_mask import main, mask_table


def test_mask_lists_the_least_typical_fifth_with_utility_ranks() -> None:
    ids = [f"v{i}" for i in range(10)]
    comp = np.array([[0.8 + 0.01 * i, 0.2] for i in range(10)])
    comp[3] = [0.1, 0.9]  # the odd composition, and the one harmful volume
    comp[7] = [0.3, 0.7]
    util = {c: 0.1 * i for i, c in enumerate(ids)}
    util["v3"] = -0.05
    table = mask_table(ids, comp, util)
    assert [m["id"] for m in table["masked"]] == ["v3", "v7"]  # floor(0.2 * 10), least typical first
    assert table["masked"][0] == {"id": "v3", "utility": -0.05, "rank_from_bottom": 1}
    assert table["harmful_in_pool"] == table["harmful_masked"] == ["v3"]
    assert -1.0 <= table["spearman"] <= 1.0


def test_main_reads_score_csv_and_embeddings(tmp_path: Path) -> None:
    ids = [f"v{i}" for i in range(5)]
    rows = ["case_id,asd,anatomy_a,anatomy_b,typicality_anatomy"]
    comp = [[0.5, 0.5], [0.52, 0.48], [0.49, 0.51], [0.9, 0.05], [0.51, 0.5]]
    rows += [f"{c},0.1,{a},{b},1.0" for c, (a, b) in zip(ids, comp)]
    (tmp_path / "s.csv").write_text("\n".join(rows) + "\n")
    emb = np.eye(5)[:, :4] + 1.0
    np.save(tmp_path / "s.embeddings.npy", emb)
    (tmp_path / "u.json").write_text(json.dumps({"utility": {c: 0.2 if c != "v3" else -0.1 for c in ids}}))
    out = main([str(tmp_path / "s.csv"), str(tmp_path / "u.json"), "--out", str(tmp_path / "m.json")])
    assert [m["id"] for m in out["spaces"]["anatomy"]["masked"]] == ["v3"]  # floor(0.2 * 5) = 1
    assert json.loads((tmp_path / "m.json").read_text())["volumes"] == 5
    assert set(out["spaces"]) == {"anatomy", "embedding"}
    with pytest.raises(FileNotFoundError):
        main([str(tmp_path / "missing.csv"), str(tmp_path / "u.json")])
