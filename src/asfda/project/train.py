"""`asfda finetune`: one round of fine-tuning on every label so far (`asfda.rounds.train_on_labels`), the weights, the
adapted bundle, then the state."""

from __future__ import annotations

import contextlib
import dataclasses
import time
from pathlib import Path

import numpy as np

from asfda import stopping
from asfda.distributed import DistContext, rank_context
from asfda.errors import AsfdaError
from asfda.io import atomic_write
from asfda.models.preprocessing import check_grids
from asfda.rounds import train_on_labels

from .state import Project, _check_settings, _now, project_lock


def finetune_project(root: str | Path, *, progress: bool = True, force: bool = False, device: str | None = None,
                     precision: str | None = None, trust_model_code: bool = False) -> dict:
    """One round of fine-tuning on every ingested label; writes ``weights/roundR.safetensors``, the adapted
    model as a MONAI bundle in ``model/``, then the state. Refuses a round without new labels (``force``).
    ``device`` and ``precision`` override the project's settings for this round; ``trust_model_code`` is the command
    line's ``--trust-model-code``, given each time (a project never stores it).

    For the when-to-stop estimate (`asfda.stopping`) the round records its ``probe``: the predictions of the model
    before and after it on a few seeded unlabeled pool volumes (one forward pass each, before and after).

    Under ``torchrun`` (``WORLD_SIZE > 1``) every rank runs the round (`asfda.adapter.Adapter.all_ranks`: one
    DistributedDataParallel fine-tuning, the guard and the probe sharded); rank 0 holds the project's lock, writes
    the weights, the bundle and the state and returns the record; the other ranks return ``{}``."""
    project = Project(root)
    requested = device or project.settings.device
    with rank_context(requested) as dist:  # torchrun's ranks, or this one process
        dist.check_batch(project.settings.train.batch_size, project.root)
        lock = project_lock(project.root, "finetune") if dist.is_main else contextlib.nullcontext()
        with lock:
            if dist.sharded:  # the state rank 0 reads under its lock, on every rank
                project.state = dist.broadcast_from_main(Project(root).state if dist.is_main else None)
            record = _finetune_round(project, progress and dist.is_main, force, dist.device(requested), precision,
                                     dist, trust_model_code)
    return record


def _finetune_round(project: Project, progress: bool, force: bool, device: str, precision: str | None,
                    dist: DistContext, trust_model_code: bool = False) -> dict:
    from safetensors.torch import save_file

    s = project.settings
    r = project.round
    ds = project.dataset()
    labelled = project.labelled_cases(ds)
    if not labelled:
        raise AsfdaError("no labels yet", project.root, "run `asfda next`, annotate, then `asfda ingest`")
    trained = set(project.state["rounds"][-1]["labelled_ids"]) if project.state["rounds"] else set()
    current = {c.case_id: project.state["labelled"][c.case_id]["sha256"] for c in labelled}
    before = project.state["rounds"][-1].get("label_sha256", {}) if project.state["rounds"] else {}
    if not force and current == before:
        raise AsfdaError(f"no new or changed labels since round {r - 1}", project.root,
                         "run `asfda next` and annotate its cases (or pass --force to train again)")
    if precision is not None:
        _check_settings(dataclasses.replace(s, train=dataclasses.replace(s.train, precision=precision)))
    adapter = project.adapter(progress, device, trust_model_code=trust_model_code)
    check_grids(ds.cases, adapter.pretrained.preprocessing)  # a volume too large on the model's grid: refused now
    t0, passes = time.perf_counter(), adapter.forward_passes()
    by_id = ds.by_id()
    unlabelled = [by_id[i] for i in project.pool_state().unlabelled([c.case_id for c in ds.cases])]
    train = dataclasses.replace(s.train, seed=s.seed * 1000 + r, precision=precision or s.train.precision)
    with adapter.all_ranks(dist):  # torchrun: every rank trains (DDP); guard and probe sharded
        temp, _ = adapter.fit_temperature(labelled, s.temperature0, s.seed * 1000 + r)
        temp = dist.broadcast_from_main(temp)  # torchrun: rank 0's T for every rank (one process: as is)
        # when to stop (asfda.stopping): a few seeded unlabeled volumes predicted before and after the round
        done = train_on_labels(adapter, labelled, unlabelled, project.state["rounds"], train, s.semi,
                               temp.temperature, desc=f"round {r}",
                               probe_ids=stopping.probe_ids(by_id, stopping.PROBE_VOLUMES, s.seed,
                                                            exclude=current))
    if not dist.is_main:  # the same weights on every rank: rank 0 writes them
        return {}
    result, held, probe_rec = done.training, done.held_back, done.probe
    hist, reliable = result.history, result.reliable
    weights = f"weights/round{r}.safetensors"
    atomic_write(project.root / weights, lambda p: save_file(adapter.current_state(), str(p)))
    adapter.export_bundle(project.root / "model", {
        "project": str(project.root), "round": r, "labelled": sorted(current),
        "guard": result.guard.to_dict() if result.guard else None})  # guard["reverted"]: weights as before r
    record = {"round": r, "labelled_ids": sorted(current), "label_sha256": current,
              "trained_ids": sorted(done.trained_ids), "held_back": held,
              "new_ids": sorted(set(current) - trained), "temperature": temp.temperature,
              "ece_before": temp.ece_before, "ece_after": temp.ece_after, "steps": train.steps,
              "loss_final": float(np.mean(hist["loss"][-10:])), "reliable": reliable,
              "guard": result.guard.to_dict() if result.guard else None, "weights": weights,
              "precision": train.precision, "probe": probe_rec,
              "seconds": round(time.perf_counter() - t0, 2), "finished": _now(),
              "forward_passes": {k: n - passes[k] for k, n in adapter.forward_passes().items()}}
    project.state["rounds"].append(record)
    project.state["weights"] = weights
    q = project.state.get("query")
    if q is not None:
        q_missing = [i for i in q["ids"] if i not in current]
        project.state["query"] = None  # answered (unlabelled picks go back to the pool)
        if q_missing:
            record["query_unanswered"] = q_missing
    project.save(f"round {r} fine-tuned on {len(current)} labelled cases")
    for old in (project.root / "weights").glob("round*.safetensors"):
        if old.name != Path(weights).name and old.name != f"round{r - 1}.safetensors":
            old.unlink(missing_ok=True)  # keep the last two rounds
    return record
