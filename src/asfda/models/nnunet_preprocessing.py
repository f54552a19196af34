"""nnU-Net v2's preprocessing as an asfda `Preprocessing`, and the model-grid affine that inverts it.

nnU-Net's ``DefaultPreprocessor`` (nnunetv2 2.x) does, per case: read the image (SimpleITK's voxel order, i.e. the
NIfTI axes reversed), transpose it as the plans say (``transpose_forward``), crop it to the bounding box of its
non-zero voxels (holes filled), normalise each channel with the configuration's scheme (``ZScoreNormalization``,
``CTNormalization`` with the plans' foreground intensity properties, ``NoNormalization``,
``RescaleTo01Normalization``), then resample it to the configuration's spacing (``resample_data_or_seg_to_shape``:
cubic spline, or cubic in-plane and nearest across slices for anisotropic spacing). This module does the same with
numpy and scipy (no nnunetv2 import), on the array asfda reads, so the network sees what nnU-Net would feed it.

The inverse is nnU-Net's export too (`NnUNetPreprocessing.label_map_on_native_grid`, which
`asfda.predict.label_map_on_native_grid` calls for softmax labels): the logits resampled to the cropped box's shape
(linear; nearest across the slices of anisotropic data), the argmax, pasted into background, the axes put back. The
model grid's affine is exact (transpose, crop offset and nnU-Net's voxel-centre-aligned resizing,
``(i + 0.5) * old / new - 0.5``), so the box and the axis order are read off it, and every other use of the affine
(asfda's generic `resample_to_native`) stays correct.

Deviations: intensities are normalised inside the non-zero mask of the image alone (nnU-Net's training-time
preprocessing also counts labelled voxels outside that mask, which only exist where the image is exactly 0); the
spacing is the affine's column norms (SimpleITK reads the header's pixdim: the same for consistent headers).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from scipy import ndimage

from asfda.errors import AsfdaError
from asfda.models.preprocessing import Preprocessing

__all__ = ["ANISO_THRESHOLD", "NnUNetPreprocessing", "compute_new_shape", "resample_data_or_seg"]

ANISO_THRESHOLD = 3.0  # nnunetv2.configuration.ANISO_THRESHOLD
NORMALIZATIONS = ("ZScoreNormalization", "CTNormalization", "NoNormalization", "RescaleTo01Normalization")
RESAMPLING_FNS = ("resample_data_or_seg_to_shape", "resample_data_or_seg_to_spacing")
READERS = ("SimpleITKIO", "NibabelIO", "NibabelIOWithReorient")


def compute_new_shape(old_shape, old_spacing, new_spacing) -> np.ndarray:
    """nnU-Net's ``compute_new_shape``."""
    return np.array([int(round(i / j * k)) for i, j, k in zip(old_spacing, new_spacing, old_shape)])


def _resize(image: np.ndarray, new_shape, order: int) -> np.ndarray:
    """``skimage.transform.resize(image, new_shape, order, mode="edge", anti_aliasing=False)`` (clip=True) on a
    float64 array: scipy's zoom on the voxel-centre grid, clipped to the input's range."""
    factors = np.divide(image.shape, new_shape)
    out = ndimage.zoom(image, [1 / f for f in factors], order=order, mode="nearest", grid_mode=True)
    if order > 0:
        np.clip(out, image.min(), image.max(), out=out)
    return out


def _resize_segmentation(seg: np.ndarray, new_shape, order: int) -> np.ndarray:
    """batchgenerators' (0.25.5) ``resize_segmentation``: each label's indicator resized, the per-voxel argmax
    wins, and an exact tie goes to the nearest-neighbour label when it is among the tied ones."""
    nearest = _resize(seg.astype(float), new_shape, 0)
    labels = np.unique(seg)
    if order == 0 or len(labels) == 1:
        return nearest.astype(seg.dtype)
    win = np.zeros(nearest.shape, dtype=np.int64)
    best = nn_top = None
    for i, c in enumerate(labels):
        score = _resize((seg == c).astype(float), new_shape, order)
        is_nn = nearest == c
        if best is None:
            best, nn_top = score, is_nn & (score > 0)
            continue
        nn_top |= (score == best) & (score > 0) & is_nn
        better = score > best
        nn_top = np.where(better, is_nn, nn_top)
        win[better] = i
        np.maximum(best, score, out=best)
    out = labels[win]
    out[nn_top] = nearest[nn_top].astype(seg.dtype)
    return out.astype(seg.dtype)


def _separate_z(force_separate_z, current_spacing, new_spacing) -> tuple[bool, int | None]:
    """nnU-Net's ``determine_do_sep_z_and_axis``."""
    def lowres_axis(spacing):
        sp = np.asarray(spacing, float)
        return np.where(max(sp) / sp == 1)[0]

    def aniso(spacing):
        return (np.max(spacing) / np.min(spacing)) > ANISO_THRESHOLD

    if force_separate_z is not None:
        do, axis = bool(force_separate_z), (lowres_axis(current_spacing) if force_separate_z else None)
    elif aniso(current_spacing):
        do, axis = True, lowres_axis(current_spacing)
    elif aniso(new_spacing):
        do, axis = True, lowres_axis(new_spacing)
    else:
        do, axis = False, None
    if axis is not None:
        if len(axis) != 1:
            return False, None
        axis = int(axis[0])
    return do, axis


def resample_data_or_seg(data: np.ndarray, new_shape, current_spacing, new_spacing, *, is_seg: bool = False,
                         order: int = 3, order_z: int = 0, force_separate_z: bool | None = False) -> np.ndarray:
    """nnU-Net's ``resample_data_or_seg_to_shape`` on ``data [C, X, Y, Z]`` (same output dtype)."""
    do_separate_z, axis = _separate_z(force_separate_z, current_spacing, new_spacing)
    shape = np.array(data.shape[1:])
    new_shape = np.array([int(s) for s in new_shape])
    if np.all(shape == new_shape):
        return data
    resize = _resize_segmentation if is_seg else _resize
    out = np.zeros((data.shape[0], *new_shape), dtype=data.dtype)
    src = data if is_seg else data.astype(float)
    for c in range(data.shape[0]):
        if not do_separate_z:
            out[c] = resize(src[c], new_shape, order)
            continue
        assert axis is not None  # _separate_z gives the axis with do_separate_z
        inplane = np.delete(new_shape, axis)
        tmp = new_shape.copy()
        tmp[axis] = shape[axis]
        here = np.zeros(tmp, dtype=float)
        for s in range(shape[axis]):
            index: list[slice | int] = [slice(None)] * 3
            index[axis] = s
            here[tuple(index)] = resize(src[c][tuple(index)], inplane, order)
        if shape[axis] == new_shape[axis]:
            out[c] = here
            continue
        scale = np.asarray(here.shape, float) / new_shape  # voxel-centre aligned, as skimage
        grid = np.mgrid[tuple(slice(0, n) for n in new_shape)].astype(float)
        coords = scale[:, None, None, None] * (grid + 0.5) - 0.5
        if not is_seg or order_z == 0:
            out[c] = ndimage.map_coordinates(here, coords, order=order_z, mode="nearest")
        else:
            for label in np.unique(here):
                out[c][np.round(ndimage.map_coordinates((here == label).astype(float), coords, order=order_z,
                                                        mode="nearest")) > 0.5] = label
    return out


def _nonzero_bbox(data: np.ndarray) -> tuple[np.ndarray, tuple[slice, ...]]:
    """nnU-Net's ``crop_to_nonzero``: the mask of non-zero voxels (holes filled) and its bounding box."""
    mask = ndimage.binary_fill_holes(data != 0)
    if not mask.any():
        raise AsfdaError("the image has no non-zero voxel, so nnU-Net's crop to the non-zero region is empty",
                         fix="check the image; nnU-Net cannot segment an all-zero volume")
    box = tuple(slice(int(np.min(w)), int(np.max(w)) + 1) for w in np.nonzero(mask))
    return mask, box


@dataclass
class NnUNetPreprocessing(Preprocessing):
    """nnU-Net v2's preprocessing of one configuration (see the module docstring), for a single input channel.

    Attributes:
        transpose_forward: the plans' axis order, in nnU-Net's (SimpleITK, reversed NIfTI) axes.
        target_spacing: the configuration's ``spacing``, in model-grid (transposed) axis order.
        scheme: the normalisation scheme of channel 0; ``use_mask_for_norm`` its mask flag.
        intensity_properties: the plans' ``foreground_intensity_properties_per_channel["0"]`` (CTNormalization).
        data_kwargs / seg_kwargs / prob_kwargs: the configuration's ``resampling_fn_data_kwargs``,
            ``resampling_fn_seg_kwargs`` and ``resampling_fn_probabilities_kwargs`` (the last for the inverse).
        reorient: the dataset's reader is ``NibabelIOWithReorient`` (RAS before anything else).
    """

    transpose_forward: tuple[int, int, int] = (0, 1, 2)
    target_spacing: tuple[float, float, float] = (1.0, 1.0, 1.0)
    scheme: str = "ZScoreNormalization"
    use_mask_for_norm: bool = False
    intensity_properties: dict = field(default_factory=dict)
    data_kwargs: dict = field(default_factory=lambda: {"order": 3, "order_z": 0, "force_separate_z": None})
    seg_kwargs: dict = field(default_factory=lambda: {"order": 1, "order_z": 0, "force_separate_z": None})
    prob_kwargs: dict = field(default_factory=lambda: {"order": 1, "order_z": 0, "force_separate_z": None})
    reorient: bool = False

    @classmethod
    def from_plans(cls, plans: dict, configuration: dict, dataset: dict,
                   where: str | Path | None = None) -> NnUNetPreprocessing:
        """Reads the preprocessing of a (resolved) configuration of ``plans.json``; refuses what it cannot repeat."""
        def refuse(problem: str, fix: str) -> AsfdaError:
            return AsfdaError(problem, where, fix)

        reader = plans.get("image_reader_writer", "SimpleITKIO")  # what nnU-Net's predictor reads with
        if reader not in READERS:
            raise refuse(f"the nnU-Net model reads images with {reader}; asfda repeats {', '.join(READERS)} (NIfTI)",
                         "use a model trained on NIfTI images")
        preprocessor = configuration.get("preprocessor_name", "DefaultPreprocessor")
        if preprocessor != "DefaultPreprocessor":
            raise refuse(f"the nnU-Net configuration uses the preprocessor {preprocessor!r}; asfda repeats "
                         "DefaultPreprocessor only", "use a model planned with nnU-Net's default preprocessor")
        for key in ("resampling_fn_data", "resampling_fn_seg", "resampling_fn_probabilities"):
            if configuration.get(key, RESAMPLING_FNS[0]) not in RESAMPLING_FNS:
                raise refuse(f"the nnU-Net configuration resamples with {configuration.get(key)!r} ({key}); asfda "
                             f"repeats {' and '.join(RESAMPLING_FNS)}", "use a model planned with nnU-Net's default "
                             "resampling")
        try:
            transpose = tuple(int(t) for t in plans.get("transpose_forward", (0, 1, 2)))
            spacing = tuple(float(s) for s in configuration["spacing"])
            scheme = str(configuration.get("normalization_schemes", ["ZScoreNormalization"])[0])
            use_mask = bool(configuration.get("use_mask_for_norm", [False])[0])
            props = dict(plans.get("foreground_intensity_properties_per_channel", {}).get("0", {}))
            data_kw = dict(configuration.get("resampling_fn_data_kwargs", {"order": 3, "order_z": 0,
                                                                           "force_separate_z": None}))
            seg_kw = dict(configuration.get("resampling_fn_seg_kwargs", {"order": 1, "order_z": 0,
                                                                         "force_separate_z": None}))
            prob_kw = dict(configuration.get("resampling_fn_probabilities_kwargs", {"order": 1, "order_z": 0,
                                                                                     "force_separate_z": None}))
        except (KeyError, IndexError, TypeError, ValueError, AttributeError) as exc:
            raise refuse(f"plans.json's preprocessing settings are malformed ({exc.__class__.__name__}: {exc})",
                         "use the plans.json nnU-Net wrote for this model") from None
        if sorted(transpose) != [0, 1, 2] or len(spacing) != 3 or not all(np.isfinite(spacing)) or min(spacing) <= 0:
            raise refuse(f"plans.json has an invalid transpose_forward {list(transpose)} or spacing {list(spacing)}",
                         "use the plans.json nnU-Net wrote for this model")
        if scheme not in NORMALIZATIONS:
            raise refuse(f"the nnU-Net configuration normalises with {scheme}; "
                         f"asfda repeats {', '.join(NORMALIZATIONS)}",
                         "use a model with one of these normalisation schemes")
        if scheme == "CTNormalization" and not all(k in props for k in ("mean", "std", "percentile_00_5",
                                                                           "percentile_99_5")):
            raise refuse("CTNormalization needs foreground_intensity_properties_per_channel['0'] (mean, std, "
                         "percentile_00_5, percentile_99_5) in plans.json", "use the plans.json nnU-Net wrote")
        for kw in (data_kw, seg_kw, prob_kw):
            kw.pop("is_seg", None)
            unknown = set(kw) - {"order", "order_z", "force_separate_z"}
            if unknown:
                raise refuse(f"unknown resampling arguments {sorted(unknown)} in plans.json", "use nnU-Net's defaults")
        # 3 each, checked above
        prep = cls(axcodes=None, pixdim_mm=None, transpose_forward=(transpose[0], transpose[1], transpose[2]),
                   target_spacing=(spacing[0], spacing[1], spacing[2]), scheme=scheme,
                   use_mask_for_norm=use_mask, intensity_properties={k: float(v) for k, v in props.items()
                                                                     if isinstance(v, (int, float))},
                   data_kwargs=data_kw, seg_kwargs=seg_kw, prob_kwargs=prob_kw,
                   reorient=reader == "NibabelIOWithReorient")
        prep.description = {"nnunet": {"transpose_forward": list(transpose), "spacing": list(spacing), "scheme": scheme,
                                       "use_mask_for_norm": use_mask, "intensity": prep.intensity_properties,
                                       "data": data_kw, "seg": seg_kw, "probabilities": prob_kw, "reader": reader}}
        return prep

    # -- the steps ------------------------------------------------------------------------------------
    @property
    def axes(self) -> tuple[int, int, int]:
        """The array axis (asfda's, i.e. nibabel's voxel axes) behind each model-grid axis: nnU-Net's array is the
        NIfTI axes reversed, then ``transpose_forward``."""
        t0, t1, t2 = self.transpose_forward
        return 2 - t0, 2 - t1, 2 - t2

    def _normalize(self, data: np.ndarray, mask: np.ndarray) -> np.ndarray:
        """nnU-Net's normalisation of one channel (float32, as nnU-Net computes it)."""
        image = data.astype(np.float32, copy=True)
        eps = 1e-8
        if self.scheme == "ZScoreNormalization":
            if self.use_mask_for_norm:
                mean, std = image[mask].mean(), image[mask].std()
                image[mask] = (image[mask] - mean) / max(std, eps)
            else:
                mean, std = image.mean(), image.std()
                image -= mean
                image /= max(std, eps)
        elif self.scheme == "CTNormalization":
            p = self.intensity_properties
            np.clip(image, p["percentile_00_5"], p["percentile_99_5"], out=image)
            image -= p["mean"]
            image /= max(p["std"], eps)
        elif self.scheme == "RescaleTo01Normalization":
            image -= image.min()
            image /= np.clip(image.max(), a_min=eps, a_max=None)
        return image

    def model_grid_shape(self, shape: tuple[int, ...], affine: np.ndarray) -> tuple[int, ...]:
        """nnU-Net's resampled shape of the whole image, before the crop to its non-zero box (which can only make it
        smaller): what `Preprocessing.check_grid` bounds before any voxel is read."""
        import nibabel as nib

        affine = np.asarray(affine, dtype=np.float64)
        if self.reorient:  # as _to_ras: output axis ornt[i, 0] holds input axis i
            ornt = nib.orientations.io_orientation(affine)
            affine = affine @ nib.orientations.inv_ornt_aff(ornt, shape)
            shape = tuple(int(n) for n in np.asarray(shape)[np.argsort(ornt[:, 0])])
        axes = list(self.axes)
        spacing = np.linalg.norm(affine[:3, :3], axis=0)[axes]
        return tuple(int(n) for n in compute_new_shape(np.asarray(shape)[axes], spacing, self.target_spacing))

    def __call__(self, image: np.ndarray, affine: np.ndarray, label: np.ndarray | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor | None, np.ndarray]:
        """Image ``[X, Y, Z]`` (+ label) on the native grid -> nnU-Net's network input ``[1, ...]`` (+ label) and the
        model grid's affine (world <- model-grid voxel)."""
        affine = np.asarray(affine, dtype=np.float64)
        image = np.asarray(image)
        if self.reorient:
            image, affine, label = _to_ras(image, affine, label)
        axes = self.axes
        data = np.transpose(image, axes).astype(np.float32)
        seg = None if label is None else np.transpose(label, axes)
        spacing = np.linalg.norm(affine[:3, :3], axis=0)[list(axes)]  # nnU-Net's spacing, transposed
        mask, box = _nonzero_bbox(data)
        data, mask = data[box], mask[box]
        seg = None if seg is None else seg[box]
        old_shape = np.array(data.shape)
        new_shape = compute_new_shape(old_shape, spacing, self.target_spacing)
        data = self._normalize(data, mask)
        data = resample_data_or_seg(data[None], new_shape, spacing, self.target_spacing, **self.data_kwargs)[0]
        lab_t = None
        if seg is not None:
            seg = resample_data_or_seg(np.rint(seg).astype(np.int16)[None], new_shape, spacing, self.target_spacing,
                                       is_seg=True, **self.seg_kwargs)[0]
            lab_t = torch.from_numpy(np.clip(seg, 0, 255).astype(np.uint8))
        # model-grid voxel m -> cropped voxel (m + 0.5) * old / new - 0.5 -> + box start -> native axes -> world
        scale = old_shape / new_shape
        grid = np.eye(4)
        for m, a in enumerate(axes):
            grid[a, :] = 0.0
            grid[a, m] = scale[m]
            grid[a, 3] = (scale[m] - 1) / 2 + box[m].start
        grid_affine = affine @ grid
        return torch.from_numpy(np.ascontiguousarray(data, dtype=np.float32))[None], lab_t, grid_affine

    def label_map_on_native_grid(self, logits: torch.Tensor, channels: tuple[int, ...], values: tuple[int, ...],
                                 grid_affine: np.ndarray, native_affine: np.ndarray,
                                 native_shape: tuple[int, int, int]) -> np.ndarray | None:
        """nnU-Net's export (``convert_predicted_logits_to_segmentation_with_correct_shape``) of model-grid softmax
        logits ``[C, ...]``: the logits resampled to the cropped box's shape (``resampling_fn_probabilities``:
        linear, nearest across slices of anisotropic data), the argmax (channel 0 and ``channels``, written as 0 and
        ``values``; other channels never win), pasted into background at the box, axes put back.

        The box, its shape and the axis order are read off the two affines (the model grid's is exact, see
        ``__call__``); None when they are not those of this preprocessing (the caller then resamples with the
        affines)."""
        layout = _grid_layout(np.asarray(grid_affine, float), np.asarray(native_affine, float), logits.shape[1:],
                              native_shape)
        if layout is None:
            return None
        axes, signs, starts, old_shape = layout
        native_spacing = np.linalg.norm(np.asarray(native_affine, float)[:3, :3], axis=0)[list(axes)]
        wanted = (0, *channels)
        z = logits.detach().float().cpu().numpy()[list(wanted)]
        z = resample_data_or_seg(z, old_shape, self.target_spacing, native_spacing, **self.prob_kwargs)
        lut = np.asarray((0, *values), dtype=np.uint8)
        seg = lut[np.argmax(z, axis=0)]
        del z
        order = [int(np.where(np.asarray(axes) == a)[0][0]) for a in range(3)]
        seg = np.transpose(seg, order)  # native axis order
        index = []
        for a in range(3):
            m = order[a]
            if signs[m] < 0:
                seg = np.flip(seg, axis=a)
                index.append(slice(starts[m] - old_shape[m] + 1, starts[m] + 1))
            else:
                index.append(slice(starts[m], starts[m] + old_shape[m]))
        out = np.zeros(tuple(native_shape), dtype=np.uint8)
        out[tuple(index)] = seg
        return out


def _grid_layout(grid_affine: np.ndarray, native_affine: np.ndarray, grid_shape, native_shape):
    """From the model grid's affine (`NnUNetPreprocessing.__call__`): per model axis the native axis, its direction,
    the native index of cropped voxel 0, and the cropped (pre-resampling) shape; None if the affines do not describe
    an axis-permuted, scaled, integer-offset crop of the native grid."""
    try:
        m = np.linalg.solve(native_affine, grid_affine)  # native voxel <- model-grid voxel
    except np.linalg.LinAlgError:
        return None
    lin = m[:3, :3]
    axes = tuple(int(np.argmax(np.abs(lin[:, j]))) for j in range(3))
    if sorted(axes) != [0, 1, 2]:
        return None
    signs, starts, old_shape = [], [], []
    for j, a in enumerate(axes):
        col = lin[:, j]
        if np.abs(np.delete(col, a)).max() > 1e-4 * max(abs(col[a]), 1e-12):
            return None
        sign, scale = float(np.sign(col[a])), float(abs(col[a]))
        old = int(round(scale * int(grid_shape[j])))
        start = m[a, 3] - sign * (scale - 1) / 2  # native index of cropped voxel 0
        if abs(start - round(start)) > 1e-3 or abs(old / int(grid_shape[j]) - scale) > 1e-4 * scale:
            return None
        start = int(round(start))
        low, high = (start, start + old - 1) if sign > 0 else (start - old + 1, start)
        if low < 0 or high >= int(native_shape[a]):
            return None
        signs.append(sign)
        starts.append(start)
        old_shape.append(old)
    return axes, signs, starts, np.asarray(old_shape)


def _to_ras(image: np.ndarray, affine: np.ndarray, label: np.ndarray | None):
    """nnU-Net's ``NibabelIOWithReorient``: the arrays and affine reoriented to RAS (``as_closest_canonical``)."""
    import nibabel as nib

    ornt = nib.orientations.io_orientation(affine)
    out_affine = affine @ nib.orientations.inv_ornt_aff(ornt, image.shape)
    image = nib.orientations.apply_orientation(image, ornt)
    label = None if label is None else nib.orientations.apply_orientation(label, ornt)
    return image, out_affine, label
