"""Datasets users already have -> a list of `Case` records.

Two layouts are read:

* nnU-Net raw: ``dataset.json`` (``labels`` name -> int, ``channel_names``, ``file_ending``),
  ``imagesTr/CASE_0000.nii.gz``, ``labelsTr/CASE.nii.gz``, optional ``imagesTs/``.
* a plain folder of NIfTI images, with an optional label folder matched by case id
  (``CASE.nii.gz`` or ``CASE_0000.nii.gz`` both give case id ``CASE``).
* a folder of DICOM series, when it holds no NIfTI image: one series a folder at any depth under it
  (`asfda.io.dicom`), case id = the series folder's path under the pool with ``_`` between its parts
  (``PAT1/CT`` -> ``PAT1_CT``); labels are NIfTI files on the series' grid, matched by case id as above.

Only headers are read here; voxels are read when a stage needs them.

An nnU-Net raw dataset must hold its files: a link in ``imagesTr``/``labelsTr`` (or the folder itself a link) that
points outside the dataset folder is refused, unless ``dataset.json`` names the folder the links point into as
``asfda_linked_from`` (a path, or a list of paths), as the fold datasets of ``benchmarks/cv.py`` do. Paths and case
ids that ``dataset.json`` lists (``training``, ``test``, nnU-Net v2's ``dataset``) may be neither absolute nor climb
out with ``..``: asfda reads ``imagesTr``/``labelsTr`` itself, and refuses a file list naming files elsewhere rather
than silently reading others. A plain NIfTI folder may hold links (a project's ``annotate/roundR/images/`` does).
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from asfda.errors import AsfdaError
from asfda.io.dicom import find_series, series_case_id
from asfda.io.nifti import NIFTI_SUFFIXES, read_header, strip_nifti_suffix

__all__ = ["LINKED_FROM_KEY", "Case", "Dataset", "check_nnunet_links", "check_nnunet_meta", "is_nnunet_dataset",
           "load_dataset", "load_folder", "load_nnunet_raw", "model_labels", "parse_labels", "read_dataset_json",
           "resolve_link"]


@dataclass(frozen=True)
class Case:
    """One volume of a dataset: where its files are and its native geometry."""

    case_id: str
    image_path: Path
    label_path: Path | None
    shape: tuple[int, int, int]
    spacing_mm: tuple[float, float, float]
    affine: np.ndarray = field(repr=False, compare=False)

    @property
    def has_label(self) -> bool:
        return self.label_path is not None


@dataclass(frozen=True)
class Dataset:
    """A set of cases and the label names they use (``background`` is 0)."""

    root: Path
    labels: dict[str, int]
    cases: tuple[Case, ...]

    @property
    def class_names(self) -> list[str]:
        return [name for name, _ in sorted(self.labels.items(), key=lambda kv: kv[1])]

    def by_id(self) -> dict[str, Case]:
        return {c.case_id: c for c in self.cases}

    def subset(self, ids: list[str] | tuple[str, ...]) -> Dataset:
        lookup = self.by_id()
        return Dataset(self.root, self.labels, tuple(lookup[i] for i in ids))

    def with_labels(self, labels: dict[str, int]) -> Dataset:
        """The same cases with other label names (a plain folder, which names none, takes a model's)."""
        return Dataset(self.root, dict(labels), self.cases)


def is_nnunet_dataset(path: str | Path) -> bool:
    """Whether ``path`` is read as an nnU-Net raw dataset (it has ``dataset.json`` or ``imagesTr/``) rather than as a
    plain folder of NIfTI images, which names no labels."""
    path = Path(path)
    return (path / "dataset.json").exists() or (path / "imagesTr").is_dir()


def model_labels(class_names: list[str]) -> dict[str, int]:
    """Label names -> values for a plain folder scored with a model: the model's classes in its single-label view
    (`asfda.models.LoadedModel.label_names`), value = channel, value 0 named ``background`` whatever the model
    calls it."""
    labels: dict[str, int] = {"background": 0}
    for i, name in enumerate(class_names[1:], 1):
        if name in labels:
            raise AsfdaError(f"the model names two output classes {name!r}, so a plain folder cannot take its classes",
                             fix="give the model distinct class names (channel_def), or use an nnU-Net raw dataset "
                                 "with dataset.json")
        labels[str(name)] = i
    return labels


def load_dataset(path: str | Path, *, require_labels: bool = False, labels_dir: str | Path | None = None) -> Dataset:
    """Reads an nnU-Net raw dataset (if ``dataset.json`` or ``imagesTr`` is there) or a plain folder of NIfTI images
    or DICOM series."""
    path = Path(path)
    if not path.exists():
        raise AsfdaError("dataset folder not found", path, "check the path")
    if not path.is_dir():
        raise AsfdaError("the dataset is a file, not a folder", path,
                         "pass the dataset folder (nnU-Net raw, with dataset.json, or a folder of NIfTI images)")
    if is_nnunet_dataset(path):
        return load_nnunet_raw(path, require_labels=require_labels)
    return load_folder(path, labels_dir, require_labels=require_labels)


def parse_labels(raw: object, source: Path) -> dict[str, int]:
    """Validates a ``labels`` mapping name -> int with unique values and background 0."""
    if not isinstance(raw, dict) or not raw:
        raise AsfdaError("'labels' must be a non-empty mapping of name -> integer", source,
                         'write e.g. "labels": {"background": 0, "liver": 1}')
    labels: dict[str, int] = {}
    for name, value in raw.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise AsfdaError(f"label {name!r} has value {value!r}; nnU-Net region labels (lists) and "
                             "non-integers are not supported", source, "map each label name to one integer >= 0")
        labels[str(name)] = value
    values = list(labels.values())
    if len(set(values)) != len(values):
        dup = sorted({v for v in values if values.count(v) > 1})
        raise AsfdaError(f"label values {dup} are used by more than one name", source, "give each name its own value")
    if 0 not in values:
        raise AsfdaError("no label has value 0 (background)", source, 'add "background": 0')
    if sorted(values) != list(range(len(values))):
        raise AsfdaError(f"label values {sorted(values)} are not consecutive from 0", source,
                         "renumber the labels 0..N-1")
    return labels


def load_nnunet_raw(root: str | Path, *, require_labels: bool = False, split: str = "Tr") -> Dataset:
    """Reads ``imagesTr`` (or ``imagesTs`` with ``split="Ts"``) of an nnU-Net raw dataset."""
    root = Path(root)
    meta_path = root / "dataset.json"
    if not meta_path.is_file():
        raise AsfdaError("missing dataset.json (nnU-Net raw layout)", meta_path,
                         "add a dataset.json with 'labels', 'channel_names' and 'file_ending'")
    meta = read_dataset_json(meta_path)
    labels = parse_labels(meta.get("labels"), meta_path)
    channels = meta.get("channel_names", {"0": "image"})
    if not isinstance(channels, dict) or len(channels) != 1:
        raise AsfdaError(f"expected one input channel, found channel_names={channels!r}", meta_path,
                         "asfda adapts single-channel models; give one channel")
    ending = meta.get("file_ending", ".nii.gz")
    if not isinstance(ending, str) or ending not in NIFTI_SUFFIXES:
        raise AsfdaError(f"file_ending {ending!r} is not supported", meta_path, "convert the images to .nii.gz")
    linked_from = check_nnunet_meta(meta, root, meta_path)
    images_dir = root / f"images{split}"
    labels_dir = root / f"labels{split}"
    if not images_dir.is_dir():
        raise AsfdaError(f"missing images{split}/ folder", images_dir, "put the images there as CASE_0000.nii.gz")
    for folder in (images_dir, labels_dir):
        if folder.is_dir():
            _check_link(folder, root, linked_from, meta_path)
    cases = []
    for image_path in sorted(images_dir.iterdir()):
        name = image_path.name
        if name.startswith(".") or not name.endswith(ending):
            continue
        _check_link(image_path, root, linked_from, meta_path)
        stem = name[: -len(ending)]
        if not stem.endswith("_0000"):
            if re.fullmatch(r".+_\d{4}", stem):  # CASE_0001: a second input channel
                raise AsfdaError(f"is input channel {stem[-4:]} of case {stem[:-5]!r}; asfda adapts single-channel "
                                 "models and reads channel 0000 only", image_path,
                                 "move the other channels' files out of the dataset")
            raise AsfdaError("image file name lacks the _0000 channel suffix", image_path,
                             f"rename it to {stem}_0000{ending}")
        case_id = stem[: -len("_0000")]
        label_path = labels_dir / f"{case_id}{ending}"
        if os.path.lexists(label_path):
            _check_link(label_path, root, linked_from, meta_path)
        cases.append(_make_case(case_id, image_path, label_path if label_path.exists() else None, require_labels))
    if not cases:
        raise AsfdaError(f"no *_0000{ending} images found", images_dir, "check the dataset layout")
    return Dataset(root, labels, tuple(cases))


LINKED_FROM_KEY = "asfda_linked_from"
"""dataset.json key naming the folder(s) outside the dataset that its links may point into."""


def read_dataset_json(meta_path: Path) -> dict:
    """The JSON object of a ``dataset.json``; an `AsfdaError` naming it when it is not UTF-8 JSON holding an object."""
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except ValueError as exc:  # syntax, not UTF-8, a number past Python's 4300 digits
        raise AsfdaError(f"invalid JSON ({' '.join(str(exc).split())[:200]})", meta_path, "fix the JSON syntax") \
            from None
    except RecursionError:
        raise AsfdaError("invalid JSON (nested too deeply)", meta_path, "fix the JSON syntax") from None
    if not isinstance(meta, dict):
        raise AsfdaError(f"dataset.json must hold a JSON object, not a JSON {type(meta).__name__}", meta_path,
                         'write e.g. {"labels": {"background": 0, "liver": 1}, "channel_names": {"0": "MR"}, '
                         '"file_ending": ".nii.gz"}')
    return meta


def check_nnunet_meta(meta: dict, root: Path, meta_path: Path) -> list[Path]:
    """The checks of an nnU-Net raw ``dataset.json`` beyond its labels: listed paths and case ids stay inside the
    dataset; returns the folders its links may point into (``asfda_linked_from``)."""
    _check_listed_paths(meta, meta_path)
    return _linked_from(meta, meta_path)


def check_nnunet_links(folder: Path, root: Path, linked_from: list[Path], meta_path: Path) -> None:
    """Refuses ``folder`` (``imagesTr`` ...) of the dataset ``root``, or any entry of it, that is a link to outside
    the dataset and the declared ``linked_from`` folders (see the module docstring)."""
    _check_link(folder, root, linked_from, meta_path)
    for entry in folder.iterdir():
        if not entry.name.startswith("."):
            _check_link(entry, root, linked_from, meta_path)


def _inside(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


def _linked_from(meta: dict, meta_path: Path) -> list[Path]:
    raw = meta.get(LINKED_FROM_KEY)
    if raw is None:
        return []
    items = raw if isinstance(raw, list) else [raw]
    if not items or not all(isinstance(i, str) and i.strip() for i in items):
        raise AsfdaError(f"{LINKED_FROM_KEY} must be a folder path or a list of folder paths, got {raw!r}", meta_path,
                         f'write e.g. "{LINKED_FROM_KEY}": "/data/original_dataset", or remove the key')
    try:
        return [(meta_path.parent / i).resolve() for i in items]
    except (OSError, ValueError) as exc:  # a NUL byte, a name too long ...
        raise AsfdaError(f"{LINKED_FROM_KEY} {raw!r} is not a usable folder path ({exc})", meta_path,
                         "give the folder the links point into, or remove the key") from None


def _check_link(path: Path, root: Path, linked_from: list[Path], meta_path: Path) -> None:
    """Refuses ``path`` when it is a link (or lies in a linked folder) resolving outside the dataset ``root`` and
    outside every folder ``dataset.json`` declares in ``asfda_linked_from``, or a link to nothing."""
    if not path.is_symlink():
        return  # not a link itself; its folder was checked on its own
    target = resolve_link(path)
    if not target.exists():
        raise AsfdaError(f"is a link to {target}, which does not exist", path, "fix or remove the link")
    allowed = [root.resolve(), *linked_from]
    if any(_inside(target, a) for a in allowed):
        return
    raise AsfdaError(f"is a link to {target}, outside the dataset folder {root.resolve()}", path,
                     "copy the file into the dataset, or (a dataset made of links) name the folder they point into "
                     f'in dataset.json as "{LINKED_FROM_KEY}"')


def resolve_link(path: Path) -> Path:
    """Where a link finally points; an `AsfdaError` naming it for a loop of links."""
    try:
        return path.resolve()
    except (RuntimeError, OSError) as exc:  # Python 3.11 raises RuntimeError on a loop, later versions OSError
        raise AsfdaError(f"is a link that cannot be followed ({exc})", path, "fix or remove the link") from None


def _unsafe_relative(text: str) -> bool:
    """Whether a path or case id from dataset.json is absolute or climbs out with ``..``."""
    norm = text.replace("\\", "/")
    return norm.startswith("/") or (len(norm) > 1 and norm[1] == ":") or ".." in norm.split("/")


def _check_listed_paths(meta: dict, meta_path: Path) -> None:
    """Refuses file names and case ids listed in dataset.json (``training``, ``test``, v2 ``dataset``) that are
    absolute or climb out of the dataset folder. Entries of other shapes are left alone: asfda does not read them."""
    listed: list[tuple[str, object]] = []  # (where, text); entries that are not strings are left alone
    training = meta.get("training")
    if isinstance(training, list):
        for i, item in enumerate(training):
            if isinstance(item, dict):
                listed += [(f"training[{i}].{k}", v) for k, v in item.items() if k in ("image", "label")]
            else:
                listed.append((f"training[{i}]", item))
    test = meta.get("test")
    if isinstance(test, list):
        listed += [(f"test[{i}]", v) for i, v in enumerate(test)]
    dataset = meta.get("dataset")
    if isinstance(dataset, dict):
        for cid, item in dataset.items():
            listed.append((f"dataset case id {cid!r}", cid))
            if isinstance(item, dict):
                images = item.get("images")
                for j, v in enumerate(images if isinstance(images, list) else [images]):
                    listed.append((f"dataset[{cid!r}].images[{j}]", v))
                listed.append((f"dataset[{cid!r}].label", item.get("label")))
    for where, text in listed:
        if isinstance(text, str) and _unsafe_relative(text):
            raise AsfdaError(f"{where} is {text!r}, a path outside the dataset folder", meta_path,
                             "list paths relative to the dataset folder, without '..', or remove the list (asfda "
                             "reads imagesTr/ and labelsTr/)")


def load_folder(images_dir: str | Path, labels_dir: str | Path | None = None, *, require_labels: bool = False,
                labels: dict[str, int] | None = None) -> Dataset:
    """Reads a plain folder of NIfTI images (or, holding none, of DICOM series folders), labels matched by case id
    from ``labels_dir``."""
    images_dir = Path(images_dir)
    labels_root = Path(labels_dir) if labels_dir is not None else None
    seen: dict[str, Path] = {}
    images = []
    for image_path in sorted(images_dir.iterdir()):
        if image_path.name.startswith(".") or not image_path.name.endswith(NIFTI_SUFFIXES):
            continue
        stem = strip_nifti_suffix(image_path.name)
        images.append((stem[: -len("_0000")] if stem.endswith("_0000") else stem, image_path))
    if not images:  # no NIfTI image: DICOM series folders, at any depth
        images = sorted((series_case_id(images_dir, f), f) for f in find_series(images_dir))
    cases = []
    for case_id, image_path in images:
        _refuse_second_file(seen, case_id, image_path, "image")
        label_path = None
        if labels_root is not None:
            found = [labels_root / f"{case_id}{suffix}" for suffix in NIFTI_SUFFIXES
                     if (labels_root / f"{case_id}{suffix}").exists()]
            if len(found) > 1:
                _refuse_second_file({case_id: found[0]}, case_id, found[1], "label")
            label_path = found[0] if found else None
        cases.append(_make_case(case_id, image_path, label_path, require_labels))
    if not cases:
        raise AsfdaError("no .nii/.nii.gz images (nor DICOM series folders) found", images_dir,
                         "point at a folder of NIfTI images, or of DICOM series (one series a folder)")
    if labels is None:
        labels = {"background": 0, "foreground": 1}
    return Dataset(images_dir, labels, tuple(cases))


def _refuse_second_file(seen: dict[str, Path], case_id: str, path: Path, what: str) -> None:
    """Refuses a second file of one case (``CASE.nii`` beside ``CASE.nii.gz``, or ``CASE.nii.gz`` beside
    ``CASE_0000.nii.gz``): which of the two is the case would be a guess. ``seen``: case id -> its first file."""
    first = seen.setdefault(case_id, path)
    if first != path:
        raise AsfdaError(f"two {what} files give case id {case_id!r}: {first.name} and {path.name}", path,
                         "keep one of them (move the other out of the folder)")


def _make_case(case_id: str, image_path: Path, label_path: Path | None, require_label: bool) -> Case:
    if ".." in Path(case_id).parts or "/" in case_id:
        raise AsfdaError("case id escapes the dataset folder", image_path, "rename the file")
    if require_label and label_path is None:
        raise AsfdaError("image has no label, and labels are required here", image_path,
                         f"add labelsTr/{case_id}.nii.gz or leave the case out")
    shape, affine = read_header(image_path)
    if label_path is not None:
        lshape, laffine = read_header(label_path)
        if lshape != shape:
            raise AsfdaError(f"label shape {lshape} differs from image shape {shape}", label_path,
                             "export the label on the image's grid")
        if not np.allclose(laffine, affine, atol=1e-3, rtol=1e-4):
            raise AsfdaError("label affine differs from the image affine", label_path,
                             "export the label on the image's grid")
    spacing = tuple(float(s) for s in np.sqrt((affine[:3, :3] ** 2).sum(axis=0)))
    return Case(case_id, image_path, label_path, shape, spacing, affine)  # type: ignore[arg-type]
