"""Build DICOM files with pydicom for the tests: every variant of one greyscale image.

Each variant stores the same picture a different way (bit depth, sign, rescale,
window, VOI LUT, MONOCHROME1, RGB, implicit VR, compressed transfer syntaxes),
chosen so that a correct display pipeline gives back exactly the source pixels
(or, for JPEG, the pixels of the same JPEG decoded as a file).
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

PATIENT_NAME = "Zyxwort^Quillonia"
PATIENT_ID = "PID-73914-QX"
BIRTH_DATE = "19870412"
ACCESSION = "ACC55501927"

CR_STORAGE = "1.2.840.10008.5.1.4.1.1.1"
SR_STORAGE = "1.2.840.10008.5.1.4.1.1.88.11"  # Basic Text SR


def base_dataset(transfer_syntax, sop_class=CR_STORAGE, view="PA", modality="CR"):
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = transfer_syntax
    ds = Dataset()
    ds.file_meta = meta
    ds.preamble = b"\x00" * 128
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.PatientName = PATIENT_NAME
    ds.PatientID = PATIENT_ID
    ds.PatientBirthDate = BIRTH_DATE
    ds.AccessionNumber = ACCESSION
    ds.InstitutionName = "Quillonia Memorial Clinic"
    ds.Modality = modality
    if view is not None:
        ds.ViewPosition = view
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    return ds


def _pixels(ds, arr: np.ndarray, photometric: str, bits_stored: int, signed: bool = False):
    ds.Rows, ds.Columns = arr.shape[:2]
    ds.SamplesPerPixel = 3 if arr.ndim == 3 else 1
    if arr.ndim == 3:
        ds.PlanarConfiguration = 0
    ds.PhotometricInterpretation = photometric
    ds.BitsAllocated = arr.dtype.itemsize * 8
    ds.BitsStored = bits_stored
    ds.HighBit = bits_stored - 1
    ds.PixelRepresentation = int(signed)
    ds.PixelData = np.ascontiguousarray(arr).tobytes()


def _linear_window(ds, lo: float, hi: float):
    """Window Center/Width whose LINEAR function maps lo -> 0 and hi -> 1 exactly."""
    width = hi - lo + 1
    ds.WindowCenter = f"{lo + (width - 1) / 2 + 0.5:.6g}"
    ds.WindowWidth = f"{width:.6g}"


def stretched(gray: np.ndarray) -> np.ndarray:
    """The source picture: spans 0..255, as a viewer without a window would show it."""
    return cv2.normalize(gray, None, 0, 255, cv2.NORM_MINMAX).astype(np.uint8)


def write_variants(folder: Path, gray: np.ndarray) -> dict[str, Path]:
    """Every lossless variant of ``gray`` (uint8, spanning 0..255); name -> file."""
    from pydicom.uid import (ExplicitVRLittleEndian, ImplicitVRLittleEndian,
                             JPEG2000Lossless, RLELossless)

    folder.mkdir(parents=True, exist_ok=True)
    g = gray.astype(np.int32)
    out: dict[str, Path] = {}

    def save(name, ds, suffix=".dcm"):
        path = folder / f"{name}{suffix}"
        ds.save_as(path, enforce_file_format=True)
        out[name] = path

    ds = base_dataset(ExplicitVRLittleEndian)
    _pixels(ds, gray, "MONOCHROME2", 8)
    save("mono2_8bit_explicit", ds)

    ds = base_dataset(ImplicitVRLittleEndian)
    _pixels(ds, gray, "MONOCHROME2", 8)
    save("mono2_8bit_implicit_noext", ds, suffix="")

    ds = base_dataset(ExplicitVRLittleEndian)
    _pixels(ds, (255 - g).astype(np.uint8), "MONOCHROME1", 8)
    save("mono1_8bit", ds)

    ds = base_dataset(ExplicitVRLittleEndian)
    _pixels(ds, (g * 16).astype(np.uint16), "MONOCHROME2", 12)
    save("mono2_12bit_range", ds)

    ds = base_dataset(ExplicitVRLittleEndian)
    _pixels(ds, (g * 16).astype(np.uint16), "MONOCHROME2", 12)
    _linear_window(ds, 0, 4080)
    save("mono2_12bit_window", ds)

    ds = base_dataset(ExplicitVRLittleEndian)
    _pixels(ds, (g * 257).astype(np.uint16), "MONOCHROME2", 16)
    ds.RescaleSlope, ds.RescaleIntercept = "0.5", "-1000"
    _linear_window(ds, -1000, 255 * 257 * 0.5 - 1000)
    save("mono2_16bit_rescale_window", ds)

    ds = base_dataset(ExplicitVRLittleEndian)
    _pixels(ds, ((255 - g) * 16).astype(np.uint16), "MONOCHROME1", 12)
    ds.RescaleSlope, ds.RescaleIntercept = "2", "0"
    _linear_window(ds, 0, 2 * 4080)
    save("mono1_12bit_rescale_window", ds)

    ds = base_dataset(ExplicitVRLittleEndian)
    _pixels(ds, (g * 100 - 12000).astype(np.int16), "MONOCHROME2", 16, signed=True)
    save("mono2_16bit_signed_range", ds)

    ds = base_dataset(ExplicitVRLittleEndian)
    _pixels(ds, (g * 16).astype(np.uint16), "MONOCHROME2", 12)
    ds.WindowCenter, ds.WindowWidth = "1", "2"  # a VOI LUT takes precedence over it
    from pydicom.dataset import Dataset
    item = Dataset()
    item.LUTDescriptor = [4096, 0, 16]
    item.LUTData = np.array([min(65535, round(i * 65535 / 4080)) for i in range(4096)],
                            np.uint16).tobytes()
    ds.VOILUTSequence = [item]
    save("mono2_12bit_voi_lut", ds)

    ds = base_dataset(ExplicitVRLittleEndian, modality="OT")
    _pixels(ds, np.repeat(gray[..., None], 3, axis=2), "RGB", 8)
    save("rgb_secondary_capture", ds)

    ds = base_dataset(ExplicitVRLittleEndian)
    _pixels(ds, (g * 16).astype(np.uint16), "MONOCHROME2", 12)
    ds.compress(RLELossless)
    save("mono2_12bit_rle", ds)

    ds = base_dataset(ExplicitVRLittleEndian)
    _pixels(ds, (g * 16).astype(np.uint16), "MONOCHROME2", 12)
    ds.compress(JPEG2000Lossless)
    save("mono2_12bit_j2k", ds)
    return out


def write_jpeg_dicom(path: Path, jpeg_bytes: bytes, rows: int, cols: int,
                     channels: int, view: str = "PA") -> Path:
    """A JPEG file's bytes encapsulated as JPEG Baseline DICOM (no re-encoding)."""
    from pydicom.encaps import encapsulate
    from pydicom.uid import JPEGBaseline8Bit

    ds = base_dataset(JPEGBaseline8Bit, view=view)
    ds.Rows, ds.Columns = rows, cols
    ds.SamplesPerPixel = channels
    ds.PhotometricInterpretation = "YBR_FULL_422" if channels == 3 else "MONOCHROME2"
    if channels == 3:
        ds.PlanarConfiguration = 0
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.WindowCenter, ds.WindowWidth, ds.VOILUTFunction = "127.5", "255", "LINEAR_EXACT"
    ds.PixelData = encapsulate([jpeg_bytes])
    ds["PixelData"].VR = "OB"
    ds["PixelData"].is_undefined_length = True
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


def write_no_pixels(path: Path) -> Path:
    """A Basic Text SR: a DICOM file with patient data and no image."""
    from pydicom.uid import ExplicitVRLittleEndian

    ds = base_dataset(ExplicitVRLittleEndian, sop_class=SR_STORAGE, view=None, modality="SR")
    ds.save_as(path, enforce_file_format=True)
    return path
