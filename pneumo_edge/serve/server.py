"""``run_server``: load the model, recover the spool, open both doors, shut down gracefully."""

from __future__ import annotations

import logging
import signal
import socket
import sys
import threading
from typing import Callable

from .config import ServeConfig, ServeError

__all__ = ["run_server", "ServeResult"]

log = logging.getLogger("pneumo_edge.serve")


class _NoTraceback(logging.Filter):
    """Log records keep their one-line message; a traceback never reaches the log."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.exc_info = None
        record.exc_text = None
        record.stack_info = None
        return True


def _setup_logging(level: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    handler.addFilter(_NoTraceback())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(getattr(logging, level.upper(), logging.WARNING))
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access", "pynetdicom"):
        lg = logging.getLogger(name)
        lg.handlers[:] = []
        lg.propagate = True
    # pynetdicom reports every refused or aborted association at ERROR with context;
    # one line each is enough
    logging.getLogger("pynetdicom").setLevel(max(root.level, logging.WARNING))
    logging.getLogger("pneumo_edge.serve").setLevel(min(root.level, logging.INFO))

    def thread_error(args) -> None:  # instead of a traceback on stderr
        if args.exc_type is not SystemExit:
            log.error("thread %s ended by %s", getattr(args.thread, "name", "?"),
                      args.exc_type.__name__)

    threading.excepthook = thread_error


class ServeResult:
    """How the server ended: ``signal`` (name) and the number of instances recovered."""

    def __init__(self) -> None:
        self.signal: str | None = None
        self.recovered = 0


def _listen(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # proto IPPROTO_TCP, not 0: asyncio sets TCP_NODELAY on accepted connections only
    # when it sees it, and without it every response waited 40 ms for a delayed ACK
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise ServeError(f"--port {port}: cannot listen on {host} ({exc.strerror or exc})") \
            from None
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def run_server(cfg: ServeConfig, on_started: Callable[[dict], None] | None = None,
               configure_logging: bool = True,
               stop: threading.Event | None = None) -> ServeResult:
    """Serve until SIGTERM or SIGINT, then finish what was acknowledged and return.

    Args:
        cfg: the settings (checked here).
        on_started: called once both doors are open with ``{"http": (host, port),
            "dicom": (host, port) | None, "recovered": n}``.
        configure_logging: one-line log records on stderr (off in embedding tests).
        stop: setting it shuts the server down like SIGTERM (servers run in a thread).

    Raises:
        ServeError: a bad option, an unusable model, spool or token file, a port in use.
    """
    import uvicorn

    from ..runtime import ModelError, load_model
    from .http import create_app
    from .service import Service

    cfg.check()
    if configure_logging:
        _setup_logging(cfg.log_level)
    result = ServeResult()
    try:
        model = load_model(cfg.model, device=cfg.device, threads=cfg.threads)
    except ModelError as exc:
        raise ServeError(str(exc)) from None
    sock = _listen(cfg.host, cfg.port)
    service = Service(cfg, model)
    scp = None
    try:
        service.start()
        result.recovered = service.recovered
        if cfg.dicom_port is not None:
            from .dicom_scp import start_dicom
            scp = start_dicom(service)
        app = create_app(service)
        config = uvicorn.Config(app, log_level=cfg.log_level, access_log=False, lifespan="off",
                                limit_concurrency=cfg.max_connections, server_header=False,
                                timeout_graceful_shutdown=30, timeout_keep_alive=5,
                                log_config=None)

        class _Server(uvicorn.Server):
            def handle_exit(self, sig, frame):  # not ready at once, then uvicorn's shutdown
                service.accepting = False
                result.signal = signal.Signals(sig).name
                super().handle_exit(sig, frame)

        server = _Server(config)
        started = {"http": sock.getsockname()[:2],
                   "dicom": None if scp is None else scp.server_address[:2],
                   "recovered": service.recovered}

        def watch() -> None:
            import time
            for _ in range(600):  # 60 s at most for uvicorn to start
                if server.started or server.should_exit:
                    break
                time.sleep(0.05)
            if server.started and on_started is not None:
                on_started(started)
            if stop is not None:
                while not server.should_exit:
                    if stop.wait(0.2):
                        service.accepting = False
                        server.should_exit = True
        threading.Thread(target=watch, name="serve-watch", daemon=True).start()

        main = threading.current_thread() is threading.main_thread()
        previous = {}
        if main:
            # uvicorn re-raises the captured signal once it has shut down; a no-op
            # handler lets the rest of this function finish the acknowledged work
            for sig in (signal.SIGINT, signal.SIGTERM):
                previous[sig] = signal.signal(sig, lambda *_: None)
        try:
            server.run(sockets=[sock])
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
    finally:
        service.accepting = False
        if scp is not None:
            scp.shutdown()
        service.stop()
        sock.close()
    return result
