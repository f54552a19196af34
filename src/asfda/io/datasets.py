"""Datasets users already have -> a list of `Case` records.

Two layouts are read:

* nnU-Net raw: ``dataset.json`` (``labels`` name -> int, ``channel_names``, ``file_ending``),
  ``imagesTr/CASE_0000.nii.gz``, ``labelsTr/CASE.nii.gz``, optional ``imagesTs/``.
* a plain folder of NIfTI images, with an optional label folder matched by case id
  (``CASE.nii.gz`` or ``CASE_0000.nii.gz`` both give case id ``CASE``).

Only headers are read here; voxels are read when a stage needs them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from asfda.errors import AsfdaError
from asfda.io.nifti import NIFTI_SUFFIXES, read_header, strip_nifti_suffix

__all__ = ["Case", "Dataset", "load_dataset", "load_folder", "load_nnunet_raw", "parse_labels"]


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


def load_dataset(path: str | Path, *, require_labels: bool = False, labels_dir: str | Path | None = None) -> Dataset:
    """Reads an nnU-Net raw dataset (if ``dataset.json`` or ``imagesTr`` is there) or a plain NIfTI folder."""
    path = Path(path)
    if not path.exists():
        raise AsfdaError("dataset folder not found", path, "check the path")
    if (path / "dataset.json").exists() or (path / "imagesTr").is_dir():
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
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise AsfdaError(f"invalid JSON ({exc})", meta_path, "fix the JSON syntax") from None
    if not isinstance(meta, dict):
        raise AsfdaError("dataset.json must hold a JSON object", meta_path)
    labels = parse_labels(meta.get("labels"), meta_path)
    channels = meta.get("channel_names", {"0": "image"})
    if not isinstance(channels, dict) or len(channels) != 1:
        raise AsfdaError(f"expected one input channel, found channel_names={channels!r}", meta_path,
                         "asfda adapts single-channel models; give one channel")
    ending = meta.get("file_ending", ".nii.gz")
    if ending not in NIFTI_SUFFIXES:
        raise AsfdaError(f"file_ending {ending!r} is not supported", meta_path, "convert the images to .nii.gz")
    images_dir = root / f"images{split}"
    labels_dir = root / f"labels{split}"
    if not images_dir.is_dir():
        raise AsfdaError(f"missing images{split}/ folder", images_dir, "put the images there as CASE_0000.nii.gz")
    cases = []
    for image_path in sorted(images_dir.iterdir()):
        name = image_path.name
        if name.startswith(".") or not name.endswith(ending):
            continue
        stem = name[: -len(ending)]
        if not stem.endswith("_0000"):
            raise AsfdaError("image file name lacks the _0000 channel suffix", image_path,
                             f"rename it to {stem}_0000{ending}")
        case_id = stem[: -len("_0000")]
        label_path = labels_dir / f"{case_id}{ending}"
        cases.append(_make_case(case_id, image_path, label_path if label_path.exists() else None, require_labels))
    if not cases:
        raise AsfdaError(f"no *_0000{ending} images found", images_dir, "check the dataset layout")
    return Dataset(root, labels, tuple(cases))


def load_folder(images_dir: str | Path, labels_dir: str | Path | None = None, *, require_labels: bool = False,
                labels: dict[str, int] | None = None) -> Dataset:
    """Reads a plain folder of NIfTI images, labels matched by case id from ``labels_dir``."""
    images_dir = Path(images_dir)
    labels_root = Path(labels_dir) if labels_dir is not None else None
    cases = []
    for image_path in sorted(images_dir.iterdir()):
        if image_path.name.startswith(".") or not image_path.name.endswith(NIFTI_SUFFIXES):
            continue
        stem = strip_nifti_suffix(image_path.name)
        case_id = stem[: -len("_0000")] if stem.endswith("_0000") else stem
        label_path = None
        if labels_root is not None:
            for suffix in NIFTI_SUFFIXES:
                candidate = labels_root / f"{case_id}{suffix}"
                if candidate.exists():
                    label_path = candidate
                    break
        cases.append(_make_case(case_id, image_path, label_path, require_labels))
    if not cases:
        raise AsfdaError("no .nii/.nii.gz images found", images_dir, "point at a folder of NIfTI images")
    if labels is None:
        labels = {"background": 0, "foreground": 1}
    return Dataset(images_dir, labels, tuple(cases))


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
