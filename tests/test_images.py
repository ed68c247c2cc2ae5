"""Decoding by content: formats, depths, colour modes, sizes and broken files."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from pneumo_edge.images import ImageDecodeError, collect_images, decode_gray, label_from_path
from pneumo_edge.preprocess import PreprocessConfig, load_image

from helpers import SHARED_ORIGINALS


def _encode(path, img, ext, params=()):
    ok, buf = cv2.imencode(ext, img, list(params))
    assert ok
    buf.tofile(str(path))
    return path


@pytest.fixture
def gradient():
    return np.tile(np.arange(0, 256, 4, dtype=np.uint8), (48, 1))  # 48 x 64


@pytest.mark.parametrize("ext", [".jpg", ".png", ".bmp", ".tiff"])
def test_formats_decode_to_same_gray(tmp_path, gradient, ext):
    path = _encode(tmp_path / f"img{ext}", gradient, ext, [cv2.IMWRITE_JPEG_QUALITY, 100] if ext == ".jpg" else [])
    out = decode_gray(path)
    assert out.dtype == np.uint8 and out.shape == (48, 64)
    tol = 3 if ext == ".jpg" else 0
    assert np.abs(out.astype(int) - gradient.astype(int)).max() <= tol


def test_decoding_ignores_extension(tmp_path, gradient):
    png_named_jpeg = _encode(tmp_path / "really_a_png.jpeg", gradient, ".png")
    assert np.array_equal(decode_gray(png_named_jpeg), gradient)


def test_png_16bit_maps_full_range(tmp_path):
    img16 = np.array([[0, 65535], [32896, 257 * 100]], np.uint16)
    out = decode_gray(_encode(tmp_path / "deep.png", img16, ".png"))
    assert out.dtype == np.uint8
    assert out.tolist() == [[0, 255], [128, 100]]


def test_rgb_and_rgba_become_luminance(tmp_path):
    rgb = np.zeros((10, 10, 3), np.uint8)
    rgb[..., 2] = 255  # pure red in BGR order
    out = decode_gray(_encode(tmp_path / "red.png", rgb, ".png"))
    assert abs(int(out[0, 0]) - 76) <= 1  # 0.299 * 255
    rgba = np.dstack([np.full((10, 10, 3), 200, np.uint8), np.zeros((10, 10), np.uint8)])
    out = decode_gray(_encode(tmp_path / "alpha.png", rgba, ".png"))
    assert out.shape == (10, 10) and int(out[0, 0]) == 200


def test_tiny_image_is_resized_up(tmp_path):
    path = _encode(tmp_path / "one.png", np.array([[123]], np.uint8), ".png")
    x = load_image(path, PreprocessConfig(16, 16, 3))
    assert x.shape == (16, 16, 3) and x.dtype == np.float32
    assert np.all(x == 123.0)


def test_huge_png_is_bounded_and_fast(tmp_path):
    big = np.zeros((12000, 12000), np.uint8)
    big[::2] = 255  # stripes average to 127.5
    path = _encode(tmp_path / "huge.png", big, ".png", [cv2.IMWRITE_PNG_COMPRESSION, 9])
    del big
    x = load_image(path, PreprocessConfig(32, 32, 1))
    assert x.shape == (32, 32, 1)
    assert abs(float(x.mean()) - 127.5) < 2


def test_large_jpeg_decodes_reduced(tmp_path):
    img = np.full((3000, 2400), 90, np.uint8)
    path = _encode(tmp_path / "big.jpg", img, ".jpg")
    out = decode_gray(path, target=180)
    assert out.shape == (375, 300)  # 1/8: 300 px still keeps 1.5x the 180 px target
    assert decode_gray(path, target=256).shape == (750, 600)  # 1/8 would leave 300 < 384
    assert decode_gray(path).shape == (3000, 2400)


@pytest.mark.parametrize("content, reason", [
    (b"", "empty file"),
    (b"hello, this is not an image\n", "not a supported image"),
    (bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8)), "not a supported image"),
    (b"\xff\xd8\xff\xe0" + b"\x00" * 100, "truncated JPEG"),
    (b"\x89PNG\r\n\x1a\n" + b"\x00" * 50, "truncated PNG"),
    (b"BM" + b"\x00" * 60, "corrupt or unreadable BMP"),
])
def test_broken_files_give_one_line_reasons(tmp_path, content, reason):
    path = tmp_path / "broken.jpeg"
    path.write_bytes(content)
    with pytest.raises(ImageDecodeError) as info:
        decode_gray(path)
    assert reason in str(info.value)
    assert "\n" not in str(info.value)


def test_truncated_real_jpeg_is_a_failure(tmp_path, gradient):
    good = _encode(tmp_path / "good.jpg", np.tile(gradient, (4, 4)), ".jpg")
    data = good.read_bytes()
    cut = tmp_path / "cut.jpg"
    cut.write_bytes(data[: len(data) * 2 // 3])
    with pytest.raises(ImageDecodeError, match="truncated JPEG"):
        decode_gray(cut)


def test_non_ascii_and_spaces_in_names(tmp_path, gradient):
    folder = tmp_path / "rayos x" / "NORMAL"
    folder.mkdir(parents=True)
    path = _encode(folder / "tórax ñ 胸部.png", gradient, ".png")
    assert collect_images([tmp_path]) == [path]
    assert np.array_equal(decode_gray(path), gradient)
    assert label_from_path(path) == "NORMAL"


def test_collect_is_sorted_recursive_and_skips_folders_named_like_files(tmp_path, gradient):
    (tmp_path / "b").mkdir()
    (tmp_path / "a" / "deep").mkdir(parents=True)
    (tmp_path / "x.jpeg").mkdir()  # a folder, not a file
    for p in ["b/2.png", "a/deep/1.png", "a/0.PNG"]:
        _encode(tmp_path / p, gradient, ".png")
    (tmp_path / "notes.txt").write_text("not an image")
    found = collect_images([tmp_path, tmp_path / "b" / "2.png"])
    rel = [p.relative_to(tmp_path).as_posix() for p in found]
    assert rel == ["a/0.PNG", "a/deep/1.png", "b/2.png"]
    with pytest.raises(FileNotFoundError, match="no such file"):
        collect_images([tmp_path / "missing"])


@pytest.mark.parametrize("path, truth", [
    ("x/NORMAL/a.jpeg", "NORMAL"), ("x/pneumonia/sub/a.jpeg", "PNEUMONIA"),
    ("x/other/a.jpeg", None), ("PNEUMONIA/NORMAL/a.jpeg", "NORMAL"), ("NORMAL.jpeg", None),
])
def test_label_from_nearest_folder(path, truth):
    assert label_from_path(path) == truth


@pytest.mark.slow
def test_real_full_resolution_originals_decode_reduced():
    files = collect_images([SHARED_ORIGINALS])
    assert len(files) == 20
    cfg = PreprocessConfig(180, 180, 3)
    for f in files:
        full = decode_gray(f)
        reduced = decode_gray(f, target=180)
        assert min(reduced.shape) >= 270 and reduced.shape[0] <= full.shape[0]
        if min(full.shape) >= 540:  # large enough for at least 1/2 scale
            assert reduced.shape[0] <= (full.shape[0] + 1) // 2
        a = load_image(f, cfg)
        b = cv2.resize(full, (180, 180), interpolation=cv2.INTER_AREA).astype(np.float32)
        # reduced-scale decoding changes the model input by a few grey levels at most on average
        assert np.abs(a[..., 0] - b).mean() < 3.0


def _png_header_only(path, width, height, bit_depth, colour_type):
    import struct
    import zlib

    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, colour_type, 0, 0, 0)
    chunk = lambda kind, body: (struct.pack(">I", len(body)) + kind + body
                                + struct.pack(">I", zlib.crc32(kind + body)))
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", b"")
                     + chunk(b"IEND", b""))
    return path


def _tiff_header_only(path, width, height, bits):
    import struct

    entries = [(256, 4, 1, width), (257, 4, 1, height), (258, 3, 1, bits), (277, 3, 1, 1)]
    body = struct.pack("<2sHI", b"II", 42, 8) + struct.pack("<H", len(entries))
    for tag, typ, n, value in entries:
        body += struct.pack("<HHII", tag, typ, n, value)
    path.write_bytes(body + struct.pack("<I", 0))
    return path


def test_decoded_size_is_bounded_before_decoding(tmp_path):
    """A few hundred bytes claiming gigabytes of 16-bit samples are refused unread."""
    bomb = _png_header_only(tmp_path / "bomb.png", 7000, 7000, 16, 6)  # 16-bit RGBA: 374 MiB
    with pytest.raises(ImageDecodeError, match="too large to decode"):
        decode_gray(bomb)
    ok = _png_header_only(tmp_path / "ok.png", 7000, 7000, 8, 0)  # 8-bit grey: 47 MiB, allowed
    with pytest.raises(ImageDecodeError) as exc:  # (no pixel data: the decoder's own error)
        decode_gray(ok)
    assert "too large" not in str(exc.value)
    tiff = _tiff_header_only(tmp_path / "big.tif", 20000, 20000, 16)
    with pytest.raises(ImageDecodeError, match="too large"):
        decode_gray(tiff)
    tiff16 = _tiff_header_only(tmp_path / "mid.tif", 14000, 14000, 16)  # 196 MP, 374 MiB
    with pytest.raises(ImageDecodeError, match="too large to decode"):
        decode_gray(tiff16)


def test_sixteen_bit_png_maps_to_eight_bits(tmp_path):
    img = np.full((20, 30), 65535 // 2, np.uint16)
    img[0, 0] = 65535
    path = _encode(tmp_path / "a16.png", img, ".png")
    out = decode_gray(path)
    assert out.dtype == np.uint8 and int(out[0, 0]) == 255 and int(out[5, 5]) in (127, 128)


def _gradient_jpeg(**params):
    img = np.tile(np.linspace(0, 255, 256, dtype=np.float32), (200, 1)).astype(np.uint8)
    img = cv2.GaussianBlur(img + np.random.default_rng(1).integers(0, 40, img.shape, dtype=np.uint8),
                           (3, 3), 0)
    flags = [cv2.IMWRITE_JPEG_QUALITY, 90]
    for key, value in params.items():
        flags += [getattr(cv2, f"IMWRITE_JPEG_{key.upper()}"), value]
    return cv2.imencode(".jpg", img, flags)[1].tobytes()


@pytest.mark.parametrize("params", [{}, {"progressive": 1}, {"rst_interval": 4},
                                    {"progressive": 1, "rst_interval": 2}])
def test_jpeg_damaged_mid_scan_is_a_failure(tmp_path, params):
    good = _gradient_jpeg(**params)
    clean = tmp_path / "clean.jpg"
    clean.write_bytes(good)
    assert decode_gray(clean).shape == (200, 256)
    rng = np.random.default_rng(7)
    caught = 0
    for trial in range(20):
        data = bytearray(good)
        mid = len(data) // 2 + int(rng.integers(-100, 100))
        data[mid:mid + 800] = rng.integers(0, 256, 800, dtype=np.uint8).tobytes()
        bad = tmp_path / f"bad{trial}.jpg"
        bad.write_bytes(bytes(data))
        try:
            decode_gray(bad)
        except ImageDecodeError as exc:
            assert "corrupt" in str(exc)  # the scan check, or the decoder itself
            caught += 1
    assert caught >= 16  # the marker structure check sees most random damage, not all


def test_jpeg_with_embedded_thumbnail_is_not_mistaken_for_damage(tmp_path):
    main = _gradient_jpeg()
    thumb = _gradient_jpeg(quality=50)
    # an APP1 segment carrying a whole JPEG (its own SOS) and bytes that would be
    # invalid inside a scan: segments are skipped by their length, not scanned
    body = b"Exif\x00\x00" + thumb + b"\xff\x03\xff\x05"
    app1 = b"\xff\xe1" + (len(body) + 2).to_bytes(2, "big") + body
    path = tmp_path / "exif.jpg"
    path.write_bytes(main[:2] + app1 + main[2:])
    assert decode_gray(path).shape == (200, 256)
