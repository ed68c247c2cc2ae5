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
import mmap
import os
import re
import warnings
import zlib
from typing import Callable

import numpy as np

from .codestreams import codestream_frame
#: What a prediction reports about a DICOM file; nothing else is read out of it.
from .records import DICOM_FACTS as FACT_KEYS

__all__ = ["FACT_KEYS", "IDENTIFYING", "LATERAL_VIEWS", "DecodeStop", "DicomError",
           "decode_dicom", "supported_transfer_syntaxes"]

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

#: Parsing stops after this many reads (an element header or value is one read,
#: an element one to three). X-ray headers take a few thousand; millions of tiny
#: elements would cost about 0.3 KB of memory and 10 microseconds each.
MAX_READS = 50_000
#: What the parsed elements may take besides their values (reserved before parsing).
PARSE_BYTES = 24 * 1024 * 1024
#: A Deflated Explicit VR Little Endian dataset is inflated in steps of this size,
#: each reserved before it is inflated; the inflated dataset counts twice (the
#: inflated buffer and the values parsed out of it).
_INFLATE_STEP = 8 * 1024 * 1024
#: The inflated dataset may not exceed the size a file may have.
MAX_INFLATED_BYTES = 256 * 1024 * 1024
#: Rows processed at a time by the display pipeline: its float32 arrays never
#: hold more than this many pixels, whatever the image size.
_STRIP_PIXELS = 1 << 18
_STRIP_BYTES = 6 * 4 * _STRIP_PIXELS
#: Transfer syntaxes whose pixel data is a codestream with its own size header.
_CODESTREAM_SYNTAXES = {
    "1.2.840.10008.1.2.4.50", "1.2.840.10008.1.2.4.51", "1.2.840.10008.1.2.4.57",
    "1.2.840.10008.1.2.4.70", "1.2.840.10008.1.2.4.80", "1.2.840.10008.1.2.4.81",
    "1.2.840.10008.1.2.4.90", "1.2.840.10008.1.2.4.91", "1.2.840.10008.1.2.4.201",
    "1.2.840.10008.1.2.4.202", "1.2.840.10008.1.2.4.203"}

#: ``reserve(total_bytes, what)``: called before each allocation that grows with
#: the image; may raise :class:`DecodeStop` to stop the decode.
Reserve = Callable[[int, str], None]


class DicomError(ValueError):
    """A DICOM file that cannot be shown as an image; one line, no identifying values."""


class DecodeStop(Exception):
    """Raised by a ``reserve`` callback; :func:`decode_dicom` lets it through unchanged."""


class _TooManyElements(Exception):
    pass


_TOO_MANY = (f"DICOM dataset with too many elements (parsing stopped after {MAX_READS} "
             "element headers and values)")


class _CountingReader:
    """A binary file for pydicom that refuses to go on after ``MAX_READS`` reads."""

    def __init__(self, raw):
        self._raw = raw
        self.reads = 0
        self.name = getattr(raw, "name", None)
        self.seek, self.tell = raw.seek, raw.tell

    def read(self, size: int = -1) -> bytes:
        self.reads += 1
        if self.reads > MAX_READS:
            raise _TooManyElements
        return self._raw.read(size)

    def readinto(self, buffer) -> int:
        self.reads += 1
        return self._raw.readinto(buffer)

    @property
    def exceeded(self) -> bool:
        return self.reads > MAX_READS


def supported_transfer_syntaxes() -> list[tuple[str, str]]:
    """(UID, name) of every transfer syntax whose pixel data this install can decode."""
    from pydicom.pixels import get_decoder
    from pydicom.pixels.decoders.base import _PIXEL_DATA_DECODERS
    from pydicom.uid import UID

    return [(str(uid), UID(uid).name) for uid in sorted(_PIXEL_DATA_DECODERS)
            if get_decoder(uid).is_available]


def decode_dicom(source: str | os.PathLike | bytes, info: dict | None = None,
                 max_pixels: int | None = None, max_bytes: int | None = None,
                 reserve: Reserve | None = None) -> np.ndarray:
    """Render a DICOM file's pixels to a 2-D uint8 greyscale image.

    ``source`` is the file's path (read element by element, never whole) or its
    bytes. ``info`` (optional) receives ``format='dicom'``, ``height``,
    ``width``, ``chroma`` (colour files) and ``dicom`` (the :data:`FACT_KEYS`).
    ``reserve`` (optional) is told, before parsing, before each inflate step of a
    deflated dataset and before the pixels are decoded, how many bytes the
    decode will hold at most from then on.

    Raises:
        DicomError: with a one-line reason naming what is missing or unsupported.
        DecodeStop: whatever ``reserve`` raised.
    """
    try:
        import pydicom  # noqa: F401
        from pydicom.errors import InvalidDicomError
    except ImportError:  # pragma: no cover - pydicom is a base dependency
        raise DicomError("DICOM support needs pydicom (pip install pydicom)") from None

    reserve = reserve or (lambda total, what: None)
    ds = None
    reader = None
    try:
        with np.errstate(all="ignore"), _open(source) as raw:
            size = _size(raw)
            reserve(size + PARSE_BYTES, "DICOM dataset")
            reader = _CountingReader(raw)
            ds, base = _read(reader, size, reserve)
            return _render(ds, info, max_pixels, max_bytes, source, base, reserve)
    except DecodeStop:
        raise
    except DicomError as exc:
        raise DicomError(_scrub(str(exc), ds)) from None
    except _TooManyElements:
        raise DicomError(_TOO_MANY) from None
    except InvalidDicomError as exc:
        raise DicomError(_scrub(f"not a valid DICOM dataset ({_first_line(exc)})", ds)) from None
    except MemoryError:
        raise DicomError("out of memory while decoding DICOM pixel data") from None
    except (KeyboardInterrupt, SystemExit, GeneratorExit):
        raise
    except BaseException as exc:  # many types for damaged files; the Rust RLE codec panics
        if reader is not None and reader.exceeded:  # pydicom may have wrapped our exception
            raise DicomError(_TOO_MANY) from None
        where = "pixel data" if ds is not None else "dataset"
        raise DicomError(_scrub(f"corrupt DICOM {where} ({type(exc).__name__}: "
                                f"{_first_line(exc)})", ds)) from None


def _open(source):
    if isinstance(source, (bytes, bytearray, memoryview)):
        return io.BytesIO(source)
    return open(source, "rb")


def _size(raw) -> int:
    here = raw.tell()
    raw.seek(0, os.SEEK_END)
    size = raw.tell()
    raw.seek(here)
    return size


def _read(reader: _CountingReader, size: int, reserve: Reserve):
    """The dataset, and the bytes its reading holds (file values, inflated data)."""
    import pydicom
    from pydicom.dataset import FileDataset
    from pydicom.filereader import _read_file_meta_info, read_dataset, read_preamble
    from pydicom.uid import DeflatedExplicitVRLittleEndian

    preamble = read_preamble(reader, False)
    meta = _read_file_meta_info(reader)
    if meta.get("TransferSyntaxUID") != DeflatedExplicitVRLittleEndian:
        reader.seek(0)
        return pydicom.dcmread(reader), size
    # pydicom would inflate the whole dataset at once; a few MB can inflate to
    # gigabytes (a deflate bomb), so inflate in reserved steps up to a limit.
    compressed = bytearray(max(0, size - reader.tell()))  # one buffer (read() may join two)
    del compressed[reader.readinto(compressed):]
    inflated = _inflate(compressed, size, reserve)
    del compressed
    length = inflated.getbuffer().nbytes
    body = _CountingReader(inflated)
    body.reads = reader.reads
    try:
        dataset = read_dataset(body, False, True)
    finally:
        reader.reads = body.reads
    ds = FileDataset(reader.name or "", dataset, preamble, meta, False, True)
    return ds, size + 2 * length


def _inflate(compressed: bytearray, size: int, reserve: Reserve) -> io.BytesIO:
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    out = io.BytesIO()
    view = memoryview(compressed)
    for start in range(0, len(view), 1 << 20):  # input in 1 MiB slices: no big tail copies
        pending = view[start:start + (1 << 20)]
        while pending and not inflater.eof:
            done = out.tell()
            if done + _INFLATE_STEP > MAX_INFLATED_BYTES:
                raise DicomError(f"deflated DICOM dataset inflates past "
                                 f"{MAX_INFLATED_BYTES // 2**20} MiB: refused")
            reserve(size + PARSE_BYTES + 2 * (done + _INFLATE_STEP),
                    "deflated DICOM dataset")
            out.write(inflater.decompress(pending, _INFLATE_STEP))
            pending = inflater.unconsumed_tail
        if inflater.eof:
            break
    out.seek(0)
    return out


def _render(ds, info: dict | None, max_pixels: int | None, max_bytes: int | None,
            source, base: int, reserve: Reserve) -> np.ndarray:
    from pydicom.pixels import get_decoder

    meta = getattr(ds, "file_meta", None)
    ts = getattr(meta, "TransferSyntaxUID", None) if meta is not None else None
    if ts is None and "SOPClassUID" not in ds and "PixelData" not in ds:
        raise DicomError("no valid DICOM dataset after the DICM preamble")
    facts = _facts(ds, ts)
    if "PixelData" not in ds and _contains(source, _PIXEL_DATA_TAG):  # parser stopped inside it
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
    if photometric.startswith("MONOCHROME") and spp != 1:
        raise DicomError(f"inconsistent DICOM header: photometric interpretation "
                         f"{photometric} with {spp} samples per pixel (expected 1)")
    if max_pixels and rows * cols > max_pixels:
        raise DicomError(f"image too large ({cols}x{rows} px > {max_pixels // 1_000_000} "
                         "megapixels)")
    raw = rows * cols * spp * max(1, -(-bits_alloc // 8))
    if max_bytes and raw > max_bytes:
        raise DicomError(f"image too large to decode ({cols}x{rows} px, {spp} samples of "
                         f"{bits_alloc} bits)")
    if str(ts) in _CODESTREAM_SYNTAXES:
        _check_codestream(ds, ts, rows, cols, spp)
    # Before decoding: what the pixels will hold at their peak. The file's values
    # (base), the fragments joined to one frame, the decoder's array and its
    # input or output copy (2 x raw), the 8-bit result and the padding mask, the
    # strips of the display pipeline; colour adds pydicom's float32 YBR
    # conversion and the RGB copies.
    pixels = rows * cols
    colour = 0 if photometric.startswith("MONOCHROME") else 16 * pixels
    frame_copy = len(ds.PixelData) if ts.is_compressed else 0  # fragments joined to a frame
    reserve(base + PARSE_BYTES + frame_copy + 2 * raw + 2 * pixels + colour + _STRIP_BYTES,
            f"{cols}x{rows} px DICOM")

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


def _contains(source, needle: bytes) -> bool:
    """Whether the file holds ``needle`` (searched in a memory map, not read into memory)."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        return needle in bytes(source)
    try:
        with open(source, "rb") as fh, mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as mm:
            return mm.find(needle) >= 0
    except (OSError, ValueError):
        return False


def _first_fragment(pixel_data: bytes, limit: int = 1 << 16) -> bytes:
    """The start of the first frame's codestream: fragments after the Basic Offset Table."""
    out = b""
    i = 0
    items = 0
    while i + 8 <= len(pixel_data) and len(out) < limit:
        tag, length = pixel_data[i:i + 4], int.from_bytes(pixel_data[i + 4:i + 8], "little")
        if tag != b"\xfe\xff\x00\xe0" or length == 0xFFFFFFFF:
            break
        if items:  # item 0 is the Basic Offset Table
            out += pixel_data[i + 8:i + 8 + min(length, limit - len(out))]
        items += 1
        i += 8 + length
    return out


def _check_codestream(ds, ts, rows: int, cols: int, spp: int) -> None:
    """The codestream's own size must be the header's, checked before decoding it."""
    stream = _first_fragment(ds.PixelData)
    frame = codestream_frame(stream)
    if frame is None:
        raise DicomError(f"corrupt DICOM pixel data (no {ts.name} codestream header "
                         "in the first fragment)")
    if (frame.height, frame.width) != (rows, cols) or frame.components != spp:
        raise DicomError(
            f"corrupt DICOM pixel data: a {frame.width}x{frame.height} {frame.codec} "
            f"codestream with {frame.components} component(s) where Rows/Columns say "
            f"{cols}x{rows} with {spp} sample(s) per pixel")


def _strips(rows: int, cols: int):
    """Row slices of at most _STRIP_PIXELS pixels (at least one row)."""
    step = max(1, _STRIP_PIXELS // max(1, cols))
    return [slice(r, min(rows, r + step)) for r in range(0, rows, step)]


def _monochrome(arr: np.ndarray, ds, photometric: str) -> np.ndarray:
    """Stored values -> modality LUT -> VOI LUT -> 0..255, MONOCHROME1 inverted.

    Computed a strip of rows at a time: the float32 arrays of each step never
    hold more than _STRIP_PIXELS pixels, whatever the size of the image; the
    statistics a step needs over the whole image are taken in a first pass.
    """
    if arr.ndim != 2:
        raise DicomError(f"DICOM pixel data of shape {arr.shape} for a "
                         f"{photometric} image (expected rows x columns)")
    pad = _padding_mask(arr, ds)
    modality = _modality(ds)
    voi = _voi(ds, arr, pad, modality)
    invert = photometric == "MONOCHROME1"
    if str(ds.get("PresentationLUTShape", "")).strip().upper() == "INVERSE":
        invert = not invert
    out = np.empty(arr.shape, np.uint8)
    with np.errstate(all="ignore"):  # inf/NaN from extreme header values: no stderr lines
        for rows in _strips(*arr.shape):
            y = voi(modality(arr[rows]))
            if invert:
                y = 1.0 - y
            if pad is not None:
                y[pad[rows]] = 0.0
            y = y * 255.0 + 0.5
            np.nan_to_num(y, copy=False, nan=0.0)
            out[rows] = np.clip(y, 0, 255).astype(np.uint8)
    return out


def _modality(ds):
    """Stored values -> float32 values: the Modality LUT Sequence or Rescale Slope/Intercept."""
    if "ModalityLUTSequence" in ds:
        from pydicom.pixels import apply_modality_lut
        return lambda a: np.asarray(apply_modality_lut(a, ds), dtype=np.float32)
    slope = _float(ds.get("RescaleSlope", 1.0), 1.0) or 1.0
    intercept = _float(ds.get("RescaleIntercept", 0.0), 0.0)
    if slope == 1.0 and intercept == 0.0:
        return lambda a: a.astype(np.float32)
    s, i = np.float32(slope), np.float32(intercept)
    return lambda a: a.astype(np.float32) * s + i


def _value_range(arr: np.ndarray, pad: np.ndarray | None, modality) -> tuple[float, float] | None:
    """(min, max) of the modality values over the image, padding left out; None if empty."""
    lo, hi = np.inf, -np.inf
    for rows in _strips(*arr.shape):
        x = modality(arr[rows])
        if pad is not None:
            x = x[~pad[rows]]
        if x.size:
            lo, hi = min(lo, float(x.min())), max(hi, float(x.max()))
    return None if lo > hi else (lo, hi)


def _voi(ds, arr: np.ndarray, pad: np.ndarray | None, modality):
    """The VOI transform to 0..1 (float32), for one strip at a time: LUT sequence,
    else window, else the range of the values present."""
    if "VOILUTSequence" in ds and len(ds.VOILUTSequence):
        item = ds.VOILUTSequence[0]
        desc = [int(v) for v in item.LUTDescriptor]
        lut = _lut_data(item, desc)
        if lut is not None and lut.size:
            first = desc[1]
            if first >= 2**15:  # signed first-mapped value when the values go below 0
                full = _value_range(arr, None, modality)
                if full is not None and full[0] < 0:
                    first -= 2**16
            top = float(lut.max()) if lut.max() > 0 else 1.0
            bits = desc[2] if 8 <= desc[2] <= 16 else int(np.ceil(np.log2(top + 1)))

            def lut_voi(x):
                idx = np.clip(np.rint(x) - first, 0, lut.size - 1).astype(np.intp)
                return (lut[idx] / float(2**bits - 1)).astype(np.float32).clip(0, 1)
            return lut_voi
    centre = _first(ds.get("WindowCenter"))
    width = _first(ds.get("WindowWidth"))
    if centre is not None and width is not None and width >= 1:
        func = str(ds.get("VOILUTFunction", "LINEAR") or "LINEAR").strip().upper()
        c, w = np.float32(centre), np.float32(width)
        if func == "SIGMOID":
            return lambda x: (1.0 / (1.0 + np.exp(-4.0 * (x - c) / w))).astype(np.float32)
        if func == "LINEAR_EXACT":
            return lambda x: np.clip((x - c) / w + 0.5, 0, 1).astype(np.float32)
        if w > 1:  # LINEAR (PS3.3 C.11.2.1.2.1)
            return lambda x: np.clip((x - (c - 0.5)) / (w - 1) + 0.5, 0, 1).astype(np.float32)
        return lambda x: (x >= c - 0.5).astype(np.float32)
    found = _value_range(arr, pad, modality)
    if found is None or found[1] <= found[0]:
        return np.zeros_like
    lo, scale = np.float32(found[0]), np.float32(1.0 / (found[1] - found[0]))
    return lambda x: ((x - lo) * scale).clip(0, 1)


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
    """Luminance, a strip of rows at a time, and the chroma of an 8x subsample."""
    import cv2

    if rgb.ndim != 3 or rgb.shape[2] != 3:
        raise DicomError(f"DICOM colour pixel data of shape {rgb.shape} (expected rows x "
                         "columns x 3)")
    if rgb.dtype != np.uint8:
        top = float(rgb.max()) or 1.0
        to8 = lambda a: (a.astype(np.float32) * (255.0 / top) + 0.5).astype(np.uint8)  # noqa: E731
    else:
        to8 = lambda a: a  # noqa: E731
    small = to8(rgb[::8, ::8]).astype(np.int16)
    chroma = float(np.mean(small.max(axis=2) - small.min(axis=2))) if small.size else 0.0
    gray = np.empty(rgb.shape[:2], np.uint8)
    for rows in _strips(*rgb.shape[:2]):
        gray[rows] = cv2.cvtColor(np.ascontiguousarray(to8(rgb[rows])), cv2.COLOR_RGB2GRAY)
    return gray, chroma


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
                if len(part) >= 3:  # parsers change case ("DOE^JOHN" quoted as "Doe")
                    message = re.sub(re.escape(part), "[removed]", message,
                                     flags=re.IGNORECASE)
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
