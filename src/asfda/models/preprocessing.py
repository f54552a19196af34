"""Preprocessing as the model declares it, applied identically to image and label, and its inverse.

A bundle's ``preprocessing`` Compose is built as data (`asfda.models.safe_config`); from it we keep the
orientation (``Orientationd``), the spacing (``Spacingd``) and every other transform as an
image-only intensity step. Loading is ours (validated, see `asfda.io.nifti`), and the label follows the
image through orientation and spacing with nearest-neighbour interpolation.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
from monai.data import MetaTensor
from monai.transforms import Orientation, Spacing, SpatialResample

from asfda.errors import AsfdaError, missing_package_error
from asfda.io.atomic import atomic_write
from asfda.io.datasets import Case
from asfda.io.dicom import volume_file_stamp
from asfda.io.nifti import (
    HELD_ITEMSIZE,
    MAX_NIFTI_BYTES_ENV,
    MIN_AXIS_VOXELS,
    max_nifti_bytes,
    read_nifti,
    refuse_constant_image,
    size_text,
)
from asfda.models.safe_config import DECLARED_ONLY

__all__ = ["Preprocessing", "PreparedVolume", "check_grids", "prepare_case", "resample_to_native"]

_SKIPPED = DECLARED_ONLY  # read and recorded, not run: loading and typing are asfda's own


@dataclass
class Preprocessing:
    """What a model expects of its input grid and intensities.

    Attributes:
        axcodes: orientation code such as ``"RAS"``, or None to keep the file's.
        pixdim_mm: target voxel spacing, or None to keep the file's.
        intensity: image-only transforms, called on ``{image_key: tensor[1, X, Y, Z]}``.
        image_key: the key the intensity transforms read.
        description: a JSON-able summary, used for cache keys and run records.
    """

    axcodes: str | None = "RAS"
    pixdim_mm: tuple[float, ...] | None = None  # MONAI's Spacing also takes one number for all sides
    intensity: list[Callable] = field(default_factory=list)
    image_key: str = "image"
    description: dict = field(default_factory=dict)

    @classmethod
    def from_steps(cls, steps: list, image_key: str = "image", raw_config: object = None) -> Preprocessing:
        """Reads the declared steps (`asfda.models.safe_config.DeclaredTransform`) of a bundle's preprocessing."""
        axcodes, pixdim, intensity, names = None, None, [], []
        for step in steps:
            name, t = step.name, step.transform
            names.append(name)
            if name in _SKIPPED or t is None:
                continue
            if name in ("Orientationd", "Orientation"):
                ornt = t.ornt_transform if hasattr(t, "ornt_transform") else t
                axcodes = ornt.axcodes
            elif name in ("Spacingd", "Spacing"):
                sp = t.spacing_transform if hasattr(t, "spacing_transform") else t
                pixdim = tuple(float(p) for p in np.atleast_1d(sp.pixdim))
            else:
                intensity.append(t)
        desc = {"axcodes": axcodes, "pixdim_mm": pixdim, "transforms": names, "config": raw_config}
        return cls(axcodes, pixdim, intensity, image_key, desc)

    def model_grid_shape(self, shape: tuple[int, ...], affine: np.ndarray) -> tuple[int, ...]:
        """The shape an image of ``shape`` and ``affine`` takes on the model's grid, computed by the very orientation
        and spacing transforms `__call__` runs, in MONAI's lazy mode on a tensor of one stored value: no voxel
        is allocated, so a grid of terabytes is only a number."""
        x: torch.Tensor = MetaTensor(torch.zeros(1, 1, 1, 1).expand(1, *shape), affine=torch.as_tensor(affine))
        if self.axcodes:
            x = Orientation(axcodes=self.axcodes, labels=None, lazy=True)(x)
        if self.pixdim_mm:
            x = Spacing(pixdim=self.pixdim_mm, mode="bilinear", lazy=True)(x)
        return tuple(int(n) for n in cast(MetaTensor, x).peek_pending_shape())

    def check_grid(self, shape: tuple[int, ...], affine: np.ndarray, path: str | Path | None = None) -> None:
        """Refuses an image whose model grid (`model_grid_shape`) is larger than asfda holds for one volume
        (`asfda.io.nifti.max_nifti_bytes` as float32: a spacing of metres in the header, or a model spacing of
        micrometres) or thinner than `asfda.io.nifti.MIN_AXIS_VOXELS` along an axis; before any voxel is read."""
        try:
            grid = self.model_grid_shape(shape, affine)
        except (ValueError, RuntimeError, np.linalg.LinAlgError) as exc:
            raise AsfdaError(f"its grid cannot be put on the model's ({exc.__class__.__name__}: "
                             f"{' '.join(str(exc).split())[:120]})", path,
                             "check the image's affine and the model's Orientationd / Spacingd") from None
        spacing = "x".join(f"{v:g}" for v in np.linalg.norm(np.asarray(affine, dtype=np.float64)[:3, :3], axis=0))
        target = f"the model's grid ({self._grid_text()})"
        what = (f"its {'x'.join(map(str, shape))} voxels of {spacing} mm are {'x'.join(map(str, grid))} voxels on "
                f"{target}")
        held = int(np.prod(grid, dtype=object)) * HELD_ITEMSIZE
        cap = max_nifti_bytes()
        if held > cap:
            raise AsfdaError(f"{what}: {size_text(held)} as float32, more than asfda holds for one volume "
                             f"({size_text(cap)})", path,
                             "check the voxel spacing in the image's header and the model's Spacingd pixdim; if both "
                             f"are genuine, crop the image or raise the cap with {MAX_NIFTI_BYTES_ENV}=BYTES")
        if min(grid) < MIN_AXIS_VOXELS:
            raise AsfdaError(f"{what}: fewer than {MIN_AXIS_VOXELS} along an axis, too thin to segment", path,
                             "check the voxel spacing in the image's header; a volume this small (or thin) cannot be "
                             "segmented by this model: move it out of the dataset")

    def _grid_text(self) -> str:
        pixdim = "x".join(f"{v:g}" for v in self.pixdim_mm) + " mm" if self.pixdim_mm else "the image's spacing"
        return f"{pixdim}, {self.axcodes}" if self.axcodes else pixdim

    def cache_key(self) -> str:
        return hashlib.sha256(json.dumps(self.description, sort_keys=True, default=str).encode()).hexdigest()[:16]

    def __call__(self, image: np.ndarray, affine: np.ndarray, label: np.ndarray | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor | None, np.ndarray]:
        """Image ``[X, Y, Z]`` (+ label) on the native grid -> model grid tensors and the model-grid affine."""
        img: torch.Tensor = MetaTensor(torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32))[None],
                         affine=torch.as_tensor(affine))
        lab: torch.Tensor | None = None
        if label is not None:
            lab = MetaTensor(torch.from_numpy(np.ascontiguousarray(label, dtype=np.float32))[None],
                             affine=torch.as_tensor(affine))
        if self.axcodes:
            orient = Orientation(axcodes=self.axcodes, labels=None)  # RAS space of the MetaTensor
            img = orient(img)
            lab = orient(lab) if lab is not None else None
        if self.pixdim_mm:
            img = Spacing(pixdim=self.pixdim_mm, mode="bilinear")(img)
            lab = Spacing(pixdim=self.pixdim_mm, mode="nearest")(lab) if lab is not None else None
        # still a MetaTensor: MONAI annotates its transforms' outputs as plain tensors
        grid_affine = np.asarray(cast(MetaTensor, img).affine, dtype=np.float64)
        data = {self.image_key: img}
        for t in self.intensity:
            try:
                data = t(data)
            except Exception as exc:
                missing = missing_package_error(exc, f"the model's preprocessing step {type(t).__name__}")
                if missing is not None:
                    raise missing from None
                raise AsfdaError(f"the model's preprocessing step {type(t).__name__} failed on this image "
                                 f"({exc.__class__.__name__}: {' '.join(str(exc).split())[:160]})",
                                 fix=f"check the step's arguments in the bundle's preprocessing (its keys must name "
                                     f"the image key {self.image_key!r})") from exc
            if tuple(data[self.image_key].shape) != tuple(img.shape):
                raise AsfdaError(f"the model's preprocessing step {type(t).__name__} changes the image grid "
                                 f"{tuple(img.shape)} -> {tuple(data[self.image_key].shape)}; asfda applies only "
                                 "orientation and spacing to images and labels alike",
                                 fix="remove cropping/resizing/padding steps from the bundle's preprocessing")
        out = data[self.image_key]
        out_t = out.as_tensor() if isinstance(out, MetaTensor) else torch.as_tensor(out)
        if not torch.isfinite(out_t).all():  # an intensity step overflowed on extreme values (|x| ~ 1e19 ...)
            raise AsfdaError(f"the model's preprocessing gives non-finite values on this image (its intensities "
                             f"span {float(image.min()):.3g} .. {float(image.max()):.3g})",
                             fix="check the image's intensities (a wrong scale factor, scl_slope, in its header?)")
        lab_t = None
        if lab is not None:
            lab_t = cast(MetaTensor, lab).as_tensor()[0].round().to(torch.uint8)  # a MetaTensor, as img
        return out_t.float().contiguous(), lab_t, grid_affine


@dataclass
class PreparedVolume:
    """One case on the model's grid: image ``[1, X, Y, Z]`` float32, label ``[X, Y, Z]`` uint8 or None."""

    case_id: str
    image: torch.Tensor
    label: torch.Tensor | None
    affine: np.ndarray
    native_affine: np.ndarray
    native_shape: tuple[int, int, int]


def prepare_case(case: Case, prep: Preprocessing, *, with_label: bool = True, cache_dir: str | Path | None = None,
                 n_labels: int | None = None) -> PreparedVolume:
    """Reads and preprocesses one case, through an on-disk cache keyed by file stamps and preprocessing."""
    with_label = with_label and case.label_path is not None
    cache_path = None
    if cache_dir is not None:
        cache_path = Path(cache_dir) / "prepared" / prep.cache_key() / f"{case.case_id}-{_stamp(case, with_label)}.npz"
        if cache_path.exists():
            try:
                with np.load(cache_path) as z:
                    cached_label = torch.from_numpy(z["label"]) if "label" in z else None
                    native_shape = cast(tuple[int, int, int], tuple(int(s) for s in z["native_shape"]))  # 3 saved
                    return PreparedVolume(case.case_id, torch.from_numpy(z["image"]), cached_label, z["affine"],
                                          z["native_affine"], native_shape)
            except Exception:  # a damaged cache entry is recomputed
                cache_path.unlink(missing_ok=True)
    prep.check_grid(case.shape, case.affine, case.image_path)  # before any voxel is read
    image, affine = read_nifti(case.image_path)
    refuse_constant_image(image, case.image_path)
    label = None
    if with_label:
        assert case.label_path is not None  # with_label is False for a case without one
        label_arr, _ = read_nifti(case.label_path, dtype=np.float32)
        _check_label_values(label_arr, case.label_path, n_labels)
        label = label_arr
    try:
        img_t, lab_t, grid_affine = prep(image, affine, label)
    except AsfdaError as exc:
        if exc.path is None:  # name the image the model's preprocessing failed on
            raise AsfdaError(exc.problem, case.image_path, exc.fix) from exc.__cause__
        raise
    vol = PreparedVolume(case.case_id, img_t, lab_t, grid_affine, affine, tuple(image.shape))
    if cache_path is not None:
        # Any: np.savez's stub checks **kwds against its allow_pickle: bool
        arrays: dict[str, Any] = {"image": vol.image.numpy(), "affine": vol.affine,
                                  "native_affine": vol.native_affine, "native_shape": np.asarray(vol.native_shape)}
        if vol.label is not None:
            arrays["label"] = vol.label.numpy()

        def write(p: Path) -> None:
            with open(p, "wb") as fh:  # closed (and flushed) before atomic_write's fsync and rename
                np.savez(fh, **arrays)

        atomic_write(cache_path, write)
    return vol


def check_grids(cases: Iterable[Case], prep: Preprocessing) -> None:
    """`Preprocessing.check_grid` of every case from its header (a few milliseconds each): a command that streams a
    pool refuses a volume it could not hold before it has spent time on the others."""
    for case in cases:
        prep.check_grid(case.shape, case.affine, case.image_path)


def _check_label_values(label: np.ndarray, path: Path | None, n_labels: int | None) -> None:
    if not np.all(label == np.round(label)):
        raise AsfdaError("label has non-integer values", path, "save labels as integers")
    if n_labels is not None:
        bad = np.setdiff1d(np.unique(label).astype(np.int64), np.arange(n_labels))
        if bad.size:
            raise AsfdaError(f"label values {bad.tolist()} are not in dataset.json (0..{n_labels - 1})", path,
                             "fix the label or dataset.json's 'labels'")


def _stamp(case: Case, with_label: bool) -> str:
    parts = [volume_file_stamp(p) for p in (case.image_path, case.label_path if with_label else None) if p is not None]
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:12]


def resample_to_native(volume: torch.Tensor, grid_affine: np.ndarray, native_affine: np.ndarray,
                       native_shape: tuple[int, int, int], mode: str = "bilinear") -> torch.Tensor:
    """Puts a model-grid tensor ``[C, X, Y, Z]`` back on the input image grid (the inverse of orientation +
    spacing in one resampling). Use ``mode="bilinear"`` for probabilities/logits, ``"nearest"`` for labels."""
    src = MetaTensor(volume.float(), affine=torch.as_tensor(grid_affine))
    out = SpatialResample(mode=mode, padding_mode="border")(src, dst_affine=torch.as_tensor(native_affine),
                                                           spatial_size=tuple(native_shape))
    return out.as_tensor() if isinstance(out, MetaTensor) else out
