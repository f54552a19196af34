"""One self-contained HTML report per simulation run (``report.html``: images inlined, no external files):
the learning curves, the results table, the per-round table of every strategy and seed, what was queried
and why (score components), and overlay previews of queried volumes (image, label, prediction before and
after adaptation)."""

from __future__ import annotations

import base64
import html
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from asfda.io.atomic import atomic_write_text
from asfda.results import UPPER_BOUND, RunRecords, read_run, stopping_rows
from asfda.stopping import estimate_error

__all__ = ["QueriedPreview", "write_run_report"]

_CSS = """
body { font-family: -apple-system, Segoe UI, Helvetica, Arial, sans-serif; margin: 2em auto; max-width: 1100px;
       color: #222; line-height: 1.4; }
h1 { font-size: 1.6em; } h2 { border-bottom: 1px solid #ccc; padding-bottom: .2em; margin-top: 1.8em; }
table { border-collapse: collapse; margin: .6em 0; font-size: .9em; }
th, td { border: 1px solid #ccc; padding: .25em .6em; text-align: right; }
th { background: #f1f3f5; } td.l, th.l { text-align: left; }
.meta td { text-align: left; } .small { color: #666; font-size: .85em; }
img { max-width: 100%; border: 1px solid #ddd; }
figure { display: inline-block; margin: .4em; vertical-align: top; }
figcaption { font-size: .85em; color: #444; max-width: 820px; }
"""


def _img(path: Path, alt: str) -> str:
    data = base64.b64encode(Path(path).read_bytes()).decode()
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{data}">'


def _table(header: list[str], rows: list[list[object]], left: int = 1) -> str:
    def cell(v: object, i: int, tag: str) -> str:
        cls = ' class="l"' if i < left else ""
        if isinstance(v, float):
            v = "" if np.isnan(v) else f"{v:.3f}"
        return f"<{tag}{cls}>{html.escape(str(v))}</{tag}>"

    head = "<tr>" + "".join(cell(h, i, "th") for i, h in enumerate(header)) + "</tr>"
    body = "".join("<tr>" + "".join(cell(v, i, "td") for i, v in enumerate(r)) + "</tr>" for r in rows)
    return f"<table>{head}{body}</table>"


def _results_section(summary: dict) -> str:
    curves = {k: v for k, v in summary.items() if k != UPPER_BOUND}
    counts = sorted({n for s in curves.values() for n in s["curve"]})
    upper = summary.get(UPPER_BOUND)
    header = ["strategy", *[f"n={n}" for n in counts], "AUC"] + (["% of upper bound (last n)"] if upper else [])
    rows = []
    several = any(len(s["auc_per_seed"]) > 1 for s in curves.values())
    for name, s in curves.items():
        cells = [(f"{s['curve'][n]:.3f}" + (f" ± {s['std'][n]:.3f}" if several else "")) if n in s["curve"] else ""
                 for n in counts]
        row = [name, *cells, s["auc"]]
        if upper:
            last = max(s["of_upper"])
            row.append(f"{100 * s['of_upper'][last]:.0f}%")
        rows.append(row)
    text = _table(header, rows)
    text += ('<p class="small">Mean Dice on the held-out test cases' + (" ± std over seeds" if several else "")
             + "; n = labelled target volumes (n=0: the zero-shot pretrained model); AUC = area under Dice vs n "
             "divided by the n range.</p>")
    if upper:
        spread = f" ± {upper['std']:.3f}" if len(upper["per_seed"]) > 1 else ""
        text += (f"<p>Upper bound (fine-tuned on all {upper['n_labelled']} pool volumes, labelled): "
                 f"<b>{upper['dice']:.3f}</b>{spread}.</p>")
    return text


def _guard_cell(guard: dict | None) -> str:
    if not guard:
        return "off"
    verdict = "DISCARDED" if guard["reverted"] else (
        "labelled half kept, pseudo-labelled half DISCARDED" if guard.get("semi_discarded") else "kept")
    return f"{verdict} ({guard['plausibility_adapted']:.3f} / {guard['plausibility_pretrained']:.3f})"


def _rounds_section(got: RunRecords, strategies: list[str], seeds: list[int]) -> tuple[str, dict]:
    parts, states = [], {}
    for name in strategies:
        for seed in seeds:
            state = got.states.get(name, {}).get(seed)
            if state is None:
                continue
            states[(name, seed)] = state
            rows = [[r["round"], r["n_labelled"], r["dice_mean"], r["temperature"],
                     "" if r["ece_before"] is None else r["ece_before"],
                     "" if r["ece_after"] is None else r["ece_after"],
                     r["seconds_score"], r["seconds_train"], _guard_cell(r.get("guard")), " ".join(r["queried"])]
                    for r in state["rounds"]]
            parts.append(f"<h3>{html.escape(name)}, seed {seed}</h3>")
            parts.append(_table(["round", "labelled", "Dice", "T", "ECE before", "ECE after", "score s", "train s",
                                 "guard (plausibility adapted / pretrained)", "queried"], rows))
    return "".join(parts), states


def _stopping_section(out: Path, cfg) -> str:
    """Per strategy and seed: after each round, the when-to-stop estimate (label-free) beside the true next-round gain
    (test Dice, which the estimate never reads), and the estimate's mean absolute error over the run."""

    rows = stopping_rows(out, cfg)
    if not rows:
        return ""

    def num(v) -> object:
        return "" if v is None else float(v)

    table = _table(["strategy", "seed", "round", "labelled", "Dice", "prediction change", "predicted next gain",
                    "true next gain", "recommendation"],
                   [[r["strategy"], r["seed"], r["round"], r["n_labelled"], r["dice_mean"], num(r["change"]),
                     num(r["predicted_next_gain"]), num(r["true_next_gain"]), r["recommendation"]] for r in rows],
                   left=1)
    err = estimate_error(rows)
    summary = (f"Mean absolute error of the estimate over {err['n']} rounds: <b>{err['mae']:.3f}</b> mean Dice "
               f"(always predicting 0: {err['mae_of_zero']:.3f})." if err["n"] else "No round has a next round yet.")
    return (table + f'<p class="small">After each round asfda estimates what the next round will add from signals that '
            "need no test labels: how much the round changed the predictions on a few unlabeled pool volumes "
            "(prediction change = 1 - their Dice agreement), times a scale fitted on real cross-validated rounds "
            f"(asfda.stopping.GAIN_PER_CHANGE). Below {cfg.stop_gain:.2f} (stop_gain) it recommends considering to "
            f"stop. {summary}</p>")


def _why_section(states: dict, seed: int) -> str:
    parts = []
    for (name, s), state in states.items():
        if s != seed:
            continue
        rows = []
        for r in state["rounds"]:
            for cid in r["queried"]:
                comps = r["query_components"].get(cid, {})
                rows.append([r["round"], cid, ", ".join(f"{k}={v:.4g}" for k, v in comps.items()) or "(random)"])
        parts.append(f"<h3>{html.escape(name)}</h3>")
        parts.append(_table(["round", "case", "score components at the pick"], rows, left=3))
    return "".join(parts)


@dataclass
class QueriedPreview:
    """One queried volume's overlay PNG (image, label, before and after adaptation), made by the caller, which runs
    the models (`asfda.run_previews.write_previews`)."""

    strategy: str
    case_id: str
    round: int
    png: Path


def _previews(previews: list[QueriedPreview]) -> str:
    parts: dict[str, list[str]] = {}
    for p in previews:
        parts.setdefault(p.strategy, []).append(
            f"<figure>{_img(p.png, p.case_id)}<figcaption>{html.escape(p.case_id)}: "
            f"queried by {html.escape(p.strategy)} "
            f"in round {p.round}. Columns: image, label, before (zero-shot), after adaptation; model grid, "
            "radiological view (R on the left)</figcaption></figure>")
    return "".join(f"<h3>{html.escape(name)}</h3>" + "".join(figs) for name, figs in parts.items())


def write_run_report(out: str | Path, cfg, summary: dict, rows: list[dict],
                     previews: list[QueriedPreview] | None = None) -> Path:
    """Writes ``out/report.html`` from what the run wrote (``run.json``, per-run ``state.json``, the curve) and the
    ``previews`` of queried volumes (made by the caller: the report runs no model)."""
    out = Path(out)
    seeds = list(cfg.seeds)
    got = read_run(out, cfg.strategies, seeds)
    run, curve_png = got.run, got.layout.file("learning_curve.png")
    rounds_html, states = _rounds_section(got, list(cfg.strategies), seeds)
    meta_rows = [["model", cfg.model], ["model weights sha256/16", run.get("model_weights_sha256_16", "")],
                 ["pool", cfg.pool], ["test", cfg.test or f"seeded {cfg.test_fraction:.0%} split of the pool"],
                 ["strategies", ", ".join(cfg.strategies)], ["budget x rounds", f"{cfg.budget} x {cfg.rounds}"],
                 ["seeds", ", ".join(map(str, seeds))], ["steps per round", cfg.train.steps],
                 ["semi-supervision", "on" if cfg.semi.enabled else "off"], ["started", run.get("started", "")],
                 ["versions", ", ".join(f"{k} {v}" for k, v in run.get("versions", {}).items())]]
    body = [
        "<h1>asfda simulation report</h1>",
        "<table class=\"meta\">" + "".join(f"<tr><th class=\"l\">{html.escape(str(k))}</th><td>{html.escape(str(v))}"
                                         f"</td></tr>" for k, v in meta_rows) + "</table>",
        "<h2>Learning curves</h2>",
        _img(curve_png, "learning curves") if curve_png.exists() else "",
        "<h2>Results</h2>", _results_section(summary),
        "<h2>Rounds</h2>", rounds_html,
        "<h2>When to stop</h2>", _stopping_section(out, cfg),
        f"<h2>What was queried and why (seed {seeds[0]})</h2>", _why_section(states, seeds[0]),
        f"<h2>Queried volumes: label, prediction before and after adaptation (seed {seeds[0]})</h2>",
        _previews(previews or []),
        '<p class="small">Written by asfda; per-case numbers are in results.csv and each run\'s state.json.</p>',
    ]
    page = ("<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>asfda report</title>"
            f"<style>{_CSS}</style></head><body>{''.join(body)}</body></html>\n")
    return atomic_write_text(got.layout.file("report.html"), page)
