"""The annotation project's commands (init, next, ingest, finetune, status, set; `asfda.project`) and
monailabel-app (a project kept by a MONAI Label app, `asfda.monailabel`): one handler each, which calls the library
function and prints where the project stands and what to do next (`status_lines`, `next_lines`, ...: the text, from
the records the project functions return)."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from typing import Any

from asfda.errors import AsfdaError

__all__ = ["APP_BUDGET", "finetune_command", "ingest_command", "init_command", "monailabel_app_command", "next_command",
           "parse_settings", "project_settings", "set_command", "status_command", "status_lines"]

APP_BUDGET = 1
"""The budget of a MONAI Label app's project unless --budget is given: Next Sample asks for one image at a time (the
budget `asfda.monailabel.write_app` gives when it is given no settings)."""


def _n(count: int, word: str, plural: str | None = None) -> str:
    """``1 case``, ``2 cases``."""
    return f"{count} {word if count == 1 else plural or word + 's'}"


def _given(**values: Any) -> dict[str, Any]:
    """The flags that were given (not None): the others keep the settings' defaults."""
    return {k: v for k, v in values.items() if v is not None}


def project_settings(args: argparse.Namespace, defaults: Any) -> Any:
    """``defaults`` (an `asfda.project.ProjectSettings`) with the settings flags that were given: --strategy, --budget,
    --steps, --seed, --device, --no-guard, and where the command has them --precision, --class-map,
    --allow-empty-labels and --output-activation (`asfda init`, `asfda monailabel-app`)."""
    train = dataclasses.replace(defaults.train, **_given(steps=args.steps, precision=getattr(args, "precision", None),
                                                         guard=False if args.no_guard else None))
    return dataclasses.replace(defaults, train=train, **_given(
        strategy=args.strategy, budget=args.budget, seed=args.seed, device=args.device,
        class_map=getattr(args, "class_map", None), output_activation=getattr(args, "output_activation", None),
        allow_empty_labels=getattr(args, "allow_empty_labels", None) or None))


def init_command(args: argparse.Namespace) -> int:
    from asfda import project as prj

    settings = project_settings(args, prj.ProjectSettings())
    p = prj.init_project(args.out, args.model, args.pool, settings, labels_json=args.labels,
                         trust_model_code=args.trust_model_code)
    print(f"project created: {p.root} ({p.state['pool_cases']} pool cases, labels {p.state['labels']})")
    if p.uncovered_classes():
        print(f"note: dataset classes {p.uncovered_classes()} are not classes of the model: folded into background "
              "(never predicted, their label voxels count as background in training and evaluation)")
    print(f"next: asfda next {p.root}")
    return 0


def monailabel_app_command(args: argparse.Namespace) -> int:
    import shlex
    from pathlib import Path

    from asfda import project as prj
    from asfda.monailabel import write_app

    settings = project_settings(args, dataclasses.replace(prj.ProjectSettings(), budget=APP_BUDGET))
    out = write_app(Path(args.out), args.model, settings=settings)
    print(f"MONAI Label app written: {out} (model {args.model}; its project starts on the first server start)")
    print(f"next: monailabel start_server --app {shlex.quote(str(out))} --studies STUDIES --conf device "
          f"{shlex.quote(args.device or 'cpu')}")
    return 0


def next_command(args: argparse.Namespace) -> int:
    from asfda import project as prj

    q = prj.next_query(args.project, progress=not args.no_progress, force=args.force, device=args.device,
                       precision=args.precision, trust_model_code=args.trust_model_code,
                       **_given(images=args.images))
    if q:  # empty on another rank of a torchrun job: rank 0 prints
        print("\n".join(next_lines(q, prj.Project(args.project).root)))
    return 0


def next_lines(q: dict, root) -> list[str]:
    """What `asfda next` says about its query ``q`` (`asfda.project.next_query`'s record)."""
    lines = []
    if q.get("shown_again"):
        lines.append(f"round {q['round']}'s query is still waiting for labels (shown again; --force replaces it)")
    if q.get("replaces"):
        rep = q["replaces"]
        lines.append(f"round {rep['round']}'s fine-tuning was discarded by the guard; this query replaces "
                     f"{', '.join(rep['ids'])} ({'its label is' if len(rep['ids']) == 1 else 'their labels are'} "
                     "kept: see `asfda status`)")
    if q.get("budget") is not None and len(q["ids"]) < q["budget"]:
        left = len(q["ids"])
        lines.append(f"only {left} unlabeled case{' is' if left == 1 else 's are'} left, fewer than the budget "
                     f"{q['budget']}: this round asks for {'it' if left == 1 else 'all of them'}")
    n = len(q["ids"])
    lines.append(f"round {q['round']}: annotate {'this case' if n == 1 else f'these {n} cases'} "
                 f"({q['strategy']}, T={q['temperature']:.3g}):")
    for cid in q["ids"]:
        comps = ", ".join(f"{k}={v:.3g}" for k, v in q["components"].get(cid, {}).items())
        lines.append(f"  {cid}  {comps}")
    lines.append(f"images, previews and instructions: {root / q['folder']}")
    lines.append(f"then: asfda ingest LABELS_DIR {root}")
    return lines


def ingest_command(args: argparse.Namespace) -> int:
    from asfda import project as prj

    res = prj.ingest_labels(args.project, args.labels)
    if not res["accepted"] and not res["refused"] and not res.get("unchanged"):
        print(f"asfda: error: no label files (CASE.nii.gz) in {args.labels}: nothing ingested", file=sys.stderr)
        return 2
    if res.get("unchanged") and not res["accepted"] and not res["refused"]:
        print(f"nothing new: {_n(len(res['unchanged']), 'label')} in {args.labels} "
              f"{'is' if len(res['unchanged']) == 1 else 'are'} already ingested, unchanged")
    for cid in res["accepted"]:
        print(f"accepted: {cid}" + (" (replaces the earlier label)" if cid in res["replaced"] else ""))
    for bad in res["refused"]:
        print(f"refused: {bad['file']}: {bad['reason']}", file=sys.stderr)
    status = prj.project_status(args.project)
    print(f"{status['labelled']} labelled in all; next: {status['next']}")
    return 1 if res["refused"] else 0


def finetune_command(args: argparse.Namespace) -> int:
    from asfda import project as prj

    rec = prj.finetune_project(args.project, progress=not args.no_progress, force=args.force, device=args.device,
                               precision=args.precision, trust_model_code=args.trust_model_code)
    if not rec:  # another rank of a torchrun job: rank 0 prints
        return 0
    root = prj.Project(args.project).root
    print(f"round {rec['round']} fine-tuned on {_n(len(rec['labelled_ids']), 'labelled case')} "
          f"in {rec['seconds']:.0f} s "
          f"(final loss {rec['loss_final']:.3f}); adapted model: {root / 'model'}")
    if rec.get("guard"):
        from asfda.training.guard import GuardResult

        print(GuardResult.from_dict(rec["guard"]).message())
    st = prj.project_status(root)
    print(_stop_line(st["when_to_stop"]))
    print(f"next: {st['next']}")
    return 0


def status_command(args: argparse.Namespace) -> int:
    from asfda import project as prj

    st = prj.project_status(args.project)
    print(json.dumps(st, indent=2) if args.json else "\n".join(status_lines(st)))
    return 0


def status_lines(st: dict) -> list[str]:
    """`asfda status`'s text of a project summary (`asfda.project.project_status`)."""
    lines = [f"project {st['project']}: {_n(st['rounds_finished'], 'round')} fine-tuned, {st['labelled']} of "
             f"{_n(st['pool_cases'], 'pool case')} labelled"]
    if st["pending_query"]:
        q = st["pending_query"]
        lines.append(f"pending query (round {q['round']}): {', '.join(q['ids'])}; missing labels: "
                     f"{', '.join(q['missing_labels']) or 'none'}")
    if st["labelled_not_trained"]:
        lines.append(f"labelled, not yet trained on: {', '.join(st['labelled_not_trained'])}")
    lines += [_discarded_line(d, st) for d in st.get("discarded_rounds", [])]
    lines += [_effort_line(e) for e in st.get("annotation_effort", [])]
    if st.get("held_back"):
        lines.append(f"held back from training (their labels are kept): {', '.join(st['held_back'])}")
    lines.append(_stop_line(st["when_to_stop"]))
    lines.append(f"next: {st['next']}")
    return lines


def _discarded_line(d: dict, st: dict) -> str:
    """A round the guard discarded: the volumes it blames, why, and what happens to their labels."""
    from asfda.training.guard import GuardResult

    harmful = d.get("harmful") or d["new_ids"]
    one = len(harmful) == 1
    guard = GuardResult.from_dict({"cases": [], "plausibility_pretrained": float("nan"),
                                   "plausibility_adapted": float("nan"), "reverted": True, **d})
    return (f"round {d['round']} was discarded by the guard: trained with "
            f"{', '.join(harmful) or 'no new volume'} ({'its' if one else 'their'} first round, "
            f"so the harmful {'volume' if one else 'volumes'}); on "
            f"{_n(len(d.get('cases', [])), 'unlabeled volume')} "
            f"{guard.reason() or 'its numbers were not recorded'}; "
            f"{'its label is' if one else 'the labels are'} "
            "kept" + ("" if st.get("hold_back_discarded") else
                      f" and trained on again (`asfda set {st['project']} hold_back_discarded=true` leaves "
                      f"{'it' if one else 'them'} out until 3 other labels exist)"))


def _effort_line(e: dict) -> str:
    """How much the annotators changed a query round's pre-segmentations."""
    return (f"round {e['round']}: the pre-segmentations of {_n(e['cases'], 'case')} matched the final labels "
            f"with Dice {e['edit_dice_mean']:.3f} ({100 * e['fraction_changed_mean']:.2f}% of voxels "
            "changed by the annotators)")


def parse_settings(items: list[str]) -> dict[str, str]:
    """``["budget=3", "train.steps=100"]`` as ``{"budget": "3", "train.steps": "100"}`` (keys and values stripped);
    an item without ``=`` or without a key is refused."""
    changes = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise AsfdaError(f"{item!r} is not KEY=VALUE", fix="write each setting as key=value, e.g. budget=3")
        changes[key.strip()] = value.strip()
    return changes


def set_command(args: argparse.Namespace) -> int:
    from asfda import project as prj

    changes = parse_settings(args.settings)
    changed = prj.update_settings(args.project, changes)
    for name, old, new in changed:
        print(f"{name}: {old} -> {new}")
    if not changed:
        print("nothing changed: " + ", ".join(f"{k} is already {v}" for k, v in changes.items()))
    pending = prj.Project(args.project).state.get("query")
    if changed and pending:
        print(f"the pending query of round {pending['round']} keeps its {_n(len(pending['ids']), 'case')}; "
              "the new settings apply from the next query and round")
    return 0


def _stop_line(est: dict) -> str:
    from asfda.stopping import StopEstimate

    return StopEstimate(**est).message()
