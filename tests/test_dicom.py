"""DICOM in: decoding by content, the display pipeline, failures with reasons, privacy."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest

pydicom = pytest.importorskip("pydicom")

from typer.testing import CliRunner  # noqa: E402

from pneumo_edge.cli import EXIT_OK, EXIT_SOME_FAILED, app  # noqa: E402
from pneumo_edge.dicom import FACT_KEYS, _monochrome, _scrub  # noqa: E402
from pneumo_edge.images import ImageDecodeError, collect_images, collect_labelled, decode_gray  # noqa: E402
from pneumo_edge.predict import predict_paths  # noqa: E402
from pneumo_edge.runtime import load_model  # noqa: E402

import dicom_factory as F  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "xrays" / "NORMAL" / "IM-0201-0001.jpeg"
RELEASE_INT8 = ROOT / "exported" / "pneumo_resnet18_int8.onnx"
PLANTED = (F.PATIENT_NAME, "Zyxwort", "Quillonia", F.PATIENT_ID, F.BIRTH_DATE, F.ACCESSION)
runner = CliRunner()


@pytest.fixture(scope="module")
def source() -> np.ndarray:
    return F.stretched(decode_gray(EXAMPLE))


@pytest.fixture(scope="module")
def variants(tmp_path_factory, source) -> dict[str, Path]:
    return F.write_variants(tmp_path_factory.mktemp("dicom"), source)


def test_every_variant_shows_the_source_pixels(variants, source):
    assert len(variants) == 12
    for name, path in variants.items():
        info: dict = {}
        gray = decode_gray(path, info=info)
        assert gray.dtype == np.uint8 and gray.shape == source.shape, name
        assert int(np.abs(gray.astype(int) - source).max()) == 0, name
        assert info["format"] == "dicom" and set(info["dicom"]) == set(FACT_KEYS), name
    facts = lambda n: (decode_gray(variants[n], info=(i := {})), i["dicom"])[1]  # noqa: E731
    assert facts("mono1_12bit_rescale_window") == {
        "modality": "CR", "view_position": "PA", "photometric_interpretation": "MONOCHROME1",
        "bits_stored": 12, "transfer_syntax": "Explicit VR Little Endian"}
    assert facts("mono2_12bit_rle")["transfer_syntax"] == "RLE Lossless"
    assert facts("mono2_12bit_j2k")["transfer_syntax"].startswith("JPEG 2000")
    assert facts("mono2_8bit_implicit_noext")["transfer_syntax"] == "Implicit VR Little Endian"
    assert facts("mono2_16bit_signed_range")["bits_stored"] == 16


def test_the_install_decodes_the_common_transfer_syntaxes():
    from pneumo_edge.dicom import supported_transfer_syntaxes

    uids = {uid for uid, _ in supported_transfer_syntaxes()}
    assert {"1.2.840.10008.1.2", "1.2.840.10008.1.2.1", "1.2.840.10008.1.2.5",  # RLE
            "1.2.840.10008.1.2.4.50", "1.2.840.10008.1.2.4.51",  # JPEG baseline, extended
            "1.2.840.10008.1.2.4.57", "1.2.840.10008.1.2.4.70",  # JPEG lossless
            "1.2.840.10008.1.2.4.80", "1.2.840.10008.1.2.4.90",  # JPEG-LS, JPEG 2000
            "1.2.840.10008.1.2.4.91", "1.2.840.10008.1.2.4.201"} <= uids


def test_jpeg_baseline_dicom_matches_the_jpeg_file(tmp_path):
    data = EXAMPLE.read_bytes()
    path = F.write_jpeg_dicom(tmp_path / "x.dcm", data, 224, 224, channels=3)
    from_dicom = decode_gray(path).astype(int)
    from_jpeg = decode_gray(EXAMPLE).astype(int)
    assert np.abs(from_dicom - from_jpeg).max() <= 2  # YCbCr->RGB->grey vs libjpeg's Y
    assert np.abs(from_dicom - from_jpeg).mean() < 0.1


def test_every_variant_predicts_like_its_source(variants, source, tmp_path):
    png = tmp_path / "source.png"
    cv2.imencode(".png", source)[1].tofile(str(png))
    jpeg_dcm = F.write_jpeg_dicom(tmp_path / "jpeg.dcm", EXAMPLE.read_bytes(), 224, 224, 3)
    model = load_model(RELEASE_INT8)
    files = [png, EXAMPLE, jpeg_dcm, *variants.values()]
    run = predict_paths(model, files, truths=[None] * len(files), batch_size=4)
    assert not run.failures
    by = {Path(p.path).name: p for p in run.predictions}
    ref = by["source.png"]
    for name, path in variants.items():
        p = by[path.name]
        assert abs(p.probability - ref.probability) < 1e-6, name
        assert p.label == ref.label and p.dicom["modality"] in ("CR", "OT")
    assert abs(by["jpeg.dcm"].probability - by[EXAMPLE.name].probability) < 0.01
    assert by["jpeg.dcm"].label == by[EXAMPLE.name].label
    assert ref.dicom is None and by["jpeg.dcm"].dicom["transfer_syntax"].startswith("JPEG Baseline")


def _fails(path: Path) -> str:
    with pytest.raises(ImageDecodeError) as err:
        decode_gray(path)
    message = str(err.value)
    assert "\n" not in message
    return message


def test_failures_carry_their_reasons(variants, tmp_path, monkeypatch):
    from pydicom.encaps import encapsulate

    assert "without pixel data (Basic Text SR Storage)" in _fails(
        F.write_no_pixels(tmp_path / "report.dcm"))
    data = variants["mono2_12bit_range"].read_bytes()
    (tmp_path / "cut.dcm").write_bytes(data[:len(data) // 2])
    assert "corrupt DICOM pixel data" in _fails(tmp_path / "cut.dcm")
    data = variants["mono2_12bit_j2k"].read_bytes()
    (tmp_path / "cut_j2k.dcm").write_bytes(data[:len(data) - 4000])
    assert "truncated or corrupt DICOM pixel data" in _fails(tmp_path / "cut_j2k.dcm")
    (tmp_path / "junk.dcm").write_bytes(b"\0" * 128 + b"DICM" + bytes(range(256)) * 3)
    assert _fails(tmp_path / "junk.dcm") == "no valid DICOM dataset after the DICM preamble"

    ds = pydicom.dcmread(variants["mono2_8bit_explicit"])
    ds.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.4.100"  # MPEG2
    ds.PixelData = encapsulate([ds.PixelData])
    ds.save_as(tmp_path / "video.dcm")
    assert "unsupported DICOM transfer syntax MPEG2" in _fails(tmp_path / "video.dcm")

    ds = pydicom.dcmread(variants["mono2_8bit_explicit"])
    ds.NumberOfFrames = 3
    ds.PixelData = ds.PixelData * 3
    ds.save_as(tmp_path / "frames.dcm")
    assert "multi-frame DICOM (3 frames)" in _fails(tmp_path / "frames.dcm")

    class Missing:  # as pydicom reports a decoder whose plugin is not installed
        is_available = False
        missing_dependencies = ["requires pylibjpeg-openjpeg"]

    monkeypatch.setattr("pydicom.pixels.get_decoder", lambda uid: Missing())
    message = _fails(variants["mono2_12bit_j2k"])
    assert message.startswith("unsupported DICOM transfer syntax JPEG 2000")
    assert "pylibjpeg-openjpeg" in message


def test_padding_is_left_out_of_the_range_and_shown_black():
    ds = pydicom.Dataset()
    ds.PixelPaddingValue = 4095
    stored = np.array([[4095, 100], [300, 500]], np.uint16)
    out = _monochrome(stored, ds, "MONOCHROME2")
    assert out.tolist() == [[0, 0], [128, 255]]
    out = _monochrome(stored, ds, "MONOCHROME1")  # inverted, padding still black
    assert out.tolist() == [[0, 255], [128, 0]]


def test_scrub_removes_identifying_values(variants):
    ds = pydicom.dcmread(variants["mono2_8bit_explicit"])
    message = _scrub(f"bad value near {F.PATIENT_NAME} / {F.PATIENT_ID} / Zyxwort", ds)
    assert not any(s in message for s in PLANTED)
    assert message.count("[removed]") == 3


def test_folders_find_dicom_by_content(variants, tmp_path):
    root = tmp_path / "archive" / "PNEUMONIA"
    root.mkdir(parents=True)
    data = variants["mono2_8bit_explicit"].read_bytes()
    for name in ("IM0001", "scan.DCM", "image.bin", "DICOMDIR"):
        (root / name).write_bytes(data)
    (root / "notes.txt").write_text("not an image")
    (root / "short").write_bytes(b"DICM")
    found = [p.name for p in collect_images([tmp_path / "archive"])]
    assert found == ["IM0001", "image.bin", "scan.DCM"]
    assert {t for _, t in collect_labelled([tmp_path / "archive"])} == {"PNEUMONIA"}


def test_lateral_view_and_other_modalities_warn(tmp_path, source):
    from pydicom.uid import ExplicitVRLittleEndian

    for name, view, modality in (("lat.dcm", "LL", "CR"), ("ct.dcm", "AP", "CT")):
        ds = F.base_dataset(ExplicitVRLittleEndian, view=view, modality=modality)
        F._pixels(ds, source, "MONOCHROME2", 8)
        ds.save_as(tmp_path / name, enforce_file_format=True)
    model = load_model(RELEASE_INT8)
    run = predict_paths(model, [tmp_path / "lat.dcm", tmp_path / "ct.dcm"], truths=[None, None])
    warns = {Path(p.path).name: " ".join(p.warnings) for p in run.predictions}
    assert "lateral view (ViewPosition LL)" in warns["lat.dcm"]
    assert "DICOM modality CT" in warns["ct.dcm"] and "lateral" not in warns["ct.dcm"]


def test_cli_mixed_folder_reports_facts_and_nothing_identifying(variants, tmp_path):
    data = tmp_path / "xrays"
    (data / "NORMAL").mkdir(parents=True)
    (data / "PNEUMONIA").mkdir(parents=True)
    for name in ("mono1_12bit_rescale_window", "mono2_12bit_rle", "mono2_8bit_implicit_noext"):
        target = data / "NORMAL" / variants[name].name
        target.write_bytes(variants[name].read_bytes())
    for jpeg in sorted((ROOT / "examples" / "xrays" / "PNEUMONIA").glob("*.jpeg"))[:3]:
        (data / "PNEUMONIA" / jpeg.name).write_bytes(jpeg.read_bytes())
    F.write_no_pixels(data / "NORMAL" / "sr.dcm")
    out = tmp_path / "out"
    result = runner.invoke(app, ["predict", str(data), "--report", "--out", str(out),
                                 "--heatmaps", str(out / "heatmaps")])
    assert result.exit_code == EXIT_SOME_FAILED, result.output  # the SR failed, with its reason
    report = json.loads((out / "report.json").read_text())
    assert report["n_images"] == 7 and report["n_failed"] == 1
    assert "without pixel data" in report["failures"][0]["error"]
    dicom = {Path(p["path"]).name: p["dicom"] for p in report["predictions"]}
    assert dicom["mono1_12bit_rescale_window.dcm"]["photometric_interpretation"] == "MONOCHROME1"
    assert dicom["mono2_12bit_rle.dcm"]["transfer_syntax"] == "RLE Lossless"
    assert sum(v is None for v in dicom.values()) == 3  # the JPEGs
    csv_text = (out / "predictions.csv").read_text()
    assert "dicom_transfer_syntax" in csv_text.splitlines()[0] and "MONOCHROME1" in csv_text
    html_text = (out / "report.html").read_text()
    assert "<th>DICOM</th>" in html_text and "RLE Lossless" in html_text
    written = [p for p in out.rglob("*") if p.is_file()]
    assert len(written) >= 3 + 6
    for path in written:
        blob = path.read_bytes()
        assert not any(s.encode() in blob for s in PLANTED), path
    assert not any(s in result.output for s in PLANTED)


def test_predict_dicom_file_named_directly_exit_ok(variants):
    result = runner.invoke(app, ["predict", str(variants["mono2_12bit_j2k"])])
    assert result.exit_code == EXIT_OK, result.output
    assert "mono2_12bit_j2k.dcm" in result.output


@pytest.mark.tf
def test_train_and_calibrate_on_dicom_folders(tmp_path):
    """NORMAL/PNEUMONIA folders of extension-less MONOCHROME1 12-bit DICOM files:
    discovery groups by a hash of the Patient ID, training and INT8 calibration read
    them through the same decoder, and nothing identifying reaches the run folder."""
    pytest.importorskip("tensorflow")
    from pydicom.uid import ExplicitVRLittleEndian

    from synthetic import make_dataset
    from training.data import discover, patient_id
    from training.export import export_run
    from training.train import TrainConfig, train

    jpegs = make_dataset(tmp_path / "jpeg", n_patients=8)
    data = tmp_path / "dicom"
    for jpeg in sorted(jpegs.rglob("*.jpeg")):
        gray = decode_gray(jpeg).astype(np.int32)
        ds = F.base_dataset(ExplicitVRLittleEndian)
        ds.PatientID = f"MRN-{patient_id(jpeg)}"
        F._pixels(ds, ((255 - gray) * 16).astype(np.uint16), "MONOCHROME1", 12)
        target = data / jpeg.parent.name / jpeg.stem  # no extension
        target.parent.mkdir(parents=True, exist_ok=True)
        ds.save_as(target, enforce_file_format=True)
    samples, no_patient = discover(data)
    assert len(samples) == 32 and no_patient == 0
    assert len({s.patient for s in samples}) == 16
    assert all(s.patient.startswith("dicom:") for s in samples)
    run = tmp_path / "run"
    train(TrainConfig(data=str(data), out=str(run), arch="resnet_tiny", img_size=32, epochs=1,
                      batch_size=8, val_fraction=0.25, seed=3))
    out = tmp_path / "onnx"
    result = export_run(run, out, int8=True, calib=str(data), calib_method="minmax",
                        calib_size=16)
    assert {r.precision for r in result.files} == {"fp32", "int8"}
    for path in [*run.rglob("*"), *out.rglob("*")]:
        if path.is_file():
            blob = path.read_bytes()
            assert not any(s.encode() in blob for s in PLANTED + ("MRN-",)), path


def _bundled(name: str) -> Path:
    from pydicom.data import get_testdata_file

    path = get_testdata_file(name, download=False)  # never a download in tests
    if path is None:
        pytest.skip(f"{name} is not bundled with this pydicom")
    return Path(path)


def test_pydicom_bundled_files(tmp_path):
    mr = decode_gray(_bundled("MR_small.dcm"))
    for lossless in ("MR_small_RLE.dcm", "MR_small_jpeg_ls_lossless.dcm"):
        assert np.array_equal(decode_gray(_bundled(lossless)), mr), lossless
    info: dict = {}
    ct = decode_gray(_bundled("CT_small.dcm"), info=info)  # its preamble is a TIFF header
    assert ct.shape == (128, 128) and info["format"] == "dicom"
    assert info["dicom"]["modality"] == "CT"
    assert "RT Plan Storage" in _fails(_bundled("rtplan.dcm"))
    info = {}
    decode_gray(_bundled("SC_rgb_jpeg_dcmtk.dcm"), info=info)  # a colour secondary capture
    assert info["dicom"]["photometric_interpretation"] == "YBR_FULL" and info["chroma"] > 50
