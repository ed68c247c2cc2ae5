"""The spool folder: received DICOM instances on disk before anyone is told "stored".

Layout (one server per folder, held by a lock on ``.lock``)::

    incoming/<SOP Instance UID>.dcm   acknowledged, result not yet stored
    kept/<SOP Instance UID>.dcm       with --keep-spool: after the result is stored
    outbox/<SOP Instance UID>.dcm     Structured Reports waiting to be forwarded
    dead-letter/                      reports the destination never took
    tmp/                              partial writes and HTTP bodies (emptied at start)
    results.sqlite                    the result store

A file appears under ``incoming/`` only by a rename after its bytes and the
temporary file were fsynced, and the folder is fsynced after the rename, so an
instance acknowledged to a sender survives ``kill -9`` and a power cut; a
crash mid-write leaves at most a file in ``tmp/``, which the next start removes.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from pathlib import Path

from .config import ServeError

__all__ = ["Spool", "valid_uid"]

#: A DICOM UID (PS3.5 9.1): digits and dots, at most 64 characters. Only such
#: strings become file names, so a sender cannot name a path.
_UID = re.compile(r"^[0-9]+(\.[0-9]+)*$")


def valid_uid(uid: object) -> bool:
    return isinstance(uid, str) and 0 < len(uid) <= 64 and bool(_UID.match(uid))


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # Windows cannot open folders; its renames are durable enough here
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class Spool:
    """The folders of one spool and durable writes into them."""

    def __init__(self, root: str | os.PathLike) -> None:
        self.root = Path(root)
        self.incoming = self.root / "incoming"
        self.kept = self.root / "kept"
        self.outbox = self.root / "outbox"
        self.dead = self.root / "dead-letter"
        self.tmp = self.root / "tmp"
        self.db_path = self.root / "results.sqlite"
        self._lock_fh = None

    def open(self) -> "Spool":
        """Create the folders, take the lock and empty ``tmp/``.

        Raises:
            ServeError: the folder cannot be created or written, or another server holds it.
        """
        try:
            for folder in (self.incoming, self.kept, self.outbox, self.dead, self.tmp):
                folder.mkdir(parents=True, exist_ok=True)
            self._lock_fh = open(self.root / ".lock", "a+b")
        except OSError as exc:
            raise ServeError(f"--spool {self.root}: cannot create or write it "
                             f"({exc.strerror or exc})") from None
        try:
            import fcntl
            fcntl.flock(self._lock_fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except ImportError:  # not POSIX: no lock
            pass
        except OSError:
            self._lock_fh.close()
            self._lock_fh = None
            raise ServeError(f"--spool {self.root}: another pneumo-edge serve is using this "
                             "folder") from None
        for stale in self.tmp.iterdir():
            if stale.is_dir():
                shutil.rmtree(stale, ignore_errors=True)
            else:
                stale.unlink(missing_ok=True)
        return self

    def close(self) -> None:
        if self._lock_fh is not None:
            self._lock_fh.close()
            self._lock_fh = None

    def writable(self) -> bool:
        return os.access(self.incoming, os.W_OK | os.X_OK) and os.access(self.tmp, os.W_OK)

    def durable_write(self, folder: Path, name: str, data: bytes) -> Path:
        """Write ``data`` to ``folder/name``: temp file, fsync, rename, fsync of the folder."""
        fd, tmp = tempfile.mkstemp(prefix=".in-", suffix=".tmp", dir=self.tmp)
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
            target = folder / name
            os.replace(tmp, target)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        _fsync_dir(folder)
        return target

    def incoming_path(self, uid: str) -> Path:
        return self.incoming / f"{uid}.dcm"

    def pending_instances(self) -> list[Path]:
        """Instances acknowledged before a crash and never finished, oldest first."""
        files = [p for p in self.incoming.glob("*.dcm") if valid_uid(p.stem)]
        return sorted(files, key=lambda p: (p.stat().st_mtime, p.name))

    def retire(self, uid: str, keep: bool) -> None:
        """After the result is stored: remove (or keep) the received instance."""
        src = self.incoming_path(uid)
        try:
            if keep:
                os.replace(src, self.kept / src.name)
            else:
                src.unlink()
        except FileNotFoundError:
            pass
