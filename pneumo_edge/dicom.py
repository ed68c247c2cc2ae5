"""DICOM X-rays: recognised by content, rendered to greyscale as a viewer shows them.

A file is DICOM when bytes 128-131 are ``DICM`` (the Part 10 preamble), whatever
its name. The pixels go through the display pipeline of PS3.3 C.11 and C.7.6.3:

1. the stored values, with the Pixel Padding Value (and Pixel Padding Range
   Limit) remembered as background;
2. the Modality LUT: Rescale Slope/Intercept, or the Modality LUT Sequence;
3. the VOI LUT: the first item of the VOI LUT Sequence, else the first Window
   Center/Width with its VOI LUT Function (LINEAR, LINEAR_EXACT, SIGMOID), else
   the range of the values present, padding excluded;
4. MONOCHROME1 (and Presentation LUT Shape INVERSE) inverted, so that bone is
   bright as in MONOCHROME2; padding shown black;
5. RGB, YBR and PALETTE COLOR secondary captures converted to grey (the colour
   input check then measures their chroma).

The result is an 8-bit image that enters the same resize and model path as a
JPEG. Multi-frame files are refused: a chest radiograph is one frame, and
picking one frame of a tomosynthesis or fluoroscopy series would be a guess.

Privacy: only the non-identifying acquisition facts of :data:`FACT_KEYS` leave
this module; error messages are built here and scrubbed of every value of the
identifying attributes in :data:`IDENTIFYING` in case a parser quotes one.
"""

from __future__ import annotations

import io
import re
import warnings

import numpy as np

#: What a prediction reports about a DICOM file; nothing else is read out of it.
from .records import DICOM_FACTS as FACT_KEYS

__all__ = ["FACT_KEYS", "IDENTIFYING", "LATERAL_VIEWS", "DicomError", "decode_dicom",
           "supported_transfer_syntaxes"]

#: Views the model was not trained on (it saw frontal PA/AP chest X-rays).
LATERAL_VIEWS = frozenset({"LL", "RL", "LATERAL", "LAT"})
#: Modalities of projection radiographs (CR, DX), mammography-free; OT and SC are
#: secondary captures, often a converted radiograph. Others get a warning.
RADIOGRAPH_MODALITIES = frozenset({"CR", "DX", "RG", "DR", "OT", "SC"})
#: Attributes whose values must never appear in an output or a message.
IDENTIFYING = ("PatientName", "PatientID", "PatientBirthDate", "PatientBirthTime",
               "OtherPatientIDs", "OtherPatientNames", "PatientAddress",
               "PatientTelephoneNumbers", "PatientMotherBirthName", "AccessionNumber",
               "StudyID", "InstitutionName", "InstitutionAddress", "ReferringPhysicianName",
               "PerformingPhysicianName", "OperatorsName", "StudyInstanceUID",
               "SeriesInstanceUID", "SOPInstanceUID", "MedicalRecordLocator",
               "IssuerOfPatientID", "DeviceSerialNumber", "StationName")

# pydicom reports recoverable oddities (VR lookups, padding, a missing delimiter)
# as UserWarnings; this module turns what matters into reasons, and a run over
# an archive must not print one warning per file.
warnings.filterwarnings("ignore", category=UserWarning, module=r"pydicom(\.|$)")

_PIXEL_DATA_TAG = b"\xe0\x7f\x10\x00"  # (7FE0,0010), little endian
_MAX_FACT = 64
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")


class DicomError(ValueError):
    """A DICOM file that cannot be shown as an image; one line, no identifying values."""


def supported_transfer_syntaxes() -> list[tuple[str, str]]:
    """(UID, name) of every transfer syntax whose pixel data this install can decode."""
    from pydicom.pixels import get_decoder
    from pydicom.pixels.decoders.base import _PIXEL_DATA_DECODERS
    from pydicom.uid import UID

    return [(str(uid), UID(uid).name) for uid in sorted(_PIXEL_DATA_DECODERS)
            if get_decoder(uid).is_available]


def decode_dicom(data: bytes, info: dict | None = None,
                 max_pixels: int | None = None, max_bytes: int | None = None) -> np.ndarray:
    """Render a DICOM file's pixels to a 2-D uint8 greyscale image.

    ``info`` (optional) receives ``format='dicom'``, ``height``, ``width``,
    ``chroma`` (colour files) and ``dicom`` (the :data:`FACT_KEYS`).

    Raises:
        DicomError: with a one-line reason naming what is missing or unsupported.
    """
    try:
        import pydicom
        from pydicom.errors import InvalidDicomError
    except ImportError:  # pragma: no cover - pydicom is a base dependency
        raise DicomError("DICOM support needs pydicom (pip install pydicom)") from None

    ds = None
    try:
        ds = pydicom.dcmread(io.BytesIO(data))
        return _render(ds, info, max_pixels, max_bytes, data)
    except DicomError as exc:
        raise DicomError(_scrub(str(exc), ds)) from None
    except InvalidDicomError as exc:
        raise DicomError(_scrub(f"not a valid DICOM dataset ({_first_line(exc)})", ds)) from None
    except MemoryError:
        raise DicomError("out of memory while decoding DICOM pixel data") from None
    except (KeyboardInterrupt, SystemExit, GeneratorExit):
        raise
    except BaseException as exc:  # many types for damaged files; the Rust RLE codec panics
        where = "pixel data" if ds is not None else "dataset"
        raise DicomError(_scrub(f"corrupt DICOM {where} ({type(exc).__name__}: "
                                f"{_first_line(exc)})", ds)) from None


def _render(ds, info: dict | None, max_pixels: int | None, max_bytes: int | None,
            data: bytes) -> np.ndarray:
    from pydicom.pixels import get_decoder

    meta = getattr(ds, "file_meta", None)
    ts = getattr(meta, "TransferSyntaxUID", None) if meta is not None else None
    if ts is None and "SOPClassUID" not in ds and "PixelData" not in ds:
        raise DicomError("no valid DICOM dataset after the DICM preamble")
    facts = _facts(ds, ts)
    if "PixelData" not in ds and _PIXEL_DATA_TAG in data:  # the parser stopped inside it
        raise DicomError("truncated or corrupt DICOM pixel data (the file ends inside "
                         "the Pixel Data element)")
    if "PixelData" not in ds:
        other = [k for k in ("FloatPixelData", "DoubleFloatPixelData") if k in ds]
        if other:
            raise DicomError(f"DICOM float pixel data ({other[0]}) is not supported")
        sop = _sop_name(ds)
        raise DicomError(f"DICOM file without pixel data ({sop}): not an image"
                         if sop else "DICOM file without pixel data: not an image")
    if ts is None:
        raise DicomError("DICOM file meta has no Transfer Syntax UID")
    try:
        decoder = get_decoder(ts)
    except NotImplementedError:
        raise DicomError(f"unsupported DICOM transfer syntax {ts.name} ({ts}): "
                         "no pixel data decoder exists for it in pydicom") from None
    if not decoder.is_available:
        missing = "; ".join(decoder.missing_dependencies) or "a decoder plugin"
        raise DicomError(f"unsupported DICOM transfer syntax {ts.name} ({ts}): "
                         f"needs {missing}")
    try:
        rows, cols = int(ds.Rows), int(ds.Columns)
        spp = int(ds.get("SamplesPerPixel", 1) or 1)
        bits_alloc = int(ds.BitsAllocated)
        photometric = str(ds.PhotometricInterpretation).strip().upper()
    except (AttributeError, TypeError, ValueError):
        raise DicomError("DICOM image without valid Rows, Columns, Bits Allocated or "
                         "Photometric Interpretation") from None
    frames = _int(ds.get("NumberOfFrames", 1)) or 1
    if frames > 1:
        raise DicomError(f"multi-frame DICOM ({frames} frames): one radiograph per file "
                         "is expected")
    if rows <= 0 or cols <= 0:
        raise DicomError(f"DICOM image of {cols}x{rows} px")
    if max_pixels and rows * cols > max_pixels:
        raise DicomError(f"image too large ({cols}x{rows} px > {max_pixels // 1_000_000} "
                         "megapixels)")
    if max_bytes and rows * cols * spp * max(1, bits_alloc // 8) * 4 > max_bytes:
        raise DicomError(f"image too large to decode ({cols}x{rows} px, {spp} samples of "
                         f"{bits_alloc} bits)")

    arr = ds.pixel_array  # decoded; YBR is converted to RGB by pydicom
    if arr.ndim == 3 and spp == 1:
        arr = arr[0]
    chroma = None
    if photometric in ("MONOCHROME1", "MONOCHROME2"):
        gray = _monochrome(arr, ds, photometric)
    elif photometric == "PALETTE COLOR":
        from pydicom.pixels import apply_color_lut
        rgb = apply_color_lut(arr, ds)
        gray, chroma = _rgb_to_gray(rgb)
    elif spp == 3 and (photometric == "RGB" or photometric.startswith("YBR")):
        gray, chroma = _rgb_to_gray(arr)
    else:
        raise DicomError(f"unsupported DICOM photometric interpretation {photometric!r}")
    if info is not None:
        info.update(format="dicom", height=rows, width=cols, chroma=chroma, dicom=facts,
                    dicom_burned_in=str(ds.get("BurnedInAnnotation", "")).upper() == "YES")
    return gray


def _monochrome(arr: np.ndarray, ds, photometric: str) -> np.ndarray:
    """Stored values -> modality LUT -> VOI LUT -> 0..255, MONOCHROME1 inverted."""
    pad = _padding_mask(arr, ds)
    if "ModalityLUTSequence" in ds:
        from pydicom.pixels import apply_modality_lut
        x = np.asarray(apply_modality_lut(arr, ds), dtype=np.float32)
    else:
        slope = _float(ds.get("RescaleSlope", 1.0), 1.0) or 1.0
        intercept = _float(ds.get("RescaleIntercept", 0.0), 0.0)
        x = arr.astype(np.float32)
        if slope != 1.0 or intercept != 0.0:
            x = x * np.float32(slope) + np.float32(intercept)
    y = _voi(x, ds, pad)
    invert = photometric == "MONOCHROME1"
    if str(ds.get("PresentationLUTShape", "")).strip().upper() == "INVERSE":
        invert = not invert
    if invert:
        y = 1.0 - y
    if pad is not None:
        y[pad] = 0.0
    return np.clip(y * 255.0 + 0.5, 0, 255).astype(np.uint8)


def _voi(x: np.ndarray, ds, pad: np.ndarray | None) -> np.ndarray:
    """VOI transform to 0..1 (float32): LUT sequence, else window, else value range."""
    if "VOILUTSequence" in ds and len(ds.VOILUTSequence):
        item = ds.VOILUTSequence[0]
        desc = [int(v) for v in item.LUTDescriptor]
        lut = _lut_data(item, desc)
        if lut is not None and lut.size:
            first = desc[1]
            if first >= 2**15 and x.min() < 0:  # signed first-mapped value
                first -= 2**16
            idx = np.clip(np.rint(x) - first, 0, lut.size - 1).astype(np.intp)
            top = float(lut.max()) if lut.max() > 0 else 1.0
            bits = desc[2] if 8 <= desc[2] <= 16 else int(np.ceil(np.log2(top + 1)))
            return (lut[idx] / float(2**bits - 1)).astype(np.float32).clip(0, 1)
    centre = _first(ds.get("WindowCenter"))
    width = _first(ds.get("WindowWidth"))
    if centre is not None and width is not None and width >= 1:
        func = str(ds.get("VOILUTFunction", "LINEAR") or "LINEAR").strip().upper()
        c, w = np.float32(centre), np.float32(width)
        if func == "SIGMOID":
            return (1.0 / (1.0 + np.exp(-4.0 * (x - c) / w))).astype(np.float32)
        if func == "LINEAR_EXACT":
            return np.clip((x - c) / w + 0.5, 0, 1).astype(np.float32)
        if w > 1:  # LINEAR (PS3.3 C.11.2.1.2.1)
            return np.clip((x - (c - 0.5)) / (w - 1) + 0.5, 0, 1).astype(np.float32)
        return (x >= c - 0.5).astype(np.float32)
    values = x if pad is None else x[~pad]
    if values.size == 0:
        return np.zeros_like(x)
    lo, hi = float(values.min()), float(values.max())
    if hi <= lo:
        return np.zeros_like(x)
    return ((x - np.float32(lo)) * np.float32(1.0 / (hi - lo))).clip(0, 1)


def _lut_data(item, desc: list[int]) -> np.ndarray | None:
    data = item.get("LUTData")
    if data is None:
        return None
    raw = data.value if hasattr(data, "value") else data
    if isinstance(raw, (bytes, bytearray)):
        dtype = np.uint8 if desc[2] <= 8 and len(raw) == (desc[0] or 65536) else np.uint16
        return np.frombuffer(raw, dtype=dtype).astype(np.float32)
    return np.asarray(raw if not np.isscalar(raw) else [raw], dtype=np.float32)


def _padding_mask(arr: np.ndarray, ds) -> np.ndarray | None:
    ppv = _int(ds.get("PixelPaddingValue"))
    if ppv is None:
        return None
    limit = _int(ds.get("PixelPaddingRangeLimit"))
    if np.issubdtype(arr.dtype, np.signedinteger) and ppv >= 2**15:
        ppv -= 2**16  # the value was read as US but pixels are signed
    if limit is None:
        mask = arr == ppv
    else:
        lo, hi = sorted((ppv, limit))
        mask = (arr >= lo) & (arr <= hi)
    return mask if mask.any() else None


def _rgb_to_gray(rgb: np.ndarray) -> tuple[np.ndarray, float]:
    import cv2

    if rgb.dtype != np.uint8:
        top = float(rgb.max()) or 1.0
        rgb = (rgb.astype(np.float32) * (255.0 / top) + 0.5).astype(np.uint8)
    small = rgb[::8, ::8].astype(np.int16)
    chroma = float(np.mean(small.max(axis=2) - small.min(axis=2))) if small.size else 0.0
    return cv2.cvtColor(np.ascontiguousarray(rgb), cv2.COLOR_RGB2GRAY), chroma


def _facts(ds, ts) -> dict:
    def text(key):
        value = ds.get(key)
        if value is None or value == "":
            return None
        value = _CONTROL.sub("", str(value)).strip()[:_MAX_FACT]
        return value or None

    return {"modality": text("Modality"), "view_position": text("ViewPosition"),
            "photometric_interpretation": text("PhotometricInterpretation"),
            "bits_stored": _int(ds.get("BitsStored")),
            "transfer_syntax": None if ts is None else _CONTROL.sub("", ts.name)[:_MAX_FACT]}


def _sop_name(ds) -> str | None:
    from pydicom.uid import UID

    uid = ds.get("SOPClassUID") or getattr(getattr(ds, "file_meta", None),
                                           "MediaStorageSOPClassUID", None)
    if not uid:
        return None
    name = UID(str(uid)).name
    return _CONTROL.sub("", name)[:_MAX_FACT]


def _scrub(message: str, ds) -> str:
    """Replace any identifying value the dataset holds by '[removed]'."""
    message = _CONTROL.sub(" ", message)
    if ds is None:
        return message
    for key in IDENTIFYING:
        try:
            value = ds.get(key)
        except Exception:
            continue
        if value is None:
            continue
        values = value if isinstance(value, (list, tuple)) else [value]
        for v in values:
            for part in sorted({str(v), *str(v).split("^")}, key=len, reverse=True):
                part = part.strip()
                if len(part) >= 3:
                    message = message.replace(part, "[removed]")
    return message


def _first_line(exc: BaseException) -> str:
    """The message on one line: pydicom lists each plugin's failure on its own line."""
    text = " ".join(part.strip() for part in str(exc).strip().splitlines() if part.strip())
    return text[:300] if text else "no detail"


def _first(value) -> float | None:
    if value is None:
        return None
    if not isinstance(value, (str, bytes)) and hasattr(value, "__len__"):
        if len(value) == 0:
            return None
        value = value[0]
    return _float(value, None)


def _float(value, default):
    try:
        out = float(value)
    except (TypeError, ValueError):
        return default
    return out if np.isfinite(out) else default


def _int(value) -> int | None:
    if value is None or value == "":
        return None
    try:
        return int(value)
    except (TypeError, ValueError):
        try:
            return int(float(value))
        except (TypeError, ValueError):
            return None
