"""pneumo-edge serve, DICOM side: C-ECHO, C-STORE in several transfer syntaxes with
pynetdicom as the sender, duplicates, aborted associations, refusals (loopback only)."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import cv2
import numpy as np
import pytest

pytest.importorskip("fastapi")
pynetdicom = pytest.importorskip("pynetdicom")
httpx = pytest.importorskip("httpx")
pydicom = pytest.importorskip("pydicom")

import dicom_factory as F  # noqa: E402
from helpers import make_tiny_onnx  # noqa: E402
from test_serve import EXAMPLE, RELEASE_INT8, wait_until, serve  # noqa: E402,F401

from pneumo_edge.images import decode_gray  # noqa: E402
from pneumo_edge.predict import predict_paths  # noqa: E402
from pneumo_edge.runtime import load_model  # noqa: E402

CR = "1.2.840.10008.5.1.4.1.1.1"
SR = F.SR_STORAGE
VERIFICATION = "1.2.840.10008.1.1"


def associate(port: int, syntaxes=("1.2.840.10008.1.2.1",), calling: str = "TEST_SCU",
              sop_classes=(CR,), handlers=None, called: str = "PNEUMO_EDGE"):
    from pynetdicom import AE

    ae = AE(ae_title=calling)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
    for sop in sop_classes:
        for ts in syntaxes:
            ae.add_requested_context(sop, ts)
    ae.add_requested_context(VERIFICATION)
    return ae.associate("127.0.0.1", port, ae_title=called, evt_handlers=handlers or [])


def store(port: int, datasets: list, **kw) -> list[int]:
    syntaxes = sorted({str(ds.file_meta.TransferSyntaxUID) for ds in datasets})
    assoc = associate(port, syntaxes=syntaxes, **kw)
    assert assoc.is_established
    try:
        statuses = []
        for ds in datasets:
            answer = assoc.send_c_store(ds)
            if "Status" not in answer:  # no answer in 30 s: show where every thread is
                import faulthandler
                faulthandler.dump_traceback(all_threads=True)
                raise AssertionError("C-STORE without an answer")
            statuses.append(int(answer.Status))
        return statuses
    finally:
        assoc.release()


def result(server, uid: str) -> dict | None:
    with httpx.Client(base_url=server.url, timeout=30) as c:
        r = c.get(f"/v1/results/{uid}")
    return None if r.status_code == 404 else r.json()


def finished(server, uid: str) -> dict | None:
    found = result(server, uid)
    return found if found and found["status"] in ("done", "failed") else None


@pytest.fixture(scope="module")
def variants(tmp_path_factory) -> dict[str, Path]:
    """The example X-ray stored 14 ways: the 12 lossless variants, JPEG Baseline, deflated."""
    from pydicom.uid import DeflatedExplicitVRLittleEndian

    folder = tmp_path_factory.mktemp("variants")
    source = F.stretched(decode_gray(EXAMPLE))
    out = F.write_variants(folder, source)
    raw = EXAMPLE.read_bytes()
    stored = cv2.imdecode(np.frombuffer(raw, np.uint8), cv2.IMREAD_UNCHANGED)
    out["jpeg_baseline"] = F.write_jpeg_dicom(folder / "jpeg_baseline.dcm", raw, *stored.shape[:2],
                                              channels=1 if stored.ndim == 2 else stored.shape[2])
    ds = pydicom.dcmread(out["mono2_12bit_window"])
    ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = pydicom.uid.generate_uid()
    ds.save_as(folder / "deflated.dcm", enforce_file_format=True)
    out["deflated"] = folder / "deflated.dcm"
    return out


def test_echo_and_store_in_many_transfer_syntaxes_match_predict(serve, variants):
    server = serve(RELEASE_INT8, dicom_port=0, max_batch=4, max_wait_ms=20)
    port = server.dicom[1]
    assoc = associate(port)
    assert assoc.is_established and int(assoc.send_c_echo().Status) == 0
    assoc.release()

    names = sorted(variants)
    datasets = [pydicom.dcmread(variants[n]) for n in names]
    syntaxes = {str(ds.file_meta.TransferSyntaxUID) for ds in datasets}
    assert len(syntaxes) >= 6  # implicit, explicit, deflated, RLE, JPEG 2000, JPEG baseline
    # some images arrive from two associations at once
    half = len(datasets) // 2
    statuses: dict[int, list[int]] = {}
    senders = [threading.Thread(target=lambda k, part: statuses.__setitem__(k, store(port, part)),
                                args=(k, part))
               for k, part in enumerate([datasets[:half], datasets[half:]])]
    for t in senders:
        t.start()
    for t in senders:
        t.join(120)
    assert statuses[0] + statuses[1] == [0] * len(datasets)

    model = load_model(RELEASE_INT8, threads=1)
    expected = {p.path: p for p in predict_paths(model, [variants[n] for n in names]).predictions}
    for name, ds in zip(names, datasets):
        got = wait_until(lambda: finished(server, ds.SOPInstanceUID))
        assert got["status"] == "done", (name, got)
        ref = expected[str(variants[name])]
        assert got["probability"] == ref.probability, name  # bit for bit
        assert got["label"] == ref.label and got["warnings"] == list(ref.warnings)
        assert got["study_instance_uid"] == ds.StudyInstanceUID
        assert got["sop_instance_uid"] == ds.SOPInstanceUID and got["received_at"]
        assert got["dicom"]["modality"] in ("CR", "OT")
        text = json.dumps(got)
        for planted in (F.PATIENT_NAME, "Zyxwort", F.PATIENT_ID, F.ACCESSION, F.BIRTH_DATE):
            assert planted not in text
    # the same files posted over HTTP: the same probabilities
    with httpx.Client(base_url=server.url, timeout=60) as c:
        for name in ("mono1_12bit_rescale_window", "mono2_12bit_j2k", "jpeg_baseline"):
            r = c.post("/v1/predict", content=variants[name].read_bytes())
            assert r.status_code == 200, r.text
            assert r.json()["probability"] == expected[str(variants[name])].probability, name
            assert r.json()["dicom"]["modality"] == "CR"
            assert F.PATIENT_NAME not in r.text
    # acknowledged instances leave the spool once their result is stored
    assert list((server.cfg.spool / "incoming").iterdir()) == []
    with httpx.Client(base_url=server.url, timeout=30) as c:
        metrics = c.get("/metrics").text
    assert f'pneumo_edge_dicom_instances_total{{outcome="stored"}} {float(len(names))}' in metrics
    for planted in (F.PATIENT_NAME, "Zyxwort", F.PATIENT_ID, "TEST_SCU"):
        assert planted not in metrics


def test_the_same_instance_twice_is_one_result(serve, tmp_path, variants):
    tiny = make_tiny_onnx(tmp_path / "tiny.onnx")
    server = serve(tiny, dicom_port=0, keep_spool=True)
    ds = pydicom.dcmread(variants["mono2_8bit_explicit"])
    assert store(server.dicom[1], [ds, ds]) == [0, 0]
    first = wait_until(lambda: finished(server, ds.SOPInstanceUID))
    assert store(server.dicom[1], [ds]) == [0]  # after its result: still success, not redone
    time.sleep(0.3)
    again = result(server, ds.SOPInstanceUID)
    assert again["completed_at"] == first["completed_at"]
    assert again["probability"] == first["probability"]
    import sqlite3
    db = sqlite3.connect(server.cfg.spool / "results.sqlite")
    assert db.execute("SELECT COUNT(*) FROM results").fetchone()[0] == 1
    db.close()
    assert [p.name for p in (server.cfg.spool / "kept").iterdir()] == [f"{ds.SOPInstanceUID}.dcm"]
    with httpx.Client(base_url=server.url, timeout=30) as c:
        metrics = c.get("/metrics").text
    assert 'pneumo_edge_dicom_instances_total{outcome="duplicate"} 2.0' in metrics
    assert 'pneumo_edge_dicom_instances_total{outcome="stored"} 1.0' in metrics


def test_non_image_damaged_and_nested_instances_fail_cleanly(serve, tmp_path):
    from pydicom.dataset import Dataset
    from pydicom.sequence import Sequence
    from pydicom.uid import ExplicitVRLittleEndian

    tiny = make_tiny_onnx(tmp_path / "tiny.onnx")
    server = serve(tiny, dicom_port=0)
    port = server.dicom[1]
    # a CR header without pixels: stored, then a failed result with its reason
    no_pixels = F.base_dataset(ExplicitVRLittleEndian)
    # deeply nested sequences in an image
    nested = F.base_dataset(ExplicitVRLittleEndian)
    nested.Rows = nested.Columns = 64
    nested.SamplesPerPixel, nested.PhotometricInterpretation = 1, "MONOCHROME2"
    nested.BitsAllocated, nested.BitsStored, nested.HighBit = 8, 8, 7
    nested.PixelRepresentation = 0
    nested.PixelData = np.random.default_rng(0).integers(0, 255, (64, 64), np.uint8).tobytes()
    inner = Dataset()
    inner.CodeMeaning = "x"
    for _ in range(60):
        outer = Dataset()
        outer.ContentSequence = Sequence([inner])
        inner = outer
    nested.ContentSequence = Sequence([inner])
    # a pixel bomb: 60,000 x 60,000 px claimed, a few bytes sent
    bomb = F.base_dataset(ExplicitVRLittleEndian)
    bomb.Rows = bomb.Columns = 60_000
    bomb.SamplesPerPixel, bomb.PhotometricInterpretation = 1, "MONOCHROME2"
    bomb.BitsAllocated, bomb.BitsStored, bomb.HighBit, bomb.PixelRepresentation = 16, 12, 11, 0
    bomb.PixelData = b"\x00" * 1024
    # pixel data shorter than Rows x Columns say, and RLE "compressed" garbage
    short = F.base_dataset(ExplicitVRLittleEndian)
    short.Rows = short.Columns = 512
    short.SamplesPerPixel, short.PhotometricInterpretation = 1, "MONOCHROME2"
    short.BitsAllocated, short.BitsStored, short.HighBit, short.PixelRepresentation = 8, 8, 7, 0
    short.PixelData = b"\x07" * 1000
    from pydicom.encaps import encapsulate
    from pydicom.uid import RLELossless
    garbage = F.base_dataset(RLELossless)
    for key in ("Rows", "Columns", "SamplesPerPixel", "PhotometricInterpretation",
                "BitsAllocated", "BitsStored", "HighBit", "PixelRepresentation"):
        setattr(garbage, key, getattr(short, key))
    garbage.PixelData = encapsulate([np.random.default_rng(1).bytes(4000)])
    garbage["PixelData"].VR = "OB"
    assert store(port, [short, garbage]) == [0, 0]
    for bad in (short, garbage):
        got = wait_until(lambda: finished(server, bad.SOPInstanceUID))
        assert got["status"] == "failed" and got["reason"] and "\n" not in got["reason"]
    assert store(port, [no_pixels, nested, bomb]) == [0, 0, 0]
    refused = wait_until(lambda: finished(server, bomb.SOPInstanceUID))
    assert refused["status"] == "failed" and "too large" in refused["reason"]
    failed = wait_until(lambda: finished(server, no_pixels.SOPInstanceUID))
    assert failed["status"] == "failed" and "without pixel data" in failed["reason"]
    assert F.PATIENT_NAME not in json.dumps(failed)
    done = wait_until(lambda: finished(server, nested.SOPInstanceUID))
    assert done["status"] in ("done", "failed")
    # non-image SOP classes (SR, presentation state) are not negotiated at all
    assoc = associate(port, sop_classes=(SR, "1.2.840.10008.5.1.4.1.1.11.1"))
    assert assoc.is_established
    accepted = {c.abstract_syntax for c in assoc.accepted_contexts}
    assert SR not in accepted and VERIFICATION in accepted
    sr = F.base_dataset(ExplicitVRLittleEndian, sop_class=SR, view=None, modality="SR")
    with pytest.raises(ValueError):
        assoc.send_c_store(sr)
    assoc.release()
    # over HTTP the same files are a 400 or a 200, never a 5xx
    no_pixels.save_as(tmp_path / "np.dcm", enforce_file_format=True)
    nested.save_as(tmp_path / "nested.dcm", enforce_file_format=True)
    with httpx.Client(base_url=server.url, timeout=30) as c:
        r = c.post("/v1/predict", content=(tmp_path / "np.dcm").read_bytes())
        assert r.status_code == 400 and "without pixel data" in r.json()["error"]
        assert F.PATIENT_NAME not in r.text
        assert c.post("/v1/predict", content=(tmp_path / "nested.dcm").read_bytes()
                      ).status_code in (200, 400)
        assert c.get("/healthz").status_code == 200


#: An A-ABORT PDU (PS3.8 9.3.8): type 07, length 4, source 0 (service user), reason 0.
A_ABORT = b"\x07\x00\x00\x00\x00\x04\x00\x00\x00\x00"


@pytest.mark.parametrize("how", ["a-abort", "connection dropped"])
def test_an_aborted_association_leaves_nothing(serve, tmp_path, how):
    import socket

    from pydicom.uid import ExplicitVRLittleEndian
    from pynetdicom import evt
    from pynetdicom.pdu import P_DATA_TF

    tiny = make_tiny_onnx(tmp_path / "tiny.onnx")
    server = serve(tiny, dicom_port=0)
    big = F.base_dataset(ExplicitVRLittleEndian)
    big.Rows = big.Columns = 1024
    big.SamplesPerPixel, big.PhotometricInterpretation = 1, "MONOCHROME2"
    big.BitsAllocated, big.BitsStored, big.HighBit, big.PixelRepresentation = 16, 12, 11, 0
    big.PixelData = np.zeros((1024, 1024), np.uint16).tobytes()  # 2 MiB: ~130 PDUs
    sent = {"n": 0}

    def on_sent(event) -> None:
        # after 20 P-DATA PDUs of the instance, end the association on the wire: the
        # rest of the instance never arrives
        if isinstance(event.pdu, P_DATA_TF):
            sent["n"] += 1
            if sent["n"] == 20:
                raw = event.assoc.dul.socket.socket
                if how == "a-abort":
                    raw.sendall(A_ABORT)
                raw.shutdown(socket.SHUT_RDWR)

    assoc = associate(server.dicom[1], handlers=[(evt.EVT_PDU_SENT, on_sent)])
    assert assoc.is_established
    status = assoc.send_c_store(big)
    assert "Status" not in status  # no answer: the association is gone
    assoc.abort()
    assert 20 <= sent["n"] < 100  # of the ~130 the instance needs
    # nothing half-stored, no result, and the server goes on answering
    time.sleep(0.3)
    assert result(server, big.SOPInstanceUID) is None
    spool = server.cfg.spool
    assert list((spool / "incoming").iterdir()) == [] and list((spool / "tmp").iterdir()) == []
    again = associate(server.dicom[1])
    assert int(again.send_c_echo().Status) == 0
    again.release()


def test_calling_ae_allowlist(serve, tmp_path):
    tiny = make_tiny_onnx(tmp_path / "tiny.onnx")
    server = serve(tiny, dicom_port=0, allowed_aes=("MODALITY_1",))
    refused = associate(server.dicom[1], calling="INTRUDER")
    assert refused.is_rejected
    ok = associate(server.dicom[1], calling="MODALITY_1")
    assert ok.is_established and int(ok.send_c_echo().Status) == 0
    ok.release()


def test_a_full_queue_refuses_instances_with_out_of_resources(serve, tmp_path, monkeypatch,
                                                              variants):
    import pneumo_edge.serve.batcher as batcher

    gate = threading.Event()
    real = batcher.decode_file
    monkeypatch.setattr(batcher, "decode_file",
                        lambda path, cfg: (gate.wait(30), real(path, cfg))[1])
    tiny = make_tiny_onnx(tmp_path / "tiny.onnx")
    server = serve(tiny, dicom_port=0, queue=1)
    first = pydicom.dcmread(variants["mono2_8bit_explicit"])
    second = pydicom.dcmread(variants["mono1_8bit"])
    try:
        assert store(server.dicom[1], [first, second]) == [0, 0xA700]
        assert result(server, first.SOPInstanceUID)["status"] == "pending"
        assert result(server, second.SOPInstanceUID) is None
    finally:
        gate.set()
    assert wait_until(lambda: finished(server, first.SOPInstanceUID))["status"] == "done"
    assert store(server.dicom[1], [second]) == [0]  # the sender's retry is taken
    assert wait_until(lambda: finished(server, second.SOPInstanceUID))["status"] == "done"


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_forwarding_a_structured_report_when_the_destination_is_down_at_first(serve, tmp_path,
                                                                               variants):
    from pynetdicom import AE, evt

    from pneumo_edge.serve import parse_forward
    from pneumo_edge.serve.forward import COMPREHENSIVE_SR

    port = free_port()
    server = serve(RELEASE_INT8, dicom_port=0, forward=parse_forward(f"PACS@127.0.0.1:{port}"),
                   forward_backoff_s=0.2, forward_retries=50)
    ds = pydicom.dcmread(variants["mono2_8bit_explicit"])
    assert store(server.dicom[1], [ds]) == [0]
    done = wait_until(lambda: finished(server, ds.SOPInstanceUID))
    assert done["status"] == "done"

    def retries() -> float:
        text = httpx.get(server.url + "/metrics", timeout=10).text
        for line in text.splitlines():
            if line.startswith('pneumo_edge_forwarded_reports_total{outcome="retry"}'):
                return float(line.rsplit(" ", 1)[1])
        return 0.0

    wait_until(lambda: retries() >= 1)  # the destination is down: retried, not lost
    assert [p.name for p in (server.cfg.spool / "outbox").iterdir()] == \
        [f"{ds.SOPInstanceUID}.dcm"]
    received = []
    pacs = AE(ae_title="PACS")
    pacs.add_supported_context(COMPREHENSIVE_SR, ["1.2.840.10008.1.2.1", "1.2.840.10008.1.2"])
    handler = (evt.EVT_C_STORE, lambda event: (received.append(event.dataset), 0)[1])
    receiver = pacs.start_server(("127.0.0.1", port), block=False, evt_handlers=[handler])
    try:
        wait_until(lambda: received, timeout=60)
    finally:
        receiver.shutdown()
    sr = received[0]
    assert sr.SOPClassUID == COMPREHENSIVE_SR and sr.VerificationFlag == "UNVERIFIED"
    assert sr.StudyInstanceUID == ds.StudyInstanceUID and sr.Modality == "SR"
    items = {it.ConceptNameCodeSequence[0].CodeValue: it for it in sr.ContentSequence}
    assert float(items["P-001"].MeasuredValueSequence[0].FloatingPointValue) == \
        done["probability"]
    assert float(items["P-002"].MeasuredValueSequence[0].FloatingPointValue) == done["threshold"]
    finding = items["121071"].ConceptCodeSequence[0].CodeMeaning
    assert finding == ("Pneumonia" if done["label"] == "PNEUMONIA" else "Normal")
    assert items["121112"].ReferencedSOPSequence[0].ReferencedSOPInstanceUID == ds.SOPInstanceUID
    assert load_model(RELEASE_INT8).sha256 in items["111003"].TextValue
    wait_until(lambda: result(server, ds.SOPInstanceUID).get("forwarded") == "sent")
    assert list((server.cfg.spool / "outbox").iterdir()) == []


def test_a_report_nobody_takes_goes_to_the_dead_letter_folder(serve, tmp_path, variants):
    from pneumo_edge.serve import parse_forward

    tiny = make_tiny_onnx(tmp_path / "tiny.onnx")
    server = serve(tiny, dicom_port=0, forward=parse_forward(f"PACS@127.0.0.1:{free_port()}"),
                   forward_backoff_s=0.05, forward_retries=3)
    ds = pydicom.dcmread(variants["mono1_8bit"])
    assert store(server.dicom[1], [ds]) == [0]
    wait_until(lambda: (result(server, ds.SOPInstanceUID) or {}).get("forwarded")
               == "dead-letter", timeout=60)
    assert [p.name for p in (server.cfg.spool / "dead-letter").iterdir()] == \
        [f"{ds.SOPInstanceUID}.dcm"]
    assert list((server.cfg.spool / "outbox").iterdir()) == []
    assert result(server, ds.SOPInstanceUID)["status"] == "done"


def test_a_stalled_sender_is_dropped_and_blocks_nobody(serve, tmp_path):
    import socket

    tiny = make_tiny_onnx(tmp_path / "tiny.onnx")
    server = serve(tiny, dicom_port=0, dicom_timeout_s=1.0)
    stalled = socket.create_connection(("127.0.0.1", server.dicom[1]), timeout=15)
    stalled.sendall(b"\x01\x00\x00\x00")  # the start of an A-ASSOCIATE-RQ, then silence
    t0 = time.monotonic()
    ok = associate(server.dicom[1])  # another sender meanwhile: served at once
    assert ok.is_established and int(ok.send_c_echo().Status) == 0
    ok.release()
    reply = b""
    for _ in range(20):  # the server closes the stalled connection
        chunk = stalled.recv(4096)
        if not chunk:
            break
        reply += chunk
    stalled.close()
    assert time.monotonic() - t0 < 15
