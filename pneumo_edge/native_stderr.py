"""Dropping the image libraries' own lines from the terminal.

libjpeg, libpng, libtiff and OpenCV write warnings about damaged files straight
to file descriptor 2 ("Corrupt JPEG data: premature end of data segment",
"libpng error: IDAT: CRC error", "[ WARN:0@1.2] global grfmt_png.cpp ..."),
from C, in whatever decoding thread met the file. pneumo-edge reports every file
it cannot use with its own one-line reason, so these lines are noise; there is
no per-thread switch for them, so while :func:`quiet_decoder_lines` is active,
descriptor 2 is a pipe whose reader passes everything through at once except
those lines. Nothing else written to stderr is held back or changed.
"""

from __future__ import annotations

import os
import re
import sys
import threading
from contextlib import contextmanager
from typing import Iterator

__all__ = ["quiet_decoder_lines"]

#: How the libraries' lines begin (libjpeg's warnings are its JWRN_* texts).
_PREFIXES = (b"Corrupt JPEG data", b"Premature end of JPEG file", b"Invalid SOS parameters",
             b"Unsupported marker type", b"Warning: unknown JFIF revision",
             b"Inconsistent progression sequence", b"Invalid JPEG file structure",
             b"libpng warning:", b"libpng error:", b"TIFFReadDirectory",
             b"TIFFFetchNormalTag", b"TIFFReadDirectoryCheckOrder", b"[ WARN:", b"[ERROR:")
_NOISE = re.compile(b"(?:" + b"|".join(re.escape(p) for p in _PREFIXES) + b")[^\n]*\n")
_active = threading.Lock()


def _could_start_noise(tail: bytes) -> bool:
    """Whether an unfinished line may still become one of the libraries' lines."""
    start = tail.rfind(b"\r") + 1  # a progress bar redraws its line with \r
    tail = tail[start:]
    return any(p.startswith(tail[:len(p)]) for p in _PREFIXES) if tail else False


def _forward(read_fd: int, write_fd: int) -> None:
    pending = b""
    while True:
        try:
            chunk = os.read(read_fd, 1 << 16)
        except OSError:
            chunk = b""
        if not chunk:
            break
        pending += chunk
        cut = pending.rfind(b"\n") + 1
        out = _NOISE.sub(b"", pending[:cut])
        pending = pending[cut:]
        if pending and not _could_start_noise(pending):
            out, pending = out + pending, b""
        _write_all(write_fd, out)
    _write_all(write_fd, _NOISE.sub(b"", pending))
    os.close(read_fd)


def _write_all(fd: int, data: bytes) -> None:
    while data:
        try:
            data = data[os.write(fd, data):]
        except OSError:
            return


@contextmanager
def quiet_decoder_lines() -> Iterator[None]:
    """Drop the image libraries' warning lines from descriptor 2 while active.

    A no-op when descriptor 2 is not open or another call is already active.
    """
    if not _active.acquire(blocking=False):
        yield
        return
    try:
        try:
            saved = os.dup(2)
        except OSError:
            yield
            return
        for stream in (sys.stderr, sys.__stderr__):
            _flush(stream)
        read_fd, write_fd = os.pipe()
        os.dup2(write_fd, 2)
        os.close(write_fd)
        forwarder = threading.Thread(target=_forward, args=(read_fd, saved),
                                     name="quiet-decoder-lines", daemon=True)
        forwarder.start()
        try:
            yield
        finally:
            for stream in (sys.stderr, sys.__stderr__):
                _flush(stream)
            os.dup2(saved, 2)  # the pipe's last writer is gone: the forwarder drains and ends
            forwarder.join(timeout=5)
            if not forwarder.is_alive():  # (a child process may still hold the pipe open)
                os.close(saved)
    finally:
        _active.release()


def _flush(stream) -> None:
    try:
        if stream is not None:
            stream.flush()
    except (OSError, ValueError):
        pass
