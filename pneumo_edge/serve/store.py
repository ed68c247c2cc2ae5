"""The result store: one SQLite row per SOP Instance UID (standard library only).

A row is written once an instance's result is known: ``done`` (with the
prediction record as JSON) or ``failed`` (with its reason); while it is
pending the spool file is its durable record and the server answers "pending"
from memory. The primary key makes a second send of the same instance the same row.
WAL journal with ``synchronous=FULL``: a committed result survives ``kill -9``
and a power cut, which is what allows the spool file to be removed after it.
"""

from __future__ import annotations

import json
import sqlite3
import threading
from datetime import datetime, timezone
from pathlib import Path

__all__ = ["ResultStore", "utc_now"]

_SCHEMA = """
CREATE TABLE IF NOT EXISTS results (
    sop_instance_uid   TEXT PRIMARY KEY,
    study_instance_uid TEXT,
    sop_class_uid      TEXT,
    received_at        TEXT NOT NULL,
    status             TEXT NOT NULL CHECK (status IN ('pending', 'done', 'failed')),
    reason             TEXT,
    record             TEXT,
    completed_at       TEXT,
    forwarded          TEXT
)
"""


def utc_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


class ResultStore:
    """Thread-safe access to ``results.sqlite`` (one connection, one lock)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(str(self.path), check_same_thread=False,
                                   isolation_level=None, timeout=30)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.execute(_SCHEMA)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def finish_many(self, rows: list[tuple]) -> None:
        """Store results in one transaction: (uid, 'done'|'failed', reason, record,
        study, SOP class, received_at); a row already there is updated (one per UID)."""
        if not rows:
            return
        now = utc_now()
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                for uid, status, reason, record, study, sop_class, received in rows:
                    self._db.execute(
                        "INSERT INTO results (sop_instance_uid, study_instance_uid, "
                        "sop_class_uid, received_at, status, reason, record, completed_at) "
                        "VALUES (?, ?, ?, ?, ?, ?, ?, ?) "
                        "ON CONFLICT(sop_instance_uid) DO UPDATE SET status = excluded.status, "
                        "reason = excluded.reason, record = excluded.record, "
                        "completed_at = excluded.completed_at, study_instance_uid = "
                        "COALESCE(excluded.study_instance_uid, study_instance_uid), "
                        "sop_class_uid = COALESCE(excluded.sop_class_uid, sop_class_uid)",
                        (uid, study, sop_class, received or now, status, reason,
                         None if record is None else json.dumps(record, allow_nan=False), now))
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise

    def set_forwarded(self, uid: str, state: str) -> None:
        with self._lock:
            self._db.execute("UPDATE results SET forwarded = ? WHERE sop_instance_uid = ?",
                             (state, uid))

    def get(self, uid: str) -> dict | None:
        """The row as a dict (``record`` parsed), or None."""
        with self._lock:
            cur = self._db.execute("SELECT * FROM results WHERE sop_instance_uid = ?", (uid,))
            row = cur.fetchone()
            names = [d[0] for d in cur.description]
        if row is None:
            return None
        out = dict(zip(names, row))
        out["record"] = None if out["record"] is None else json.loads(out["record"])
        return out

    def status_counts(self) -> dict[str, int]:
        with self._lock:
            rows = self._db.execute("SELECT status, COUNT(*) FROM results GROUP BY status")
            return {status: n for status, n in rows}
