"""One budget for decoded pixels, every decoder: hostile files that declare far more
than they store are refused or decoded within the bound (issue 19, classes 1, 2, 3,
7, 9, 11, 12). Every file here is built in the test; none is committed."""

from __future__ import annotations

import struct
import threading
import tracemalloc
from pathlib import Path

import cv2
import numpy as np
import pytest

pydicom = pytest.importorskip("pydicom")

from typer.testing import CliRunner  # noqa: E402

from pneumo_edge import images  # noqa: E402
from pneumo_edge.cli import EXIT_OK, app  # noqa: E402
from pneumo_edge.codestreams import jpeg_frame, jpeg_scan_damage  # noqa: E402
from pneumo_edge.dicom import _scrub  # noqa: E402
from pneumo_edge.images import (DECODE_BUDGET, ImageDecodeError, collect_images,  # noqa: E402
                                decode_gray, discover)

import dicom_factory as F  # noqa: E402
from helpers import make_tiny_onnx, write_gray_jpeg  # noqa: E402

MiB = 2**20
JPEG_BASELINE = "1.2.840.10008.1.2.4.50"
JPEG_LS = "1.2.840.10008.1.2.4.80"
J2K_LOSSLESS = "1.2.840.10008.1.2.4.90"
RLE = "1.2.840.10008.1.2.5"


def _traced(call):
    """(result or the ImageDecodeError raised, peak bytes Python and numpy allocated)."""
    tracemalloc.start()
    try:
        try:
            result = call()
        except ImageDecodeError as exc:
            result = exc
        return result, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def _refused(path, match: str, target: int | None = 224) -> str:
    with pytest.raises(ImageDecodeError) as err:
        decode_gray(path, target=target)
    message = str(err.value)
    assert "\n" not in message and match in message, message
    return message


@pytest.fixture
def gray() -> np.ndarray:
    rng = np.random.default_rng(3)
    return cv2.GaussianBlur((rng.random((96, 128)) * 255).astype(np.uint8), (5, 5), 0)


@pytest.fixture
def fresh_budget(monkeypatch):
    """A budget of its own for the test, so that its peak is this test's."""
    budget = images._Budget(DECODE_BUDGET)
    monkeypatch.setattr(images, "_BUDGET", budget)
    return budget


# ---------------------------------------------------------------- class 1: deflate bomb


def test_deflated_dicom_decodes(tmp_path, gray):
    path = F.write_deflated(tmp_path / "deflated.dcm", gray)
    info: dict = {}
    out = decode_gray(path, info=info)
    assert out.shape == gray.shape and int(np.abs(out.astype(int) - F.stretched(gray)).max()) <= 1
    assert info["dicom"]["transfer_syntax"] == "Deflated Explicit VR Little Endian"


def test_deflate_bomb_is_refused_before_inflating_past_the_bound(tmp_path, gray):
    """1 MB on disk that inflates to 1 GiB: refused once 256 MiB are inflated."""
    path = F.write_deflated(tmp_path / "bomb.dcm", gray, zeros=1 << 30)
    assert path.stat().st_size < 2 * MiB
    result, peak = _traced(lambda: decode_gray(path))
    assert isinstance(result, ImageDecodeError), "the bomb was decoded"
    assert "deflated DICOM dataset" in str(result) and "\n" not in str(result)
    assert peak < 300 * MiB  # (pydicom alone inflated all of it: 1 GiB and more)


# ---------------------------------------------------------------- class 2: codestream vs header


def _j2k_header(width: int, height: int, comps: int = 1) -> bytes:
    siz = struct.pack(">HHIIIIIIIIH", 38 + 3 * comps, 0, width, height, 0, 0, width, height,
                      0, 0, comps) + b"\x07\x01\x01" * comps
    return b"\xff\x4f\xff\x51" + siz + b"\xff\x52" + b"\x00" * 64 + b"\xff\xd9"


def _jpeg_header(width: int, height: int, sof: int = 0xC0, comps: int = 1) -> bytes:
    frame = struct.pack(">BHHB", 8, height, width, comps) + b"".join(
        bytes([i + 1, 0x11, 0]) for i in range(comps))
    return (b"\xff\xd8" + bytes([0xFF, sof]) + struct.pack(">H", 2 + len(frame)) + frame
            + b"\xff\xda\x00\x08\x01\x01\x00\x00\x3f\x00" + b"\x12" * 64 + b"\xff\xd9")


@pytest.mark.parametrize("ts, stream, codec", [
    (J2K_LOSSLESS, _j2k_header(20000, 20000), "JPEG 2000"),
    (JPEG_BASELINE, _jpeg_header(20000, 20000), "JPEG"),
    (JPEG_LS, _jpeg_header(20000, 20000, sof=0xF7), "JPEG-LS"),
])
def test_codestream_larger_than_its_header_is_refused_before_decoding(tmp_path, ts, stream, codec):
    path = F.write_encapsulated(tmp_path / "liar.dcm", ts, [stream], rows=64, cols=64)
    result, peak = _traced(lambda: decode_gray(path))
    assert isinstance(result, ImageDecodeError)
    assert f"20000x20000 {codec} codestream" in str(result) and "64x64" in str(result)
    assert peak < 16 * MiB


def test_real_codestream_of_another_size_is_refused(tmp_path, gray):
    from pydicom.uid import ExplicitVRLittleEndian, JPEG2000Lossless

    ds = F.base_dataset(ExplicitVRLittleEndian)
    F._pixels(ds, gray, "MONOCHROME2", 8)
    ds.compress(JPEG2000Lossless)
    ds.Rows, ds.Columns = 64, 64
    ds.save_as(tmp_path / "j2k.dcm", enforce_file_format=True)
    message = _refused(tmp_path / "j2k.dcm", "128x96 JPEG 2000 codestream")
    assert "64x64" in message


def test_codestream_frames_are_read_from_headers():
    assert jpeg_frame(_jpeg_header(300, 200, sof=0xC2, comps=3)).progressive
    frame = jpeg_frame(_jpeg_header(300, 200, sof=0xC2, comps=3))
    assert (frame.height, frame.width, frame.components, frame.blocks) == (200, 300, 3, 3 * 38 * 25)
    # junk between segments is skipped, not walked byte by byte
    data = _jpeg_header(17, 9)
    junky = data[:2] + b"\x00" * 100_000 + data[2:]
    assert (jpeg_frame(junky).height, jpeg_frame(junky).width) == (9, 17)


# ---------------------------------------------------------------- class 3: small files, huge images


def test_rle_dicom_decodes_within_its_estimate(tmp_path, fresh_budget, monkeypatch):
    """A small RLE file of a large image (the benchmark measures 9000 x 9000): what
    the decode allocated was counted against the budget before it was allocated,
    and the image was shrunk for the caller while still counted."""
    monkeypatch.setattr(images, "BIG_BYTES", 4 * MiB)  # 3000 x 3000 counts as large here
    path = F.write_encapsulated(tmp_path / "rle.dcm", RLE, [F.rle_constant(3000, 3000, 77)],
                                rows=3000, cols=3000)
    assert path.stat().st_size < MiB
    info: dict = {}
    out, peak = _traced(lambda: decode_gray(path, target=224, info=info))
    assert isinstance(out, np.ndarray), out
    assert out.shape == (375, 375) and int(out[0, 0]) == 0  # one value: black after VOI
    assert (info["height"], info["width"]) == (3000, 3000)  # the stored size
    assert 9_000_000 < peak <= fresh_budget.peak  # (before: 8 x the pixels, nothing counted)
    assert fresh_budget.used == 0


def test_rle_dicom_declaring_400_megapixels_is_refused_unread(tmp_path):
    path = F.write_encapsulated(tmp_path / "rle.dcm", RLE, [F.rle_constant(20000, 20000)],
                                rows=20000, cols=20000)
    result, peak = _traced(lambda: decode_gray(path))
    assert "too large (20000x20000 px > 256 megapixels)" in str(result)
    assert peak < 3 * path.stat().st_size + 48 * MiB


def _progressive_rgb_claiming(width: int, height: int) -> bytes:
    """A real 64 x 64 progressive colour JPEG whose frame header says ``width`` x ``height``."""
    rng = np.random.default_rng(5)
    small = (rng.random((64, 64, 3)) * 255).astype(np.uint8)
    data = bytearray(cv2.imencode(".jpg", small, [cv2.IMWRITE_JPEG_PROGRESSIVE, 1,
                                                  cv2.IMWRITE_JPEG_SAMPLING_FACTOR,
                                                  cv2.IMWRITE_JPEG_SAMPLING_FACTOR_444])[1])
    sof = data.find(b"\xff\xc2")
    data[sof + 5:sof + 9] = struct.pack(">HH", height, width)
    return bytes(data)


def test_progressive_rgb_jpeg_16000_px_is_refused_before_decoding(tmp_path):
    """256 MP: under the pixel limit, but libjpeg would keep 1.5 GB of coefficients."""
    path = tmp_path / "progressive.jpg"
    path.write_bytes(_progressive_rgb_claiming(16000, 16000))
    message = _refused(path, "too large to decode (16000x16000 px progressive JPEG")
    assert f"> {DECODE_BUDGET // MiB} MiB" in message


def test_progressive_jpeg_estimate_covers_the_decode(tmp_path, fresh_budget):
    rng = np.random.default_rng(6)
    img = cv2.resize((rng.random((30, 40, 3)) * 255).astype(np.uint8), (1600, 1200))
    path = tmp_path / "ok.jpg"
    cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_PROGRESSIVE, 1])[1].tofile(str(path))
    out, peak = _traced(lambda: decode_gray(path))
    assert out.shape == (1200, 1600)
    assert peak <= fresh_budget.peak


def test_dicom_with_two_million_elements_is_refused_quickly(tmp_path):
    path = F.write_native(tmp_path / "tags.dcm", bytes(64), 8, 8,
                          extra=F.many_elements(2_000_000))
    assert path.stat().st_size > 15 * MiB
    result, peak = _traced(lambda: decode_gray(path))
    assert isinstance(result, ImageDecodeError)
    assert "DICOM dataset with too many elements" in str(result)
    assert peak < 64 * MiB  # (before: 0.94 GB for the parsed elements)


def test_concurrent_large_decodes_share_one_budget(tmp_path, monkeypatch):
    """Eight threads, each decode needing more than half the budget: one at a time,
    all succeed, and the reservations never exceed the budget."""
    files = []
    for i in range(4):
        files.append(F.write_encapsulated(tmp_path / f"rle{i}.dcm", RLE,
                                          [F.rle_constant(1500, 1500, 40 + i)], 1500, 1500))
        png = tmp_path / f"p{i}.png"
        cv2.imencode(".png", np.full((1500, 1500), 40 + i, np.uint8))[1].tofile(str(png))
        files.append(png)
    one = images._Budget(DECODE_BUDGET)
    monkeypatch.setattr(images, "_BUDGET", one)
    decode_gray(files[0])
    budget = images._Budget(int(one.peak * 1.5))  # room for one RLE decode at a time
    monkeypatch.setattr(images, "_BUDGET", budget)
    results: dict = {}

    def work(path):
        results[path.name] = decode_gray(path)

    threads = [threading.Thread(target=work, args=(p,)) for p in files]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not any(t.is_alive() for t in threads), "a decode never got its reservation"
    assert len(results) == 8
    assert all(results[p.name].shape == (1500, 1500) for p in files)
    assert [int(results[f"p{i}.png"][0, 0]) for i in range(4)] == [40, 41, 42, 43]
    assert budget.peak <= budget.capacity and budget.used == 0


def test_budget_refuses_what_cannot_fit(monkeypatch, tmp_path, gray):
    monkeypatch.setattr(images, "_BUDGET", images._Budget(1 * MiB))
    big = tmp_path / "big.png"
    cv2.imencode(".png", np.zeros((1000, 1000), np.uint8))[1].tofile(str(big))
    _refused(big, "too large to decode (1000x1000 px PNG: needs", target=None)


# ---------------------------------------------------------------- class 7: linear scan check


def _many_scans_then_stuffing(scans: int, stuffed: int) -> bytes:
    base = _jpeg_header(8, 8)
    head = base[:base.find(b"\xff\xda")]
    sos = b"\xff\xda\x00\x08\x01\x01\x00\x00\x3f\x00"
    return (head + (sos + b"\x12\x34") * scans + sos + b"\xff\x00" * (stuffed // 2)
            + b"\xff\xd9")


def test_jpeg_scan_check_is_one_pass_in_bounded_memory():
    data = np.frombuffer(_many_scans_then_stuffing(999, 8 * MiB), np.uint8)
    (damage, scans), peak = _traced(lambda: jpeg_scan_damage(data))
    assert damage is None and scans == 1000
    assert peak < 16 * MiB  # (before: every scan scanned the rest of the file, 5 x its size)
    many = np.frombuffer(_many_scans_then_stuffing(1000, 1000), np.uint8)
    assert jpeg_scan_damage(many)[0] == "JPEG with more than 1000 scans"


def test_restart_markers_are_checked_across_windows():
    body = b"".join(b"\x11" * 3000 + bytes([0xFF, 0xD0 + k % 8]) for k in range(10))
    base = _jpeg_header(8, 8)
    head = base[:base.find(b"\xff\xda")] + b"\xff\xda\x00\x08\x01\x01\x00\x00\x3f\x00"
    good = np.frombuffer(head + body + b"\xff\xd9", np.uint8)
    assert jpeg_scan_damage(good) == (None, 1)
    bad = body.replace(b"\xff\xd5", b"\xff\xd6")  # D4 then D6 at byte ~18000
    assert "restart markers out of order" in jpeg_scan_damage(
        np.frombuffer(head + bad + b"\xff\xd9", np.uint8))[0]


# ---------------------------------------------------------------- class 9 and 11: discovery


def test_deep_folder_tree_is_walked_without_recursion(tmp_path):
    import os

    deep = str(tmp_path)
    for _ in range(990):  # (pathlib's and os's makedirs recurse themselves)
        deep = os.path.join(deep, "d")
        os.mkdir(deep)
    leaf = write_gray_jpeg(Path(deep) / "x.jpeg", 90)
    write_gray_jpeg(tmp_path / "top.jpeg", 90)
    try:
        assert collect_images([tmp_path]) == [leaf, tmp_path / "top.jpeg"]
    finally:  # pytest's own clean-up (shutil.rmtree) recurses too
        os.remove(leaf)
        while deep != str(tmp_path):
            os.rmdir(deep)
            deep = os.path.dirname(deep)


def test_own_heatmaps_are_skipped_with_a_note(tmp_path):
    from pneumo_edge.heatmap import overlay, write_overlay

    root = tmp_path / "xr"
    write_gray_jpeg(root / "NORMAL" / "a.jpeg", 80)
    write_overlay(root / "heat" / "000000_a.png",
                  overlay(np.full((40, 30), 80, np.uint8), np.zeros((2, 2), np.float32), "p"))
    cv2.imencode(".png", np.zeros((8, 8), np.uint8))[1].tofile(str(root / "plain.png"))
    found = discover([root])
    assert [p.name for p, _ in found.items] == ["a.jpeg", "plain.png"]
    assert [p.name for p in found.skipped_own] == ["000000_a.png"]
    assert found.note == ("skipped 1 file pneumo-edge wrote itself (heatmap overlays) "
                          "in the input folders")
    # a heatmap named explicitly is still read, and it is a valid PNG
    assert discover([root / "heat" / "000000_a.png"]).items
    assert decode_gray(root / "heat" / "000000_a.png").shape == (40, 30)
    assert discover([root / "NORMAL"]).note is None


def test_predict_twice_with_heatmaps_inside_the_input(tmp_path):
    model = make_tiny_onnx(tmp_path / "m.onnx", heads=True)
    root = tmp_path / "xr"
    for i, level in enumerate((60, 90, 200)):
        write_gray_jpeg(root / "NORMAL" / f"n{i}.jpeg", level, size=(64, 64))
    runner = CliRunner()
    args = ["predict", str(root), "--model", str(model), "--heatmaps", str(root / "heat")]
    first = runner.invoke(app, args)
    assert first.exit_code == EXIT_OK, first.output
    assert len(list((root / "heat").glob("*.png"))) == 3
    second = runner.invoke(app, args)
    assert second.exit_code == EXIT_OK, second.output
    assert "predictions (3)" in first.output and "predictions (3)" in second.output
    assert "000000_n0.png" not in second.output
    assert "skipped 3 files pneumo-edge wrote itself" in second.output


# ---------------------------------------------------------------- class 12: DICOM rough edges


def test_rgb_pixels_marked_monochrome2_get_a_dicom_reason(tmp_path):
    rgb = np.zeros((32, 48, 3), np.uint8).tobytes()
    path = F.write_native(tmp_path / "rgb_as_mono.dcm", rgb, 32, 48, spp=3)
    _refused(path, "inconsistent DICOM header: photometric interpretation MONOCHROME2 "
                   "with 3 samples per pixel")


def test_scrub_is_case_insensitive(tmp_path, gray):
    from pydicom.uid import ExplicitVRLittleEndian

    ds = F.base_dataset(ExplicitVRLittleEndian)
    message = _scrub(f"bad value near {F.PATIENT_NAME.upper()} / zyxwort / "
                     f"{F.PATIENT_ID.lower()}", ds)
    assert "zyxwort" not in message.lower() and F.PATIENT_ID.lower() not in message.lower()
    assert message.count("[removed]") == 3


def test_extreme_dicom_values_leave_no_numpy_lines_on_stderr(tmp_path, capfd):
    from pydicom.uid import ExplicitVRLittleEndian

    ds = F.base_dataset(ExplicitVRLittleEndian)
    F._pixels(ds, (np.arange(64 * 64).reshape(64, 64) % 4096).astype(np.uint16),
              "MONOCHROME2", 12)
    ds.RescaleSlope = "1e38"
    ds.WindowCenter, ds.WindowWidth, ds.VOILUTFunction = "0", "1", "SIGMOID"
    ds.save_as(tmp_path / "extreme.dcm", enforce_file_format=True)
    out = decode_gray(tmp_path / "extreme.dcm")
    assert out.dtype == np.uint8 and out.shape == (64, 64)
    assert capfd.readouterr().err == ""


def test_image_library_lines_are_dropped_from_stderr_and_others_kept(tmp_path, capfd):
    import os

    from pneumo_edge.native_stderr import quiet_decoder_lines

    rng = np.random.default_rng(9)
    good = cv2.imencode(".jpg", (rng.random((200, 256)) * 255).astype(np.uint8))[1].tobytes()
    premature = tmp_path / "premature.jpg"  # entropy data ends early: libjpeg warns, decodes
    premature.write_bytes(good[:len(good) // 2] + b"\xff\xd9")
    png = cv2.imencode(".png", np.zeros((64, 64), np.uint8))[1].tobytes()
    broken = tmp_path / "broken.png"  # chunks after the first garbled: libpng errors out
    broken.write_bytes(png[:40] + b"\x00\x01\x02\x03" * 8 + png[-12:])
    capfd.readouterr()
    with quiet_decoder_lines():
        decode_gray(premature)
        with pytest.raises(ImageDecodeError):
            decode_gray(broken)
        os.write(2, b"a line of our own\n")
    assert capfd.readouterr().err == "a line of our own\n"
    decode_gray(premature)  # without it, libjpeg's line reaches the terminal
    assert "Corrupt JPEG data" in capfd.readouterr().err
