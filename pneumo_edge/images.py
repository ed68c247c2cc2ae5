"""Finding image files, reading labels from folder names, and decoding by content.

Decoding never trusts the file extension: the first bytes decide the format.
Large JPEGs are decoded at a reduced scale (libjpeg DCT scaling) when the model
input is much smaller than the image, which keeps full-resolution X-rays fast
and huge files inside a bounded amount of memory.
"""

from __future__ import annotations

import os
import struct
import threading
from contextlib import nullcontext
from pathlib import Path
from typing import Iterable

import cv2
import numpy as np

from .metadata import CLASS_NAMES

__all__ = [
    "DICOM_EXTENSIONS",
    "IMAGE_EXTENSIONS",
    "ImageDecodeError",
    "collect_images",
    "collect_labelled",
    "decode_gray",
    "is_dicom",
    "is_dicom_file",
    "is_image_file",
    "label_from_path",
    "sniff_format",
]

#: Extensions picked up when walking a folder. Files named on the command line
#: are always tried, whatever their extension, because decoding is by content.
IMAGE_EXTENSIONS = frozenset(
    {".jpg", ".jpeg", ".jpe", ".png", ".bmp", ".dib", ".tif", ".tiff"}
)
#: DICOM files are found by content (``DICM`` at byte 128) whatever their name;
#: these extensions are only the ones kept without looking inside.
DICOM_EXTENSIONS = frozenset({".dcm", ".dicom", ".dic"})
#: Names skipped when walking folders: the index file of a DICOM CD or archive
#: export is DICOM but holds no image.
_SKIPPED_NAMES = frozenset({"DICOMDIR"})

#: Files larger than this are refused before reading (no X-ray is this big).
MAX_FILE_BYTES = 256 * 1024 * 1024
#: Decoded images with more pixels than this are refused (about 16,000 px square),
MAX_PIXELS = 256_000_000
#: or whose decoded samples would take more bytes than this (16-bit and colour count).
MAX_DECODED_BYTES = 320 * 1024 * 1024
#: Reads or decodes larger than this take a process-wide lock, one at a time, so
#: that the decoding threads never hold several huge images at once. Peak memory
#: of decoding is then at most MAX_FILE_BYTES + MAX_DECODED_BYTES for the one big
#: image plus 2 x BIG_BYTES per other decoding thread.
BIG_BYTES = 64 * 1024 * 1024
_BIG = threading.Lock()

_REDUCED_FLAGS = {2: cv2.IMREAD_REDUCED_GRAYSCALE_2, 4: cv2.IMREAD_REDUCED_GRAYSCALE_4,
                  8: cv2.IMREAD_REDUCED_GRAYSCALE_8}


class ImageDecodeError(ValueError):
    """A file could not be turned into an image; the message is one line."""


def collect_images(paths: Iterable[str | os.PathLike]) -> list[Path]:
    """Return the image files under ``paths``, sorted, without duplicates.

    Folders are walked recursively (symlinked folders are not followed) and the
    files :func:`is_image_file` accepts are kept (image extensions, and DICOM
    files by content, with or without an extension); a path given explicitly as
    a file is kept whatever its name. Something that is not a regular file (a folder
    named ``x.jpeg``, a socket) is never returned.

    Raises:
        FileNotFoundError: if a given path does not exist.
    """
    found: dict[str, Path] = {}
    for raw in paths:
        path = Path(raw)
        if path.is_file():
            found[str(path)] = path
        elif path.is_dir():
            for root, dirs, files in os.walk(path):
                dirs.sort()
                for name in files:
                    child = Path(root) / name
                    if is_image_file(child):
                        found[str(child)] = child
        elif path.exists():
            raise FileNotFoundError(f"{path}: not a file or folder")
        else:
            raise FileNotFoundError(f"{path}: no such file or folder")
    return [found[k] for k in sorted(found)]


def collect_labelled(paths: Iterable[str | os.PathLike]) -> list[tuple[Path, str | None]]:
    """Image files under ``paths`` with the ground truth their folders give.

    Only folders at or below a given path label its files: ``predict
    data/NORMAL`` labels every file NORMAL, while a folder named ``pneumonia``
    above the given path never does, however the path was typed. A file named
    directly is unlabelled. The same file reached twice (two spellings, a folder
    and a file inside it) is kept once, with the label of its first mention.

    Raises:
        FileNotFoundError: if a given path does not exist.
    """
    found: dict[str, tuple[Path, str | None]] = {}
    for raw in paths:
        root = Path(raw)
        for path in collect_images([root]):
            key = os.path.realpath(path)
            if key in found:
                continue
            truth = None
            if root.is_dir():
                truth = label_from_path(Path(root.resolve().name or "root") / path.relative_to(root))
            found[key] = (path, truth)
    return sorted(found.values(), key=lambda item: str(item[0]))


def is_image_file(path: Path) -> bool:
    """Whether a folder walk keeps ``path``: a regular file with an image or DICOM
    extension, or any other file whose first 132 bytes say DICOM (``DICM``)."""
    suffix = path.suffix.lower()
    if suffix in IMAGE_EXTENSIONS or suffix in DICOM_EXTENSIONS:
        return path.is_file()
    if path.name.upper() in _SKIPPED_NAMES or path.name.startswith("."):
        return False
    return is_dicom_file(path)


def is_dicom(head: bytes) -> bool:
    """True for the head of a DICOM Part 10 file: ``DICM`` after the 128-byte preamble."""
    return len(head) >= 132 and head[128:132] == b"DICM"


def is_dicom_file(path: str | os.PathLike) -> bool:
    """A regular file whose first 132 bytes carry the DICOM ``DICM`` marker."""
    try:
        if not os.path.isfile(path):
            return False
        with open(path, "rb") as fh:
            return is_dicom(fh.read(132))
    except OSError:
        return False


def label_from_path(path: str | os.PathLike) -> str | None:
    """Ground truth from the nearest parent folder named NORMAL or PNEUMONIA."""
    for part in reversed(Path(path).parent.parts):
        upper = part.upper()
        if upper in CLASS_NAMES:
            return upper
    return None


def sniff_format(head: bytes) -> str | None:
    """Name the image format from its first bytes, or None if not supported.

    DICOM comes first: its 128-byte preamble may itself be a TIFF header (a
    dual-personality file), and the DICOM dataset is the one to read.
    """
    if is_dicom(head):
        return "dicom"
    if head.startswith(b"\xff\xd8\xff"):
        return "jpeg"
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "png"
    if head.startswith(b"BM"):
        return "bmp"
    if head.startswith((b"II*\x00", b"MM\x00*")):
        return "tiff"
    return None


def _jpeg_size(data: bytes) -> tuple[int, int] | None:
    """(height, width) from the first SOF marker, or None if not found."""
    header = _jpeg_header(data)
    return None if header is None else header[:2]


def _jpeg_header(data: bytes) -> tuple[int, int, int] | None:
    """(height, width, components) from the first SOF marker, or None if not found."""
    i = 2
    n = len(data)
    while i + 9 < n:
        if data[i] != 0xFF:
            i += 1
            continue
        marker = data[i + 1]
        if marker in (0xD8, 0x01) or 0xD0 <= marker <= 0xD7 or marker == 0xFF:
            i += 1 if marker == 0xFF else 2
            continue
        seg_len = struct.unpack(">H", data[i + 2:i + 4])[0]
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
            h, w = struct.unpack(">HH", data[i + 5:i + 9])
            return h, w, data[i + 9] if i + 9 < n else 1
        i += 2 + seg_len
    return None


#: Bytes that may follow 0xFF inside entropy-coded JPEG data: stuffing (00), restart
#: markers (D0-D7) and fill bytes (FF). What ends a scan must be EOI or a segment
#: allowed between scans (DHT C4, DAC CC, SOS DA, DQT DB, DNL DC, DRI DD, APPn,
#: COM FE). Anything else there (reserved codes 01-BF, a frame header SOFn, SOI,
#: JPGn F0-FD, DHP, EXP) means damaged scan data.
_RESERVED_MARKERS = np.ones(256, bool)
_RESERVED_MARKERS[[0xC4, 0xCC, 0xD9, 0xDA, 0xDB, 0xDC, 0xDD, 0xFE]] = False
_RESERVED_MARKERS[0xE0:0xF0] = False


def _next_scan(data: np.ndarray, i: int) -> int | None:
    """From a marker at ``i``, skip marker segments to the next SOS; the index its
    entropy-coded data starts at, or None (EOI or the end of the file first)."""
    n = data.size
    while i + 1 < n:
        if data[i] != 0xFF:
            return None
        marker = int(data[i + 1])
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if marker == 0xD9 or i + 3 >= n:
            return None
        if 0xD0 <= marker <= 0xD7 or marker == 0x01:  # standalone markers
            i += 2
            continue
        length = (int(data[i + 2]) << 8) | int(data[i + 3])
        if marker == 0xDA:
            return i + 2 + length
        i += 2 + length
    return None


def _jpeg_scan_damage(data: np.ndarray) -> str | None:
    """A reason if the JPEG's scan data is visibly damaged, else None.

    libjpeg decodes damaged scan data with only a warning (grey or smeared
    blocks); this check finds what it warns about, scan by scan (marker
    segments, EXIF thumbnails included, are skipped by their lengths):
    markers that cannot follow entropy-coded data, and restart markers out of
    their D0..D7 order. It cannot see damage that keeps the marker structure
    (a bad Huffman code, an early end of the data): those still decode.
    """
    pos = _next_scan(data, 2)
    if pos is None:
        return "JPEG without scan data"
    for _ in range(1000):  # progressive files have a few dozen scans at most
        region = data[pos:]
        ff = np.flatnonzero(region[:-1] == 0xFF)
        follow = region[ff + 1] if ff.size else np.zeros(0, np.uint8)
        inside = (follow == 0) | ((follow >= 0xD0) & (follow <= 0xD7)) | (follow == 0xFF)
        end = int(np.argmin(inside)) if ff.size and not inside.all() else ff.size
        rst = follow[:end][(follow[:end] >= 0xD0) & (follow[:end] <= 0xD7)].astype(np.int16)
        if rst.size > 1 and np.any(np.diff(rst - 0xD0) % 8 != 1):
            return "corrupt JPEG data (restart markers out of order)"
        if end == ff.size:
            return None  # no marker after the scan: truncation is judged elsewhere
        marker = int(follow[end])
        if _RESERVED_MARKERS[marker]:
            return "corrupt JPEG data (invalid marker inside the scan)"
        pos = _next_scan(data, pos + int(ff[end]))
        if pos is None:
            return None
    return None


def _png_size(data: bytes) -> tuple[int, int] | None:
    if len(data) < 24 or data[12:16] != b"IHDR":
        return None
    w, h = struct.unpack(">II", data[16:24])
    return h, w


_PNG_CHANNELS = {0: 1, 2: 3, 3: 3, 4: 2, 6: 4}


def _tiff_header(data: bytes) -> tuple[int, int, int] | None:
    """(height, width, bytes per pixel) from the first IFD of a TIFF, or None."""
    try:
        end = "<" if data[:2] == b"II" else ">"
        (ifd,) = struct.unpack(end + "I", data[4:8])
        (count,) = struct.unpack(end + "H", data[ifd:ifd + 2])
        tags: dict[int, int] = {}
        for k in range(min(count, 512)):
            e = ifd + 2 + 12 * k
            tag, typ, n = struct.unpack(end + "HHI", data[e:e + 8])
            if typ == 3:
                (value,) = struct.unpack(end + "H", data[e + 8:e + 10])
            elif typ == 4:
                (value,) = struct.unpack(end + "I", data[e + 8:e + 12])
            else:
                continue
            if tag == 258 and n > 1:  # BitsPerSample per channel, stored elsewhere: assume 16
                value = 16
            tags[tag] = value
        h, w = tags[257], tags[256]
    except (struct.error, KeyError, IndexError):
        return None
    bits, samples = tags.get(258, 8), tags.get(277, 1)
    return h, w, max(1, bits // 8) * max(1, samples)


#: Reduced JPEG decoding keeps at least this multiple of the model input size.
#: 1.5 measured on the full-resolution originals: +10 % end-to-end images/s
#: against 2.0, a mean change of 0.5 grey levels in the model input, and
#: probabilities within 0.004 of a full-resolution decode.
REDUCED_DECODE_MARGIN = 1.5


def _reduction_for(size: tuple[int, int] | None, target: int | None) -> int:
    """Largest JPEG DCT scale (1, 2, 4, 8) keeping REDUCED_DECODE_MARGIN x the target size."""
    if size is None or not target:
        return 1
    short_side = min(size)
    for factor in (8, 4, 2):
        if short_side / factor >= REDUCED_DECODE_MARGIN * target:
            return factor
    return 1


def decode_gray(path: str | os.PathLike, target: int | None = None,
                info: dict | None = None) -> np.ndarray:
    """Decode an image file to a 2-D uint8 grayscale array.

    Colour and alpha are reduced to luminance, 16-bit images are mapped linearly
    from 0..65535 to 0..255, and EXIF orientation is applied.

    Args:
        path: the file; any name, including non-ASCII characters and spaces.
        target: the longest side the caller will resize to. Large JPEGs are then
            decoded at 1/2, 1/4 or 1/8 scale, never below 1.5 times this size.
        info: if given, filled with facts for the input checks: ``format``,
            ``height`` and ``width`` of the stored image, and ``chroma`` (mean
            max-min over the colour channels of a small colour decode; None for
            greyscale files).

    Raises:
        ImageDecodeError: with a one-line reason, for anything not decodable.
    """
    path = Path(path)
    try:
        size_bytes = path.stat().st_size
    except OSError as exc:
        raise ImageDecodeError(f"cannot read file: {exc.strerror or exc}") from None
    if size_bytes == 0:
        raise ImageDecodeError("empty file (0 bytes)")
    if size_bytes > MAX_FILE_BYTES:
        raise ImageDecodeError(
            f"file too large ({size_bytes / 2**20:.0f} MiB > {MAX_FILE_BYTES // 2**20} MiB)")
    with _BIG if size_bytes > BIG_BYTES else nullcontext():
        return _decode(path, target, info, size_bytes > BIG_BYTES)


def _decode(path: Path, target: int | None, info: dict | None, locked: bool) -> np.ndarray:
    try:
        # np.fromfile + imdecode instead of cv2.imread: works for any file name.
        data = np.fromfile(path, dtype=np.uint8)
    except OSError as exc:
        raise ImageDecodeError(f"cannot read file: {exc.strerror or exc}") from None
    raw = data[:132].tobytes()
    fmt = sniff_format(raw)
    if fmt is None:
        raise ImageDecodeError(
            "not a supported image (expected JPEG, PNG, BMP, TIFF or DICOM content)")
    if fmt == "dicom":
        from .dicom import DicomError, decode_dicom

        try:
            return decode_dicom(data.tobytes(), info, MAX_PIXELS, MAX_DECODED_BYTES)
        except DicomError as exc:
            raise ImageDecodeError(str(exc)) from None

    flags = cv2.IMREAD_GRAYSCALE
    dims: tuple[int, int] | None = None
    bytes_per_pixel = 1
    colour = True  # unknown formats: measure
    if fmt == "jpeg":
        blob = data.tobytes()
        # A JPEG cut short still "decodes" in libjpeg (grey bottom rows and a
        # warning); require an end-of-image marker after the last scan instead.
        eoi = blob.rfind(b"\xff\xd9")
        if eoi == -1 or eoi < blob.rfind(b"\xff\xda"):
            raise ImageDecodeError("truncated JPEG (no end-of-image marker after the last scan)")
        damage = _jpeg_scan_damage(data)
        if damage:
            raise ImageDecodeError(damage)
        header = _jpeg_header(blob)
        dims = header[:2] if header else None
        colour = header is None or header[2] >= 3
        factor = _reduction_for(dims, target)
        if factor > 1:
            flags = _REDUCED_FLAGS[factor]
    elif fmt == "png":
        dims = _png_size(raw)
        colour = len(raw) < 26 or raw[25] in (2, 3, 6)  # RGB, palette, RGBA
        if len(raw) >= 26:
            bytes_per_pixel = max(1, raw[24] // 8) * _PNG_CHANNELS.get(raw[25], 4)
        flags = cv2.IMREAD_GRAYSCALE | cv2.IMREAD_ANYDEPTH
        if not data[-12:].tobytes().startswith(b"\x00\x00\x00\x00IEND"):
            raise ImageDecodeError("truncated PNG (no IEND chunk at the end)")
    else:
        flags = cv2.IMREAD_GRAYSCALE | cv2.IMREAD_ANYDEPTH
        if fmt == "tiff":
            header = _tiff_header(data[:1 << 20].tobytes())
            if header is None:
                raise ImageDecodeError("TIFF without readable width and height tags")
            dims, bytes_per_pixel = header[:2], header[2]
        elif len(raw) >= 26:  # BMP: width and height at 18 and 22
            w, h = struct.unpack("<ii", raw[18:26])
            dims, bytes_per_pixel = (abs(h), abs(w)), 4
    if dims is not None and dims[0] * dims[1] > MAX_PIXELS:
        raise ImageDecodeError(
            f"image too large ({dims[1]}x{dims[0]} px > {MAX_PIXELS // 1_000_000} megapixels)")
    decoded = 0 if dims is None else dims[0] * dims[1] * bytes_per_pixel
    if fmt == "jpeg":
        decoded //= _reduction_for(dims, target) ** 2
    if decoded > MAX_DECODED_BYTES:
        raise ImageDecodeError(
            f"image too large to decode ({dims[1]}x{dims[0]} px, {decoded / 2**20:.0f} MiB "
            f"of samples > {MAX_DECODED_BYTES // 2**20} MiB)")

    try:
        with _BIG if decoded > BIG_BYTES and not locked else nullcontext():
            image = _imdecode(data, flags)
    except cv2.error as exc:
        reason = str(exc).strip().splitlines()[-1] if str(exc).strip() else "OpenCV error"
        raise ImageDecodeError(f"{fmt.upper()} decoder failed: {reason}") from None
    if image is None or image.size == 0:
        raise ImageDecodeError(f"corrupt or unreadable {fmt.upper()} data")
    if image.ndim == 3:  # TIFF/BMP paths that ignored the grayscale request
        image = cv2.cvtColor(image[..., :3], cv2.COLOR_BGR2GRAY)
    if image.dtype == np.uint16:  # no float copy of a large image
        image = cv2.convertScaleAbs(image, alpha=255.0 / 65535.0)
    elif image.dtype != np.uint8:
        lo, hi = float(image.min()), float(image.max())
        scale = 255.0 / (hi - lo) if hi > lo else 0.0
        image = ((image.astype(np.float32) - lo) * scale + 0.5).astype(np.uint8)
    if info is not None:
        h, w = dims if dims is not None else image.shape[:2]
        info.update(format=fmt, height=int(h), width=int(w),
                    chroma=_chroma(data, fmt) if colour else None)
    return image


def _imdecode(data: np.ndarray, flags: int) -> np.ndarray | None:
    image = cv2.imdecode(data, flags)
    if image is not None and image.dtype == np.uint16 and image.size > BIG_BYTES // 2:
        image = cv2.convertScaleAbs(image, alpha=255.0 / 65535.0)  # shrink inside the lock
    return image


def _chroma(data: np.ndarray, fmt: str) -> float | None:
    """Mean (max - min) over B, G, R of a small colour decode: ~0 for a radiograph."""
    flag = cv2.IMREAD_REDUCED_COLOR_8 if fmt == "jpeg" else cv2.IMREAD_REDUCED_COLOR_4
    try:
        bgr = cv2.imdecode(data, flag)
    except cv2.error:
        return None
    if bgr is None or bgr.ndim != 3 or bgr.size == 0:
        return None
    if bgr.dtype != np.uint8:
        bgr = (bgr.astype(np.float32) * (255.0 / max(float(bgr.max()), 1.0))).astype(np.uint8)
    return float(np.mean(bgr.max(axis=2).astype(np.int16) - bgr.min(axis=2)))

