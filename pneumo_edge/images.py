"""Finding image files, reading labels from folder names, and decoding by content.

Decoding never trusts the file extension: the first bytes decide the format.
Large JPEGs are decoded at a reduced scale (libjpeg DCT scaling) when the model
input is much smaller than the image, which keeps full-resolution X-rays fast.

Memory: every decoder, DICOM included, estimates from the file's header what
the decode will hold at its peak (the file's bytes, the decoded samples, the
decoder's working arrays) and reserves that much of one process-wide budget,
:data:`DECODE_BUDGET`, before it allocates anything; decodes that do not fit
together wait, and an image whose estimate alone exceeds the budget is refused.
"""

from __future__ import annotations

import collections
import os
import struct
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

import cv2
import numpy as np

from .codestreams import jpeg_frame, jpeg_scan_damage
from .dicom import DecodeStop
from .metadata import CLASS_NAMES

__all__ = [
    "DECODE_BUDGET",
    "DICOM_EXTENSIONS",
    "IMAGE_EXTENSIONS",
    "Discovery",
    "ImageDecodeError",
    "collect_images",
    "collect_labelled",
    "decode_gray",
    "discover",
    "is_dicom",
    "is_dicom_file",
    "is_image_file",
    "is_own_output",
    "label_from_path",
    "mark_own_png",
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
#: What all decodes in flight may hold together: file bytes, decoded samples and
#: working arrays, as estimated from each file's header before decoding. A decode
#: that does not fit waits for others to finish; one whose own estimate is larger
#: is refused.
DECODE_BUDGET = MAX_FILE_BYTES + MAX_DECODED_BYTES
#: A decoded image larger than this is shrunk (area average, by 2, 4, 8...) while
#: it is still counted, when the caller resizes it to a small target anyway; the
#: caller then holds at most this much per decoding thread.
BIG_BYTES = 64 * 1024 * 1024

#: Per decode, besides the estimate's image-sized terms: the JPEG scan check's
#: windows, the libraries' row and zlib buffers, header copies (measured at most
#: 16 MiB in benchmarks/decode_memory.py).
_DECODER_SLACK = 24 * 1024 * 1024
#: OpenCV's imdecode decodes into a Mat and copies it into the returned array:
#: its output counts twice.
_IMDECODE_COPIES = 2

_REDUCED_FLAGS = {2: cv2.IMREAD_REDUCED_GRAYSCALE_2, 4: cv2.IMREAD_REDUCED_GRAYSCALE_4,
                  8: cv2.IMREAD_REDUCED_GRAYSCALE_8}
#: Own outputs: heatmap PNGs carry this tEXt chunk right after IHDR, so that a
#: folder walk recognises them from the first 64 bytes.
_OWN_PNG_TEXT = b"Software\x00pneumo-edge heatmap"


class ImageDecodeError(ValueError):
    """A file could not be turned into an image; the message is one line."""


class _TooLarge(ImageDecodeError, DecodeStop):
    """Refused by the budget; passes through the DICOM decoder unchanged."""


class _Restart(DecodeStop):
    """The budget could not grow without waiting: release, then reserve ``need`` at once."""

    def __init__(self, need: int):
        super().__init__(need)
        self.need = need


# --------------------------------------------------------------------------- budget


class _Budget:
    """A byte semaphore: reservations wait in arrival order until they fit.

    A decode reserves once while holding nothing (blocking) and may grow its
    reservation only without waiting (``try_grow``); when it cannot, it releases
    everything and reserves its full need again. No thread ever waits while
    holding a reservation, so decodes cannot deadlock on each other.
    """

    def __init__(self, capacity: int):
        self.capacity = capacity
        self.used = 0
        self.peak = 0  # the most ever reserved at once (tests, benchmark)
        self._cond = threading.Condition()
        self._queue: collections.deque[object] = collections.deque()

    def reserve(self, nbytes: int) -> None:
        nbytes = min(nbytes, self.capacity)
        ticket = object()
        with self._cond:
            self._queue.append(ticket)
            while self._queue[0] is not ticket or self.used + nbytes > self.capacity:
                self._cond.wait()
            self._queue.popleft()
            self._take(nbytes)
            self._cond.notify_all()

    def try_grow(self, nbytes: int) -> bool:
        with self._cond:
            if self._queue or self.used + nbytes > self.capacity:
                return False
            self._take(nbytes)
            return True

    def release(self, nbytes: int) -> None:
        with self._cond:
            self.used -= nbytes
            self._cond.notify_all()

    def _take(self, nbytes: int) -> None:
        self.used += nbytes
        self.peak = max(self.peak, self.used)


_BUDGET = _Budget(DECODE_BUDGET)


@dataclass
class _Hold:
    """One decode's reservation; ``need`` raises the reservation to an estimate."""

    reserved: int
    what: str = ""

    def need(self, total: int, describe: str) -> None:
        if total > _BUDGET.capacity:
            raise _TooLarge(f"image too large to decode ({describe}: needs {total / 2**20:.0f} "
                            f"MiB > {_BUDGET.capacity // 2**20} MiB)")
        if total <= self.reserved:
            return
        if not _BUDGET.try_grow(total - self.reserved):
            raise _Restart(total)
        self.reserved = total


# --------------------------------------------------------------------------- discovery


@dataclass
class Discovery:
    """The image files under the given paths, and what the walk left out."""

    items: list[tuple[Path, str | None]] = field(default_factory=list)
    #: Files pneumo-edge wrote itself (heatmap overlays) met in a folder walk.
    skipped_own: list[Path] = field(default_factory=list)

    @property
    def note(self) -> str | None:
        """One line for the caller to show, or None when nothing was left out."""
        n = len(self.skipped_own)
        if not n:
            return None
        return (f"skipped {n} file{'s' if n != 1 else ''} pneumo-edge wrote itself "
                f"(heatmap overlays) in the input folders")


def discover(paths: Iterable[str | os.PathLike]) -> Discovery:
    """Image files under ``paths`` with the ground truth their folders give.

    Folders are walked without recursion (any depth), symlinked folders are not
    followed, and :func:`is_image_file` decides what is kept; files pneumo-edge
    wrote (heatmap overlays) are left out and listed in ``skipped_own``. A path
    given explicitly as a file is kept whatever its name or content. Only
    folders at or below a given path label its files: ``predict data/NORMAL``
    labels every file NORMAL, while a folder named ``pneumonia`` above the given
    path never does. The same file reached twice (two spellings, a folder and a
    file inside it) is kept once, with the label of its first mention.

    Raises:
        FileNotFoundError: if a given path does not exist.
    """
    found: dict[str, tuple[Path, str | None]] = {}
    own: dict[str, Path] = {}
    for raw in paths:
        root = Path(raw)
        if root.is_file():
            files = [root]
        elif root.is_dir():
            files = _walk(root, own)
        elif root.exists():
            raise FileNotFoundError(f"{root}: not a file or folder")
        else:
            raise FileNotFoundError(f"{root}: no such file or folder")
        top = Path(root.resolve().name or "root") if root.is_dir() else None
        for path in files:
            key = os.path.realpath(path)
            if key in found:
                continue
            truth = None if top is None else label_from_path(top / path.relative_to(root))
            found[key] = (path, truth)
    items = sorted(found.values(), key=lambda item: str(item[0]))
    return Discovery(items, [own[k] for k in sorted(own)])


def _walk(root: Path, own: dict[str, Path]) -> list[Path]:
    """Image files below ``root``, depth first with an explicit stack (no recursion limit)."""
    out: list[Path] = []
    stack = [str(root)]
    while stack:
        folder = stack.pop()
        try:
            with os.scandir(folder) as it:
                entries = sorted(it, key=lambda e: e.name)
        except OSError:
            continue  # unreadable folder: as os.walk, skipped
        subdirs = []
        for entry in entries:
            try:
                if entry.is_dir(follow_symlinks=False):
                    subdirs.append(entry.path)
                    continue
            except OSError:
                continue
            child = Path(entry.path)
            if not is_image_file(child):
                continue
            if is_own_output(child):
                own[str(child)] = child
            else:
                out.append(child)
        stack.extend(reversed(subdirs))
    return out


def collect_images(paths: Iterable[str | os.PathLike]) -> list[Path]:
    """The image files under ``paths``, sorted, without duplicates (see :func:`discover`)."""
    return sorted((p for p, _ in discover(paths).items), key=str)


def collect_labelled(paths: Iterable[str | os.PathLike]) -> list[tuple[Path, str | None]]:
    """(file, truth) for the image files under ``paths`` (see :func:`discover`)."""
    return discover(paths).items


def mark_own_png(png: bytes) -> bytes:
    """``png`` with a tEXt chunk after IHDR that marks it as written by pneumo-edge."""
    import zlib

    if png[:8] != b"\x89PNG\r\n\x1a\n" or png[12:16] != b"IHDR":
        return png
    chunk = (struct.pack(">I", len(_OWN_PNG_TEXT)) + b"tEXt" + _OWN_PNG_TEXT
             + struct.pack(">I", zlib.crc32(b"tEXt" + _OWN_PNG_TEXT)))
    return png[:33] + chunk + png[33:]


def is_own_output(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a file pneumo-edge wrote (a heatmap overlay PNG)."""
    if not str(path).lower().endswith(".png"):
        return False
    try:
        with open(path, "rb") as fh:
            head = fh.read(41 + len(_OWN_PNG_TEXT))
    except OSError:
        return False
    return head[37:41] == b"tEXt" and head[41:] == _OWN_PNG_TEXT


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


# --------------------------------------------------------------------------- decoding

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


@dataclass
class _Decoded:
    image: np.ndarray
    dims: tuple[int, int] | None  # (height, width) of the stored image
    colour: bool  # measure chroma
    info: dict = field(default_factory=dict)


def decode_gray(path: str | os.PathLike, target: int | None = None,
                info: dict | None = None) -> np.ndarray:
    """Decode an image file to a 2-D uint8 grayscale array.

    Colour and alpha are reduced to luminance, 16-bit images are mapped linearly
    from 0..65535 to 0..255, and EXIF orientation is applied.

    Args:
        path: the file; any name, including non-ASCII characters and spaces.
        target: the longest side the caller will resize to. Large JPEGs are then
            decoded at 1/2, 1/4 or 1/8 scale, and any decoded image over
            BIG_BYTES is shrunk, never below 1.5 times this size.
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
    need = size_bytes
    while True:  # at most once per estimate a decode makes (DICOM: inflate, then pixels)
        _BUDGET.reserve(need)
        hold = _Hold(need)
        try:
            out = _decode(path, size_bytes, target, hold)
            break
        except _Restart as again:
            need = max(need, again.need)
        finally:
            _BUDGET.release(hold.reserved)
    if info is not None:
        h, w = out.dims if out.dims is not None else out.image.shape[:2]
        info.update(format=out.info.pop("format"), height=int(h), width=int(w), **out.info)
    return out.image


def _decode(path: Path, size_bytes: int, target: int | None, hold: _Hold) -> _Decoded:
    try:
        with open(path, "rb") as fh:
            head = fh.read(132)
            fmt = sniff_format(head)
            if fmt is None:
                raise ImageDecodeError(
                    "not a supported image (expected JPEG, PNG, BMP, TIFF or DICOM content)")
            if fmt == "dicom":
                return _decode_dicom(path, size_bytes, target, hold)
            blob = _read_all(fh, size_bytes)
    except OSError as exc:
        raise ImageDecodeError(f"cannot read file: {exc.strerror or exc}") from None
    data = np.frombuffer(blob, np.uint8)
    out = _DECODERS[fmt](blob, data, target, hold)
    out.image = _shrink(_to_uint8(out.image), target)
    chroma = _chroma(data, fmt) if out.colour else None
    out.info.update(format=fmt, chroma=chroma)
    return out


def _read_all(fh, size: int) -> bytearray:
    """The whole file in one buffer of its size (``read()`` after a peek joins two copies)."""
    fh.seek(0)
    blob = bytearray(size)
    n = fh.readinto(blob)
    if n < size:  # the file shrank since stat
        del blob[n:]
    return blob


def _check_size(dims: tuple[int, int], samples: int) -> None:
    """The per-image limits, from the header: pixels and decoded sample bytes."""
    h, w = dims
    if h * w > MAX_PIXELS:
        raise ImageDecodeError(
            f"image too large ({w}x{h} px > {MAX_PIXELS // 1_000_000} megapixels)")
    if samples > MAX_DECODED_BYTES:
        raise ImageDecodeError(
            f"image too large to decode ({w}x{h} px, {samples / 2**20:.0f} MiB "
            f"of samples > {MAX_DECODED_BYTES // 2**20} MiB)")


def _decode_jpeg(blob: bytes, data: np.ndarray, target: int | None, hold: _Hold) -> _Decoded:
    # A JPEG cut short still "decodes" in libjpeg (grey bottom rows and a
    # warning); require an end-of-image marker after the last scan instead.
    eoi = blob.rfind(b"\xff\xd9")
    if eoi == -1 or eoi < blob.rfind(b"\xff\xda"):
        raise ImageDecodeError("truncated JPEG (no end-of-image marker after the last scan)")
    damage, scans = jpeg_scan_damage(data)
    if damage:
        raise ImageDecodeError(damage)
    frame = jpeg_frame(blob)
    if frame is None or frame.height == 0 or frame.width == 0:
        raise ImageDecodeError("JPEG without a readable frame header (width and height)")
    dims = (frame.height, frame.width)
    colour = frame.components >= 3
    _check_size(dims, frame.height * frame.width)
    factor = _reduction_for(dims, target)
    out = -(-frame.height // factor) * -(-frame.width // factor)
    # libjpeg keeps every coefficient of a progressive or multi-scan file in memory
    # (128 bytes per 8x8 block, whatever the output scale); a single-scan
    # sequential file is decoded a row of blocks at a time.
    coefficients = frame.blocks * 128 if frame.progressive or scans > 1 else 0
    small_colour = 3 * -(-frame.height // 8) * -(-frame.width // 8) if colour else 0
    kind = "progressive JPEG" if frame.progressive else "JPEG"
    hold.need(len(blob) + _IMDECODE_COPIES * (out + small_colour) + coefficients
              + _DECODER_SLACK, f"{frame.width}x{frame.height} px {kind}")
    flags = _REDUCED_FLAGS[factor] if factor > 1 else cv2.IMREAD_GRAYSCALE
    return _Decoded(_imdecode(data, flags, "jpeg"), dims, colour)


_PNG_CHANNELS = {0: 1, 2: 3, 3: 3, 4: 2, 6: 4}


def _decode_png(blob: bytes, data: np.ndarray, target: int | None, hold: _Hold) -> _Decoded:
    if not blob[-12:].startswith(b"\x00\x00\x00\x00IEND"):
        raise ImageDecodeError("truncated PNG (no IEND chunk at the end)")
    if len(blob) < 26 or blob[12:16] != b"IHDR":
        raise ImageDecodeError("PNG without an IHDR header")
    w, h = struct.unpack(">II", blob[16:24])
    depth, colour_type = blob[24], blob[25]
    samples = h * w * max(1, depth // 8) * _PNG_CHANNELS.get(colour_type, 4)
    _check_size((h, w), samples)
    colour = colour_type in (2, 3, 6)  # RGB, palette, RGBA
    # samples (decoded and copied), the 8-bit result, and for colour files the
    # full-size colour decode OpenCV makes before shrinking it for the chroma measurement
    hold.need(len(blob) + _IMDECODE_COPIES * samples + h * w + (3 * h * w if colour else 0)
              + _DECODER_SLACK, f"{w}x{h} px PNG")
    return _Decoded(_imdecode(data, cv2.IMREAD_GRAYSCALE | cv2.IMREAD_ANYDEPTH, "png"),
                    (h, w), colour)


def _tiff_header(data: bytes) -> tuple[int, int, int, bool] | None:
    """(height, width, bytes per pixel, colour) from the first IFD of a TIFF, or None."""
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
    colour = samples >= 3 or tags.get(262, 1) in (2, 3, 6)  # RGB, palette, YCbCr
    return h, w, max(1, bits // 8) * max(1, samples), colour


def _decode_tiff(blob: bytes, data: np.ndarray, target: int | None, hold: _Hold) -> _Decoded:
    header = _tiff_header(blob[:1 << 20])
    if header is None:
        raise ImageDecodeError("TIFF without readable width and height tags")
    h, w, bytes_per_pixel, colour = header
    samples = h * w * bytes_per_pixel
    _check_size((h, w), samples)
    # samples (decoded and copied), the 8-bit result, and for colour files the
    # colour decode of the chroma measurement
    hold.need(len(blob) + _IMDECODE_COPIES * samples + h * w
              + (samples + 3 * h * w if colour else 0) + _DECODER_SLACK, f"{w}x{h} px TIFF")
    return _Decoded(_imdecode(data, cv2.IMREAD_GRAYSCALE | cv2.IMREAD_ANYDEPTH, "tiff"),
                    (h, w), colour)


def _decode_bmp(blob: bytes, data: np.ndarray, target: int | None, hold: _Hold) -> _Decoded:
    if len(blob) < 26:
        raise ImageDecodeError("corrupt or unreadable BMP data")
    w, h = struct.unpack("<ii", blob[18:26])
    h, w = abs(h), abs(w)
    _check_size((h, w), h * w * 4)
    hold.need(len(blob) + _IMDECODE_COPIES * 4 * h * w + h * w + 3 * h * w + _DECODER_SLACK,
              f"{w}x{h} px BMP")
    return _Decoded(_imdecode(data, cv2.IMREAD_GRAYSCALE | cv2.IMREAD_ANYDEPTH, "bmp"),
                    (h, w), True)


def _decode_dicom(path: Path, size_bytes: int, target: int | None, hold: _Hold) -> _Decoded:
    from .dicom import DicomError, decode_dicom

    info: dict = {}
    try:
        gray = decode_dicom(path, info, MAX_PIXELS, MAX_DECODED_BYTES,
                            reserve=lambda total, what: hold.need(total, what))
    except DicomError as exc:
        raise ImageDecodeError(str(exc)) from None
    info.pop("height", None)
    info.pop("width", None)
    dims = (int(gray.shape[0]), int(gray.shape[1]))
    return _Decoded(_shrink(gray, target), dims, False, info)


_DECODERS: dict[str, Callable[[bytes, np.ndarray, int | None, _Hold], _Decoded]] = {
    "jpeg": _decode_jpeg, "png": _decode_png, "tiff": _decode_tiff, "bmp": _decode_bmp}


def _imdecode(data: np.ndarray, flags: int, fmt: str) -> np.ndarray:
    try:
        image = cv2.imdecode(data, flags)
    except cv2.error as exc:
        reason = str(exc).strip().splitlines()[-1] if str(exc).strip() else "OpenCV error"
        raise ImageDecodeError(f"{fmt.upper()} decoder failed: {reason}") from None
    if image is None or image.size == 0:
        raise ImageDecodeError(f"corrupt or unreadable {fmt.upper()} data")
    return image


def _to_uint8(image: np.ndarray) -> np.ndarray:
    if image.ndim == 3:  # TIFF/BMP paths that ignored the grayscale request
        image = cv2.cvtColor(image[..., :3], cv2.COLOR_BGR2GRAY)
    if image.dtype == np.uint16:  # no float copy of a large image
        return cv2.convertScaleAbs(image, alpha=255.0 / 65535.0)
    if image.dtype != np.uint8:
        lo, hi = float(image.min()), float(image.max())
        scale = 255.0 / (hi - lo) if hi > lo else 0.0
        return ((image.astype(np.float32) - lo) * scale + 0.5).astype(np.uint8)
    return image


def _shrink(image: np.ndarray, target: int | None) -> np.ndarray:
    """Area-average an image over BIG_BYTES by 2, 4, 8... while it is still counted,
    keeping REDUCED_DECODE_MARGIN x ``target`` (the caller resizes to ``target``)."""
    if not target or image.nbytes <= BIG_BYTES:
        return image
    factor = 1
    while min(image.shape[:2]) / (factor * 2) >= REDUCED_DECODE_MARGIN * target:
        factor *= 2
    if factor == 1:
        return image
    h, w = image.shape[:2]
    return cv2.resize(image, (max(1, w // factor), max(1, h // factor)),
                      interpolation=cv2.INTER_AREA)


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
