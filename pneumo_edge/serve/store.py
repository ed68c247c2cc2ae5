"""The result store: one SQLite row per SOP Instance UID (standard library only).

A row is written ``pending`` when an instance is acknowledged and becomes
``done`` (with the prediction record as JSON) or ``failed`` (with its reason)
once. The primary key makes a second send of the same instance the same row.
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

    def add_pending(self, uid: str, study: str | None, sop_class: str | None,
                    received_at: str | None = None) -> str | None:
        """Record an acknowledged instance; returns the status it already had (None: new)."""
        with self._lock:
            row = self._db.execute("SELECT status FROM results WHERE sop_instance_uid = ?",
                                   (uid,)).fetchone()
            if row is not None:
                return row[0]
            self._db.execute(
                "INSERT INTO results (sop_instance_uid, study_instance_uid, sop_class_uid, "
                "received_at, status) VALUES (?, ?, ?, ?, 'pending')",
                (uid, study, sop_class, received_at or utc_now()))
            return None

    def finish_many(self, rows: list[tuple[str, str, str | None, dict | None]]) -> None:
        """Store results in one transaction: (uid, 'done'|'failed', reason, record)."""
        if not rows:
            return
        now = utc_now()
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                for uid, status, reason, record in rows:
                    self._db.execute(
                        "INSERT INTO results (sop_instance_uid, received_at, status, reason, "
                        "record, completed_at) VALUES (?, ?, ?, ?, ?, ?) "
                        "ON CONFLICT(sop_instance_uid) DO UPDATE SET status = excluded.status, "
                        "reason = excluded.reason, record = excluded.record, "
                        "completed_at = excluded.completed_at",
                        (uid, now, status, reason,
                         None if record is None else json.dumps(record, allow_nan=False), now))
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise

    def set_study(self, uid: str, study: str | None, sop_class: str | None) -> None:
        with self._lock:
            self._db.execute("UPDATE results SET study_instance_uid = COALESCE(?, "
                             "study_instance_uid), sop_class_uid = COALESCE(?, sop_class_uid) "
                             "WHERE sop_instance_uid = ?", (study, sop_class, uid))

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
