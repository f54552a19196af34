"""Which volumes a least-typical mask keeps out, in which space, against the single-label utility table.

`representativeness: trimmed` keeps the least typical 20% of the pool out of the candidates once labels exist. Which
space that typicality is measured in decides what it keeps out. This reads `asfda score`'s CSV (the
``anatomy_<organ>`` fractions, ``typicality_anatomy``) and its ``.embeddings.npy`` and, for the organ composition and
the pooled embedding, lists the masked volumes with their utility and its rank from the bottom (1 = the least useful
volume of the pool), and Spearman's rho of the typicality with the utility. Seconds, no training:

    asfda score --model ../shared/models/ct_abdomen_unet --data ../shared/data/mr_chaos_t2 --strategies asfda \\
        --precision bf16 --out /tmp/p1_scores.csv
    python benchmarks/typicality_mask.py /tmp/p1_scores.csv \\
        benchmarks/results/single_label_utility/ct_to_mr/utility.json \\
        --out benchmarks/results/selection/mask_ct_to_mr.json
"""

from __future__ import annotations

import argparse
import json
import math
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
from scipy.stats import spearmanr

from _machine import code_version
from asfda.io import atomic_write_json
from asfda.selection import typicality
from asfda.selection.diversity import least_typical
from asfda.selection.strategies import OUTLIER_FRACTION0
from single_label_utility import score_table


def mask_table(ids: list[str], space: np.ndarray, utility: dict[str, float],
               fraction: float = OUTLIER_FRACTION0) -> dict[str, Any]:
    """The least typical ``fraction`` of ``ids`` in ``space`` (rows in the order of ids): each with its utility and
    its rank from the bottom of the utility table, and Spearman's rho of typicality with utility."""
    typ = typicality(space)
    mask = least_typical(typ, fraction, keep=1)
    from_bottom = {c: k + 1 for k, c in enumerate(sorted(utility, key=lambda c: utility[c]))}
    masked = [ids[i] for i in np.argsort(typ, kind="stable") if mask[i]]
    known = [i for i, c in enumerate(ids) if c in utility and not math.isnan(utility[c])]
    rho = spearmanr([typ[i] for i in known], [utility[ids[i]] for i in known]).statistic
    return {"masked": [{"id": c, "utility": utility.get(c), "rank_from_bottom": from_bottom.get(c)} for c in masked],
            "spearman": float(rho), "harmful_in_pool": sorted(c for c in ids if utility.get(c, 0.0) < 0),
            "harmful_masked": sorted(c for c in masked if utility.get(c, 0.0) < 0)}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("scores", help="asfda score's CSV (its .embeddings.npy beside it)")
    ap.add_argument("utility", help="single_label_utility.py's utility.json")
    ap.add_argument("--out", help="write the tables here as JSON")
    args = ap.parse_args(argv)
    scores = Path(args.scores)
    table = score_table(scores)  # {column: {case: value}}, the CSV's row order kept
    ids = list(next(iter(table.values())))
    organs = [c for c in table if c.startswith("anatomy_")]
    utility = json.loads(Path(args.utility).read_text())["utility"]
    spaces = {"anatomy": np.array([[table[c][i] for c in organs] for i in ids]),
              "embedding": np.load(scores.with_name(scores.stem + ".embeddings.npy"))}
    result = {"spaces": {name: mask_table(ids, space, utility) for name, space in spaces.items()},
              "volumes": len(ids), "fraction": OUTLIER_FRACTION0, "scores": str(scores), "utility": args.utility,
              "commit": code_version(), "date": datetime.now(UTC).isoformat(timespec="minutes")}
    for name, t in result["spaces"].items():
        listed = ", ".join(f"{m['id']} ({m['utility']:+.3f}, {m['rank_from_bottom']})" for m in t["masked"])
        print(f"{name}: rho {t['spearman']:+.2f}; masked (utility, rank from the bottom): {listed}; "
              f"harmful masked {len(t['harmful_masked'])}/{len(t['harmful_in_pool'])}")
    if args.out:
        atomic_write_json(Path(args.out), result)
    return result


if __name__ == "__main__":
    main()
