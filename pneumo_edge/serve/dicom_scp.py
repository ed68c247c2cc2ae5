"""The DICOM door: a pynetdicom Storage SCP (C-ECHO, C-STORE) over a :class:`~.service.Service`.

Accepted: CR, DX (for presentation and for processing) and Secondary Capture
images, in every transfer syntax the decoding reads (uncompressed, deflated,
RLE, JPEG baseline/extended/lossless, JPEG-LS, JPEG 2000, HTJ2K where the
plugins are installed). Each association runs in its own thread with network,
ACSE and DIMSE timeouts, so a stalled sender is dropped and never blocks the
others. pynetdicom hands an instance to the C-STORE handler only once it was
received whole; an association aborted mid-transfer therefore never reaches
the spool. "Success" is answered only after :meth:`Service.receive_instance`
has fsynced the instance into the spool.
"""

from __future__ import annotations

import io
import logging
import socket

from pynetdicom import AE, evt
from pynetdicom.sop_class import Verification

from .config import ServeError
from .service import STATUS_CANNOT_UNDERSTAND, STATUS_OUT_OF_RESOURCES, Service

__all__ = ["STORAGE_CLASSES", "TRANSFER_SYNTAXES", "start_dicom"]

log = logging.getLogger("pneumo_edge.serve")

STORAGE_CLASSES = {
    "1.2.840.10008.5.1.4.1.1.1": "CR Image Storage",
    "1.2.840.10008.5.1.4.1.1.1.1": "Digital X-Ray Image Storage - For Presentation",
    "1.2.840.10008.5.1.4.1.1.1.1.1": "Digital X-Ray Image Storage - For Processing",
    "1.2.840.10008.5.1.4.1.1.7": "Secondary Capture Image Storage",
}
TRANSFER_SYNTAXES = (
    "1.2.840.10008.1.2",         # Implicit VR Little Endian
    "1.2.840.10008.1.2.1",       # Explicit VR Little Endian
    "1.2.840.10008.1.2.1.99",    # Deflated Explicit VR Little Endian
    "1.2.840.10008.1.2.2",       # Explicit VR Big Endian (retired, still decoded)
    "1.2.840.10008.1.2.5",       # RLE Lossless
    "1.2.840.10008.1.2.4.50",    # JPEG Baseline
    "1.2.840.10008.1.2.4.51",    # JPEG Extended
    "1.2.840.10008.1.2.4.57",    # JPEG Lossless, process 14
    "1.2.840.10008.1.2.4.70",    # JPEG Lossless SV1
    "1.2.840.10008.1.2.4.80",    # JPEG-LS Lossless
    "1.2.840.10008.1.2.4.81",    # JPEG-LS Near-Lossless
    "1.2.840.10008.1.2.4.90",    # JPEG 2000 Lossless
    "1.2.840.10008.1.2.4.91",    # JPEG 2000
    "1.2.840.10008.1.2.4.201",   # HTJ2K Lossless
    "1.2.840.10008.1.2.4.202",   # HTJ2K Lossless RPCL
    "1.2.840.10008.1.2.4.203",   # HTJ2K
)


def accepted_syntaxes() -> list[str]:
    """The transfer syntaxes above whose pixel data this install decodes."""
    from ..dicom import supported_transfer_syntaxes

    native = {"1.2.840.10008.1.2", "1.2.840.10008.1.2.1", "1.2.840.10008.1.2.1.99",
              "1.2.840.10008.1.2.2"}
    decodable = {uid for uid, _ in supported_transfer_syntaxes()} | native
    return [ts for ts in TRANSFER_SYNTAXES if ts in decodable]


def _study_uid(data: bytes) -> str | None:
    """Study Instance UID from the encoded instance, or None when it cannot be parsed."""
    try:
        import pydicom

        ds = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True,
                             specific_tags=["StudyInstanceUID"])
        value = ds.get("StudyInstanceUID")
        return None if value is None else str(value)
    except Exception:  # noqa: BLE001 - a damaged header: stored, then a failed result
        return None


def start_dicom(service: Service):
    """Start listening on ``cfg.host:cfg.dicom_port``; returns pynetdicom's server
    (``.shutdown()`` stops it, ``.server_address`` tells the port)."""
    cfg = service.cfg
    ae = AE(ae_title=cfg.ae_title)
    ae.network_timeout = cfg.dicom_timeout_s
    ae.acse_timeout = cfg.dicom_timeout_s
    ae.dimse_timeout = cfg.dicom_timeout_s
    ae.maximum_associations = cfg.max_associations
    if cfg.allowed_aes:
        ae.require_calling_aet = list(cfg.allowed_aes)
    syntaxes = accepted_syntaxes()
    for sop in STORAGE_CLASSES:
        ae.add_supported_context(sop, syntaxes)
    ae.add_supported_context(Verification)

    def on_store(event) -> int:
        try:
            req = event.request
            uid = str(req.AffectedSOPInstanceUID or "")
            sop_class = str(req.AffectedSOPClassUID or "")
            data = event.encoded_dataset(include_meta=True)
            return service.receive_instance(uid, sop_class, _study_uid(data), data)
        except MemoryError:
            return STATUS_OUT_OF_RESOURCES
        except Exception as exc:  # noqa: BLE001 - a failure status, never a dead thread
            log.error("C-STORE refused: %s", type(exc).__name__)
            return STATUS_CANNOT_UNDERSTAND

    handlers = [(evt.EVT_C_STORE, on_store)]
    try:
        server = ae.start_server((cfg.host, cfg.dicom_port), block=False, evt_handlers=handlers)
    except OSError as exc:
        raise ServeError(f"--dicom-port {cfg.dicom_port}: cannot listen on {cfg.host} "
                         f"({exc.strerror or exc})") from None
    # Accepted sockets are blocking without a timeout (Python's accept() does not pass the
    # listening socket's on), and pynetdicom reads a PDU with a blocking recv loop: a
    # sender that stops mid-PDU would hold its thread forever. A timeout per recv ends it.
    accept = server.get_request

    def get_request():
        sock, address = accept()
        sock.settimeout(cfg.dicom_timeout_s)
        # pynetdicom leaves Nagle on: a C-STORE response then waited up to 40 ms for the
        # sender's delayed ACK
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return sock, address

    server.get_request = get_request

    def handle_error(request, address) -> None:  # socketserver would print a traceback
        import sys
        log.error("DICOM connection ended by an error: %s", type(sys.exc_info()[1]).__name__)

    server.handle_error = handle_error
    return server
