"""pneumo-edge serve survives kill -9: every acknowledged instance gets exactly one result.

The server runs as a subprocess (the real CLI); instances are sent with pynetdicom
while it is killed; a second server on the same spool infers what the first one
acknowledged and never finished, before it opens its doors.
"""

from __future__ import annotations

import os
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("fastapi")
pytest.importorskip("pynetdicom")
httpx = pytest.importorskip("httpx")
pytest.importorskip("pydicom")

import dicom_factory as F  # noqa: E402
from helpers import make_tiny_onnx  # noqa: E402
from test_serve import wait_until  # noqa: E402
from test_serve_dicom import associate  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def small_cr(seed: int):
    from pydicom.uid import ExplicitVRLittleEndian

    ds = F.base_dataset(ExplicitVRLittleEndian)
    ds.Rows = ds.Columns = 64
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    rng = np.random.default_rng(seed)
    ds.PixelData = rng.normal(100 + seed % 50, 20, (64, 64)).clip(0, 255).astype(np.uint8).tobytes()
    return ds


class ServerProcess:
    def __init__(self, model: Path, spool: Path, log: Path, *extra: str) -> None:
        self.http, self.dicom = free_port(), free_port()
        self.log = log
        env = dict(os.environ, PYTHONPATH=str(ROOT))
        cmd = [sys.executable, "-m", "pneumo_edge.cli", "serve", "--model", str(model),
               "--port", str(self.http), "--dicom-port", str(self.dicom), "--spool", str(spool),
               "--threads", "1", "--log-level", "info", *extra]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=open(log, "wb"),
                                     env=env, cwd=ROOT)
        self.url = f"http://127.0.0.1:{self.http}"

        def up():
            if self.proc.poll() is not None:
                raise AssertionError(f"server exited: {log.read_text()}")
            try:
                return httpx.get(self.url + "/healthz", timeout=2).status_code == 200
            except httpx.HTTPError:
                return False

        wait_until(up, timeout=90, step=0.2)

    def kill9(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(30)

    def terminate(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(60)


def test_kill_9_while_receiving_then_restart_every_acknowledged_instance_has_one_result(tmp_path):
    model = make_tiny_onnx(tmp_path / "tiny.onnx")
    spool = tmp_path / "spool"
    # long batch waits keep acknowledged instances unfinished when the kill comes
    first = ServerProcess(model, spool, tmp_path / "first.log", "--max-batch", "64",
                          "--max-wait-ms", "1500", "--queue", "200")
    datasets = [small_cr(i) for i in range(80)]
    acked: list[str] = []
    attempted: list[str] = []
    stop = threading.Event()

    def send() -> None:
        assoc = associate(first.dicom)
        if not assoc.is_established:
            return
        for ds in datasets:
            if stop.is_set():
                break
            attempted.append(ds.SOPInstanceUID)
            status = assoc.send_c_store(ds)
            if "Status" not in status:
                break  # the server is gone: not acknowledged
            if int(status.Status) == 0:
                acked.append(ds.SOPInstanceUID)
            time.sleep(0.01)
        assoc.abort()

    sender = threading.Thread(target=send, daemon=True)
    sender.start()
    wait_until(lambda: len(acked) >= 30, timeout=60)
    first.kill9()
    sender.join(60)
    stop.set()
    assert 30 <= len(acked) < len(datasets)
    left = sorted(p.stem for p in (spool / "incoming").glob("*.dcm"))
    assert left, "the kill came after every result was stored: nothing was recovered"
    assert set(left) <= set(attempted)

    second = ServerProcess(model, spool, tmp_path / "second.log")
    try:
        for uid in acked:
            r = httpx.get(f"{second.url}/v1/results/{uid}", timeout=10)
            assert r.status_code == 200, uid
            # recovered before the doors opened: no waiting needed
            assert r.json()["status"] == "done", r.json()
        assert list((spool / "incoming").iterdir()) == []
        # resending what was acknowledged does not make a second result
        assoc = associate(second.dicom)
        assert [int(assoc.send_c_store(ds).Status) for ds in datasets[:3]] == [0, 0, 0]
        assoc.release()
    finally:
        assert second.terminate() == 0
    db = sqlite3.connect(spool / "results.sqlite")
    rows = db.execute("SELECT sop_instance_uid, status FROM results").fetchall()
    db.close()
    uids = [u for u, _ in rows]
    assert len(uids) == len(set(uids))
    assert set(acked) <= {u for u, s in rows if s == "done"}
    assert set(uids) <= set(attempted)
    log = (tmp_path / "first.log").read_text() + (tmp_path / "second.log").read_text()
    assert "Traceback" not in log
    assert f"{len(left)} instances recovered" in (tmp_path / "second.log").read_text() or \
        "recovering" in log


def test_sigterm_finishes_what_was_acknowledged(tmp_path):
    model = make_tiny_onnx(tmp_path / "tiny.onnx")
    spool = tmp_path / "spool"
    server = ServerProcess(model, spool, tmp_path / "s.log", "--max-batch", "64",
                           "--max-wait-ms", "1000")
    datasets = [small_cr(i) for i in range(5)]
    assoc = associate(server.dicom)
    assert [int(assoc.send_c_store(ds).Status) for ds in datasets] == [0] * 5
    assoc.release()
    assert server.terminate() == 0  # while the batch is still waiting to fill
    db = sqlite3.connect(spool / "results.sqlite")
    done = {u for (u,) in db.execute("SELECT sop_instance_uid FROM results WHERE status='done'")}
    db.close()
    assert done == {ds.SOPInstanceUID for ds in datasets}
    assert list((spool / "incoming").iterdir()) == []
    assert "Traceback" not in (tmp_path / "s.log").read_text()
