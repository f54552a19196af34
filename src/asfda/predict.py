"""`asfda evaluate` (Dice and HD95 per case and class against labels) and `asfda predict` (label maps)."""

from __future__ import annotations

import csv
import io
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from asfda.errors import AsfdaError
from asfda.evaluation import compute_dice, compute_hd95, largest_component_per_class, mean_ignoring_nan
from asfda.io import atomic_write, atomic_write_json, atomic_write_text, load_dataset, read_nifti
from asfda.io.datasets import (Dataset, check_nnunet_links, check_nnunet_meta, load_folder, parse_labels,
                               read_dataset_json)
from asfda.io.labels import check_label_values
from asfda.io.outputs import (check_writable_folder, dataset_folders, dataset_input_folders,
                              refuse_output_inside_inputs)
from asfda.models import (
    LoadedModel,
    OutputAsLogits,
    build_class_map,
    load_model,
    parse_class_map_override,
    prepare_case,
    resample_to_native,
)

__all__ = ["evaluate_model", "label_map_on_native_grid", "predict_model"]

log = logging.getLogger(__name__)

SIGMOID_THRESHOLD = 0.5
LABELS_FILE = "labels.json"
SIDECAR_SUFFIX = ".asfda.json"


def _model_inputs(model: str | Path, model_config: str | Path | None) -> dict[str, object]:
    return {"the model": model, "the model config": model_config}


def evaluate_model(model: str | Path, data: str | Path, out: str | Path, *, model_config: str | None = None,
                   class_map: str | None = None, progress: bool = True, cache_dir: str | None = ".cache",
                   trust_model_code: bool = False, device: str = "auto", output_activation: str | None = None) -> dict:
    """Evaluates a model on a labelled dataset at each case's native grid; writes per_case.csv + summary.json.

    Labels are checked as `asfda ingest` checks them (integer values among the dataset's label values).
    ``trust_model_code``: build the model config with MONAI's full parser (`load_model`'s ``allow_code``);
    ``output_activation``: overrides what the model declares (`load_model`).
    """
    from asfda.loop import Adapter

    out = Path(out)
    refuse_output_inside_inputs(out, {"the dataset": dataset_folders(data), **_model_inputs(model, model_config)})
    check_writable_folder(out)
    loaded = load_model(model, config=model_config, allow_code=trust_model_code, output_activation=output_activation)
    ds = load_dataset(data, require_labels=True)
    refuse_output_inside_inputs(out, {"the dataset": dataset_input_folders(ds)})
    allowed = set(ds.labels.values())
    adapter = Adapter(loaded, ds.class_names, class_map_override=parse_class_map_override(class_map),
                      cache_dir=cache_dir, progress=progress, device=device)
    names = ds.class_names
    rows = []
    for case in adapter._bar(list(ds.cases), "evaluate"):
        label_arr = read_nifti(case.label_path, dtype=np.float64)[0]
        check_label_values(label_arr, allowed, case.label_path)  # before the model runs on it
        label = torch.from_numpy(label_arr).long()
        vol = adapter.prepare(case, with_label=False)
        logits, _ = adapter.engine_current.run(vol.image)
        fg = tuple(range(1, len(names)))
        pred = torch.from_numpy(label_map_on_native_grid(logits, "softmax", fg, fg, vol.affine, vol.native_affine,
                                                         vol.native_shape, loaded.preprocessing).astype(np.int64))
        dice = compute_dice(pred, label, len(names))
        hd = compute_hd95(pred, label, len(names), case.spacing_mm)
        row = {"case_id": case.case_id}
        row.update({f"dice_{n}": float(d) for n, d in zip(names[1:], dice)})
        row["dice_mean"] = mean_ignoring_nan(dice)
        row.update({f"hd95_mm_{n}": float(h) for n, h in zip(names[1:], hd)})
        rows.append(row)
    summary = {k: mean_ignoring_nan([r[k] for r in rows]) for k in rows[0] if k != "case_id"}
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(rows[0]))
    w.writeheader()
    w.writerows(rows)
    atomic_write_text(out / "per_case.csv", buf.getvalue())
    result = {"model": str(model), "data": str(data), "model_weights_sha256_16": loaded.weights_hash,
              "class_map": adapter.class_map.to_dict(), "n_cases": len(rows), "mean": summary,
              "empty_label_rule": "Dice is NaN (left out of means) for a class absent from both label and "
                                  "prediction, 0 when absent from the label but predicted; HD95 NaN if either is empty"}
    atomic_write_json(out / "summary.json", result)
    print("| class | Dice | HD95 (mm) |\n|---|---|---|")
    for n in names[1:]:
        print(f"| {n} | {summary[f'dice_{n}']:.3f} | {summary[f'hd95_mm_{n}']:.1f} |")
    print(f"| mean | {summary['dice_mean']:.3f} | |")
    print(f"per case: {out / 'per_case.csv'}; summary: {out / 'summary.json'}")
    return result




# -- predict ---------------------------------------------------------------------------------------

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


def label_map_on_native_grid(logits: torch.Tensor, activation: str, channels: tuple[int, ...],
                             values: tuple[int, ...], grid_affine: np.ndarray, native_affine: np.ndarray,
                             native_shape: tuple[int, int, int], preprocessing: object = None) -> np.ndarray:
    """Model-grid logits ``[C, X, Y, Z]`` -> uint8 label map ``[X', Y', Z']`` on the input image's grid.

    A ``preprocessing`` with its own inverse (``label_map_on_native_grid``: nnU-Net's export, which resamples logits
    and pastes the cropped box back) decides softmax labels itself; the rest of this docstring is the general path.

    Probabilities are resampled (bilinear) one channel at a time, so memory stays at a few native-size
    volumes whatever the number of classes, and the label is decided on the native grid:

    * ``"softmax"``: the channel of highest probability (background = channel 0 wins ties);
    * ``"sigmoid"`` (multi-label heads): each channel of ``channels`` is thresholded at 0.5, and a voxel
      above the threshold in several channels takes the one of highest probability; voxels above it in
      none are background (0).

    Args:
        channels: foreground channels of ``logits`` to consider; ``values``: label value written for each.
    """
    if activation not in ("softmax", "sigmoid"):
        raise ValueError(f"activation must be 'softmax' or 'sigmoid', got {activation!r}")
    if len(channels) != len(values):
        raise ValueError(f"channels and values must have the same length, got {len(channels)} and {len(values)}")
    if any(not 0 <= v <= 255 for v in values):
        raise ValueError(f"label values must fit uint8 (0..255), got {list(values)}")
    own = getattr(preprocessing, "label_map_on_native_grid", None) if activation == "softmax" else None
    label = own(logits, channels, values, grid_affine, native_affine, native_shape) if own else None
    if label is not None:
        return label
    logits = logits.float()
    same_grid = (tuple(logits.shape[1:]) == tuple(native_shape)
                 and np.allclose(grid_affine, native_affine, atol=1e-4, rtol=1e-5))

    def native(prob: torch.Tensor) -> torch.Tensor:
        if same_grid:
            return prob
        return resample_to_native(prob[None], grid_affine, native_affine, native_shape)[0]

    label = torch.zeros(tuple(native_shape), dtype=torch.uint8)
    if activation == "softmax":
        lse = torch.logsumexp(logits, 0)
        best = native(torch.exp(logits[0] - lse))  # background probability
        for c, v in zip(channels, values):
            p = native(torch.exp(logits[c] - lse))
            win = p > best
            best = torch.where(win, p, best)
            label[win] = v
    else:
        best = torch.full(tuple(native_shape), -1.0)
        for c, v in zip(channels, values):
            p = native(torch.sigmoid(logits[c]))
            win = (p >= SIGMOID_THRESHOLD) & (p > best)
            best = torch.where(win, p, best)
            label[win] = v
    return label.numpy()


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


def _write_label_map(path: Path, label: np.ndarray, image_path: Path) -> None:
    """Writes ``label`` with the input image's header (both affines, codes), as uint8 without scaling."""
    import nibabel as nib

    src = nib.load(str(image_path))
    cls = type(src) if isinstance(src, (nib.Nifti1Image, nib.Nifti2Image)) else nib.Nifti1Image
    if cls is type(src):
        hdr = src.header.copy()
        hdr.set_data_dtype(np.uint8)
        img = cls(label.astype(np.uint8), None, hdr)
        img.header["cal_min"], img.header["cal_max"] = 0, 0
        img.header.set_slope_inter(1.0, 0.0)
    else:
        img = nib.Nifti1Image(label.astype(np.uint8), src.affine)
    atomic_write(path, lambda p: nib.save(img, str(p)))


def _read_json(path: Path) -> object:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _up_to_date(out_path: Path, sidecar: Path, image_path: Path, settings: dict) -> bool:
    try:
        if out_path.stat().st_mtime_ns < image_path.stat().st_mtime_ns:
            return False
    except OSError:
        return False
    recorded = _read_json(sidecar)
    return isinstance(recorded, dict) and recorded.get("settings") == settings


def predict_model(model: str | Path, images: str | Path, out: str | Path, *, model_config: str | None = None,
                  class_map: str | None = None, tta: bool = False, overwrite: bool = False, device: str = "auto",
                  progress: bool = True, trust_model_code: bool = False,
                  largest_component: str | None = None, output_activation: str | None = None) -> dict:
    """Segments every image of a dataset folder and writes ``out/<case_id>.nii.gz`` on the image's own grid.

    Each label map has the input image's shape and affine (and header), so it overlays in any viewer.
    With an nnU-Net raw dataset (``dataset.json``) the values are the dataset's labels (model classes
    matched by name, overridable by ``class_map``); with a plain folder of NIfTI images they are the
    model's class indices. ``out/labels.json`` names the values either way. Softmax heads take the most
    probable class; sigmoid (multi-label) heads threshold each channel at 0.5 and give a voxel claimed
    by several channels to the most probable one (see `label_map_on_native_grid`).

    Idempotent: a case is skipped when its output is newer than the image and its sidecar
    (``out/<case_id>.asfda.json``) records the same model weights hash and settings (TTA, class map,
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

    ``out`` may not be, or lie inside, the images' dataset or the model (`refuse_output_inside_inputs`), and
    must be writable; both are checked before the model is loaded. ``out/labels.json`` is written once the
    first case is done (or at the end), so a run that fails before any case leaves nothing behind.

    Returns:
        ``{"out", "written", "skipped", "labels", "model_weights_sha256_16"}``.
    """
    from tqdm.auto import tqdm

    from asfda.engine import OUTPUT_EMBEDDING, InferenceEngine, select_device

    out = Path(out)
    refuse_output_inside_inputs(out, {"the images folder": dataset_folders(images),
                                      **_model_inputs(model, model_config)})
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
    unknown = sorted(n for n, v in classes.labels.items() if v and v not in classes.values)
    if unknown:
        log.warning("dataset classes %s are not model classes: they are never predicted", unknown)
    dev = select_device(device)
    network = network.to(dev).eval()
    engine = InferenceEngine(network, loaded.roi_size, sw_batch_size=loaded.sw_batch_size, overlap=loaded.overlap,
                             embedding_layer=OUTPUT_EMBEDDING, device=dev, mode=loaded.sw_mode,
                             tta_axes=loaded.tta_axes)
    weights = loaded.weights_hash
    settings = {"model_weights_sha256_16": weights, "activation": loaded.activation, "labels": classes.labels,
                "channels": list(classes.channels), "values": list(classes.values),
                "preprocessing": loaded.preprocessing.cache_key(), "roi_size": list(loaded.roi_size),
                "overlap": loaded.overlap, "tta": bool(tta), "tta_axes": list(engine.tta_axes) if tta else []}
    if loaded.probabilities:  # the same weights read as probabilities give other label maps
        settings["output_activation"] = "none"
    lcc_values = _largest_component_values(largest_component, classes.labels, Path(images))
    if lcc_values:
        settings["largest_component"] = list(lcc_values)

    def write_labels_json() -> None:
        if _read_json(out / LABELS_FILE) != classes.labels:
            atomic_write_json(out / LABELS_FILE, classes.labels)

    written, skipped = [], []
    for case in tqdm(list(ds.cases), desc="predict", unit="case", disable=not progress, dynamic_ncols=True):
        out_path = out / f"{case.case_id}.nii.gz"
        sidecar = out / f"{case.case_id}{SIDECAR_SUFFIX}"
        if not overwrite and _up_to_date(out_path, sidecar, case.image_path, settings):
            skipped.append(case.case_id)
            continue
        vol = prepare_case(case, loaded.preprocessing, with_label=False, cache_dir=None)
        logits, _ = engine.run(vol.image, tta=tta)
        label = label_map_on_native_grid(logits, loaded.activation, classes.channels, classes.values, vol.affine,
                                         vol.native_affine, vol.native_shape, loaded.preprocessing)
        del logits
        if lcc_values:
            label = largest_component_per_class(label, lcc_values)
        _write_label_map(out_path, label, case.image_path)
        atomic_write_json(sidecar, {"case_id": case.case_id, "image": str(case.image_path), "model": str(model),
                                    "n_passes": engine.n_passes if tta else 1, "settings": settings})
        if not written:
            write_labels_json()  # once a case is done: a run that fails before any leaves no debris
        written.append(case.case_id)
    write_labels_json()
    msg = f"predict: {len(written)} case{'' if len(written) == 1 else 's'} segmented"
    if skipped:
        msg += f", {len(skipped)} skipped (outputs already up to date for weights {weights} and these settings)"
    print(f"{msg}; label maps in {out} (values named in {out / LABELS_FILE})")
    return {"out": out, "written": written, "skipped": skipped, "labels": classes.labels,
            "model_weights_sha256_16": weights}
