"""Writing files: the one atomic writer and the output-folder lock.

Every file pneumo-edge writes (reports, heatmaps, model files, run folders,
benchmarks) goes through :func:`write_set` (or :func:`atomic_write` and
:func:`atomic_path`, which use it): the content goes to a temporary name in the
target folder, is synced, and is renamed into place, so a reader never sees
half a file and a failure leaves every earlier file as it was. Temporary files
are created with mode 0666 and the process umask applies, as for ``open``; the
umask is never changed.

:func:`output_lock` makes one run the only writer of a folder: a second
``predict --out`` on the same folder waits a few seconds for the first to end,
then gives up naming it (:class:`OutputLocked`), so a report set is always one
run's.

A leaf module: it imports nothing else of the package.
"""

from __future__ import annotations

import io
import json
import os
import platform
import secrets
import time
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, TextIO, Union

__all__ = ["Data", "write_set", "atomic_write", "write_json", "atomic_path",
           "check_output_folder", "OutputLocked", "output_lock", "LOCK_NAME", "LOCK_WAIT_SECONDS"]

#: What a file holds: text (written as UTF-8), bytes, or a callable that writes
#: text to the file object it is given (streamed content of any size).
Data = Union[str, bytes, Callable[[TextIO], None]]

#: The lock file inside a locked output folder; removed when the run ends.
LOCK_NAME = ".pneumo-edge.lock"
#: How long a run waits for another run's lock on the same folder before it gives up.
LOCK_WAIT_SECONDS = 5.0


def write_set(files: Mapping[str | os.PathLike, Data], durable: bool = False) -> None:
    """Write several files as one set: every temporary file is written and synced
    first, and only then are they renamed into place. A failure while writing (a
    full disk, a read-only folder) removes the temporary files and leaves every
    earlier file as it was.

    ``durable``: also sync the folders after the renames, so that the new names
    survive a power loss (a receiver acknowledging what it stored needs this).

    Raises:
        OSError: a file could not be written; nothing of the set was renamed.
    """
    temps: list[tuple[Path, Path]] = []
    try:
        for path, data in files.items():
            temps.append((_write_temp(Path(path), data), Path(path)))
        for tmp, path in temps:
            os.replace(tmp, path)
    except BaseException:
        for tmp, _ in temps:
            tmp.unlink(missing_ok=True)
        raise
    if durable:
        for folder in dict.fromkeys(path.parent for _, path in temps):
            _sync_folder(folder)


def _sync_folder(folder: Path) -> None:
    if os.name != "posix":  # Windows cannot open a folder to sync it; NTFS journals renames
        return
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: str | os.PathLike, data: Data, durable: bool = False) -> None:
    """Write one file via a temporary file in the same folder and a rename."""
    write_set({path: data}, durable)


def write_json(path: str | os.PathLike, obj: Any) -> None:
    """``obj`` as indented JSON (one trailing newline), written atomically."""
    atomic_write(path, json.dumps(obj, indent=2) + "\n")


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """A temporary path beside ``path`` for writers that need a file name (Parquet,
    matplotlib); renamed to ``path`` when the block ends without an error, removed
    when it raises."""
    target = Path(path)
    tmp = _write_temp(target, b"")
    try:
        yield tmp
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _temp_name(path: Path) -> Path:
    return path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")


def _write_temp(path: Path, data: Data) -> Path:
    """``data`` in a new temporary file beside ``path``, synced; returns its path."""
    path.parent.mkdir(parents=True, exist_ok=True)
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0)
    while True:
        tmp = _temp_name(path)
        try:
            # 0666 and the umask: the mode a plain open() would give
            fd = os.open(tmp, flags, 0o666)
            break
        except FileExistsError:
            continue
    try:
        with os.fdopen(fd, "wb") as fh:
            # file names that are not UTF-8 arrive as lone surrogates: write them as
            # visible \udcXX escapes instead of failing after all the work is done
            if callable(data):
                text = io.TextIOWrapper(fh, encoding="utf-8", errors="backslashreplace",
                                        newline="")
                data(text)
                text.flush()
                text.detach()
            else:
                fh.write(data.encode("utf-8", "backslashreplace") if isinstance(data, str)
                         else data)
            fh.flush()
            os.fsync(fh.fileno())
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return tmp


def check_output_folder(folder: str | os.PathLike) -> None:
    """Refuse a folder that cannot be written, before any work: the nearest existing
    part of the path must be a writable folder.

    Raises:
        NotADirectoryError: a part of the path is a file.
        PermissionError: the nearest existing folder is not writable.
    """
    folder = Path(folder)
    probe = folder
    while not probe.exists() and probe.parent != probe:
        probe = probe.parent
    if probe.exists() and not probe.is_dir():
        raise NotADirectoryError(f"{folder}: {probe} is a file, not a folder")
    if probe.exists() and not os.access(probe, os.W_OK | os.X_OK):
        raise PermissionError(f"{folder}: {probe} is not writable")


# ---------------------------------------------------------------- the output-folder lock

class OutputLocked(RuntimeError):
    """Another run holds the folder; the message names the folder and the holder."""


def _try_lock(fd: int) -> bool:
    try:
        import fcntl
    except ImportError:  # Windows
        import msvcrt
        try:
            msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
            return True
        except OSError:
            return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False


def _holder(path: Path) -> str:
    try:
        text = path.read_text(encoding="utf-8", errors="replace").strip()
    except OSError:
        text = ""
    return text or "a run that is starting"


@contextmanager
def output_lock(folder: str | os.PathLike, wait: float | None = None,
                poll: float = 0.1) -> Iterator[Path]:
    """Hold ``folder`` for one run: created if needed, locked until the block ends.

    The lock is an advisory ``flock`` on ``folder/.pneumo-edge.lock``: the
    operating system releases it when the process ends, however it ends, so a
    crashed run never leaves a stale lock. The file names its holder (process id,
    host, start time) for the message a second run shows. A folder this call
    created is removed again when the run leaves it empty.

    Args:
        folder: the output folder.
        wait: seconds to wait for another holder (default :data:`LOCK_WAIT_SECONDS`).
        poll: seconds between attempts.

    Raises:
        OutputLocked: another run still holds the folder after ``wait`` seconds.
    """
    folder = Path(folder)
    created = not folder.exists()
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / LOCK_NAME
    deadline = time.monotonic() + (LOCK_WAIT_SECONDS if wait is None else wait)
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        if _try_lock(fd):
            try:  # the holder we waited for unlinks the file it locked: lock the new one
                same = os.path.samestat(os.fstat(fd), os.stat(path))
            except FileNotFoundError:
                same = False
            if same:
                break
        os.close(fd)
        if time.monotonic() >= deadline:
            raise OutputLocked(f"{folder}: another pneumo-edge run is writing here "
                               f"({_holder(path)}); wait for it to finish or choose "
                               "another folder")
        time.sleep(poll)
    try:
        started = datetime.now(timezone.utc).isoformat(timespec="seconds")
        try:  # the holder's name is for the message of a waiting run: a full disk
            # must not fail the lock (the run may still write elsewhere)
            os.ftruncate(fd, 0)
            os.write(fd, f"pid {os.getpid()} on {platform.node() or 'this host'}, "
                         f"started {started}\n".encode())
        except OSError:
            pass
        yield folder
    finally:
        try:  # removed while still locked, so no waiting run locks a stale file
            path.unlink()
        except OSError:
            pass
        os.close(fd)
        if created:
            try:
                folder.rmdir()  # only when the run wrote nothing
            except OSError:
                pass
