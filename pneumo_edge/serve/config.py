"""The settings of one ``pneumo-edge serve`` process (no third-party imports here)."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["ServeConfig", "ForwardTarget", "ServeError", "parse_forward"]

#: DICOM AE titles: up to 16 characters of the default repertoire, no backslash.
_AE_TITLE = re.compile(r"^[\x20-\x5b\x5d-\x7e]{1,16}$")


class ServeError(RuntimeError):
    """Something the user gave cannot be served (option, port, folder, model); one line."""


@dataclass(frozen=True)
class ForwardTarget:
    """Where DICOM Structured Reports are sent: ``AE@host:port``."""

    ae_title: str
    host: str
    port: int

    def __str__(self) -> str:
        return f"{self.ae_title}@{self.host}:{self.port}"


def parse_forward(text: str) -> ForwardTarget:
    """``AE@host:port`` -> :class:`ForwardTarget`.

    Raises:
        ServeError: the text is not of that form.
    """
    ae, at, rest = text.partition("@")
    host, colon, port = rest.rpartition(":")
    if not at or not colon or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ServeError(f"--forward {text!r}: expected AE@host:port, e.g. PACS@10.0.0.5:104")
    if not _AE_TITLE.match(ae.strip() or "-") or not ae.strip():
        raise ServeError(f"--forward {text!r}: {ae!r} is not a DICOM AE title "
                         "(1-16 characters, no backslash)")
    return ForwardTarget(ae.strip(), host.strip("[]"), int(port))


@dataclass
class ServeConfig:
    """Everything ``serve`` needs; the CLI fills it, :func:`run_server` checks it.

    Attributes:
        model: the ONNX file (with ``pneumo_edge`` metadata).
        host, port: the HTTP listener (port 0: any free port).
        dicom_port: the DICOM listener; None: no DICOM side.
        ae_title: this server's AE title.
        allowed_aes: calling AE titles accepted (empty: any).
        spool: folder for received instances, the result database and the outbox.
        keep_spool: keep received instances after their result is stored.
        token_file: a file holding the bearer token (None: no auth).
        max_batch, max_wait_ms: micro-batching: up to ``max_batch`` images per model run,
            waiting at most ``max_wait_ms`` for the batch to fill.
        queue: images admitted and not yet answered, at most; beyond: 503 / DICOM A700.
        max_body_mb: HTTP request bodies above this get 413.
        body_timeout_s: a request body not received within this gets 408.
        max_connections: concurrent HTTP connections (uvicorn's limit; beyond: 503).
        dicom_timeout_s: DICOM network/ACSE/DIMSE timeouts: a stalled sender is dropped.
        max_associations: concurrent DICOM associations.
        workers: decoding threads.
        threads: onnxruntime intra-op threads (None: physical cores).
        forward: send a Structured Report per DICOM result here.
        forward_retries: attempts per report before it goes to ``spool/dead-letter``.
        forward_backoff_s: first retry delay; doubles per attempt (capped at 60 s).
    """

    model: Path
    host: str = "127.0.0.1"
    port: int = 8000
    dicom_port: int | None = None
    ae_title: str = "PNEUMO_EDGE"
    allowed_aes: tuple[str, ...] = ()
    spool: Path = Path("pneumo_edge_spool")
    keep_spool: bool = False
    token_file: Path | None = None
    max_batch: int = 8
    max_wait_ms: float = 5.0
    queue: int = 64
    max_body_mb: float = 64.0
    body_timeout_s: float = 30.0
    max_connections: int = 128
    dicom_timeout_s: float = 30.0
    max_associations: int = 16
    workers: int = 2
    threads: int | None = None
    device: str = "auto"
    forward: ForwardTarget | None = None
    forward_retries: int = 8
    forward_backoff_s: float = 1.0
    log_level: str = "warning"
    extra: dict = field(default_factory=dict)

    def check(self) -> None:
        """Raises ServeError naming the first option that cannot work."""
        if not 1 <= self.max_batch <= 1024:
            raise ServeError(f"--max-batch {self.max_batch}: must be 1-1024")
        if not 0 <= self.max_wait_ms <= 10_000:
            raise ServeError(f"--max-wait-ms {self.max_wait_ms}: must be 0-10000")
        if self.queue < 1:
            raise ServeError(f"--queue {self.queue}: must be at least 1")
        if not 0 < self.max_body_mb <= 1024:
            raise ServeError(f"--max-body-mb {self.max_body_mb}: must be in (0, 1024]")
        if not 0 <= self.port < 65536:
            raise ServeError(f"--port {self.port}: not a TCP port")
        if self.dicom_port is not None and not 0 <= self.dicom_port < 65536:
            raise ServeError(f"--dicom-port {self.dicom_port}: not a TCP port")
        for ae in (self.ae_title, *self.allowed_aes):
            if not _AE_TITLE.match(ae) or not ae.strip():
                raise ServeError(f"AE title {ae!r}: 1-16 characters, no backslash")
        from ..options import THREADS, WORKERS  # predict's ranges

        if not WORKERS.lo <= self.workers <= WORKERS.hi:
            raise ServeError(f"--workers {self.workers}: must be {WORKERS.lo}-{WORKERS.hi}")
        if self.threads is not None and not THREADS.lo <= self.threads <= THREADS.hi:
            raise ServeError(f"--threads {self.threads}: must be {THREADS.lo}-{THREADS.hi}")
        if self.forward is not None and self.dicom_port is None:
            raise ServeError("--forward sends a report per DICOM instance: it needs --dicom-port")

    def max_body_bytes(self) -> int:
        return int(self.max_body_mb * 2**20)
