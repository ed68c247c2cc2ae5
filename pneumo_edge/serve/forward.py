"""Forwarding results as DICOM Structured Reports (highdicom), with retries and a dead letter.

For each DICOM instance that gets a ``done`` result, :meth:`Forwarder.prepare`
builds a Comprehensive SR in the source study that references the source
instance and holds the probability, label, threshold, OOD score and flag and
the model's identity, VerificationFlag UNVERIFIED (research output nobody has
verified). The report is written durably to ``spool/outbox`` before the result
is committed, so a crash never loses a report of a stored result. A sender
thread C-STOREs the outbox to ``--forward`` and retries with exponential
backoff; after ``forward_retries`` attempts a report moves to ``spool/dead-letter``.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from pathlib import Path

from .spool import valid_uid

__all__ = ["Forwarder", "build_sr", "CODES"]

log = logging.getLogger("pneumo_edge.serve")

COMPREHENSIVE_SR = "1.2.840.10008.5.1.4.1.1.88.33"
#: Private codes (coding scheme 99PNEUMOEDGE) for what standard codes do not name.
CODES = {
    "report": ("18748-4", "LN", "Diagnostic imaging report"),
    "probability": ("P-001", "99PNEUMOEDGE", "Probability of pneumonia (model output)"),
    "threshold": ("P-002", "99PNEUMOEDGE", "Decision threshold"),
    "ood_score": ("P-003", "99PNEUMOEDGE", "Out-of-distribution score"),
    "flags": ("P-004", "99PNEUMOEDGE", "Input check warnings"),
    "finding": ("121071", "DCM", "Finding"),
    "pneumonia": ("233604007", "SCT", "Pneumonia"),
    "normal": ("17621005", "SCT", "Normal"),
    "algorithm": ("111001", "DCM", "Algorithm Name"),
    "version": ("111003", "DCM", "Algorithm Version"),
    "source": ("121112", "DCM", "Source of Measurement"),
    "comment": ("121106", "DCM", "Comment"),
    "no_units": ("1", "UCUM", "no units"),
}
MAX_BACKOFF_S = 60.0


def _code(key: str):
    from highdicom.sr import CodedConcept

    value, scheme, meaning = CODES[key]
    return CodedConcept(value=value, scheme_designator=scheme, meaning=meaning)


def build_sr(source: Path, pred, model) -> "object":
    """The Comprehensive SR (a pydicom Dataset) for ``pred`` of the spooled ``source``."""
    import highdicom as hd
    import pydicom
    from highdicom.sr import (CodeContentItem, ComprehensiveSR, ContainerContentItem,
                              ImageContentItem, NumContentItem, TextContentItem)

    from .. import __version__
    from ..records import DISCLAIMER

    header = pydicom.dcmread(source, stop_before_pixels=True)
    # the patient and study modules are copied from the source; type 2 attributes a
    # modality left out are present and empty in the report, as the standard allows
    for key in ("PatientID", "PatientName", "PatientBirthDate", "PatientSex",
                "AccessionNumber", "StudyID", "StudyDate", "StudyTime"):
        if key not in header:
            setattr(header, key, None)
    rel = "CONTAINS"
    items = [
        CodeContentItem(_code("finding"), _code("pneumonia" if pred.label == "PNEUMONIA"
                                                else "normal"), relationship_type=rel),
        NumContentItem(_code("probability"), float(pred.probability), _code("no_units"),
                       relationship_type=rel),
        NumContentItem(_code("threshold"), float(pred.threshold), _code("no_units"),
                       relationship_type=rel),
    ]
    if pred.ood_score is not None:
        items.append(NumContentItem(_code("ood_score"), float(pred.ood_score),
                                    _code("no_units"), relationship_type=rel))
    items += [
        TextContentItem(_code("flags"), "; ".join(pred.warnings)[:1000] or "none",
                        relationship_type=rel),
        TextContentItem(_code("algorithm"), f"pneumo-edge {model.path.name}"[:64],
                        relationship_type=rel),
        TextContentItem(_code("version"), f"{__version__} {model.precision} sha256:"
                        f"{model.sha256}", relationship_type=rel),
        TextContentItem(_code("comment"), DISCLAIMER, relationship_type=rel),
        ImageContentItem(_code("source"), str(header.SOPClassUID), str(header.SOPInstanceUID),
                         relationship_type=rel),
    ]
    root = ContainerContentItem(_code("report"))
    root.ContentSequence = items
    return ComprehensiveSR(
        evidence=[header], content=root, series_instance_uid=hd.UID(), series_number=990,
        sop_instance_uid=hd.UID(), instance_number=1, manufacturer="pneumo-edge",
        is_complete=True, is_final=False, is_verified=False)


def _no_delay(event) -> None:
    """TCP_NODELAY on the forwarding connection (pynetdicom leaves Nagle on, and each
    C-STORE then waited up to 40 ms for a delayed ACK)."""
    import socket

    sock = getattr(getattr(event.assoc.dul, "socket", None), "socket", None)
    if sock is not None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


class Forwarder:
    """Builds reports into the outbox and sends them from one thread."""

    def __init__(self, service) -> None:
        self.service = service
        self.cfg = service.cfg
        self.target = service.cfg.forward
        self.outbox: Path = service.spool.outbox
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._attempts: dict[str, int] = {}
        self._due: dict[str, float] = {}
        self._thread = threading.Thread(target=self._loop, name="serve-forward", daemon=True)

    def start(self) -> "Forwarder":
        import highdicom  # noqa: F401 - seconds to import: not on the first result's path

        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        self._thread.join(30)

    def wake(self) -> None:
        self._wake.set()

    def prepare(self, uid: str, source: Path, pred) -> None:
        """Write the report of one result to the outbox (durably); a report that cannot
        be built is logged and skipped, never a reason to lose the result."""
        try:
            sr = build_sr(source, pred, self.service.model)
            import io
            buf = io.BytesIO()
            sr.save_as(buf, enforce_file_format=True)
            self.service.spool.durable_write(self.outbox, f"{uid}.dcm", buf.getvalue())
        except Exception as exc:  # noqa: BLE001
            log.error("no Structured Report for an instance: %s: %s", type(exc).__name__,
                      str(exc).splitlines()[0][:200] if str(exc) else "")
            self.service.metrics.forwarded.labels("build_failed").inc()

    def _pending(self) -> list[Path]:
        now = time.monotonic()
        return sorted(p for p in self.outbox.glob("*.dcm")
                      if valid_uid(p.stem) and self._due.get(p.stem, 0.0) <= now)

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                files = self._pending()
                if files:
                    self._send(files)
            except Exception as exc:  # noqa: BLE001 - the sender thread never dies
                log.error("forwarding failed: %s", type(exc).__name__)
            waits = [d - time.monotonic() for d in self._due.values()]
            self._wake.wait(max(0.05, min(waits)) if waits else 5.0)
            self._wake.clear()

    def _send(self, files: list[Path]) -> None:
        from pynetdicom import AE, evt

        ae = AE(ae_title=self.cfg.ae_title)
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = self.cfg.dicom_timeout_s
        ae.add_requested_context(COMPREHENSIVE_SR, ["1.2.840.10008.1.2.1"])
        assoc = ae.associate(self.target.host, self.target.port, ae_title=self.target.ae_title,
                             evt_handlers=[(evt.EVT_CONN_OPEN, _no_delay)])
        if not assoc.is_established:
            for f in files:
                self._failed(f, "association not established")
            return
        try:
            for f in files:
                if self._stop.is_set():
                    break
                status = assoc.send_c_store(f)
                code = int(status.Status) if "Status" in status else None
                if code is not None and (code == 0 or 0xB000 <= code <= 0xBFFF):
                    f.unlink(missing_ok=True)
                    self._attempts.pop(f.stem, None)
                    self._due.pop(f.stem, None)
                    self.service.store.set_forwarded(f.stem, "sent")
                    self.service.metrics.forwarded.labels("sent").inc()
                else:
                    self._failed(f, "no answer" if code is None else f"status 0x{code:04X}")
        finally:
            if assoc.is_established:
                assoc.release()

    def _failed(self, f: Path, why: str) -> None:
        uid = f.stem
        n = self._attempts.get(uid, 0) + 1
        self._attempts[uid] = n
        if n >= self.cfg.forward_retries:
            os.replace(f, self.service.spool.dead / f.name)
            self._attempts.pop(uid, None)
            self._due.pop(uid, None)
            self.service.store.set_forwarded(uid, "dead-letter")
            self.service.metrics.forwarded.labels("dead_letter").inc()
            log.warning("a report went to the dead-letter folder after %d attempts (%s)", n, why)
            return
        delay = min(MAX_BACKOFF_S, self.cfg.forward_backoff_s * 2 ** (n - 1))
        self._due[uid] = time.monotonic() + delay
        self.service.metrics.forwarded.labels("retry").inc()
