"""pneumo-edge serve: HTTP API, queue, auth, DICOM receiver (loopback, ephemeral ports).

Servers run in a thread of the test process (``run_server(stop=...)``) on port 0;
every wait is bounded in count and time. Skipped where the serve extra is absent.
"""

from __future__ import annotations

import base64
import json
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import cv2
import numpy as np
import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
pytest.importorskip("pynetdicom")
pytest.importorskip("prometheus_client")
httpx = pytest.importorskip("httpx")

from helpers import make_tiny_onnx, write_gray_jpeg  # noqa: E402

import dicom_factory as F  # noqa: E402
from pneumo_edge.images import collect_images, decode_gray  # noqa: E402
from pneumo_edge.predict import predict_paths  # noqa: E402
from pneumo_edge.runtime import load_model  # noqa: E402
from pneumo_edge.serve import ServeConfig, ServeError, parse_forward, run_server  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples" / "xrays"
EXAMPLE = EXAMPLES / "NORMAL" / "IM-0201-0001.jpeg"
RELEASE_INT8 = ROOT / "exported" / "pneumo_resnet18_int8.onnx"
CR = "1.2.840.10008.5.1.4.1.1.1"


def wait_until(cond, timeout: float = 20.0, step: float = 0.05):
    """Poll ``cond`` until it returns something truthy; bounded in time and count."""
    deadline = time.monotonic() + timeout
    for _ in range(int(timeout / step) + 1):
        value = cond()
        if value:
            return value
        if time.monotonic() > deadline:
            break
        time.sleep(step)
    raise AssertionError(f"condition not met within {timeout} s")


class Running:
    """A server in a thread: ``url``, ``dicom`` (host, port), ``stop()``."""

    def __init__(self, cfg: ServeConfig) -> None:
        self.cfg = cfg
        self.info: dict = {}
        self.error: BaseException | None = None
        self._started = threading.Event()
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        assert self._started.wait(60), f"server did not start: {self.error!r}"
        if self.error is not None:
            raise self.error
        host, port = self.info["http"]
        self.url = f"http://{host}:{port}"
        self.dicom = self.info["dicom"]

    def _run(self) -> None:
        try:
            run_server(self.cfg, on_started=self._on_started, configure_logging=False,
                       stop=self._stop)
        except BaseException as exc:  # noqa: BLE001 - reported by __init__
            self.error = exc
            self._started.set()

    def _on_started(self, info: dict) -> None:
        self.info = info
        self._started.set()

    def stop(self) -> None:
        self._stop.set()
        self.thread.join(60)
        assert not self.thread.is_alive()


@pytest.fixture
def serve(tmp_path):
    """Factory: ``serve(model=..., **options)`` -> Running; all stopped at the end."""
    started: list[Running] = []

    def start(model: Path, **options) -> Running:
        options.setdefault("spool", tmp_path / "spool")
        cfg = ServeConfig(model=model, host="127.0.0.1", port=0, workers=2, threads=1,
                          **options)
        server = Running(cfg)
        started.append(server)
        return server

    yield start
    for server in started:
        if server.thread.is_alive():
            server.stop()


@pytest.fixture
def tiny(tmp_path) -> Path:
    return make_tiny_onnx(tmp_path / "tiny.onnx", heads=True)


def textured_jpeg(path: Path, mean: float = 170.0, size: int = 150, seed: int = 0) -> bytes:
    """A JPEG no input check flags (textured, mid-grey): the tiny model says PNEUMONIA
    above mean 127.5, and its OOD score |mean - 128| / 10 stays under 5."""
    rng = np.random.default_rng(seed)
    img = rng.normal(mean, 20, (size, size)).clip(0, 255).astype(np.uint8)
    ok, buf = cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, 95])
    assert ok
    path.write_bytes(buf.tobytes())
    return buf.tobytes()


# ---------------------------------------------------------------------- HTTP


def test_http_probability_is_predicts_bit_for_bit_on_the_sample_xrays(serve):
    files = collect_images([EXAMPLES])
    assert len(files) == 12
    model = load_model(RELEASE_INT8, threads=1)
    expected = {str(p.path): p for p in predict_paths(model, files, batch_size=8).predictions}
    server = serve(RELEASE_INT8, max_batch=4, max_wait_ms=20)
    results: dict[str, dict] = {}

    def send(f: Path) -> None:
        with httpx.Client(base_url=server.url, timeout=60) as c:
            r = c.post("/v1/predict", content=f.read_bytes())
            assert r.status_code == 200, r.text
            results[str(f)] = r.json()

    # concurrently, so that the server forms batches of mixed images
    threads = [threading.Thread(target=send, args=(f,)) for f in files]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert len(results) == 12
    for path, body in results.items():
        ref = expected[path]
        assert body["probability"] == ref.probability, path  # exact, not approximately
        assert body["label"] == ref.label and body["threshold"] == ref.threshold
        assert body["ood_score"] == ref.ood_score
        assert body["in_distribution"] == ref.in_distribution
        assert body["warnings"] == list(ref.warnings) and body["flagged"] == ref.flagged
        assert body["model"]["sha256"] == model.sha256
        assert body["model"]["precision"] == "int8"
    assert {b["label"] for b in results.values()} == {"NORMAL", "PNEUMONIA"}
    with httpx.Client(base_url=server.url, timeout=60) as c:
        metrics = c.get("/metrics").text
        body = c.post("/v1/predict?heatmap=1", content=EXAMPLE.read_bytes()).json()
    png = np.frombuffer(base64.b64decode(body["heatmap_png"]), np.uint8)
    overlay = cv2.imdecode(png, cv2.IMREAD_COLOR)
    assert overlay is not None and overlay.ndim == 3 and max(overlay.shape[:2]) <= 512
    # the server formed batches: 12 images in fewer than 12 model runs
    runs = float(_metric(metrics, "pneumo_edge_batch_size_count"))
    assert float(_metric(metrics, "pneumo_edge_batch_size_sum")) == 12.0
    assert runs < 12


def _metric(text: str, name: str, labels: str = "") -> str:
    for line in text.splitlines():
        if line.startswith(name + labels + " ") or (not labels and line.startswith(name + " ")):
            return line.rsplit(" ", 1)[1]
    raise AssertionError(f"{name}{labels} not in the metrics")


def test_http_error_statuses_are_one_line_json(serve, tiny, tmp_path):
    server = serve(tiny, max_body_mb=0.05)
    good = textured_jpeg(tmp_path / "g.jpeg")
    truncated = good[: len(good) // 2]
    with httpx.Client(base_url=server.url, timeout=30) as c:
        r = c.post("/v1/predict", content=good)
        assert r.status_code == 200 and r.json()["label"] == "PNEUMONIA"
        assert r.json()["flagged"] is False
        for body, status, words in [
            (b"", 400, "empty body"),
            (b"\x00garbage" * 50, 400, "not a supported image"),
            (truncated, 400, "JPEG"),
            (b"\xff\xd8\xff" + b"\x00" * 100_000, 413, "max-body-mb"),
        ]:
            r = c.post("/v1/predict", content=body)
            assert r.status_code == status, (words, r.text)
            err = r.json()["error"]
            assert words in err and "\n" not in err
        # a decompression bomb (PNG claiming 40,000 x 40,000 px) is refused from its header
        from test_images import _png_header_only
        bomb = _png_header_only(tmp_path / "bomb.png", 40_000, 40_000, 8, 0).read_bytes()
        r = c.post("/v1/predict", content=bomb)
        assert r.status_code == 400 and "too large" in r.json()["error"]
        # a body without Content-Length (chunked) is cut at the limit too
        r = c.post("/v1/predict", content=iter([b"\x00" * 30_000] * 4))
        assert r.status_code == 413
        assert c.post("/v1/predict?heatmap=maybe", content=good).status_code == 400
        r = c.get("/v1/results/1.2.3.4")
        assert r.status_code == 404 and "SOP Instance UID" in r.json()["error"]
        assert c.get("/v1/results/..%2F..%2Fetc").status_code == 404
        assert c.get("/nothing").status_code == 404
        assert c.get("/v1/predict").status_code == 405
        # the model's own view: a uniform image is predicted, flagged, with its reason
        r = c.post("/v1/predict", content=write_gray_jpeg(tmp_path / "u.jpeg", 128).read_bytes())
        assert r.status_code == 200 and r.json()["flagged"] is True
        assert any("uniform" in w for w in r.json()["warnings"])
        assert c.get("/healthz").json()["status"] == "alive"


def test_a_200_mb_body_is_refused_without_being_read(serve, tiny):
    server = serve(tiny)  # default limit 64 MiB
    sent = {"n": 0}

    def body():
        for _ in range(200):  # 200 MiB if it were all read
            sent["n"] += 1
            yield b"\x00" * 2**20

    with httpx.Client(base_url=server.url, timeout=30) as c:
        r = c.post("/v1/predict", content=body(), headers={"content-length": str(200 * 2**20)})
        assert r.status_code == 413
        assert "max-body-mb" in r.json()["error"]
        assert c.get("/healthz").status_code == 200
    # refused from the header: nothing of it was written to the spool
    assert sent["n"] >= 1 and list((server.cfg.spool / "tmp").iterdir()) == []


def test_token_auth(serve, tiny, tmp_path):
    token = "s3cret-token-0123456789"
    (tmp_path / "token").write_text(token + "\n")
    server = serve(tiny, token_file=tmp_path / "token")
    img = textured_jpeg(tmp_path / "g.jpeg")
    with httpx.Client(base_url=server.url, timeout=30) as c:
        for headers in [{}, {"Authorization": "Bearer wrong"},
                        {"Authorization": f"Bearer {token[:-1]}X"},
                        {"Authorization": f"Bearer {token}extra"},
                        {"Authorization": f"Basic {token}"}, {"Authorization": token}]:
            r = c.post("/v1/predict", content=img, headers=headers)
            assert r.status_code == 401, headers
            assert r.headers["www-authenticate"].startswith("Bearer")
            assert c.get("/v1/results/1.2.3", headers=headers).status_code == 401
        ok = {"Authorization": f"Bearer {token}"}
        assert c.post("/v1/predict", content=img, headers=ok).status_code == 200
        assert c.get("/v1/results/1.2.3", headers=ok).status_code == 404
        # the probes carry no patient data and need no token
        assert c.get("/healthz").status_code == 200 and c.get("/readyz").status_code == 200
    with pytest.raises(ServeError, match="at least 16"):
        (tmp_path / "short").write_text("abc")
        serve(tiny, token_file=tmp_path / "short", spool=tmp_path / "other")


def test_a_full_queue_answers_503_at_once(serve, tiny, tmp_path, monkeypatch):
    import pneumo_edge.serve.batcher as batcher

    gate = threading.Event()
    entered = threading.Event()
    real = batcher.decode_file

    def held(path, cfg):
        entered.set()
        assert gate.wait(30)
        return real(path, cfg)

    monkeypatch.setattr(batcher, "decode_file", held)
    server = serve(tiny, queue=1)
    img = textured_jpeg(tmp_path / "g.jpeg")
    first: dict = {}

    def occupy() -> None:
        with httpx.Client(base_url=server.url, timeout=60) as c:
            first["r"] = c.post("/v1/predict", content=img)

    t = threading.Thread(target=occupy)
    t.start()
    try:
        assert entered.wait(30)
        with httpx.Client(base_url=server.url, timeout=30) as c:
            r = c.post("/v1/predict", content=img)
            assert r.status_code == 503 and r.headers["retry-after"] == "1"
            assert "queue is full" in r.json()["error"]
            ready = c.get("/readyz")
            assert ready.status_code == 503 and ready.json()["queue_not_full"] is False
            # answered while the first image is still held: no waiting for a slot
            assert t.is_alive() and "r" not in first
            assert "pneumo_edge_queue_depth 1.0" in c.get("/metrics").text
    finally:
        gate.set()
        t.join(60)
    assert first["r"].status_code == 200
    with httpx.Client(base_url=server.url, timeout=30) as c:
        assert c.get("/readyz").status_code == 200
        assert c.post("/v1/predict", content=img).status_code == 200


def test_a_slow_body_gets_408_and_does_not_block_others(serve, tiny, tmp_path):
    server = serve(tiny, body_timeout_s=1.0)
    host, port = server.info["http"]
    img = textured_jpeg(tmp_path / "g.jpeg")
    with socket.create_connection((host, port), timeout=10) as s:
        s.sendall(b"POST /v1/predict HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n")
        with httpx.Client(base_url=server.url, timeout=30) as c:
            for _ in range(3):  # one byte at a time; others are served meanwhile
                s.sendall(b"\xff")
                assert c.post("/v1/predict", content=img).status_code == 200
                time.sleep(0.2)
        s.settimeout(10)
        reply = b""
        for _ in range(100):
            chunk = s.recv(4096)
            reply += chunk
            if not chunk or b"}" in reply:
                break
    assert reply.startswith(b"HTTP/1.1 408")
    assert b"not received within 1 s" in reply


def test_one_server_per_spool(serve, tiny, tmp_path):
    serve(tiny, spool=tmp_path / "shared-spool")
    with pytest.raises(ServeError, match="another pneumo-edge run"):
        serve(tiny, spool=tmp_path / "shared-spool")


def test_import_pneumo_edge_does_not_import_the_serve_stack():
    code = ("import sys, pneumo_edge, pneumo_edge.cli, pneumo_edge.serve;"
            "bad = [m for m in ('fastapi', 'uvicorn', 'pynetdicom', 'prometheus_client',"
            " 'starlette', 'highdicom') if m in sys.modules]; print(bad)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=ROOT, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_bad_options_are_one_line_errors(tmp_path, tiny):
    with pytest.raises(ServeError, match="AE@host:port"):
        parse_forward("PACS-10.0.0.1-104")
    assert str(parse_forward("PACS@127.0.0.1:11112")) == "PACS@127.0.0.1:11112"
    with pytest.raises(ServeError, match="--max-batch"):
        ServeConfig(model=tiny, max_batch=0).check()
    with pytest.raises(ServeError, match="needs --dicom-port"):
        ServeConfig(model=tiny, forward=parse_forward("A@127.0.0.1:1")).check()
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen(1)
    try:
        with pytest.raises(ServeError, match="--port"):
            run_server(ServeConfig(model=tiny, port=busy.getsockname()[1],
                                   spool=tmp_path / "s"), configure_logging=False)
    finally:
        busy.close()
    with pytest.raises(ServeError, match="model file not found"):
        run_server(ServeConfig(model=tmp_path / "none.onnx", port=0, spool=tmp_path / "s"),
                   configure_logging=False)


def test_cli_serve_without_the_model_is_exit_2(tmp_path):
    from typer.testing import CliRunner

    from pneumo_edge.cli import app

    r = CliRunner().invoke(app, ["serve", "--model", str(tmp_path / "none.onnx"), "--port", "0",
                                 "--spool", str(tmp_path / "s")])
    assert r.exit_code == 2 and "model file not found" in r.output
    r = CliRunner().invoke(app, ["serve", "--forward", "nonsense", "--dicom-port", "0",
                                 "--port", "0", "--spool", str(tmp_path / "s")])
    assert r.exit_code == 2 and "AE@host:port" in r.output


def test_an_internal_error_is_a_json_500_and_the_server_goes_on(serve, tiny, tmp_path,
                                                                 monkeypatch, caplog):
    import logging

    import pneumo_edge.serve.batcher as batcher

    real = batcher.batch_records

    def broken(*args, **kwargs):
        raise RuntimeError("something the model code did not expect")

    monkeypatch.setattr(batcher, "batch_records", broken)
    server = serve(tiny)
    img = textured_jpeg(tmp_path / "g.jpeg")
    with caplog.at_level(logging.ERROR, logger="pneumo_edge.serve"):
        with httpx.Client(base_url=server.url, timeout=30) as c:
            r = c.post("/v1/predict", content=img)
            assert r.status_code == 500
            assert r.json() == {"error": "internal error (RuntimeError)"}
            monkeypatch.setattr(batcher, "batch_records", real)
            assert c.post("/v1/predict", content=img).status_code == 200  # thread still alive
            assert c.get("/readyz").status_code == 200
    assert any("RuntimeError" in rec.getMessage() for rec in caplog.records)
    assert not any(rec.exc_info for rec in caplog.records if rec.name.startswith("pneumo_edge"))
