"""DICOM CT series written with pydicom for the tests (slices with ImagePositionPatient, ImageOrientationPatient,
PixelSpacing, SliceThickness, RescaleIntercept), in files named and numbered out of order."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid
from pydicom.valuerep import format_number_as_ds

RAS_TO_LPS = np.diag([-1.0, -1.0, 1.0, 1.0])


def _rotation(angles_deg: tuple[float, float, float]) -> np.ndarray:
    a, b, c = np.deg2rad(angles_deg)
    rx = np.array([[1, 0, 0], [0, np.cos(a), -np.sin(a)], [0, np.sin(a), np.cos(a)]])
    ry = np.array([[np.cos(b), 0, np.sin(b)], [0, 1, 0], [-np.sin(b), 0, np.cos(b)]])
    rz = np.array([[np.cos(c), -np.sin(c), 0], [np.sin(c), np.cos(c), 0], [0, 0, 1]])
    return rz @ ry @ rx


def oblique_affine(spacing=(0.7, 0.9, 2.5), angles=(15.0, -10.0, 25.0), origin=(-31.5, 12.25, -80.0)) -> np.ndarray:
    """A RAS affine with anisotropic spacing and a non-identity orientation (det > 0: slices ascend the normal)."""
    affine = np.eye(4)
    affine[:3, :3] = _rotation(angles) @ np.diag(spacing)
    affine[:3, 3] = origin
    return affine


def _ds(value: float) -> str:
    return format_number_as_ds(float(value))


def write_series(folder: Path, raw: np.ndarray, affine_ras: np.ndarray, *, intercept: float = 0.0, slope: float = 1.0,
                 series_uid: str | None = None, skip: tuple[int, ...] = (), names: str = "IM{:04d}",
                 reverse_numbers: bool = True, z: list[float] | None = None) -> Path:
    """One CT series of ``raw`` ([X, Y, Z] = [column, row, slice], int16) placed by ``affine_ras``: slice k at
    affine @ (0, 0, z[k]) (z[k] = k by default), slices in ``skip`` left out. Files are named in a shuffled order
    and InstanceNumber runs against the position (both happen in real exports), so a reader has to place slices by
    their position."""
    folder.mkdir(parents=True, exist_ok=True)
    lps = RAS_TO_LPS @ affine_ras
    row_dir, col_dir = lps[:3, 0], lps[:3, 1]
    col_spacing, row_spacing = np.linalg.norm(row_dir), np.linalg.norm(col_dir)
    study, series, frame = generate_uid(), series_uid or generate_uid(), generate_uid()
    nz = raw.shape[2]
    for k in np.random.default_rng(nz).permutation(nz):
        if k in skip:
            continue
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CTImageStorage
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, meta.MediaStorageSOPInstanceUID
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study, series, frame
        ds.PatientName, ds.PatientID, ds.PatientBirthDate, ds.PatientSex = "Test^Phantom", "P1", "19700101", "O"
        ds.StudyDate, ds.StudyTime, ds.StudyID, ds.AccessionNumber = "20240101", "120000", "1", "A1"
        ds.ReferringPhysicianName, ds.Modality, ds.SeriesNumber = "", "CT", 3
        ds.Manufacturer, ds.PositionReferenceIndicator = "test", ""
        ds.InstanceNumber = int(nz - k if reverse_numbers else k + 1)
        ds.ImagePositionPatient = [_ds(v) for v in lps[:3, 3] + (k if z is None else z[k]) * lps[:3, 2]]
        ds.ImageOrientationPatient = [_ds(v) for v in (*(row_dir / col_spacing), *(col_dir / row_spacing))]
        ds.PixelSpacing = [_ds(float(row_spacing)), _ds(float(col_spacing))]
        ds.SliceThickness = _ds(float(np.linalg.norm(lps[:3, 2])))
        ds.Rows, ds.Columns = raw.shape[1], raw.shape[0]
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.RescaleIntercept, ds.RescaleSlope = _ds(intercept), _ds(slope)
        ds.PixelData = np.ascontiguousarray(raw[:, :, k].T.astype("<i2")).tobytes()  # [row, column]
        ds.save_as(folder / names.format(int(k * 7919 % 10007)), enforce_file_format=True)
    return folder


def ct_volume(seed: int, shape=(24, 20, 10)) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 2000, size=shape).astype(np.int16)
