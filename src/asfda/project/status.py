"""`asfda status`: where a project stands, the rounds the guard discarded, the annotation effort, when to stop and
what to run next (read-only)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from asfda import stopping
from asfda.rounds import trained_history
from asfda.training.guard import blamed

from .state import Project


def project_status(root: str | Path) -> dict:
    """A summary of the project (read-only, no lock needed: the state file is replaced atomically): what is labelled
    and pending, the rounds the guard discarded with the volumes they blame, the annotation effort per query round,
    the when-to-stop estimate (`asfda.stopping`) and what to run next."""
    project = Project(root)
    st = project.state
    q = st.get("query")
    labelled = st["labelled"]
    trained = set(st["rounds"][-1]["labelled_ids"]) if st["rounds"] else set()
    out = {"project": str(project.root), "model": st["model"], "pool": st["pool"], "pool_cases": st["pool_cases"],
           "rounds_finished": len(st["rounds"]), "labelled": len(labelled),
           "labelled_not_trained": sorted(set(labelled) - trained), "pending_query": None}
    if q:
        out["pending_query"] = {"round": q["round"], "ids": q["ids"], "folder": q["folder"],
                                "missing_labels": [i for i in q["ids"] if i not in labelled]}
    if st["rounds"]:
        last = st["rounds"][-1]
        out["last_round"] = {k: last.get(k) for k in ("round", "seconds", "loss_final", "temperature", "finished")}
        # per discarded round: the volumes it blames (trained on for the first time then: the harmful ones) and the
        # guard's numbers; their labels are kept (held back from training under train.hold_back_discarded)
        out["discarded_rounds"] = [
            {"round": rec["round"], "new_ids": rec.get("new_ids", []), "harmful": harm, **(rec.get("guard") or {})}
            for rec, harm in zip(st["rounds"], blamed(trained_history(st["rounds"])))
            if (rec.get("guard") or {}).get("reverted")]
        out["held_back"] = last.get("held_back", [])
        out["last_round_discarded"] = bool((last.get("guard") or {}).get("reverted"))
        out["hold_back_discarded"] = project.settings.train.hold_back_discarded
    effort: dict[int, list[dict]] = {}
    for rec in labelled.values():
        if rec.get("edit") and rec.get("query_round") is not None:
            effort.setdefault(int(rec["query_round"]), []).append(rec["edit"])
    # per query round: how close the pre-segmentations were to the final labels (1.0: accepted as they were)
    out["annotation_effort"] = [
        {"round": r, "cases": len(edits),
         "edit_dice_mean": float(np.nanmean([e["edit_dice_mean"] for e in edits])),
         "fraction_changed_mean": float(np.mean([e["fraction_changed"] for e in edits]))}
        for r, edits in sorted(effort.items())]
    # when to stop: the estimate after the last round (label-free), beside the curve of the edit Dice (the Dice of
    # each query's pre-segmentations against the annotators' labels)
    curve = {r: [e["edit_dice_mean"] for e in edits] for r, edits in effort.items()}
    out["when_to_stop"] = stopping.estimate_from_records(st["rounds"], curve,
                                                        project.settings.stop_gain).to_dict()
    if q and out["pending_query"]["missing_labels"]:
        out["next"] = f"annotate {q['folder']}, then `asfda ingest LABELS_DIR {project.root}`"
    elif out["labelled_not_trained"]:
        out["next"] = f"`asfda finetune {project.root}`"
    elif out.get("last_round_discarded"):
        out["next"] = f"`asfda next {project.root}` (a replacement query for the discarded round)"
    else:
        out["next"] = f"`asfda next {project.root}`"
    return out
