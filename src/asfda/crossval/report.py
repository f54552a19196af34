"""A cross-validation's summary as files: ``summary.json``, ``README.md`` (tables, provenance, what is missing),
``learning_curve.png`` (mean Dice by number labelled with 95% bootstrap bands over test volumes) and ``report.html``
(the same, self-contained). The tables are built once as rows of text and written as markdown and as HTML."""

from __future__ import annotations

import html
from pathlib import Path
from typing import cast

from asfda.io import atomic_write, atomic_write_json, atomic_write_text
from asfda.report.html import _CSS, _img, _table

__all__ = ["console_tables", "readme", "report_html", "write_summary"]

Rows = tuple[list[str], list[list[str]]]


def _f(x) -> str:
    return "–" if x is None else f"{x:.3f}"


def _d(diff: dict | None) -> str:
    if not diff:
        return "–"
    lo, hi = diff["ci95"]
    return f"{diff['mean']:+.3f} [{lo:+.3f}, {hi:+.3f}]"


def _ns(summary: dict) -> list[str]:
    return [str(summary["budget"] * r) for r in range(summary["rounds"] + 1)]


def _seeds(seeds: list) -> str:
    return ",".join(map(str, seeds))


def curve_rows(summary: dict, strategies: dict | None = None) -> Rows:
    ns = _ns(summary)
    strategies = summary["strategies"] if strategies is None else strategies
    rows = [[name, _seeds(summary["seeds"].get(name, [])), *(_f(s["dice_by_n"].get(n)) for n in ns), _f(s["auc"])]
            for name, s in strategies.items()]
    return ["strategy", "seeds", *(f"n={n}" for n in ns), "AUC"], rows


def diff_rows(summary: dict) -> Rows:
    ns = _ns(summary)[1:]
    rows = [[name, *(_d((s["diff_vs_random"] or {}).get(n)) for n in ns), _d(s["auc_diff_vs_random"])]
            for name, s in summary["strategies"].items() if s["diff_vs_random"] is not None]
    return ["strategy - random", *(f"n={n}" for n in ns), "AUC"], rows


def seed_rows(summary: dict) -> Rows:
    ns = _ns(summary)
    rows = [[name, s, *(_f(curve.get(n)) for n in ns), _f(st["auc_per_seed"].get(s))]
            for name, st in summary["strategies"].items() for s, curve in st["dice_by_n_per_seed"].items()]
    return ["strategy", "seed", *(f"n={n}" for n in ns), "AUC"], rows


def fold_rows(summary: dict) -> Rows:
    names, last = list(summary["strategies"]), _ns(summary)[-1]
    rows = [[k, ", ".join(f["test"]), _f(f["zero_shot"]),
             *(c for n in names for c in (_f(f["strategies"][n]["auc"]),
                                          _f(f["strategies"][n]["dice_by_n"].get(last)))),
             _f(f["upper_bound"])] for k, f in summary["per_fold"].items()]
    return ["fold", "test volumes", "zero-shot", *(c for n in names for c in (f"{n} AUC", f"{n} n={last}")),
            "upper bound"], rows


def volume_rows(summary: dict) -> Rows:
    names, ns = list(summary["strategies"]), _ns(summary)[1:]
    rows = [[c, str(v["fold"]), _f(v["zero_shot"]), *(_f(v[name].get(n)) for name in names for n in ns),
             _f(v["upper_bound"])] for c, v in summary["per_volume"].items()]
    return ["volume", "fold", "zero-shot", *(f"{name} n={n}" for name in names for n in ns), "upper bound"], rows


def _md(table: Rows) -> list[str]:
    header, rows = table
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header),
            *("| " + " | ".join(map(str, r)) + " |" for r in rows)]


_WHAT = {
    "dice_mean": ("", "as predicted (`dice_mean`); after largest-component post-processing of every organ: "
                  "README.lcc_dice_mean.md; of the organs the cross-validation chose: README.pp_dice_mean.md"),
    "lcc_dice_mean": (" (Dice after largest-component post-processing)",
                      "after cutting each organ to its largest connected component (`lcc_dice_mean`); the plain "
                      "Dice is in README.md"),
    "pp_dice_mean": (" (Dice after the post-processing the cross-validation chose)",
                     "after cutting the organs the cross-validation chose ({}) to their largest connected component, "
                     "nnU-Net's rule: a class is cut when that raises its mean Dice over every fine-tuned prediction "
                     "of the cross-validation (postprocessing.json; the choice is made on these same predictions, as "
                     "nnU-Net does); the plain Dice is in README.md"),
}


def _texts(summary: dict) -> dict[str, str]:
    """The sentences README.md and report.html share."""
    n_vol, b = len(summary["per_volume"]), summary["bootstrap"]
    title, what = _WHAT[summary["metric"]]
    partial = "" if summary["complete"] else (" PARTIAL: each number is the mean over the test volumes that have it; "
                                              "see Missing.")
    texts = {
        "title": f"{summary['folds']}-fold cross-validated active adaptation{title}",
        "what": f"Case Dice {what.format(', '.join(summary.get('postprocessing') or []) or 'none')}.",
        "status": f"{'complete' if summary['complete'] else 'PARTIAL, see Missing below'}; {n_vol} test volumes, "
                  "each tested once (in its fold, whose pool is every other volume); seeds "
                  + "; ".join(f"{k} {_seeds(v)}" for k, v in summary["seeds"].items()),
        "curve": "Mean Dice over all test volumes of all folds (the mean over volumes of each volume's mean over "
                 "its seeds: the mean of the seeds' curves once every seed has run every fold; a volume's Dice is "
                 "its mean over foreground classes; n = labelled volumes, n=0 is zero-shot). AUC: the "
                 "trapezoid area under mean Dice vs n over n = 0.." + _ns(summary)[-1] + ", divided by that n range "
                 "(a mean Dice level; `asfda.results.area_under_curve`, as `asfda simulate` reports it)." + partial,
        "diff": "Paired difference against random: per test volume, the strategy's Dice (mean over its seeds) minus "
                f"random's (mean over random's seeds), averaged over the test volumes; [95% interval]: percentile "
                f"bootstrap over test volumes ({b['resamples']:,} resamples, seed {b['seed']}). AUC: the same "
                "difference of each volume's own AUC. An interval that excludes 0 says the difference holds beyond "
                "which volumes happened to be tested; seeds and folds are not resampled.",
        "bounds": f"Zero-shot: {_f(summary['zero_shot'])}. Upper bound (each fold's whole pool labelled, seeds "
                  f"{_seeds(summary['upper_bound_seeds']) or 'none'}): {_f(summary['upper_bound'])}.",
    }
    o = summary.get("oracle_1")
    if o and o.get("best") is not None:
        gains = "; ".join(f"{name} {s['dice_by_n']['1'] - s['dice_by_n']['0']:+.3f}"
                          for name, s in summary["strategies"].items()
                          if s["dice_by_n"].get("1") is not None and s["dice_by_n"].get("0") is not None)
        texts["oracle"] = (f"One label, measured on every volume ({o['source']}): the best single volume raises the "
                           f"mean Dice of the others by {o['best']:+.3f} ({o['best_volume']}), a random one by "
                           f"{o['expected_random']:+.3f} on average. Here at n=1 over zero-shot: {gains or '–'}.")
    fp = summary.get("first_picks")
    if fp and any(v["runs"] for v in fp.values()):
        texts["oracle"] = texts.get("oracle", "") + " First picks against that table (runs, fold x seed): " + "; ".join(
            f"{name} {len(v['runs'])} runs, {v['below_zero']} below zero, {v['at_or_above_median']} at or above their "
            f"pool's median ({', '.join(sorted({r['pick'] for r in v['runs']}))})" for name, v in fp.items()
            if v["runs"]) + "."
    lc = summary.get("largest_component")
    if lc:
        texts["lcc"] = (f"Post-processing chosen by this cross-validation: {', '.join(lc['classes']) or 'none'} "
                        f"(`{lc['predict']}`); the rule: {lc['rule']}. Mean Dice under it:")
    return texts


def console_tables(summary: dict) -> str:
    """The curve table and the differences against random, as markdown (what ``asfda crossval`` prints)."""
    lines = _md(curve_rows(summary))
    if any(s["diff_vs_random"] is not None for s in summary["strategies"].values()):
        lines += ["", "Paired difference against random per test volume, mean [95% bootstrap interval]:", "",
                  *_md(diff_rows(summary))]
    if not summary["complete"]:
        lines += ["", f"PARTIAL: {len(summary['missing'])} parts missing (README.md lists them)."]
    return "\n".join(lines)


def readme(summary: dict) -> str:
    t = _texts(summary)
    lines = [f"# {t['title']}", "", t["what"], "",
             f"Command: `{summary['command']}`  ", f"Machine (this summary): {summary['machine']}  ",
             f"Code: asfda commit {summary['commit']}  ", f"Date: {summary['date']}  ", f"Status: {t['status']}", "",
             t["curve"], "", *_md(curve_rows(summary)), "", t["bounds"], ""]
    if any(s["diff_vs_random"] is not None for s in summary["strategies"].values()):
        lines += [t["diff"], "", *_md(diff_rows(summary)), ""]
    lines += [t[k] + "\n" for k in ("oracle",) if k in t]
    if "lcc" in t:
        lines += [t["lcc"], "", *_md(curve_rows(summary, summary["largest_component"]["strategies"])), ""]
    if any(len(s) > 1 for s in summary["seeds"].values()):
        lines += ["Per seed:", "", *_md(seed_rows(summary)), ""]
    suffix = "" if summary["metric"] == "dice_mean" else f".{summary['metric']}"
    lines += [f"![learning curve](learning_curve{suffix}.png)", "", "## Per fold", "", *_md(fold_rows(summary)),
              "", "## Where each part ran", "",
              "From the device simulate records per round, and the machine logged when a part was computed "
              "(`fold<k>/cv_provenance.json`).", ""]
    lines += [f"- fold {k}, {name}: {line}" for k, f in summary["per_fold"].items()
              for name, line in f["provenance"].items()]
    lines += ["", "Invocations that computed something, per fold (from `cv_provenance.json`):", ""]
    lines += [f"- fold {k}: {r['start']}, {r['wall_s'] / 60:.1f} min, {r['status']}, {r['machine']}, commit "
              f"{r['commit']}" for k, f in summary["per_fold"].items() for r in f["runs"]]
    warn = [f"- fold {k}: {w}" for k, f in summary["per_fold"].items() for w in f["warnings"]]
    lines += ["", "Warnings:", "", *warn] if warn else []
    lines += ["", "## Per volume", "", "Mean over seeds.", "", *_md(volume_rows(summary)), "", "## Missing", ""]
    lines += [f"- {m}" for m in summary["missing"]] or ["Nothing: every fold, strategy, seed and n is on disk."]
    return "\n".join(lines) + "\n"


def plot_curves(summary: dict, path: Path) -> Path:
    """Mean Dice by number labelled per strategy, with its 95% bootstrap band over test volumes; zero-shot and the
    upper bound as lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    for name, s in summary["strategies"].items():
        pts = [(int(n), d, s["dice_ci95_by_n"].get(n)) for n, d in s["dice_by_n"].items() if d is not None]
        if not pts:
            continue
        auc = f" (AUC {s['auc']:.3f})" if s["auc"] is not None else ""
        (line,) = ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=name + auc)
        band = [p for p in pts if p[2]]
        if band:
            ax.fill_between([p[0] for p in band], [p[2][0] for p in band], [p[2][1] for p in band],
                            color=line.get_color(), alpha=0.15)
    for value, style, text in ((summary["zero_shot"], ":", "zero-shot"),
                               (summary["upper_bound"], "--", "upper bound (whole pool)")):
        if value is not None:
            ax.axhline(value, color="0.4", linestyle=style, linewidth=1, label=f"{text} {value:.3f}")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("labelled target volumes")
    ax.set_ylabel("mean Dice over all test volumes")
    ax.set_title(f"{summary['folds']}-fold CV, {len(summary['per_volume'])} test volumes; bands: 95% bootstrap over "
                 "volumes" + ("" if summary["complete"] else " (partial)"), fontsize=9)
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)
    fig.tight_layout()
    atomic_write(path, lambda p: fig.savefig(p, format="png"))
    plt.close(fig)
    return path


def report_html(summary: dict, curve_png: Path | None) -> str:
    """The self-contained page: the curve (inlined), the tables of README.md, the per-volume table."""
    t = _texts(summary)

    def table(rows: Rows) -> str:
        return _table(rows[0], cast(list[list[object]], rows[1]))

    def p(text: str) -> str:
        return f"<p>{html.escape(text)}</p>"

    meta = [["command", summary["command"]], ["machine (this summary)", summary["machine"]],
            ["asfda commit", summary["commit"]], ["date", summary["date"]], ["status", t["status"]]]
    body = [f"<h1>{html.escape(t['title'])}</h1>", p(t["what"]),
            '<table class="meta">' + "".join(f'<tr><th class="l">{html.escape(k)}</th><td>{html.escape(str(v))}'
                                             "</td></tr>" for k, v in meta) + "</table>",
            "<h2>Learning curve</h2>", _img(curve_png, "learning curve") if curve_png else "",
            table(curve_rows(summary)), f'<p class="small">{html.escape(t["curve"])}</p>', p(t["bounds"])]
    if any(s["diff_vs_random"] is not None for s in summary["strategies"].values()):
        body += ["<h2>Against random</h2>", table(diff_rows(summary)), f'<p class="small">{html.escape(t["diff"])}</p>']
    body += [p(t["oracle"])] if "oracle" in t else []
    if "lcc" in t:
        body += ["<h2>Post-processing</h2>", p(t["lcc"]),
                 table(curve_rows(summary, summary["largest_component"]["strategies"]))]
    body += ["<h2>Per fold</h2>", table(fold_rows(summary)), "<h2>Per volume</h2>",
             '<p class="small">Mean over seeds.</p>', table(volume_rows(summary)), "<h2>Missing</h2>",
             "<ul>" + "".join(f"<li>{html.escape(m)}</li>" for m in summary["missing"]) + "</ul>"
             if summary["missing"] else p("Nothing: every fold, strategy, seed and n is on disk.")]
    return ("<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>asfda cross-validation</title>"
            f"<style>{_CSS}</style></head><body>{''.join(body)}</body></html>\n")


def write_summary(out: str | Path, summary: dict, plot: bool = True) -> Path:
    """Writes ``summary.json``, ``README.md``, ``learning_curve.png`` and (for the plain Dice) ``report.html`` into
    ``out``; a summary of another metric gets that metric as a suffix (``summary.lcc_dice_mean.json``, ...) and no
    report.html. Returns the summary's path."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    suffix = "" if summary["metric"] == "dice_mean" else f".{summary['metric']}"
    path = atomic_write_json(out / f"summary{suffix}.json", summary)
    png = plot_curves(summary, out / f"learning_curve{suffix}.png") if plot else None
    atomic_write_text(out / f"README{suffix}.md", readme(summary))
    if not suffix:
        atomic_write_text(out / "report.html", report_html(summary, png))
    return Path(path)
