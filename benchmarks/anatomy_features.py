"""Label-free features of the pretrained model's predicted anatomy on every volume, as candidate first-pick scores.

Issue 33 asks whether what the model predicts on a volume (each organ there, its size, cut by the field of view or
not) tells a safe first label from a harmful one where the embedding's typicality does not (pair 2's btcv_014: its
right kidney starts at the first slice). For each volume, from one pass of the pretrained model (read back from the
forward store when a query or score already ran it): per organ its predicted volume over the pool's median, whether
it touches the first or last slice along the scan's z axis, and its mean top-class probability; then combined
columns (the smallest organ ratio, how many organs touch the z ends, a "complete anatomy" score). Writes a CSV in
`asfda score`'s layout, so that `single_label_utility.py`'s `correlations` rates every column against the utility
table (``--utility``: printed).

    python benchmarks/anatomy_features.py --model ../shared/models/mr_abdomen_unet --data ../shared/data/ct_btcv4 \\
        --out benchmarks/results/selection/anatomy_mr_to_ct.csv \\
        --utility benchmarks/results/single_label_utility/mr_to_ct/utility.json
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

from asfda.adapter import Adapter
from asfda.crossval.summary import read_utility_table
from asfda.io import atomic_write_text, load_dataset
from asfda.metrics import largest_component
from asfda.models import load_model
from asfda.scoring import organ_extent
from single_label_utility import correlations, score_table


def volume_features(logits: torch.Tensor, names: list[str]) -> dict[str, float]:
    """One volume's raw features from its logits ``[C, X, Y, Z]`` (Z: the model grid's third axis, the scan's
    slices, superior last after the bundle's orientation): per foreground organ, on its largest connected component
    (stray fragments left out), its voxels, whether it touches the first or last slice, its mean top probability."""
    prob = torch.softmax(logits.float(), 0)
    top, label = prob.max(0)
    top_np, label_np = top.numpy(), label.numpy()
    extent = organ_extent(label_np, len(names))  # the scoring stage's per-organ (voxels, cut by the z ends)
    out: dict[str, float] = {}
    for k, name in enumerate(names[1:], start=1):
        out[f"voxels_{name}"], out[f"z_edge_{name}"] = float(extent[k - 1, 0]), float(extent[k - 1, 1])
        mask = largest_component(label_np == k) if extent[k - 1, 0] else None
        out[f"confidence_{name}"] = float(top_np[mask].mean()) if mask is not None else 0.0
    return out


def pool_columns(raw: dict[str, dict[str, float]], names: list[str]) -> dict[str, dict[str, float]]:
    """Per volume the score columns: each organ's voxels over the pool's median, the smallest of those ratios, the
    organs touching a z end, the mean confidence and ``complete`` (the smallest ratio, zero when any organ touches a
    z end): larger is a more complete, typical predicted anatomy."""
    organs = names[1:]
    median = {o: float(np.median([r[f"voxels_{o}"] for r in raw.values()])) or 1.0 for o in organs}
    cols: dict[str, dict[str, float]] = {}
    for cid, r in raw.items():
        ratios = [r[f"voxels_{o}"] / median[o] for o in organs]
        edges = sum(r[f"z_edge_{o}"] for o in organs)
        cols[cid] = {**{f"ratio_{o}": q for o, q in zip(organs, ratios, strict=True)},
                     "min_ratio": min(ratios), "z_edges": edges, "no_z_edge": float(edges == 0),
                     "mean_confidence": float(np.mean([r[f"confidence_{o}"] for o in organs])),
                     "complete": 0.0 if edges else min(min(ratios), 1.0 / max(max(ratios), 1e-6))}
    return cols


def write_csv(path: Path, cols: dict[str, dict[str, float]]) -> None:
    names = list(next(iter(cols.values())))
    rows = [",".join(["case_id", *names])] + [",".join([cid, *(f"{v[n]:.6g}" for n in names)])
                                             for cid, v in sorted(cols.items())]
    atomic_write_text(path, "\n".join(rows) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--data", required=True)
    ap.add_argument("--out", type=Path, required=True, help="CSV (asfda score's layout)")
    ap.add_argument("--utility", type=Path, help="single_label_utility.py's utility.json: rate every column")
    ap.add_argument("--cache-dir", default=".cache")
    ap.add_argument("--device", default="auto")
    args = ap.parse_args()
    ds = load_dataset(args.data)
    adapter = Adapter(load_model(args.model), ds.class_names, cache_dir=args.cache_dir, device=args.device,
                      progress=False, keep_outputs=True)
    names = adapter.target_names
    raw = {c.case_id: volume_features(adapter.forward(c, pretrained=True)[0], names) for c in ds.cases}
    write_csv(args.out, pool_columns(raw, names))
    print(args.out.read_text())
    if args.utility:
        util = read_utility_table(args.utility)
        for col, r in correlations(util, score_table(args.out)).items():
            print(f"{col}: rho {r['spearman']:+.2f}, first pick {r['first_pick']} (utility "
                  f"{r['first_pick_utility']:+.3f}, rank {r['first_pick_rank']})")


if __name__ == "__main__":
    main()
