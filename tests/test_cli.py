"""The CLI end to end with tiny ONNX models: exit codes, reports, failures, info."""

from __future__ import annotations

import csv
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from pneumo_edge.cli import EXIT_OK, EXIT_SOME_FAILED, EXIT_USAGE, app

from helpers import SHARED_ORIGINALS, make_tiny_onnx, prob_for_gray, write_gray_jpeg

runner = CliRunner()

from pneumo_edge.report import REPORT_KEYS as CONTRACT


def add_broken_files(root: Path) -> dict[str, str]:
    """Awkward files beside the good ones; returns name -> expected reason fragment."""
    (root / "NORMAL").mkdir(parents=True, exist_ok=True)
    (root / "empty.jpeg").write_bytes(b"")
    (root / "notes.png").write_text("this is text, not a PNG")
    (root / "noise.jpg").write_bytes(np.random.default_rng(3).bytes(2048))
    good = write_gray_jpeg(root / "tmp.jpg", 128, size=(64, 64)).read_bytes()
    (root / "tmp.jpg").unlink()
    (root / "NORMAL" / "cut.jpeg").write_bytes(good[: len(good) // 2])
    (root / "folder.jpeg").mkdir()  # a folder named like an image: not a file at all
    return {"empty.jpeg": "empty file", "notes.png": "not a supported image",
            "noise.jpg": "not a supported image", "cut.jpeg": "truncated JPEG"}


def test_predict_report_on_labelled_folder(tiny_model, labelled_folder, tmp_path):
    out = tmp_path / "out"
    res = runner.invoke(app, ["predict", str(labelled_folder), "--model", str(tiny_model),
                              "--report", "--out", str(out), "--batch-size", "3"])
    assert res.exit_code == EXIT_OK, res.output
    report = json.loads((out / "report.json").read_text())
    assert set(CONTRACT) <= set(report)
    for key, inner in CONTRACT.items():
        if not inner:
            continue
        rows = report[key] if isinstance(report[key], list) else [report[key]]
        for row in rows:
            assert set(inner) <= set(row), (key, inner, row)
    assert report["n_images"] == 8 and report["n_failed"] == 0
    m = report["metrics"]
    assert (m["tp"], m["fn"], m["tn"], m["fp"], m["n_labelled"]) == (3, 1, 3, 1, 8)
    assert m["accuracy"] == pytest.approx(0.75) and m["specificity"] == pytest.approx(0.75)
    # scores: NORMAL 30,60,90,200 vs PNEUMONIA 160,190,220,70 -> 12 of 16 pairs ordered right
    assert m["auc"] == pytest.approx(12 / 16)
    probs = {Path(p["path"]).name: p["probability"] for p in report["predictions"]}
    assert probs["p2.jpeg"] == pytest.approx(prob_for_gray(220), abs=0.01)
    assert report["model"]["provider"] == "cpu"
    assert report["end_to_end"]["batch_size"] == 3
    lat = report["latency_ms"]
    assert 0 < lat["p50"] <= lat["p95"] <= lat["p99"]
    html = (out / "report.html").read_text()
    assert "not a medical device" in html.lower() and "<svg" in html and "<script" not in html
    rows = list(csv.DictReader((out / "predictions.csv").open()))
    assert len(rows) == 8 and {r["truth"] for r in rows} == {"NORMAL", "PNEUMONIA"}
    assert "accuracy" in res.output and "0.7500" in res.output


def test_broken_files_are_listed_and_run_goes_on(tiny_model, labelled_folder, tmp_path):
    expected = add_broken_files(labelled_folder)
    out = tmp_path / "out"
    res = runner.invoke(app, ["predict", str(labelled_folder), "--model", str(tiny_model),
                              "--report", "--out", str(out), "-q"])
    assert res.exit_code == EXIT_SOME_FAILED, res.output
    report = json.loads((out / "report.json").read_text())
    assert report["n_images"] == 12 and report["n_failed"] == 4
    assert len(report["predictions"]) == 8
    reasons = {Path(f["path"]).name: f["error"] for f in report["failures"]}
    assert set(reasons) == set(expected)
    for name, fragment in expected.items():
        assert fragment in reasons[name]
        assert name in res.output  # one line per failure, naming the file
    assert report["metrics"]["n_labelled"] == 8  # cut.jpeg sits in NORMAL/ but failed
    assert not any("folder.jpeg" in p["path"] for p in report["predictions"])
    rows = list(csv.DictReader((out / "predictions.csv").open()))
    assert len(rows) == 12 and sum(1 for r in rows if r["error"]) == 4


def test_unlabelled_files_predicted_without_metrics(tiny_model, tmp_path):
    img = write_gray_jpeg(tmp_path / "scan one.jpeg", 240)
    out = tmp_path / "out"
    res = runner.invoke(app, ["predict", str(img), "--model", str(tiny_model), "--report",
                              "--out", str(out)])
    assert res.exit_code == EXIT_OK, res.output
    report = json.loads((out / "report.json").read_text())
    assert report["metrics"] is None
    assert report["predictions"][0]["label"] == "PNEUMONIA"
    assert report["predictions"][0]["truth"] is None


def test_threshold_override_changes_labels(tiny_model, labelled_folder, tmp_path):
    out = tmp_path / "out"
    res = runner.invoke(app, ["predict", str(labelled_folder), "--model", str(tiny_model),
                              "--threshold", "0.99", "--out", str(out), "-q"])
    assert res.exit_code == EXIT_OK
    rows = list(csv.DictReader((out / "predictions.csv").open()))
    assert {r["label"] for r in rows} == {"NORMAL"}
    assert not (out / "report.json").exists()  # without --report only the CSV


def test_model_without_metadata_is_refused(tmp_path, labelled_folder):
    bare = make_tiny_onnx(tmp_path / "bare.onnx", with_metadata=False)
    res = runner.invoke(app, ["predict", str(labelled_folder), "--model", str(bare)])
    assert res.exit_code == EXIT_USAGE
    assert "no 'pneumo_edge' metadata" in res.output


def test_bad_metadata_and_non_onnx_are_refused(tmp_path, labelled_folder):
    newer = make_tiny_onnx(tmp_path / "newer.onnx", {"schema": 99})
    res = runner.invoke(app, ["predict", str(labelled_folder), "--model", str(newer)])
    assert res.exit_code == EXIT_USAGE and "newer" in res.output
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"not onnx at all")
    res = runner.invoke(app, ["predict", str(labelled_folder), "--model", str(junk)])
    assert res.exit_code == EXIT_USAGE and "not a loadable ONNX model" in res.output


def test_usage_errors(tiny_model, tmp_path):
    res = runner.invoke(app, ["predict", str(tmp_path / "missing"), "--model", str(tiny_model)])
    assert res.exit_code == EXIT_USAGE and "no such file" in res.output
    (tmp_path / "empty").mkdir()
    res = runner.invoke(app, ["predict", str(tmp_path / "empty"), "--model", str(tiny_model)])
    assert res.exit_code == EXIT_USAGE and "no image files" in res.output
    res = runner.invoke(app, ["predict", str(tmp_path), "--model", str(tiny_model),
                              "--device", "tpu"])
    assert res.exit_code == EXIT_USAGE and "--device" in res.output


def test_no_default_model_says_so(tmp_path, labelled_folder, monkeypatch):
    monkeypatch.setattr("pneumo_edge.runtime.default_model_path", lambda: None)
    res = runner.invoke(app, ["predict", str(labelled_folder)])
    assert res.exit_code == EXIT_USAGE and "no --model given" in res.output


def test_default_model_from_env(tiny_model, labelled_folder, monkeypatch):
    monkeypatch.setenv("PNEUMO_EDGE_MODEL", str(tiny_model))
    res = runner.invoke(app, ["predict", str(labelled_folder), "-q"])
    assert res.exit_code == EXIT_OK and "tiny.onnx" in res.output


def test_progress_and_quiet_paths(tiny_model, labelled_folder):
    loud = runner.invoke(app, ["predict", str(labelled_folder), "--model", str(tiny_model)])
    quiet = runner.invoke(app, ["predict", str(labelled_folder), "--model", str(tiny_model), "-q"])
    assert loud.exit_code == quiet.exit_code == EXIT_OK
    assert "p0.jpeg" in loud.output            # per-image table
    assert "p0.jpeg" not in quiet.output       # quiet: summary only
    assert "summary" in quiet.output


def test_info_prints_metadata_and_hash(tiny_model):
    import hashlib
    res = runner.invoke(app, ["info", str(tiny_model)])
    assert res.exit_code == EXIT_OK, res.output
    assert hashlib.sha256(tiny_model.read_bytes()).hexdigest()[:16] in res.output
    assert "threshold" in res.output and "pneumonia_prob" in res.output


def test_cli_import_does_not_load_tensorflow():
    code = ("import sys, pneumo_edge.cli, pneumo_edge.predict, pneumo_edge.report; "
            "bad = [m for m in ('tensorflow', 'keras', 'tf2onnx', 'training', 'onnxruntime') "
            "if m in sys.modules]; print(bad); sys.exit(1 if bad else 0)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.slow
def test_real_xrays_mixed_with_broken_files(tiny_model, tmp_path):
    root = tmp_path / "mixed"
    shutil.copytree(SHARED_ORIGINALS, root)
    expected = add_broken_files(root)
    out = tmp_path / "out"
    res = runner.invoke(app, ["predict", str(root), "--model", str(tiny_model), "--report",
                              "--out", str(out), "-q"])
    assert res.exit_code == EXIT_SOME_FAILED, res.output
    report = json.loads((out / "report.json").read_text())
    assert len(report["predictions"]) == 20 and report["n_failed"] == len(expected)
    assert report["metrics"]["n_labelled"] == 20


def test_auto_device_is_quiet_and_reports_its_provider(tiny_model, labelled_folder, tmp_path):
    # onnxruntime logs from C++ straight to fd 2, so run a real process to see it
    proc = subprocess.run([sys.executable, "-m", "pneumo_edge.cli", "predict",
                           str(labelled_folder), "--model", str(tiny_model), "-q",
                           "--device", "auto", "--report", "--out", str(tmp_path / "o")],
                          capture_output=True, text=True)
    assert proc.returncode == EXIT_OK, proc.stderr
    assert "onnxruntime:" not in proc.stderr and "Failed to create" not in proc.stderr
    provider = json.loads((tmp_path / "o" / "report.json").read_text())["model"]["provider"]
    assert provider in ("cpu", "cuda")


def test_cuda_device_loads_or_fails_clearly(tiny_model, labelled_folder):
    from pneumo_edge.runtime import ModelError, load_model

    try:  # what this machine's onnxruntime does with CUDA decides the expected outcome
        cuda = load_model(tiny_model, device="cuda").provider == "cuda"
    except ModelError as exc:
        cuda = False
        assert "--device cuda" in str(exc) and "use --device auto or cpu" in str(exc)
    res = runner.invoke(app, ["predict", str(labelled_folder), "--model", str(tiny_model), "-q",
                              "--device", "cuda"])
    if cuda:
        assert res.exit_code == EXIT_OK and "cuda" in res.output, res.output
    else:
        assert res.exit_code == EXIT_USAGE and "Traceback" not in res.output
        assert "--device cuda" in res.output and "use --device auto or cpu" in res.output


def test_progress_counts_every_file_once(tiny_model, labelled_folder):
    from pneumo_edge.images import collect_images
    from pneumo_edge.predict import predict_paths
    from pneumo_edge.runtime import load_model

    add_broken_files(labelled_folder)
    files = collect_images([labelled_folder])
    seen: list[int] = []
    run = predict_paths(load_model(tiny_model, device="cpu"), files, batch_size=3,
                        progress=seen.append)
    assert seen == sorted(seen) and seen[-1] == len(files) == 12
    assert len(run.predictions) == 8 and len(run.failures) == 4


def test_internal_errors_are_one_line_with_their_exit_code(tiny_model, labelled_folder,
                                                           monkeypatch, capsys):
    import pneumo_edge.predict as predict_mod
    from pneumo_edge.cli import EXIT_INTERNAL, main

    def boom(*a, **k):
        raise RuntimeError("disk on fire\nsecond line")

    monkeypatch.setattr(predict_mod, "predict_paths", boom)
    argv = ["pneumo-edge", "predict", str(labelled_folder), "--model", str(tiny_model), "-q"]
    monkeypatch.setattr(sys, "argv", argv)
    with pytest.raises(SystemExit) as exc:
        main()
    assert exc.value.code == EXIT_INTERNAL
    out = capsys.readouterr().err
    assert "internal error (RuntimeError: disk on fire)" in out and "Traceback" not in out
    monkeypatch.setattr(sys, "argv", ["pneumo-edge", "--debug", *argv[1:]])
    with pytest.raises(RuntimeError, match="disk on fire"):
        main()
