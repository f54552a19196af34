"""The annotation project's commands (init, next, ingest, finetune, status, set; `asfda.project`): each calls the
project function and prints where the project stands and what to do next."""

from __future__ import annotations

import argparse
import sys

from asfda.errors import AsfdaError

__all__ = ["project_command"]


def _n(count: int, word: str, plural: str | None = None) -> str:
    """``1 case``, ``2 cases``."""
    return f"{count} {word if count == 1 else plural or word + 's'}"


def project_command(args: argparse.Namespace, progress: bool) -> int:
    import json

    from asfda import project as prj

    if args.command == "init":
        from asfda.training import TrainConfig

        settings = prj.ProjectSettings(strategy=args.strategy, budget=args.budget, seed=args.seed,
                                       class_map=args.class_map, allow_empty_labels=args.allow_empty_labels,
                                       device=args.device, output_activation=args.output_activation,
                                       train=TrainConfig(steps=args.steps, guard=not args.no_guard,
                                                         precision=args.precision or "fp32"))
        p = prj.init_project(args.out, args.model, args.pool, settings, labels_json=args.labels,
                             trust_model_code=args.trust_model_code)
        print(f"project created: {p.root} ({p.state['pool_cases']} pool cases, labels {p.state['labels']})")
        print(f"next: asfda next {p.root}")
    elif args.command == "next":
        q = prj.next_query(args.project, progress=progress, force=args.force, device=args.device,
                           precision=args.precision, trust_model_code=args.trust_model_code)
        if not q:  # another rank of a torchrun job: rank 0 prints
            return 0
        root = prj.Project(args.project).root
        if q.get("shown_again"):
            print(f"round {q['round']}'s query is still waiting for labels (shown again; --force replaces it)")
        if q.get("replaces"):
            rep = q["replaces"]
            print(f"round {rep['round']}'s fine-tuning was discarded by the guard; this query replaces "
                  f"{', '.join(rep['ids'])} ({'its label is' if len(rep['ids']) == 1 else 'their labels are'} kept: "
                  "see `asfda status`)")
        if q.get("budget") is not None and len(q["ids"]) < q["budget"]:
            left = len(q["ids"])
            print(f"only {left} unlabeled case{' is' if left == 1 else 's are'} left, fewer than the budget "
                  f"{q['budget']}: this round asks for {'it' if left == 1 else 'all of them'}")
        n = len(q["ids"])
        print(f"round {q['round']}: annotate {'this case' if n == 1 else f'these {n} cases'} "
              f"({q['strategy']}, T={q['temperature']:.3g}):")
        for cid in q["ids"]:
            comps = ", ".join(f"{k}={v:.3g}" for k, v in q["components"].get(cid, {}).items())
            print(f"  {cid}  {comps}")
        print(f"images, previews and instructions: {root / q['folder']}")
        print(f"then: asfda ingest LABELS_DIR {root}")
    elif args.command == "ingest":
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
    elif args.command == "finetune":
        rec = prj.finetune_project(args.project, progress=progress, force=args.force, device=args.device,
                                   precision=args.precision, trust_model_code=args.trust_model_code)
        if not rec:  # another rank of a torchrun job: rank 0 prints
            return 0
        root = prj.Project(args.project).root
        print(f"round {rec['round']} fine-tuned on {_n(len(rec['labelled_ids']), 'labelled case')} "
              f"in {rec['seconds']:.0f} s "
              f"(final loss {rec['loss_final']:.3f}); adapted model: {root / 'model'}")
        if rec.get("guard"):
            from asfda.training.guard import GuardResult

            print(GuardResult(**rec["guard"]).message())
        st = prj.project_status(root)
        print(_stop_line(st["when_to_stop"]))
        print(f"next: {st['next']}")
    elif args.command == "status":
        st = prj.project_status(args.project)
        if args.json:
            print(json.dumps(st, indent=2))
        else:
            print(f"project {st['project']}: {_n(st['rounds_finished'], 'round')} fine-tuned, {st['labelled']} of "
                  f"{_n(st['pool_cases'], 'pool case')} labelled")
            if st["pending_query"]:
                q = st["pending_query"]
                print(f"pending query (round {q['round']}): {', '.join(q['ids'])}; missing labels: "
                      f"{', '.join(q['missing_labels']) or 'none'}")
            if st["labelled_not_trained"]:
                print(f"labelled, not yet trained on: {', '.join(st['labelled_not_trained'])}")
            for d in st.get("discarded_rounds", []):
                harmful = d.get("harmful") or d["new_ids"]
                one = len(harmful) == 1
                print(f"round {d['round']} was discarded by the guard: trained with "
                      f"{', '.join(harmful) or 'no new volume'} ({'its' if one else 'their'} first round, "
                      f"so the harmful {'volume' if one else 'volumes'}), the model's organs on "
                      f"{_n(len(d.get('cases', [])), 'unlabeled volume')} "
                      f"were more fragmented than the pretrained model's (plausibility "
                      f"{d.get('plausibility_adapted', float('nan')):.3f} < "
                      f"{d.get('plausibility_pretrained', float('nan')):.3f}: "
                      f"the mean fraction of each organ in its largest connected piece); "
                      f"{'its label is' if one else 'the labels are'} "
                      "kept" + ("" if st.get("hold_back_discarded") else
                                f" and trained on again (`asfda set {st['project']} hold_back_discarded=true` leaves "
                                f"{'it' if one else 'them'} out until 3 other labels exist)"))
            for e in st.get("annotation_effort", []):
                print(f"round {e['round']}: the pre-segmentations of {_n(e['cases'], 'case')} matched the final labels "
                      f"with Dice {e['edit_dice_mean']:.3f} ({100 * e['fraction_changed_mean']:.2f}% of voxels "
                      "changed by the annotators)")
            if st.get("held_back"):
                print(f"held back from training (their labels are kept): {', '.join(st['held_back'])}")
            print(_stop_line(st["when_to_stop"]))
            print(f"next: {st['next']}")
    elif args.command == "set":
        changes = {}
        for item in args.settings:
            key, sep, value = item.partition("=")
            if not sep or not key.strip():
                raise AsfdaError(f"{item!r} is not KEY=VALUE", fix="write each setting as key=value, e.g. budget=3")
            changes[key.strip()] = value.strip()
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
