"""``pneumo-edge serve``: an HTTP API and a DICOM receiver in one process (the ``serve`` extra).

Modules: :mod:`.config` (settings), :mod:`.service` (what both doors share),
:mod:`.batcher` (admission, decoding pool, micro-batched inference),
:mod:`.spool` (durable received instances), :mod:`.store` (SQLite results),
:mod:`.http` (FastAPI app), :mod:`.dicom_scp` (pynetdicom SCP),
:mod:`.forward` (Structured Reports sent on), :mod:`.metrics` (Prometheus),
:mod:`.server` (:func:`run_server`). FastAPI, uvicorn and pynetdicom are imported
only when a server is built, never by ``import pneumo_edge``.
"""

from __future__ import annotations

from .config import ForwardTarget, ServeConfig, ServeError, parse_forward

__all__ = ["ServeConfig", "ServeError", "ForwardTarget", "parse_forward", "run_server"]


def run_server(*args, **kwargs):
    """See :func:`pneumo_edge.serve.server.run_server`."""
    from .server import run_server as _run

    return _run(*args, **kwargs)
