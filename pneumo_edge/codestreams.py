"""Sizes read from compressed codestreams before decoding, and the JPEG scan check.

A compressed image says how large it will be in its own header: the JPEG frame
header (SOFn, and SOF55 for JPEG-LS) and the JPEG 2000 SIZ marker. Reading it
first lets the decoders refuse a small file that would inflate to gigabytes, and
lets DICOM compare the codestream with its Rows/Columns before anything is
decoded. Nothing here allocates more than a few bytes per marker.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["Frame", "codestream_frame", "j2k_frame", "jpeg_frame", "jpeg_scan_damage"]

#: Start-of-frame markers whose header holds the image size: SOF0..SOF15 except
#: DHT (C4), JPG (C8) and DAC (CC), and JPEG-LS SOF55 (F7).
_SOF = frozenset(set(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}) | {0xF7}
#: Progressive (SOF2, 6, 10, 14): libjpeg keeps every DCT coefficient of the whole image.
_PROGRESSIVE = frozenset({0xC2, 0xC6, 0xCA, 0xCE})


@dataclass(frozen=True)
class Frame:
    """What a codestream header says about the image it holds."""

    height: int
    width: int
    components: int
    bits: int
    codec: str
    #: Progressive JPEG: the decoder buffers all coefficients, whatever the output scale.
    progressive: bool = False
    #: 8x8 blocks over all components (JPEG); a buffered decode keeps 128 bytes per block.
    blocks: int = 0


def jpeg_frame(data: bytes) -> Frame | None:
    """The frame header of a JPEG or JPEG-LS codestream, or None if there is none.

    Marker segments are skipped by their lengths; bytes between segments that
    are not a marker are skipped with a C-speed search for the next 0xFF, so a
    file of junk costs one pass.
    """
    n = len(data)
    i = 2
    while i + 3 < n:
        if data[i] != 0xFF:
            i = data.find(b"\xff", i)
            if i < 0:
                return None
            continue
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if marker in (0xD8, 0x01, 0x00) or 0xD0 <= marker <= 0xD7:
            i += 2
            continue
        if marker in (0xD9, 0xDA):  # end of image, or a scan before any frame header
            return None
        length = (data[i + 2] << 8) | data[i + 3]
        if marker in _SOF:
            if i + 10 > n:
                return None
            bits = data[i + 4]
            height = (data[i + 5] << 8) | data[i + 6]
            width = (data[i + 7] << 8) | data[i + 8]
            ncomp = data[i + 9]
            sampling = [(data[j] >> 4, data[j] & 15)
                        for j in range(i + 11, min(i + 11 + 3 * ncomp, n), 3)]
            return Frame(height, width, ncomp, bits,
                         "JPEG-LS" if marker == 0xF7 else "JPEG",
                         progressive=marker in _PROGRESSIVE,
                         blocks=_jpeg_blocks(height, width, sampling))
        i += 2 + length
    return None


def _jpeg_blocks(height: int, width: int, sampling: list[tuple[int, int]]) -> int:
    """8x8 blocks libjpeg allocates for a buffered decode (components padded to MCUs)."""
    sampling = [(max(1, h), max(1, v)) for h, v in sampling] or [(1, 1)]
    hmax = max(h for h, _ in sampling)
    vmax = max(v for _, v in sampling)
    mcus_x = -(-width // (8 * hmax))
    mcus_y = -(-height // (8 * vmax))
    return sum(mcus_x * h * mcus_y * v for h, v in sampling)


def j2k_frame(data: bytes) -> Frame | None:
    """The SIZ marker of a JPEG 2000 codestream (raw, or inside a JP2 file), or None."""
    start = 0
    if data[4:8] == b"jP  ":  # JP2: walk the boxes to the contiguous codestream
        i = 0
        start = -1
        while i + 8 <= len(data):
            box = int.from_bytes(data[i:i + 4], "big")
            kind = data[i + 4:i + 8]
            header = 8
            if box == 1 and i + 16 <= len(data):
                box, header = int.from_bytes(data[i + 8:i + 16], "big"), 16
            if kind == b"jp2c":
                start = i + header
                break
            if box < header:  # 0 = to the end of the file; anything else is damage
                return None
            i += box
        if start < 0:
            return None
    siz = data[start:start + 42]
    if len(siz) < 42 or siz[:4] != b"\xff\x4f\xff\x51":
        return None
    xsiz, ysiz, xo, yo = (int.from_bytes(siz[k:k + 4], "big") for k in (8, 12, 16, 20))
    ncomp = int.from_bytes(siz[40:42], "big")
    ssiz = data[start + 42:start + 43]
    bits = ((ssiz[0] & 0x7F) + 1) if ssiz else 0
    return Frame(max(0, ysiz - yo), max(0, xsiz - xo), ncomp, bits, "JPEG 2000")


def codestream_frame(data: bytes) -> Frame | None:
    """The frame of a JPEG, JPEG-LS or JPEG 2000 codestream, whichever ``data`` is."""
    if data[:2] == b"\xff\xd8":
        return jpeg_frame(data)
    if data[:4] == b"\xff\x4f\xff\x51" or data[4:8] == b"jP  ":
        return j2k_frame(data)
    return None


#: Bytes that may follow 0xFF inside entropy-coded JPEG data: stuffing (00), restart
#: markers (D0-D7) and fill bytes (FF). What ends a scan must be EOI or a segment
#: allowed between scans (DHT C4, DAC CC, SOS DA, DQT DB, DNL DC, DRI DD, APPn,
#: COM FE). Anything else there (reserved codes 01-BF, a frame header SOFn, SOI,
#: JPGn F0-FD, DHP, EXP) means damaged scan data.
_RESERVED_MARKERS = np.ones(256, bool)
_RESERVED_MARKERS[[0xC4, 0xCC, 0xD9, 0xDA, 0xDB, 0xDC, 0xDD, 0xFE]] = False
_RESERVED_MARKERS[0xE0:0xF0] = False
#: More scans than this is not a photograph or an X-ray (progressive files have
#: a few dozen); each scan of a progressive file is a pass over the whole image.
MAX_SCANS = 1000
_FIRST_WINDOW = 4096
_MAX_WINDOW = 1 << 20


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


def _scan_end(data: np.ndarray, pos: int, last_rst: int) -> tuple[int | None, int, str | None]:
    """Walk one scan's entropy-coded data from ``pos`` in growing windows.

    Returns (index of the 0xFF of the marker that ends the scan or None at the
    end of the file, the last restart number seen, a damage reason or None).
    Every byte is looked at once; windows start small so that many tiny scans
    cost no more than their own bytes.
    """
    n = data.size
    window = _FIRST_WINDOW
    while pos < n - 1:
        stop = min(n, pos + window + 1)  # one byte of overlap: the byte after an 0xFF
        region = data[pos:stop]
        ff = np.flatnonzero(region[:-1] == 0xFF)
        if ff.size:
            follow = region[ff + 1]
            inside = (follow == 0) | ((follow >= 0xD0) & (follow <= 0xD7)) | (follow == 0xFF)
            end = int(np.argmin(inside)) if not inside.all() else ff.size
            rst = follow[:end]
            rst = rst[(rst >= 0xD0) & (rst <= 0xD7)].astype(np.int16) - 0xD0
            if rst.size:
                seq = np.concatenate(([last_rst], rst)) if last_rst >= 0 else rst
                if seq.size > 1 and np.any(np.diff(seq) % 8 != 1):
                    return None, last_rst, "corrupt JPEG data (restart markers out of order)"
                last_rst = int(rst[-1])
            if end < ff.size:
                return pos + int(ff[end]), last_rst, None
        pos = stop - 1
        window = min(window * 2, _MAX_WINDOW)
    return None, last_rst, None


def jpeg_scan_damage(data: np.ndarray) -> tuple[str | None, int]:
    """(a reason if the JPEG's scan data is visibly damaged or None, the number of scans).

    libjpeg decodes damaged scan data with only a warning (grey or smeared
    blocks); this check finds what it warns about, scan by scan (marker
    segments, EXIF thumbnails included, are skipped by their lengths):
    markers that cannot follow entropy-coded data, and restart markers out of
    their D0..D7 order. It cannot see damage that keeps the marker structure
    (a bad Huffman code, an early end of the data): those still decode. One
    pass over the file, in windows of at most 1 MiB.
    """
    pos = _next_scan(data, 2)
    if pos is None:
        return "JPEG without scan data", 0
    scans = 0
    while pos is not None:
        scans += 1
        if scans > MAX_SCANS:
            return f"JPEG with more than {MAX_SCANS} scans", scans
        end, _, damage = _scan_end(data, pos, -1)
        if damage:
            return damage, scans
        if end is None:
            return None, scans  # no marker after the scan: truncation is judged elsewhere
        if _RESERVED_MARKERS[int(data[end + 1])]:
            return "corrupt JPEG data (invalid marker inside the scan)", scans
        pos = _next_scan(data, end)
    return None, scans
