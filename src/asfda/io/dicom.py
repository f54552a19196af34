"""DICOM series as volumes: one series a folder, at any depth under a pool folder.

A folder that directly holds DICOM files (the ``DICM`` mark at byte 128, or a ``.dcm`` name; hidden files and
``DICOMDIR`` are left out) is one series, one case. `scan_series` reads the slices' headers only (no pixel data) and
refuses, in one line naming the folder (and the slice), what cannot be stacked into one 3D grid:

* a file that is not readable DICOM, a slice without pixel data (a report, a presentation state ...), a multi-frame
  (enhanced) or colour image;
* a mixed series: several SeriesInstanceUIDs, slices that differ in size, pixel spacing or orientation, two slices at
  one position (echoes, phases), slices off one line (a localiser among them);
* missing slices (a gap between neighbours wider than the series' spacing) or unevenly spaced slices;
* then what a NIfTI file is refused for (`asfda.io.limits`): fewer than `MIN_AXIS_VOXELS` voxels along an axis, more
  voxels than `max_nifti_bytes`, a grid that is not finite or is singular.

The voxels are decoded by MONAI's ``PydicomReader`` (pixel data, RescaleSlope/RescaleIntercept), one slice at a time
in the order `scan_series` established, straight into the float32 volume: MONAI's folder mode stacks by
InstanceNumber, drops slices without one (with a warning only) and globs the folder's name as a pattern, so it would
read a folder named ``CT [1]`` as nothing.

The grid is the one ITK, dcm2niix and 3D Slicer give a series: array axes [column, row, slice] (MONAI's ``swap_ij``),
slices ascending along the normal of ImageOrientationPatient (row direction x column direction), the affine in RAS+
(NIfTI's world; DICOM's LPS with x and y negated). A label (NIfTI) drawn on that conversion matches it.

Outputs on the series' grid: a NIfTI label map with the series' affine (`asfda.io.nifti.write_label_map`) and,
as an option, a DICOM SEG referencing the series' slices (`write_dicom_seg`, with highdicom). pydicom (and highdicom
for SEG) come with the optional extra ``asfda[dicom]``; without them a DICOM pool is refused in one line.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from asfda.errors import AsfdaError
from asfda.io.atomic import atomic_write
from asfda.io.limits import check_affine, check_cap, check_min_axis

__all__ = ["DICOM_INSTALL_FIX", "SeriesGeometry", "find_series", "is_series_folder", "read_dicom_header",
           "read_dicom_series", "scan_series", "series_case_id", "series_files", "series_stamp", "volume_file_stamp",
           "write_dicom_seg", "written_seg"]

DICOM_INSTALL_FIX = "install DICOM support: pip install 'asfda[dicom]' (pydicom; highdicom for DICOM SEG)"
_LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
_GAP = 1.5  # a step this many times the series' spacing is a missing slice
_UNEVEN = 0.1  # steps differing from the series' spacing by more than this fraction: unevenly spaced
_MIXED_FIX = "put each series in its own folder (any depth under the pool), one series a folder"
_GEOMETRY_FIX = "export the series again with its geometry, or convert it to NIfTI (e.g. dcm2niix)"


def _is_dicom_file(path: Path) -> bool:
    if path.name.startswith(".") or path.name.upper() == "DICOMDIR" or not path.is_file():
        return False  # a folder, a pipe (reading which could hang), a device
    if path.name.lower().endswith(".dcm"):
        return True
    try:
        with open(path, "rb") as fh:
            head = fh.read(132)
    except OSError:
        return False
    return head[128:132] == b"DICM"


def series_files(folder: Path) -> list[Path]:
    """The DICOM files directly in ``folder`` (not in its subfolders), by name."""
    try:
        entries = sorted(Path(folder).iterdir())
    except OSError:
        return []
    return [p for p in entries if _is_dicom_file(p)]


def is_series_folder(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a folder directly holding at least one DICOM file."""
    path = Path(path)
    if not path.is_dir():
        return False
    try:
        return any(_is_dicom_file(p) for p in sorted(path.iterdir()))
    except OSError:
        return False


def find_series(root: Path) -> list[Path]:
    """Every series folder at or under ``root`` (hidden folders skipped; links followed, each real folder once)."""
    found, seen = [], set()
    for dirpath, dirnames, _ in os.walk(root, followlinks=True):
        real = os.path.realpath(dirpath)
        if real in seen:
            dirnames[:] = []
            continue
        seen.add(real)
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        if is_series_folder(dirpath):
            found.append(Path(dirpath))
    return found


def series_case_id(root: Path, folder: Path) -> str:
    """A series' case id: its folder's path under the pool, the parts joined by ``_`` (``PAT1/CT`` -> ``PAT1_CT``);
    the folder's own name when the pool is the series."""
    parts = Path(folder).relative_to(root).parts
    return "_".join(parts) if parts else Path(folder).resolve().name


def series_stamp(folder: Path) -> str:
    """Changes whenever a slice of the series is added, removed or rewritten (a folder's own mtime misses a slice
    rewritten in place): the number of slices, their total size and latest mtime."""
    stats = [p.stat() for p in series_files(folder)]
    return f"{Path(folder).resolve()}:{len(stats)}:{sum(s.st_size for s in stats)}:" \
           f"{max((s.st_mtime_ns for s in stats), default=0)}"


def volume_file_stamp(path: str | os.PathLike) -> str:
    """What identifies an image's file for the caches: its resolved path, size and modification time; for a DICOM
    series folder, `series_stamp` (a slice rewritten in place changes it, though the folder's own mtime does not)."""
    p = Path(path)
    if is_series_folder(p):
        return series_stamp(p)
    st = p.stat()
    return f"{p.resolve()}:{st.st_size}:{st.st_mtime_ns}"


@dataclass(frozen=True)
class SeriesGeometry:
    """A series as `scan_series` read it from its slices' headers."""

    folder: Path
    files: tuple[Path, ...]  # the slices in grid order (ascending along the slice normal)
    shape: tuple[int, int, int]  # [columns, rows, slices]
    affine: np.ndarray = field(repr=False)  # RAS+


def _pydicom(folder: Path) -> Any:
    try:
        import pydicom
    except ImportError:
        raise AsfdaError("is a DICOM series, and pydicom is not installed", folder, DICOM_INSTALL_FIX) from None
    return pydicom


def _floats(ds: Any, tag: str, n: int, name: str, folder: Path) -> np.ndarray:
    value = ds.get(tag)
    try:
        out = np.asarray([float(v) for v in value], dtype=np.float64)
    except Exception:  # missing (None), not numbers, a value pydicom cannot convert
        out = np.zeros(0)
    if out.shape != (n,) or not np.isfinite(out).all():
        raise AsfdaError(f"slice {name} has no usable {tag} ({value!r}): the slices cannot be placed in the patient",
                         folder, _GEOMETRY_FIX)
    return out


def _int(ds: Any, tag: str, default: int, name: str, folder: Path) -> int:
    try:
        value = ds.get(tag)
        return default if value is None or value == "" else int(value)
    except Exception:
        raise AsfdaError(f"slice {name} has an unusable {tag} ({ds.get(tag)!r})", folder,
                         "export the series again") from None


def _read_headers(folder: Path, files: list[Path]) -> list[dict]:
    pydicom = _pydicom(folder)
    headers = []
    for f in files:
        try:  # large values (the pixel data) are skipped, not read: their presence is still seen
            ds = pydicom.dcmread(f, defer_size=1024)
        except Exception as exc:
            raise AsfdaError(f"{f.name} is not a readable DICOM file ({exc.__class__.__name__}: "
                             f"{' '.join(str(exc).split())[:160]})", folder,
                             "move it out of the series folder, or export the series again") from None
        if not any(t in ds for t in ("PixelData", "FloatPixelData", "DoubleFloatPixelData")):
            raise AsfdaError(f"slice {f.name} has no pixel data (Modality {ds.get('Modality', '?')}: a report, a "
                             "presentation state or another non-image object)", folder,
                             "move it out of the series folder (one image series a folder)")
        if _int(ds, "NumberOfFrames", 1, f.name, folder) > 1:
            raise AsfdaError(f"{f.name} is a multi-frame (enhanced) DICOM image; asfda reads a series of one slice "
                             "a file", folder, "convert the series to NIfTI (e.g. dcm2niix) or to single-frame slices")
        if _int(ds, "SamplesPerPixel", 1, f.name, folder) != 1:
            colour = ds.get("PhotometricInterpretation", "?")
            raise AsfdaError(f"slice {f.name} has {ds.SamplesPerPixel} samples a pixel ({colour}): colour, not real "
                             "intensities", folder,
                             "export a grey-level series (the scanner's original images)")
        headers.append({
            "name": f.name, "file": f, "series": str(ds.get("SeriesInstanceUID", "")),
            "size": (_int(ds, "Rows", 0, f.name, folder), _int(ds, "Columns", 0, f.name, folder)),
            "position": _floats(ds, "ImagePositionPatient", 3, f.name, folder),
            "orientation": _floats(ds, "ImageOrientationPatient", 6, f.name, folder),
            "spacing": _floats(ds, "PixelSpacing", 2, f.name, folder),
            "bits": _int(ds, "BitsAllocated", 16, f.name, folder),
            "signed": _int(ds, "PixelRepresentation", 0, f.name, folder)})
    return headers


def _check_same(folder: Path, headers: list[dict]) -> None:
    """One series: one SeriesInstanceUID, and every slice of one size, pixel spacing and orientation."""
    first = headers[0]
    uids = sorted({h["series"] for h in headers})
    if len(uids) > 1:
        other = next(h for h in headers if h["series"] != first["series"])
        raise AsfdaError(f"holds {len(uids)} series (SeriesInstanceUID of {first['name']} and {other['name']} "
                         "differ): a mixed series", folder, _MIXED_FIX)
    for key, what, tol in (("size", "size (rows x columns)", 0), ("spacing", "PixelSpacing", 1e-3),
                           ("orientation", "ImageOrientationPatient", 1e-3)):
        for h in headers[1:]:
            if not np.allclose(np.asarray(h[key], float), np.asarray(first[key], float), atol=tol, rtol=0):
                raise AsfdaError(f"slices {first['name']} and {h['name']} differ in {what} ({first[key]} vs "
                                 f"{h[key]}): a mixed series", folder, _MIXED_FIX)


def _slice_order(folder: Path, headers: list[dict], normal: np.ndarray, pixel: float) -> tuple[list[int], np.ndarray]:
    """The slices' order along ``normal`` and the step between neighbours (a vector); refuses two slices at one
    position, missing or unevenly spaced slices, and slices off one line."""
    n = len(headers)
    where = np.array([h["position"] @ normal for h in headers])
    order = [int(i) for i in np.argsort(where, kind="stable")]
    if n == 1:
        return order, normal.copy()
    steps = np.diff(where[order])
    spacing = float(np.median(steps))
    tiny = max(1e-3, 1e-3 * spacing)
    for k, step in enumerate(steps):
        a, b = headers[order[k]]["name"], headers[order[k + 1]]["name"]
        if step < tiny:
            raise AsfdaError(f"slices {a} and {b} lie at the same position: a mixed series (several echoes, phases "
                             "or acquisitions in one folder)", folder, _MIXED_FIX)
        if step > _GAP * spacing:
            raise AsfdaError(f"missing slices: {a} and {b} are {step:.4g} mm apart where the series' slices are "
                             f"{spacing:.4g} mm apart (about {round(step / spacing) - 1} slice(s) missing)", folder,
                             "copy the whole series (all its slices) into the folder")
        if abs(step - spacing) > _UNEVEN * spacing:
            raise AsfdaError(f"unevenly spaced slices: {a} and {b} are {step:.4g} mm apart, the series' median is "
                             f"{spacing:.4g} mm", folder, "resample the series to even spacing (or convert it to "
                             "NIfTI with dcm2niix, which does) before asfda reads it")
    positions = np.array([headers[i]["position"] for i in order])
    step_vec = (positions[-1] - positions[0]) / (n - 1)
    off = np.linalg.norm(positions - (positions[0] + np.arange(n)[:, None] * step_vec), axis=1)
    worst = int(np.argmax(off))
    if off[worst] > max(1e-2, 0.1 * min(pixel, spacing)):
        raise AsfdaError(f"its slices do not lie on one line (slice {headers[order[worst]]['name']} is "
                         f"{off[worst]:.3g} mm off): a mixed series, or a localiser among the slices", folder,
                         _MIXED_FIX)
    return order, step_vec


def scan_series(folder: str | os.PathLike) -> SeriesGeometry:
    """The geometry of the DICOM series in ``folder`` from its slices' headers (no pixel data read); refuses what
    cannot be one 3D volume (see the module docstring)."""
    folder = Path(folder)
    files = series_files(folder)
    if not files:
        raise AsfdaError("holds no DICOM files", folder, "point at a folder holding one DICOM series' slices")
    headers = _read_headers(folder, files)
    _check_same(folder, headers)
    first = headers[0]
    row_dir, col_dir = first["orientation"][:3], first["orientation"][3:]
    normal = np.cross(row_dir, col_dir)
    if not (np.isclose(np.linalg.norm(row_dir), 1, atol=1e-2) and np.isclose(np.linalg.norm(col_dir), 1, atol=1e-2)
            and np.linalg.norm(normal) > 0.5):
        raise AsfdaError(f"ImageOrientationPatient {first['orientation'].tolist()} is not two perpendicular unit "
                         "vectors", folder, _GEOMETRY_FIX)
    normal = normal / np.linalg.norm(normal)
    spacing = first["spacing"]  # [between rows, between columns]
    if not (spacing > 0).all():
        raise AsfdaError(f"PixelSpacing {spacing.tolist()} is not positive", folder, _GEOMETRY_FIX)
    order, step_vec = _slice_order(folder, headers, normal, float(spacing.min()))
    rows, cols = first["size"]
    shape = (cols, rows, len(headers))
    check_min_axis(folder, shape, "move the folder out of the pool (a localiser or a few slices are not a 3D "
                   "volume), or copy the whole series into it")
    bits = first["bits"] if first["bits"] in (8, 16, 32) else 16
    stored = np.dtype(f"{'i' if first['signed'] else 'u'}{bits // 8}")
    check_cap(folder, shape, stored, source="slice headers declare")
    lps = np.eye(4)
    lps[:3, 0], lps[:3, 1] = row_dir * spacing[1], col_dir * spacing[0]
    lps[:3, 2], lps[:3, 3] = step_vec, headers[order[0]]["position"]
    affine = _LPS_TO_RAS @ lps
    check_affine(folder, affine, _GEOMETRY_FIX)
    return SeriesGeometry(folder, tuple(headers[i]["file"] for i in order), shape, affine)


def read_dicom_header(folder: str | os.PathLike) -> tuple[tuple[int, int, int], np.ndarray]:
    """Shape and RAS affine of a series (as `asfda.io.nifti.read_header` gives a NIfTI file's), from headers only."""
    geo = scan_series(folder)
    return geo.shape, geo.affine


def read_dicom_series(folder: str | os.PathLike, *, dtype: type = np.float32) -> tuple[np.ndarray, np.ndarray]:
    """Voxels ([X, Y, Z] = [column, row, slice]) and RAS affine of the series in ``folder``, decoded by MONAI's
    PydicomReader slice by slice; refuses what `scan_series` refuses, undecodable pixels and non-finite values."""
    geo = scan_series(folder)
    _pydicom(geo.folder)
    from monai.data import PydicomReader  # here, not at import: MONAI loads torch

    reader = PydicomReader(swap_ij=True, affine_lps_to_ras=True)
    out = np.empty(geo.shape, dtype=np.dtype(dtype), order="F")
    for k, f in enumerate(geo.files):
        try:
            plane, _ = reader.get_data(reader.read(str(f)))
        except Exception as exc:  # a compressed transfer syntax without its decoder, truncated pixel data ...
            raise AsfdaError(f"cannot decode the pixels of slice {f.name} ({exc.__class__.__name__}: "
                             f"{' '.join(str(exc).split())[:200]})", geo.folder,
                             "export the series again (uncompressed, if it is compressed: or install a decoder for "
                             "its transfer syntax, pip install pylibjpeg pylibjpeg-libjpeg pylibjpeg-openjpeg)") \
                from None
        plane = np.asarray(plane)
        if plane.shape != geo.shape[:2]:
            raise AsfdaError(f"slice {f.name} decodes to {plane.shape} pixels, its header says {geo.shape[:2]}",
                             geo.folder, "export the series again")
        out[:, :, k] = plane
    if np.issubdtype(out.dtype, np.floating) and not np.isfinite(out).all():
        raise AsfdaError(f"contains NaN or infinite values (or values beyond {out.dtype.name}'s range)", geo.folder,
                         "export the series again")
    return out, geo.affine


def write_dicom_seg(path: str | os.PathLike, label: np.ndarray, folder: str | os.PathLike,
                    class_names: list[str] | tuple[str, ...], *, description: str = "asfda pre-segmentation") -> Path:
    """Writes ``label`` ([X, Y, Z] on the series' grid, values = indices of ``class_names``, 0 background) as a
    DICOM SEG (binary segments, one a foreground class, empty frames left out) referencing the series in ``folder``;
    needs highdicom."""
    geo = scan_series(folder)
    pydicom = _pydicom(geo.folder)
    try:
        import highdicom as hd
        from pydicom.sr.codedict import codes
    except ImportError:
        raise AsfdaError("writing DICOM SEG needs highdicom, which is not installed", path,
                         DICOM_INSTALL_FIX) from None
    label = np.asarray(label)
    if label.shape != geo.shape:
        raise AsfdaError(f"the label's shape {label.shape} is not the series' grid {geo.shape}", geo.folder,
                         "give the label on the series' grid")
    sources = [pydicom.dcmread(f, stop_before_pixels=True) for f in geo.files]
    algorithm = hd.AlgorithmIdentificationSequence(name="asfda", version="1", family=codes.DCM.ArtificialIntelligence)
    segments = [hd.seg.SegmentDescription(segment_number=i, segment_label=str(name).replace("\\", "/")[:64],
                                          segmented_property_category=codes.SCT.Tissue,
                                          segmented_property_type=codes.SCT.Organ, algorithm_type="AUTOMATIC",
                                          algorithm_identification=algorithm)
                for i, name in enumerate(class_names) if i > 0]
    frames = np.ascontiguousarray(np.transpose(label, (2, 1, 0))).astype(np.uint16)  # [slice, row, column]
    if frames.max(initial=0) >= len(class_names):
        raise AsfdaError(f"the label holds value {int(frames.max())}, the model names {len(class_names)} classes",
                         path, "pass the class names of the label's values")
    seg = hd.seg.Segmentation(
        source_images=sources, pixel_array=frames, segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=segments, series_instance_uid=hd.UID(), series_number=900, sop_instance_uid=hd.UID(),
        instance_number=1, manufacturer="asfda", manufacturer_model_name="asfda", software_versions="asfda",
        device_serial_number="0", series_description=description[:64])
    return atomic_write(Path(path), lambda p: seg.save_as(str(p)))


def written_seg(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a DICOM SEG that `write_dicom_seg` wrote (how a command recognises its own earlier
    output, `asfda.io.outputs.refuse_foreign_files`); False for anything else, or without pydicom."""
    try:
        import pydicom

        ds = pydicom.dcmread(path, stop_before_pixels=True)
    except Exception:
        return False
    return ds.get("Modality") == "SEG" and ds.get("Manufacturer") == "asfda"
