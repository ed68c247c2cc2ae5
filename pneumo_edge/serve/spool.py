"""The spool folder: received DICOM instances on disk before anyone is told "stored".

Layout (one server per folder, held by :func:`pneumo_edge.io.output_lock`)::

    incoming/<SOP Instance UID>.dcm   acknowledged, result not yet stored
    kept/<SOP Instance UID>.dcm       with --keep-spool: after the result is stored
    outbox/<SOP Instance UID>.dcm     Structured Reports waiting to be forwarded
    dead-letter/                      reports the destination never took
    tmp/                              HTTP bodies (emptied at start)
    results.sqlite                    the result store

A file appears under ``incoming/`` only through the one atomic writer
(:func:`pneumo_edge.io.atomic_write` with ``durable=True``: the temporary file
is fsynced, renamed, and the folder fsynced), so an instance acknowledged to a
sender survives ``kill -9`` and a power cut; a crash mid-write leaves at most a
hidden ``.*.tmp`` file, which the next start removes.
"""

from __future__ import annotations

import os
import re
import shutil
from contextlib import ExitStack
from pathlib import Path

from ..io import OutputLocked, atomic_write, output_lock
from .config import ServeError

__all__ = ["Spool", "valid_uid"]

#: A DICOM UID (PS3.5 9.1): digits and dots, at most 64 characters. Only such
#: strings become file names, so a sender cannot name a path.
_UID = re.compile(r"^[0-9]+(\.[0-9]+)*$")


def valid_uid(uid: object) -> bool:
    return isinstance(uid, str) and 0 < len(uid) <= 64 and bool(_UID.match(uid))


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
        self._held = ExitStack()

    def open(self) -> "Spool":
        """Take the folder's lock, create the folders, remove what a crash left half-written.

        Raises:
            ServeError: the folder cannot be created or written, or another server holds it.
        """
        try:
            self._held.enter_context(output_lock(self.root, wait=0))
            for folder in (self.incoming, self.kept, self.outbox, self.dead, self.tmp):
                folder.mkdir(parents=True, exist_ok=True)
        except OutputLocked as exc:
            self._held.close()
            raise ServeError(f"--spool {exc}") from None
        except OSError as exc:
            self._held.close()
            raise ServeError(f"--spool {self.root}: cannot create or write it "
                             f"({exc.strerror or exc})") from None
        for stale in self.tmp.iterdir():
            if stale.is_dir():
                shutil.rmtree(stale, ignore_errors=True)
            else:
                stale.unlink(missing_ok=True)
        for folder in (self.incoming, self.outbox, self.dead, self.kept):
            for stale in folder.glob(".*.tmp"):  # the atomic writer's, from a crash
                stale.unlink(missing_ok=True)
        return self

    def close(self) -> None:
        self._held.close()

    def writable(self) -> bool:
        return os.access(self.incoming, os.W_OK | os.X_OK) and os.access(self.tmp, os.W_OK)

    def durable_write(self, folder: Path, name: str, data: bytes) -> Path:
        """Write ``data`` to ``folder/name`` durably (fsynced file, rename, fsynced folder)."""
        target = folder / name
        atomic_write(target, data, durable=True)
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
