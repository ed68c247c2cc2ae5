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


# --------------------------------------------------------------------------- hostile files
# Built in the tests, never committed: each declares far more than it stores.


def _file_bytes(meta_ts: str, body: bytes, sop_class: str = CR_STORAGE) -> bytes:
    """Preamble, DICM and a file meta group for ``meta_ts``, then ``body`` as it is."""
    from pydicom.dataset import FileMetaDataset
    from pydicom.filebase import DicomBytesIO
    from pydicom.filewriter import write_file_meta_info
    from pydicom.uid import generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = meta_ts
    buf = DicomBytesIO()
    buf.is_little_endian, buf.is_implicit_VR = True, False
    write_file_meta_info(buf, meta, enforce_standard=True)
    return b"\x00" * 128 + b"DICM" + buf.getvalue() + body


def dataset_bytes(ds) -> bytes:
    """A dataset encoded as Explicit VR Little Endian, without preamble or file meta."""
    from pydicom.filebase import DicomBytesIO
    from pydicom.filewriter import write_dataset

    buf = DicomBytesIO()
    buf.is_little_endian, buf.is_implicit_VR = True, False
    write_dataset(buf, ds)
    return buf.getvalue()


def write_deflated(path: Path, gray: np.ndarray, zeros: int = 0) -> Path:
    """A Deflated Explicit VR Little Endian DICOM of ``gray``; with ``zeros`` > 0 a
    private OB element of that many zero bytes comes first (a deflate bomb: the
    file stays about zeros / 1000 bytes, built without ever holding the zeros)."""
    import struct
    import zlib

    from pydicom.uid import DeflatedExplicitVRLittleEndian, ExplicitVRLittleEndian

    ds = base_dataset(ExplicitVRLittleEndian)
    _pixels(ds, gray, "MONOCHROME2", 8)
    body = dataset_bytes(ds)

    def deflate(data: bytes, final: bool) -> bytes:
        c = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
        return c.compress(data) + c.flush(zlib.Z_FINISH if final else zlib.Z_FULL_FLUSH)

    parts = []
    if zeros:
        creator = b"BOMB"
        head = (struct.pack("<HH2sH", 0x0009, 0x0010, b"LO", len(creator)) + creator
                + struct.pack("<HH2sHI", 0x0009, 0x1000, b"OB", 0, zeros))
        parts.append(deflate(head, False))
        step = 1 << 20
        block = deflate(b"\0" * step, False)  # byte-aligned, independent: repeatable
        parts.extend([block] * (zeros // step))
        parts.append(deflate(b"\0" * (zeros % step), False))
    parts.append(deflate(body, True))
    path.write_bytes(_file_bytes(DeflatedExplicitVRLittleEndian, b"".join(parts)))
    return path


def _element(group: int, elem: int, vr: bytes, value: bytes) -> bytes:
    import struct

    if vr in (b"OB", b"OW", b"UN", b"SQ", b"UT"):
        return struct.pack("<HH2sHI", group, elem, vr, 0, len(value)) + value
    return struct.pack("<HH2sH", group, elem, vr, len(value)) + value


def image_elements(rows: int, cols: int, photometric: str = "MONOCHROME2", spp: int = 1,
                   bits: int = 8) -> bytes:
    """The image pixel module's elements (0028,xxxx), Explicit VR Little Endian."""
    import struct

    us = lambda v: struct.pack("<H", v)  # noqa: E731
    pi = photometric.encode()
    pi += b" " * (len(pi) % 2)
    out = _element(0x0028, 0x0002, b"US", us(spp)) + _element(0x0028, 0x0004, b"CS", pi)
    if spp > 1:
        out += _element(0x0028, 0x0006, b"US", us(0))
    return out + b"".join(_element(0x0028, e, b"US", us(v)) for e, v in (
        (0x0010, rows), (0x0011, cols), (0x0100, bits), (0x0101, bits), (0x0102, bits - 1),
        (0x0103, 0)))


def _header_elements() -> bytes:
    """SOP class, modality and patient name: enough for a valid image header."""
    name = PATIENT_NAME.encode()
    name += b" " * (len(name) % 2)
    return (_element(0x0008, 0x0016, b"UI", CR_STORAGE.encode() + b"\0")
            + _element(0x0008, 0x0060, b"CS", b"CR")
            + _element(0x0010, 0x0010, b"PN", name))


def encapsulated(fragments: list[bytes]) -> bytes:
    """Pixel Data (7FE0,0010) of undefined length: empty offset table, the fragments."""
    import struct

    items = struct.pack("<HHI", 0xFFFE, 0xE000, 0)
    for frag in fragments:
        frag += b"\0" * (len(frag) % 2)
        items += struct.pack("<HHI", 0xFFFE, 0xE000, len(frag)) + frag
    items += struct.pack("<HHI", 0xFFFE, 0xE0DD, 0)
    return struct.pack("<HH2sHI", 0x7FE0, 0x0010, b"OB", 0, 0xFFFFFFFF) + items


def write_encapsulated(path: Path, ts: str, fragments: list[bytes], rows: int, cols: int,
                       photometric: str = "MONOCHROME2", spp: int = 1, bits: int = 8) -> Path:
    """A DICOM whose Rows/Columns say one size and whose fragments hold anything."""
    body = (_header_elements() + image_elements(rows, cols, photometric, spp, bits)
            + encapsulated(fragments))
    path.write_bytes(_file_bytes(ts, body))
    return path


def rle_constant(rows: int, cols: int, value: int = 0) -> bytes:
    """One RLE Lossless fragment of an 8-bit image of one value: about 1/64 of its size."""
    import struct

    n = rows * cols
    runs = b"\x81" + bytes([value])  # -127: repeat the next byte 128 times
    data = runs * (n // 128)
    if n % 128:
        data += bytes([257 - n % 128, value])
    return struct.pack("<16I", 1, 64, *([0] * 14)) + data


def write_native(path: Path, pixel_bytes: bytes, rows: int, cols: int,
                 photometric: str = "MONOCHROME2", spp: int = 1, bits: int = 8,
                 extra: bytes = b"") -> Path:
    """Explicit VR Little Endian with the given pixel bytes (and elements before them)."""
    from pydicom.uid import ExplicitVRLittleEndian

    body = (_header_elements() + extra + image_elements(rows, cols, photometric, spp, bits)
            + _element(0x7FE0, 0x0010, b"OB" if bits == 8 else b"OW", pixel_bytes))
    path.write_bytes(_file_bytes(ExplicitVRLittleEndian, body))
    return path


def many_elements(n: int) -> bytes:
    """``n`` empty private elements (8 bytes each), in tag order, in groups 0009-00FF."""
    per_group = 0xF000
    groups = np.repeat(np.arange(0x0009, 0x0101, 2, dtype="<u2"), per_group)[:n]
    elems = np.tile(np.arange(0x1000, 0x1000 + per_group, dtype="<u2"),
                    len(groups) // per_group + 1)[:n]
    rec = np.zeros(n, dtype=[("g", "<u2"), ("e", "<u2"), ("vr", "S2"), ("len", "<u2")])
    rec["g"], rec["e"], rec["vr"] = groups, elems, b"LO"
    return rec.tobytes()
