"""The HTTP door: a FastAPI app over a :class:`~.service.Service`.

Routes: ``POST /v1/predict`` (the body is one image file), ``GET
/v1/results/{sop_instance_uid}``, ``GET /healthz``, ``GET /readyz``, ``GET
/metrics``. The ``/v1`` routes need ``Authorization: Bearer <token>`` when a
token file is configured; the probes and metrics carry no patient data and need
none. Errors are JSON ``{"error": "<one line>"}``.
"""

from __future__ import annotations

import asyncio
import hmac
import logging

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from .. import __version__
from ..records import Prediction
from .metrics import CONTENT_TYPE_LATEST
from .service import Service, heatmap_png, prediction_json

__all__ = ["create_app", "RETRY_AFTER_S"]

log = logging.getLogger("pneumo_edge.serve")

#: What a 503 asks the client to wait, in seconds.
RETRY_AFTER_S = 1
_ROUTES = {"/v1/predict": "predict", "/healthz": "healthz", "/readyz": "readyz",
           "/metrics": "metrics"}


def _error(status: int, message: str, headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=headers)


class _BodyTooLarge(Exception):
    pass


def create_app(service: Service) -> "_Counted":
    """The ASGI app (FastAPI inside a counting wrapper); ``service`` must be started."""
    cfg = service.cfg
    max_body = cfg.max_body_bytes()
    app = FastAPI(title="pneumo-edge", version=__version__, docs_url=None, redoc_url=None,
                  openapi_url=None)
    metrics = service.metrics

    @app.exception_handler(Exception)
    async def internal(request: Request, exc: Exception):
        # one line in the log, never a traceback, never the exception's text to the client
        log.error("internal error on %s: %s", _route(request.url.path), type(exc).__name__)
        return _error(500, "internal error")

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        return _error(exc.status_code, str(exc.detail), getattr(exc, "headers", None))

    def authorised(request: Request) -> bool:
        if service.token is None:
            return True
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        # compare_digest on bytes: the time taken does not depend on where they differ
        return hmac.compare_digest(token.strip().encode("utf-8", "replace"), service.token) \
            and scheme.lower() == "bearer"

    def unauthorised() -> JSONResponse:
        return _error(401, "missing or wrong bearer token",
                      {"WWW-Authenticate": 'Bearer realm="pneumo-edge"'})

    def busy() -> JSONResponse:
        return _error(503, "busy: the queue is full, retry later",
                      {"Retry-After": str(RETRY_AFTER_S)})

    async def read_body(request: Request, fh) -> int:
        size = 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > max_body:
                raise _BodyTooLarge
            fh.write(chunk)
        return size

    @app.post("/v1/predict")
    async def predict(request: Request):
        if not authorised(request):
            return unauthorised()
        flag = request.query_params.get("heatmap", "0").lower()
        if flag not in ("0", "1", "true", "false"):
            return _error(400, "heatmap must be 0 or 1")
        want_heatmap = flag in ("1", "true")
        too_large = f"request body over --max-body-mb ({cfg.max_body_mb:g} MiB)"
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > max_body:
            return _error(413, too_large)
        if not service.accepting or service.batcher.full:
            return busy()  # at once, before reading anything
        path = service.new_upload_path()
        try:
            try:
                with open(path, "wb") as fh:
                    size = await asyncio.wait_for(read_body(request, fh), cfg.body_timeout_s)
            except _BodyTooLarge:
                return _error(413, too_large)
            except asyncio.TimeoutError:
                return _error(408, f"request body not received within {cfg.body_timeout_s:g} s")
            except ClientDisconnect:
                return _error(400, "client disconnected during the body")
            if size == 0:
                return _error(400, "empty body: send one image file (JPEG, PNG, BMP, TIFF or "
                                   "DICOM) as the request body")
            if not service.batcher.try_admit():
                return busy()
            # the batcher releases the slot when the image is finished
            rec = await asyncio.wrap_future(service.submit_upload(path))
            if not isinstance(rec, Prediction):
                status = 500 if rec.error.startswith("internal error") else 400
                return _error(status, rec.error)
            body = prediction_json(rec, service.model)
            if want_heatmap:
                body["heatmap_png"] = await asyncio.get_running_loop().run_in_executor(
                    None, heatmap_png, path, rec)
            return JSONResponse(body)
        finally:
            path.unlink(missing_ok=True)

    @app.get("/v1/results/{uid}")
    async def result(uid: str, request: Request):
        if not authorised(request):
            return unauthorised()
        found = await asyncio.get_running_loop().run_in_executor(None, service.result, uid)
        if found is None:
            return _error(404, "no instance with this SOP Instance UID was received")
        return JSONResponse(found)

    @app.get("/healthz")
    async def healthz():
        return {"status": "alive", "version": __version__}

    @app.get("/readyz")
    async def readyz():
        checks = service.ready()
        ok = all(checks.values())
        return JSONResponse({"ready": ok, **checks}, status_code=200 if ok else 503)

    @app.get("/metrics")
    async def prometheus():
        return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)

    return _Counted(app, metrics)


def _route(path: str) -> str:
    """A fixed word for the metrics' route label: never a UID or anything a client sent."""
    return _ROUTES.get(path, "results" if path.startswith("/v1/results/") else "other")


class _Counted:
    """Pure ASGI wrapper counting responses by route and status (a BaseHTTPMiddleware
    would add a task and a copy of every body per request)."""

    def __init__(self, app: FastAPI, metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = {"code": 500}

        async def counting_send(message) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, counting_send)
        finally:
            self.metrics.requests.labels(_route(scope.get("path", "")),
                                         str(status["code"])).inc()
