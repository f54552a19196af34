"""The overlay previews of a simulation's report: the first queried volumes of each strategy (seed of the report),
predicted by the pretrained model and by the run's adapted weights. This module runs the models; the report
(`asfda.report.html`) only shows the PNGs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from safetensors.torch import load_file

from asfda.adapter import Adapter
from asfda.report.html import QueriedPreview
from asfda.report.previews import preview_png
from asfda.results import read_run

__all__ = ["write_previews"]


def write_previews(out: Path, adapter: Adapter, pool_ds, strategies: list[str], seed: int, per_strategy: int
                   ) -> list[QueriedPreview]:
    """Overlay PNGs (under ``out/previews/``, reused when up to date) of the first ``per_strategy`` volumes each
    strategy queried in run ``seed``; the adapter's weights are restored afterwards."""
    if per_strategy <= 0:
        return []
    by_id = pool_ds.by_id()
    before_state = adapter.current_state()
    previews = []
    got = read_run(out, strategies, [seed])
    try:
        for name in strategies:
            state = got.states.get(name, {}).get(seed, {"rounds": []})
            if not state["rounds"]:
                continue
            ids = [i for r in state["rounds"] for i in r["queried"]][:per_strategy]
            weights = got.layout.run_dir(name, seed) / state["weights"]
            tag = f"r{len(state['rounds'])}"
            loaded = False
            for cid in ids:
                png = got.layout.preview(name, seed, cid, tag)
                if not png.exists():
                    vol = adapter.prepare(by_id[cid])
                    if not loaded:
                        adapter.load_current_state(load_file(str(weights)))
                        loaded = True
                    case = by_id[cid]  # the stored passes of both models when the rounds made them
                    before = adapter.forward(case, pretrained=True)[0].argmax(0).numpy().astype(np.uint8)
                    after = adapter.forward(case)[0].argmax(0).numpy().astype(np.uint8)
                    label = None if vol.label is None else vol.label.numpy()
                    preview_png(vol.image[0].numpy(), {"label": label, "before (zero-shot)": before,
                                                       f"after ({name}, {len(state['rounds'])} rounds)": after},
                                png, title=f"{cid} (queried by {name})", class_names=pool_ds.class_names)
                round_of = next(r["round"] for r in state["rounds"] if cid in r["queried"])
                previews.append(QueriedPreview(name, cid, round_of, png))
    finally:
        adapter.load_current_state(before_state)
    return previews
