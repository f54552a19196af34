"""`asfda predict`: label maps of every image of a folder, on each image's own grid."""

from __future__ import annotations

import functools
import importlib.util
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from asfda.engine import OUTPUT_EMBEDDING, InferenceEngine, select_device
from asfda.errors import AsfdaError
from asfda.evaluation import largest_component_per_class
from asfda.io import atomic_write_json, atomic_write_text, load_dataset
from asfda.io.atomic import PartialOutputs, write_failures_as_errors
from asfda.io.datasets import (
    Case,
    Dataset,
    check_nnunet_links,
    check_nnunet_meta,
    load_folder,
    parse_labels,
    read_dataset_json,
)
from asfda.io.dicom import DICOM_INSTALL_FIX, is_series_folder, write_dicom_seg, written_seg
from asfda.io.nifti import write_label_map
from asfda.io.outputs import (
    OutputFiles,
    check_writable_folder,
    dataset_folders,
    dataset_input_folders,
    json_object_with,
    refuse_foreign_files,
    refuse_output_inside_inputs,
)
from asfda.models import (
    LoadedModel,
    OutputAsLogits,
    build_class_map,
    load_model,
    parse_class_map_override,
    prepare_case,
)
from asfda.models.native_grid import label_map_on_native_grid

__all__ = ["label_map_on_native_grid", "predict_model"]

log = logging.getLogger(__name__)

LABELS_FILE = "labels.json"
SIDECAR_SUFFIX = ".asfda.json"
SEG_SUFFIX = ".seg.dcm"
"""``OUT/CASE.seg.dcm``: the DICOM SEG `predict_model` writes beside the label map of a DICOM series (``dicom_seg``)."""


def _model_inputs(model: str | Path, model_config: str | Path | None) -> dict[str, object]:
    return {"the model": model, "the model config": model_config}


@dataclass(frozen=True)
class _OutputClasses:
    """How network output channels become label values: ``channels[i]`` is written as ``values[i]``."""

    labels: dict[str, int]  # name -> value written, background 0 included
    channels: tuple[int, ...]  # foreground channels of the network that runs
    values: tuple[int, ...]  # label value written for each of ``channels``


def _open_images(images: str | Path) -> tuple[Dataset, bool]:
    """The cases to segment, and whether their label values come from a dataset.json.

    An nnU-Net raw dataset (or its ``imagesTr``/``imagesTs`` folder) gives the dataset's labels; any other
    folder of NIfTI images gives none (the model's class indices are written).
    """
    path = Path(images)
    if path.is_dir() and path.name in ("imagesTr", "imagesTs") and (path.parent / "dataset.json").is_file():
        meta_path = path.parent / "dataset.json"
        meta = read_dataset_json(meta_path)
        labels = parse_labels(meta.get("labels"), meta_path)
        check_nnunet_links(path, path.parent, check_nnunet_meta(meta, path.parent, meta_path), meta_path)
        return load_folder(path, labels=labels), True
    is_dataset = (path / "dataset.json").exists() or (path / "imagesTr").is_dir()
    return load_dataset(path, require_labels=False), is_dataset


def _output_classes(loaded: LoadedModel, target_names: list[str] | None, override: dict[str, str]
                    ) -> tuple[torch.nn.Module, _OutputClasses]:
    """The network to run and how its channels map to written label values. A network whose output already is
    probabilities (``output_activation: none``) runs wrapped in `OutputAsLogits`, so that its probabilities are
    read as they are."""
    names = list(loaded.class_names)
    raw = OutputAsLogits(loaded.network, loaded.activation) if loaded.probabilities else loaded.network
    if loaded.activation == "sigmoid":
        if target_names is None:  # the model's own channels; a "background" channel 0 is not a class
            has_bg = names[0].strip().lower() == "background"
            channels = tuple(range(1, len(names))) if has_bg else tuple(range(len(names)))
            values = channels if has_bg else tuple(c + 1 for c in channels)
            labels = {"background": 0, **{names[c]: v for c, v in zip(channels, values)}}
            return raw, _OutputClasses(labels, channels, values)
        cmap = build_class_map(names, target_names, override)
        pairs = [(s, t) for t, s in enumerate(cmap.source_index) if t > 0 and s is not None]
        return raw, _OutputClasses({n: i for i, n in enumerate(target_names)},
                                   tuple(s for s, _ in pairs), tuple(t for _, t in pairs))
    if target_names is None:
        return raw, _OutputClasses({n: i for i, n in enumerate(names)}, tuple(range(1, len(names))),
                                   tuple(range(1, len(names))))
    cmap = build_class_map(names, target_names, override)
    network = loaded.mapped_network(cmap)
    fg = tuple(t for t, s in enumerate(cmap.source_index) if t > 0 and s is not None)  # unknown ones never win
    return network, _OutputClasses({n: i for i, n in enumerate(target_names)}, fg, fg)


def _largest_component_values(spec: str | None, labels: dict[str, int], where: Path) -> tuple[int, ...]:
    """The label values of ``--largest-component`` (``all``, or class names), checked against the written labels."""
    if not spec or spec.strip().lower() == "none":
        return ()
    if spec.strip().lower() == "all":
        return tuple(v for v in sorted(labels.values()) if v)
    names = [n.strip() for n in spec.split(",") if n.strip()]
    unknown = [n for n in names if n not in labels or labels[n] == 0]
    if unknown:
        raise AsfdaError(f"--largest-component names {unknown}, which are not foreground classes here", where,
                         f"choose among {sorted(n for n, v in labels.items() if v)}, or 'all'")
    return tuple(sorted(labels[n] for n in names))


def _read_json(path: Path) -> object:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _is_sidecar(path: Path, case_id: str) -> bool:
    """A sidecar predict wrote for ``case_id`` (a claim written before the label map included)."""
    return json_object_with(path, ("case_id", "settings"), lambda o: o["case_id"] == case_id)


def _has_sidecar(sidecar: Path, case_id: str, label_map: Path) -> bool:
    """A label map is predict's when its sidecar is."""
    return sidecar.is_file() and not sidecar.is_symlink() and _is_sidecar(sidecar, case_id)


def _own_outputs(out: Path, ds: Dataset, labels: dict[str, int], seg_cases: frozenset[str] = frozenset()
                 ) -> OutputFiles:
    """Every file this run may write, with how predict recognises its own earlier one: a sidecar by its content, a
    label map by its sidecar, a DICOM SEG (the cases of ``seg_cases``) as one asfda wrote (`written_seg`),
    labels.json as a name -> value map in a folder holding predict's sidecars."""
    files: OutputFiles = []
    for case in ds.cases:
        sidecar = out / f"{case.case_id}{SIDECAR_SUFFIX}"
        files.append((sidecar, functools.partial(_is_sidecar, case_id=case.case_id)))
        files.append((out / f"{case.case_id}.nii.gz", functools.partial(_has_sidecar, sidecar, case.case_id)))
        if case.case_id in seg_cases:
            files.append((out / f"{case.case_id}{SEG_SUFFIX}", written_seg))

    def labels_json(p: Path) -> bool:
        if _read_json(p) == labels:
            return True  # the same content: not rewritten
        sidecars = (s for s in out.glob(f"*{SIDECAR_SUFFIX}") if s.is_file() and not s.is_symlink())
        return (json_object_with(p, (), lambda o: all(isinstance(v, int) for v in o.values()))
                and any(_is_sidecar(s, s.name[: -len(SIDECAR_SUFFIX)]) for s in sidecars))

    return [*files, (out / LABELS_FILE, labels_json)]


def _up_to_date(out_path: Path, sidecar: Path, image_path: Path, settings: dict) -> bool:
    try:
        if out_path.stat().st_mtime_ns < image_path.stat().st_mtime_ns:
            return False
    except OSError:
        return False
    recorded = _read_json(sidecar)
    if not isinstance(recorded, dict) or recorded.get("settings") != settings:
        return False
    try:  # the same image: a case of another folder with the same id is not up to date
        return os.path.samefile(str(recorded.get("image")), image_path)
    except (OSError, TypeError):
        return False


def predict_model(model: str | Path, images: str | Path, out: str | Path, *, model_config: str | None = None,
                  class_map: str | None = None, tta: bool = False, overwrite: bool = False, device: str = "auto",
                  progress: bool = True, trust_model_code: bool = False,
                  largest_component: str | None = None, output_activation: str | None = None,
                  precision: str = "fp32", dicom_seg: bool = False) -> dict:
    """Segments every image of a dataset folder and writes ``out/<case_id>.nii.gz`` on the image's own grid.

    Each label map has the input image's shape and affine (and header), so it overlays in any viewer.
    With an nnU-Net raw dataset (``dataset.json``) the values are the dataset's labels (model classes
    matched by name, overridable by ``class_map``); with a plain folder of NIfTI images they are the
    model's class indices. ``out/labels.json`` names the values either way. Softmax heads take the most
    probable class; sigmoid (multi-label) heads threshold each channel at 0.5 and give a voxel claimed
    by several channels to the most probable one (see `label_map_on_native_grid`).

    Idempotent: a case is skipped when its output is newer than the image and its sidecar
    (``out/<case_id>.asfda.json``) records the same image file, model weights hash and settings (TTA, class map,
    preprocessing); ``overwrite`` redoes all. Every file is written atomically.

    Args:
        model: bundle folder, checkpoint (with ``model_config``) or TorchScript file.
        images: nnU-Net raw dataset, its ``imagesTr``/``imagesTs`` folder, or a folder of NIfTI images.
        out: output folder.
        tta: average the logits over the identity and flips along the model grid's axes 1 and 2
            (3 sliding-window passes; see `asfda.engine`).
        trust_model_code: build the model config with MONAI's full parser (`load_model`'s ``allow_code``).
        output_activation: ``softmax``, ``sigmoid`` or ``none`` (the network already outputs probabilities): overrides
            what the model declares (`load_model`).
        largest_component: ``"all"`` or comma-separated class names whose label is cut to its largest connected
            component (nnU-Net's post-processing; `asfda.evaluation.largest_component_per_class`); None: none.
        precision: ``fp32`` or ``bf16`` (each window's forward under bfloat16 autocast: `InferenceEngine`).
        dicom_seg: for a case whose image is a DICOM series folder, also write ``out/<case_id>.seg.dcm``, the label
            map as a DICOM SEG referencing the series' slices (`asfda.io.dicom.write_dicom_seg`; needs highdicom); a
            case that is not a DICOM series gets its NIfTI label map only, and is listed under ``not_dicom``.

    ``out`` may not be, or lie inside, the images' dataset or the model, nor any dataset, project or model folder
    (`refuse_output_inside_inputs`), and must be writable; both are checked before the model is loaded. An existing
    file it would write must be predict's own (`_own_outputs`; checked before any case is segmented).
    ``out/labels.json`` is written once the first case is done (or at the end), so a run that fails before any
    case leaves nothing behind. Before a case's first label map its sidecar is claimed (written with no settings),
    so a run killed between the two recognises the map as its own. A full disk (`write_failures_as_errors`) is a
    one-line error: the case being written is removed, the finished ones are kept (the next run skips them).

    Returns:
        ``{"out", "written", "skipped", "labels", "model_weights_sha256_16"}``, with ``dicom_seg``: also
        ``"dicom_seg"`` (the cases with a DICOM SEG) and ``"not_dicom"`` (the cases without: not DICOM series) (what
        `asfda predict` reports; nothing is printed here).
    """
    out = Path(out)
    inputs: dict[str, object] = {"the images folder": dataset_folders(images),
                                 **_model_inputs(model, model_config)}
    refuse_output_inside_inputs(out, inputs)
    check_writable_folder(out)
    loaded = load_model(model, config=model_config, allow_code=trust_model_code, output_activation=output_activation)
    loaded.check_usable(1)  # input channels, the roi and the output channels: refused before any case is read
    ds, from_dataset = _open_images(images)
    refuse_output_inside_inputs(out, {"the images folder": dataset_input_folders(ds)})
    override = parse_class_map_override(class_map)
    if override and not from_dataset:
        raise AsfdaError("--class-map needs a dataset with dataset.json (its label names are the targets)",
                         Path(images), "leave --class-map out to write the model's own class indices")
    network, classes = _output_classes(loaded, ds.class_names if from_dataset else None, override)
    seg_cases = _seg_cases(ds, Path(images)) if dicom_seg else frozenset()
    refuse_foreign_files(_own_outputs(out, ds, classes.labels, seg_cases), "predict")
    unknown = sorted(n for n, v in classes.labels.items() if v and v not in classes.values)
    if unknown:
        log.warning("dataset classes %s are not model classes: they are never predicted", unknown)
    dev = select_device(device)
    network = network.to(dev).eval()
    engine = InferenceEngine(network, loaded.roi_size, sw_batch_size=loaded.sw_batch_size, overlap=loaded.overlap,
                             embedding_layer=OUTPUT_EMBEDDING, device=dev, mode=loaded.sw_mode,
                             tta_axes=loaded.tta_axes, precision=precision)
    lcc_values = _largest_component_values(largest_component, classes.labels, Path(images))
    predictor = _Predictor(engine, loaded, classes, bool(tta), lcc_values, str(model),
                           _recorded_settings(loaded, classes, engine, tta, precision, lcc_values), seg_cases)
    written, skipped = _write_cases(predictor, list(ds.cases), out, overwrite=overwrite, progress=progress)
    segs = {"dicom_seg": [c.case_id for c in ds.cases if c.case_id in seg_cases],
            "not_dicom": [c.case_id for c in ds.cases if c.case_id not in seg_cases]}
    return {"out": out, "written": written, "skipped": skipped, "labels": classes.labels,
            "model_weights_sha256_16": loaded.weights_hash, **(segs if dicom_seg else {})}


def _seg_cases(ds: Dataset, where: Path) -> frozenset[str]:
    """The cases that get a DICOM SEG (``dicom_seg``): those whose image is a DICOM series folder. Without highdicom
    they are refused here, before any case is segmented."""
    cases = frozenset(c.case_id for c in ds.cases if is_series_folder(c.image_path))
    if cases and importlib.util.find_spec("highdicom") is None:
        raise AsfdaError("--dicom-seg needs highdicom, which is not installed", where, DICOM_INSTALL_FIX)
    return cases


def _recorded_settings(loaded: LoadedModel, classes: _OutputClasses, engine: InferenceEngine, tta: bool,
                       precision: str, lcc_values: tuple[int, ...]) -> dict:
    """What makes a label map: the settings each sidecar records (a case whose sidecar records others is redone)."""
    settings = {"model_weights_sha256_16": loaded.weights_hash, "activation": loaded.activation,
                "labels": classes.labels, "channels": list(classes.channels), "values": list(classes.values),
                "preprocessing": loaded.preprocessing.cache_key(), "roi_size": list(loaded.roi_size),
                "overlap": loaded.overlap, "tta": bool(tta), "tta_axes": list(engine.tta_axes) if tta else []}
    if loaded.probabilities:  # the same weights read as probabilities give other label maps
        settings["output_activation"] = "none"
    if precision != "fp32":  # (fp32 outputs of earlier versions stay up to date)
        settings["precision"] = precision
    if lcc_values:
        settings["largest_component"] = list(lcc_values)
    return settings


@dataclass(frozen=True)
class _Predictor:
    """How predict segments a case (``label_map``) and what its sidecar records."""

    engine: InferenceEngine
    loaded: LoadedModel
    classes: _OutputClasses
    tta: bool
    lcc_values: tuple[int, ...]
    model: str
    settings: dict
    seg_cases: frozenset[str] = frozenset()  # the cases that get a DICOM SEG too

    def label_map(self, case: Case) -> np.ndarray:
        """The case's label map on its image's own grid."""
        vol = prepare_case(case, self.loaded.preprocessing, with_label=False, cache_dir=None)
        logits, _ = self.engine.run(vol.image, tta=self.tta)
        label = label_map_on_native_grid(logits, self.loaded.activation, self.classes.channels, self.classes.values,
                                         vol.affine, vol.native_affine, vol.native_shape, self.loaded.preprocessing)
        del logits
        if self.lcc_values:
            label = largest_component_per_class(label, self.lcc_values)
        return label


def _write_cases(predictor: _Predictor, cases: list[Case], out: Path, *, overwrite: bool,
                 progress: bool) -> tuple[list[str], list[str]]:
    """Segments and writes every case not up to date (see `predict_model`); returns (written, skipped) ids."""
    from tqdm.auto import tqdm

    labels = predictor.classes.labels
    settings = predictor.settings

    def write_labels_json(partial: PartialOutputs) -> None:
        if _read_json(out / LABELS_FILE) != labels:
            if not (out / LABELS_FILE).exists():
                partial.add(out / LABELS_FILE)
            atomic_write_json(out / LABELS_FILE, labels)
            partial.done()

    written: list[str] = []
    skipped: list[str] = []
    with write_failures_as_errors(out, "the label maps") as partial:
        for case in tqdm(cases, desc="predict", unit="case", disable=not progress, dynamic_ncols=True):
            out_path = out / f"{case.case_id}.nii.gz"
            sidecar = out / f"{case.case_id}{SIDECAR_SUFFIX}"
            seg = out / f"{case.case_id}{SEG_SUFFIX}" if case.case_id in predictor.seg_cases else None
            if (not overwrite and _up_to_date(out_path, sidecar, case.image_path, settings)
                    and (seg is None or _up_to_date(seg, sidecar, case.image_path, settings))):
                skipped.append(case.case_id)
                continue
            label = predictor.label_map(case)
            record = {"case_id": case.case_id, "image": str(case.image_path), "model": predictor.model}
            partial.add(*(p for p in (out_path, sidecar, seg) if p is not None and not p.exists()))
            if not sidecar.exists():  # the claim: this name is predict's from now on (see the docstring)
                atomic_write_text(sidecar, json.dumps({**record, "settings": None}, indent=2) + "\n")
            write_label_map(out_path, label, case.image_path)
            if seg is not None:
                write_dicom_seg(seg, label, case.image_path, _value_names(labels))
                record["dicom_seg"] = seg.name
            n_passes = predictor.engine.n_passes if predictor.tta else 1
            atomic_write_json(sidecar, {**record, "n_passes": n_passes, "settings": settings})
            partial.done()
            if not written:
                write_labels_json(partial)  # once a case is done: a run that fails before any leaves no debris
            written.append(case.case_id)
        write_labels_json(partial)
    return written, skipped


def _value_names(labels: dict[str, int]) -> list[str]:
    """The class names of label values 0..max (a value no class has: ``label N``), as `write_dicom_seg` takes them."""
    names = {v: n for n, v in labels.items()}
    return [names.get(v, f"label {v}") for v in range(max(labels.values(), default=0) + 1)]
