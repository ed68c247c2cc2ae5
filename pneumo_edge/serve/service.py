"""The server's state behind both doors: model, batcher, spool, result store, metrics.

The HTTP app (:mod:`.http`) and the DICOM receiver (:mod:`.dicom_scp`) only
translate their protocol into calls of :class:`Service`; what an image
becomes, and when a received instance counts as stored, is decided here.
"""

from __future__ import annotations

import base64
import logging
import os
import tempfile
import threading
from concurrent.futures import Future, wait
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from .. import __version__
from ..records import Failure, Prediction, to_http
from ..runtime import PneumoModel
from .batcher import Job, MicroBatcher
from .config import ServeConfig
from .metrics import ServeMetrics
from .spool import Spool, valid_uid
from .store import ResultStore, utc_now

__all__ = ["Service", "prediction_json", "STATUS_SUCCESS", "STATUS_OUT_OF_RESOURCES",
           "STATUS_CANNOT_UNDERSTAND"]

log = logging.getLogger("pneumo_edge.serve")

# DICOM C-STORE statuses (PS3.4 B.2.3)
STATUS_SUCCESS = 0x0000
STATUS_OUT_OF_RESOURCES = 0xA700
STATUS_CANNOT_UNDERSTAND = 0xC000


def prediction_json(pred: Prediction, model: PneumoModel) -> dict:
    """The HTTP / result-store form of one prediction: :func:`pneumo_edge.records.to_http`
    (report.json's per-image fields unrounded, with threshold and flagged) plus the model.

    The probability is the float ``predict`` computed: JSON keeps it exact.
    """
    return to_http(pred) | {"model": {"name": model.path.name, "sha256": model.sha256,
                                      "precision": model.precision},
                            "pneumo_edge_version": __version__}


def heatmap_png(path: Path, pred: Prediction) -> str | None:
    """Base64 PNG of the X-ray with its class activation map (None without ``cam``)."""
    import cv2

    from ..heatmap import overlay
    from ..images import ImageDecodeError, decode_gray

    if pred.cam is None:
        return None
    try:
        gray = decode_gray(path, target=512)
    except ImageDecodeError:
        return None
    image = overlay(gray, pred.cam.astype(np.float32),
                    f"P(PNEUMONIA) {pred.probability:.3f}: {pred.label}", box=pred.lung_box)
    ok, buf = cv2.imencode(".png", image)
    return base64.b64encode(buf.tobytes()).decode("ascii") if ok else None


class Service:
    """Everything both doors share. ``start`` recovers the spool before returning."""

    def __init__(self, cfg: ServeConfig, model: PneumoModel) -> None:
        self.cfg = cfg
        self.model = model
        self.metrics = ServeMetrics()
        self.spool = Spool(cfg.spool)
        self.store: ResultStore | None = None
        self.forwarder = None
        self.batcher = MicroBatcher(model, max_batch=cfg.max_batch, max_wait_ms=cfg.max_wait_ms,
                                    capacity=cfg.queue, workers=cfg.workers,
                                    on_batch=self._on_batch, metrics=self.metrics)
        self.token: bytes | None = None
        #: instances acknowledged and not finished: uid -> (study, SOP class, received_at).
        #: Kept in memory only: the spool file is the durable record until the result
        #: row is committed (one fsync fewer per instance than a "pending" row).
        self._inflight: dict[str, tuple[str | None, str | None, str]] = {}
        self._inflight_lock = threading.Lock()
        self.accepting = False
        self.recovered = 0

    # ------------------------------------------------------------------ life cycle
    def start(self) -> "Service":
        """Open the spool and store, start inference, infer what a crash left behind."""
        if self.cfg.token_file is not None:
            from .config import ServeError
            try:
                token = Path(self.cfg.token_file).read_bytes().strip()
            except OSError as exc:
                raise ServeError(f"--token-file {self.cfg.token_file}: cannot read it "
                                 f"({exc.strerror or exc})") from None
            if len(token) < 16:
                raise ServeError(f"--token-file {self.cfg.token_file}: the token must be at "
                                 "least 16 characters")
            self.token = token
        self.spool.open()
        self.store = ResultStore(self.spool.db_path)
        self.batcher.start()
        if self.cfg.forward is not None:
            from .forward import Forwarder
            self.forwarder = Forwarder(self).start()
        self.recovered = self._recover()
        self.accepting = True
        return self

    def stop(self, timeout: float = 30.0) -> None:
        """Admit nothing more, finish what was admitted, close everything."""
        self.accepting = False
        self.batcher.stop(timeout)
        if self.forwarder is not None:
            self.forwarder.stop()
        if self.store is not None:
            self.store.close()
        self.spool.close()

    def ready(self) -> dict:
        checks = {"model": self.model is not None, "spool_writable": self.spool.writable(),
                  "queue_not_full": not self.batcher.full, "accepting": self.accepting}
        return checks

    def _recover(self) -> int:
        """Instances acknowledged but without a stored result (a crash): infer them first."""
        futures: list[Future] = []
        for path in self.spool.pending_instances():
            uid = path.stem
            row = self.store.get(uid)
            if row is not None and row["status"] in ("done", "failed"):
                self.spool.retire(uid, self.cfg.keep_spool)  # crashed between commit and unlink
                continue
            study, sop_class = _header_uids(path)
            try:  # received when it was written to the spool
                received = datetime.fromtimestamp(path.stat().st_mtime, timezone.utc).isoformat(
                    timespec="milliseconds")
            except OSError:
                received = utc_now()
            with self._inflight_lock:
                self._inflight[uid] = (study, sop_class, received)
            self.batcher.force_admit()
            futures.append(self.batcher.submit(Job(path, "dicom", uid, uid=uid)))
        if futures:
            log.warning("recovering %d instances left in the spool", len(futures))
            wait(futures)
        return len(futures)

    # ------------------------------------------------------------------ HTTP door
    def new_upload_path(self) -> Path:
        fd, name = tempfile.mkstemp(prefix="upload-", suffix=".bin", dir=self.spool.tmp)
        os.close(fd)
        return Path(name)

    def submit_upload(self, path: Path) -> Future:
        """Predict an admitted upload already written to ``path``."""
        return self.batcher.submit(Job(path, "http", "upload"))

    # ------------------------------------------------------------------ DICOM door
    def receive_instance(self, uid: str, sop_class: str | None, study: str | None,
                         data: bytes) -> int:
        """Store one C-STORE instance durably, then queue it; the DICOM status to answer."""
        if not valid_uid(uid):
            self.metrics.instances.labels("refused_invalid").inc()
            return STATUS_CANNOT_UNDERSTAND
        with self._inflight_lock:
            if uid in self._inflight:
                self.metrics.instances.labels("duplicate").inc()
                return STATUS_SUCCESS
            row = self.store.get(uid)
            if row is not None and row["status"] in ("done", "failed"):
                self.metrics.instances.labels("duplicate").inc()
                return STATUS_SUCCESS
            if not self.accepting or not self.batcher.try_admit():
                self.metrics.instances.labels("refused_busy").inc()
                return STATUS_OUT_OF_RESOURCES
            self._inflight[uid] = (study if valid_uid(study) else None,
                                   sop_class if valid_uid(sop_class) else None, utc_now())
        try:
            path = self.spool.durable_write(self.spool.incoming, f"{uid}.dcm", data)
        except Exception as exc:  # noqa: BLE001 - a full disk: refuse, the sender retries
            log.error("could not spool an instance: %s", exc)
            with self._inflight_lock:
                self._inflight.pop(uid, None)
            self.batcher.release()
            self.metrics.instances.labels("error").inc()
            return STATUS_OUT_OF_RESOURCES
        self.metrics.instances.labels("stored").inc()
        self.batcher.submit(Job(path, "dicom", uid, uid=uid))
        return STATUS_SUCCESS

    def result(self, uid: str) -> dict | None:
        """What ``GET /v1/results/{uid}`` answers (None: unknown)."""
        if not valid_uid(uid):
            return None
        with self._inflight_lock:
            pending = self._inflight.get(uid)
        row = self.store.get(uid)
        if row is None and pending is not None:
            return {"sop_instance_uid": uid, "study_instance_uid": pending[0],
                    "received_at": pending[2], "status": "pending", "completed_at": None}
        if row is None:
            return None
        out = dict(row["record"] or {})
        out.update(sop_instance_uid=uid, study_instance_uid=row["study_instance_uid"],
                   received_at=row["received_at"], status=row["status"],
                   completed_at=row["completed_at"])
        if row["status"] == "failed":
            out["reason"] = row["reason"]
        if row["forwarded"] is not None:
            out["forwarded"] = row["forwarded"]
        return out

    # ------------------------------------------------------------------ results
    def _on_batch(self, results: list[tuple[Job, Prediction | Failure]]) -> None:
        """Store the DICOM results of one model run in one transaction, then retire
        their spool files (the result is durable first, so none is ever lost)."""
        rows = []
        for job, rec in results:
            if job.door != "dicom":
                continue
            with self._inflight_lock:
                study, sop_class, received = self._inflight.get(job.uid) or (None, None, None)
            if isinstance(rec, Prediction):
                rows.append((job.uid, "done", None, prediction_json(rec, self.model), study,
                             sop_class, received))
                if self.forwarder is not None:
                    self.forwarder.prepare(job.uid, job.path, rec)
            else:
                rows.append((job.uid, "failed", rec.error, None, study, sop_class, received))
        if not rows:
            return
        self.store.finish_many(rows)
        for uid, *_ in rows:
            self.spool.retire(uid, self.cfg.keep_spool)
            with self._inflight_lock:
                self._inflight.pop(uid, None)
        if self.forwarder is not None:
            self.forwarder.wake()


def _header_uids(path: Path) -> tuple[str | None, str | None]:
    """(Study Instance UID, SOP Class UID) from a spooled file's header, or Nones."""
    try:
        import pydicom

        ds = pydicom.dcmread(path, stop_before_pixels=True,
                             specific_tags=["StudyInstanceUID", "SOPClassUID"])
        study, sop = ds.get("StudyInstanceUID"), ds.get("SOPClassUID")
        return (str(study) if valid_uid(str(study)) else None,
                str(sop) if valid_uid(str(sop)) else None)
    except Exception:  # noqa: BLE001 - a damaged file still gets its (failed) result
        return None, None
