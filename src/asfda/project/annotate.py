"""`asfda next` (score the pool, pick the next cases, export them with pre-segmentations and viewer files) and
`asfda ingest` (check the annotators' labels against their images; keep the good ones with their edit statistics)."""

from __future__ import annotations

import functools
import os
import shutil
from pathlib import Path

import numpy as np

from asfda.annotation import edit_summary, itksnap_label_description, slicer_color_table
from asfda.distributed import DistContext, rank_context
from asfda.errors import AsfdaError
from asfda.io import atomic_write, atomic_write_folder, atomic_write_json, atomic_write_text
from asfda.io.datasets import Case
from asfda.io.labels import check_label, label_case_id, label_files
from asfda.io.nifti import read_nifti, write_label_map
from asfda.models.native_grid import label_map_on_native_grid
from asfda.models.preprocessing import check_grids
from asfda.options import IMAGE_MODES
from asfda.report.previews import preview_png
from asfda.rounds import select_batch, trained_history
from asfda.selection import build_strategy
from asfda.training.guard import blamed

from .state import Project, _now, _sha256, project_lock


def next_query(root: str | Path, *, progress: bool = True, force: bool = False, device: str | None = None,
               precision: str | None = None, trust_model_code: bool = False, images: str = "copy") -> dict:
    """Scores the unlabeled pool with the current model and picks the next batch to annotate.

    Writes ``annotate/roundR/``: ``cases.txt`` (ids), ``images/`` (the pool images, copied or relatively linked:
    ``images``, one of `IMAGE_MODES`), ``previews/CASE.png`` (image and current prediction), ``query.json`` (scores
    and why) and ``README.txt`` (naming each case's files). A pending query whose labels are not all in is shown
    again, not replaced (``force`` replaces it); the record returned then has ``"shown_again": True``. After a round
    the guard discarded, the query is a replacement: ``"replaces": {"round", "ids"}`` names that round and the
    volumes it blames (their labels are kept). ``device`` overrides the project's setting for this command;
    ``precision`` is the scoring (inference) precision, ``fp32`` (default) or ``bf16``. ``trust_model_code``: the
    command line's ``--trust-model-code``, given each time (a project never stores it).

    Under ``torchrun`` (``WORLD_SIZE > 1``) the pool's scoring is sharded over the ranks (`asfda.distributed`): rank 0
    fits T, picks and writes every file; the other ranks score their shards and return ``{}``.
    """
    if images not in IMAGE_MODES:
        raise AsfdaError(f"images mode {images!r} is not one of {list(IMAGE_MODES)}",
                         fix="copy (portable: the default) or link (links relative to the round folder)")
    project = Project(root)
    requested = device or project.settings.device
    with rank_context(requested) as dist:  # torchrun's ranks, or this one process
        if not dist.is_main:  # another rank: score shards of the pool for rank 0 until it has picked
            state = dist.broadcast_from_main(None)  # the state rank 0 read under its lock; None: nothing to score
            if state is not None:
                project.state = state
                project.adapter(False, dist.device(requested), precision or "fp32",
                                trust_model_code=trust_model_code).serve_pool_shards(dist)
            return {}
        sent = False
        try:
            with project_lock(project.root, "next"):
                project = Project(root)  # read under the lock
                pending = project.state.get("query")
                if pending and not force:
                    missing = [i for i in pending["ids"] if i not in project.state["labelled"]]
                    if missing:
                        return {**pending, "shown_again": True}
                    raise AsfdaError(f"every case of round {pending['round']}'s query is labelled, and that round is "
                                     "not fine-tuned yet", project.root, "run `asfda finetune` first")
                if dist.sharded:
                    dist.broadcast_from_main(project.state)
                sent = True
                return _new_query(project, progress, dist.device(requested), precision or "fp32", dist,
                                  trust_model_code, images)
        finally:
            if dist.sharded and not sent:  # nothing to score (or an error before): the other ranks return
                dist.broadcast_from_main(None)


def _new_query(project: Project, progress: bool, device: str | None = None, precision: str = "fp32",
               dist: DistContext | None = None, trust_model_code: bool = False, images_mode: str = "copy") -> dict:

    s = project.settings
    r = project.round
    ds = project.dataset()
    adapter = project.adapter(progress, device, precision, trust_model_code=trust_model_code)
    check_grids(ds.cases, adapter.pretrained.preprocessing)  # a volume too large on the model's grid: refused now
    labelled = project.labelled_cases(ds)
    by_id = ds.by_id()
    unlabelled = [by_id[i] for i in project.pool_state().unlabelled([c.case_id for c in ds.cases])]
    rounds = project.state["rounds"]
    # after a round the guard discarded: this query replaces the volumes it blames (their labels are kept)
    replaces = ({"round": rounds[-1]["round"], "ids": blamed(trained_history(rounds))[-1]}
                if rounds and (rounds[-1].get("guard") or {}).get("reverted") else None)
    if not unlabelled:
        raise AsfdaError(f"every one of the {len(ds.cases)} pool cases is labelled: there is nothing left to query",
                         project.root, "run `asfda finetune` if the last labels are not trained on yet, or add cases "
                         "to the pool")
    budget = min(s.budget, len(unlabelled))  # fewer left than the budget: the last round asks for all of them
    strategy = build_strategy(s.strategy, settings=s)
    passes = adapter.forward_passes()
    with adapter.sharded_scoring(dist or DistContext()):  # rank 0 of a torchrun job: the ranks score the pool
        batch = select_batch(adapter, strategy, labelled, unlabelled, budget, r, s.seed * 1000 + r,
                             t0=s.temperature0, grow_voxels=s.grow_voxels)
    query, temp = batch.query, batch.temperature
    folder = project.root / "annotate" / f"round{r}"
    images = folder / "images"
    images.mkdir(parents=True, exist_ok=True)
    for cid in query.ids:
        place_image(by_id[cid].image_path, images, images_mode, name=_image_name(by_id[cid]))
    _write_annotation_aids(adapter, [by_id[i] for i in query.ids], folder, ds.class_names, project.state["labels"])
    record = {"round": r, "strategy": query.strategy, "ids": query.ids, "scores": query.scores,
              "components": query.components, "strategy_settings": strategy.settings(),
              "temperature": temp.temperature, "ece_before": temp.ece_before, "ece_after": temp.ece_after,
              "seconds": round(batch.seconds, 2),
              "forward_passes": {k: n - passes[k] for k, n in adapter.forward_passes().items()},
              "folder": str(folder.relative_to(project.root)), "created": _now(), "budget": s.budget,
              "unlabelled_left": len(unlabelled), **({"replaces": replaces} if replaces else {}),
              **({"precision": precision} if precision != "fp32" else {})}
    atomic_write_json(folder / "query.json", record)
    atomic_write_text(folder / "cases.txt", "\n".join(query.ids) + "\n")
    atomic_write_text(folder / "README.txt", round_readme(r, [(cid, _image_name(by_id[cid])) for cid in query.ids],
                                                          project.state["labels"], project.root, replaces))
    project.state["query"] = record
    project.save(f"round {r}: queried {', '.join(query.ids)}")
    return record


def _copy_tree(src: Path, tmp: Path) -> None:
    shutil.copytree(src, tmp, dirs_exist_ok=True)


def _image_name(case: Case) -> str:
    """The name of a case's image in a round's ``images/``: its file's name; a DICOM series folder (whose own name,
    e.g. ``CT``, several series may share) by its case id."""
    return case.case_id if case.image_path.is_dir() else case.image_path.name


def place_image(src: Path, images: Path, mode: str = "copy", name: str | None = None) -> Path:
    """Puts the pool image ``src`` into a round's ``images/`` folder under ``name`` (default: its own name): a copy
    (``copy``; a DICOM series folder: the whole folder), or a link relative to that folder (``link``; a copy where
    the file system has no links). Never an absolute link: the round folder stays usable when the project
    (``link``: with the pool beside it) is moved or sent."""
    dest = images / (name or src.name)
    if os.path.lexists(dest):
        if dest.exists() and not (dest.is_symlink() and os.path.isabs(os.readlink(dest))):
            return dest  # already there (a query shown again)
        dest.unlink()  # a dangling link, or an absolute one an earlier asfda wrote: placed again
    if mode == "link":
        try:
            os.symlink(os.path.relpath(src.resolve(), images.resolve()), dest)
            return dest
        except (OSError, ValueError):  # no links on this file system, or another drive (Windows): a copy
            pass
    if src.is_dir():  # a DICOM series folder: copied whole
        atomic_write_folder(dest, functools.partial(_copy_tree, src))
    else:
        atomic_write(dest, functools.partial(shutil.copyfile, src))
    return dest


def _series(name: str) -> str:
    """A DICOM series folder is named without a file ending: say what it is."""
    return "" if name.endswith((".nii", ".nii.gz")) else "/ (a DICOM series folder: load the folder)"


def round_readme(r: int, cases: list[tuple[str, str]], labels: dict[str, int], root: Path,
                 replaces: dict | None = None) -> str:
    """The README.txt of round ``r``'s folder: what to annotate, each case's real file names (``cases``: (id, image
    file name) pairs: ``CASE.nii.gz`` for a plain-folder pool, ``CASE_0000.nii.gz`` for an nnU-Net one), the label
    values, and how to edit and save the pre-segmentations in ITK-SNAP and 3D Slicer."""
    values = ", ".join(f"{v} = {n}" for n, v in sorted(labels.items(), key=lambda kv: kv[1]))
    why = (f"Round {replaces['round']}'s fine-tuning was discarded by the guard (its model segmented unlabeled volumes "
           f"worse than the pretrained model); this query replaces {', '.join(replaces['ids'])} "
           f"({'its label is' if len(replaces['ids']) == 1 else 'their labels are'} kept).\n" if replaces else "")
    listing = "".join(f"  {cid}: open images/{name}{_series(name)}, pre-segmentation presegmentations/{cid}.nii.gz, "
                      f"save the label as {cid}.nii.gz\n" for cid, name in cases)
    cid, name = cases[0]
    return why + (
        f"Round {r}: please annotate {'this case' if len(cases) == 1 else f'these {len(cases)} cases'} "
        "(ids in cases.txt, images in images/):\n" + listing +
        f"Save each label map on its image's grid as CASE.nii.gz (CASE: the case id above) with the values "
        f"{values}.\n"
        "Correcting is faster than drawing: presegmentations/CASE.nii.gz is the current model's prediction on the\n"
        f"image's own grid, with these values. ITK-SNAP: open the image (for {cid}: images/{name}), then\n"
        f"Segmentation > Open Segmentation... presegmentations/{cid}.nii.gz and Segmentation > Import Label\n"
        f"Descriptions... labels.itksnap.txt; edit, then Segmentation > Save Segmentation Image as {cid}.nii.gz.\n"
        "3D Slicer: load labels.slicer.ctbl (a colour table), then the image, then its pre-segmentation as a\n"
        "segmentation with that colour table; edit in Segment Editor; export it as a labelmap CASE.nii.gz on the\n"
        "image's grid.\n"
        f"Then: asfda ingest LABELS_FOLDER {root}\n")


def _write_annotation_aids(adapter, cases: list[Case], folder: Path, class_names: list[str],
                           labels: dict[str, int]) -> None:
    """Per queried case, from one forward pass of the current model: ``previews/CASE.png`` and
    ``presegmentations/CASE.nii.gz`` (the prediction on the image's own grid, the dataset's label values); plus
    the label descriptions for ITK-SNAP and 3D Slicer."""

    fg = tuple(range(1, len(class_names)))
    for case in cases:
        vol = adapter.prepare(case, with_label=False)
        logits, _ = adapter.forward(case, vol)  # the pass that scored it
        pred = logits.argmax(0).numpy().astype(np.uint8)
        preview_png(vol.image[0].numpy(), {"current prediction": pred}, folder / "previews" / f"{case.case_id}.png",
                    title=case.case_id, class_names=class_names)
        native = label_map_on_native_grid(logits, "softmax", fg, fg, vol.affine, vol.native_affine, vol.native_shape,
                                          adapter.pretrained.preprocessing)
        (folder / "presegmentations").mkdir(parents=True, exist_ok=True)
        write_label_map(folder / "presegmentations" / f"{case.case_id}.nii.gz", native, case.image_path)
    atomic_write_text(folder / "labels.itksnap.txt", itksnap_label_description(labels))
    atomic_write_text(folder / "labels.slicer.ctbl", slicer_color_table(labels))


# ---------------------------------------------------------------------------------------------- ingest
def ingest_labels(root: str | Path, labels_dir: str | Path) -> dict:
    """Checks each label file of ``labels_dir`` against its pool image and keeps the good ones.

    Each accepted file is copied to ``labels/`` (atomically) before the state records it. Returns
    ``{"accepted": [ids], "refused": [{"file", "reason"}], "replaced": [ids], "unchanged": [ids]}`` (unchanged:
    the same file was ingested before).
    """
    project = Project(root)
    accepted, refused, replaced, unchanged = [], [], [], []
    with project_lock(project.root, "ingest"):
        ds = project.dataset()
        by_id = ds.by_id()
        allowed = set(project.state["labels"].values())
        seen: set[str] = set()
        for path in label_files(labels_dir):
            cid = label_case_id(path)
            if cid in seen:
                refused.append({"file": str(path), "reason": f"a second label file for case {cid!r}"})
                continue
            seen.add(cid)
            if cid not in by_id:
                refused.append({"file": str(path), "reason": f"{cid!r} is not a case of the pool"})
                continue
            problem = check_label(path, by_id[cid], allowed, allow_empty=project.settings.allow_empty_labels)
            if problem:
                refused.append({"file": str(path), "reason": problem})
                continue
            digest = _sha256(path)
            old = project.state["labelled"].get(cid)
            if old and old["sha256"] == digest:
                unchanged.append(cid)
                continue  # already in: ingesting a folder twice changes nothing
            suffix = ".nii.gz" if path.name.endswith(".nii.gz") else ".nii"
            dest = project.root / "labels" / f"{cid}{suffix}"
            versions = list(old.get("versions", [])) if old else []
            if old:  # the replaced label is kept beside it, as labels/CASE.vN.nii.gz
                kept = project.root / "labels" / f"{cid}.v{len(versions) + 1}{suffix}"
                src = project.root / old["file"]
                if src.is_file():
                    atomic_write(kept, functools.partial(shutil.copyfile, src))
                    versions.append({"file": str(kept.relative_to(project.root)), "sha256": old["sha256"],
                                     "ingested": old.get("ingested")})
            atomic_write(dest, functools.partial(shutil.copyfile, path))
            if old:
                replaced.append(cid)
                if old["file"] != str(dest.relative_to(project.root)):
                    (project.root / old["file"]).unlink(missing_ok=True)
            query_round = _query_round(project, cid)
            project.state["labelled"][cid] = {"file": str(dest.relative_to(project.root)), "sha256": digest,
                                              "ingested": _now(), "source": str(path.resolve()),
                                              "query_round": query_round,
                                              **({"versions": versions} if versions else {}),
                                              **_edit_record(project, cid, path, query_round)}
            project.save(f"label {'replaced' if old else 'ingested'}: {cid}")
            accepted.append(cid)
    return {"accepted": accepted, "refused": refused, "replaced": replaced, "unchanged": unchanged}


def _edit_record(project: Project, cid: str, label_path: Path, query_round: int | None) -> dict:
    """``{"edit": ...}``: how much the annotator changed the pre-segmentation `asfda next` wrote for this case
    (`asfda.annotation.edit_summary`), or nothing when there is none."""

    if query_round is None:
        return {}
    pre = project.root / "annotate" / f"round{query_round}" / "presegmentations" / f"{cid}.nii.gz"
    if not pre.is_file():
        return {}
    try:
        p, _ = read_nifti(pre)
        g, _ = read_nifti(label_path)
        return {"edit": edit_summary(p.round().astype(np.int64), g.round().astype(np.int64), project.state["labels"])}
    except (AsfdaError, ValueError):  # a pre-segmentation removed or damaged by hand: no statistic, not an error
        return {}


def _query_round(project: Project, cid: str) -> int | None:
    q = project.state.get("query")
    return q["round"] if q and cid in q["ids"] else None
