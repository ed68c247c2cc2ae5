"""The benchmark command on tiny ONNX models: table, benchmark.json keys, sane numbers."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from pneumo_edge.benchmark import time_runs
from pneumo_edge.cli import EXIT_OK, EXIT_USAGE, app

from helpers import make_tiny_onnx

runner = CliRunner()


def test_benchmark_table_and_json(tmp_path, labelled_folder):
    a = make_tiny_onnx(tmp_path / "a.onnx")
    b = make_tiny_onnx(tmp_path / "b.onnx", {"precision": "int8"})
    out = tmp_path / "bench"
    res = runner.invoke(app, ["benchmark", "--models", str(a), "--models", str(b), "--data",
                              str(labelled_folder), "--batch-sizes", "1,4", "--seconds", "0.05",
                              "--out", str(out)])
    assert res.exit_code == EXIT_OK, res.output
    assert "a.onnx" in res.output and "b.onnx" in res.output and "speedup" in res.output
    doc = json.loads((out / "benchmark.json").read_text())
    assert set(doc) == {"machine", "n_images", "n_labelled", "batch_sizes", "rows"}
    assert {"cpu", "physical_cores", "onnxruntime", "provider"} <= set(doc["machine"])
    assert doc["n_images"] == 8 and doc["n_labelled"] == 8 and doc["batch_sizes"] == [1, 4]
    first, second = doc["rows"]
    assert first["speedup_vs_first"] == pytest.approx(1.0)
    assert second["precision"] == "int8" and second["speedup_vs_first"] > 0
    for row in doc["rows"]:
        assert row["metrics"]["accuracy"] == pytest.approx(0.75)  # same as predict on this folder
        assert row["metrics"]["auc"] == pytest.approx(0.75)
        assert row["size_mb"] > 0
        for lat in row["latency"].values():
            assert 0 < lat["p50_ms"] <= lat["p95_ms"] and lat["images_per_second"] > 0
            assert lat["runs"] >= 10
    md = (out / "benchmark.md").read_text()
    assert md.count("\n| ") == 3 and "p50 ms b1" in md


def test_models_option_takes_a_shell_glob(tmp_path):
    a = make_tiny_onnx(tmp_path / "a.onnx")
    b = make_tiny_onnx(tmp_path / "b.onnx", {"precision": "fp16"})
    out = tmp_path / "bench"
    res = runner.invoke(app, ["benchmark", "--models", str(a), str(b), "--batch-sizes", "1",
                              "--seconds", "0", "--out", str(out)])
    assert res.exit_code == EXIT_OK, res.output
    rows = json.loads((out / "benchmark.json").read_text())["rows"]
    assert [r["name"] for r in rows] == ["a.onnx", "b.onnx"]  # fp32 before fp16
    res = runner.invoke(app, ["benchmark", "--models", str(b), str(a), "--batch-sizes", "1",
                              "--seconds", "0", "--out", str(out)])
    rows = json.loads((out / "benchmark.json").read_text())["rows"]
    assert [r["precision"] for r in rows] == ["fp32", "fp16"]
    res = runner.invoke(app, ["benchmark", str(a)])
    assert res.exit_code == EXIT_USAGE and "unexpected arguments" in res.output


def test_benchmark_without_data_times_only(tmp_path):
    a = make_tiny_onnx(tmp_path / "a.onnx")
    out = tmp_path / "bench"
    res = runner.invoke(app, ["benchmark", "--models", str(a), "--batch-sizes", "2",
                              "--seconds", "0", "--out", str(out)])
    assert res.exit_code == EXIT_OK, res.output
    row = json.loads((out / "benchmark.json").read_text())["rows"][0]
    assert row["metrics"] is None and row["latency"]["2"]["p50_ms"] > 0


def test_benchmark_bad_batch_sizes(tmp_path):
    a = make_tiny_onnx(tmp_path / "a.onnx")
    res = runner.invoke(app, ["benchmark", "--models", str(a), "--batch-sizes", "0,x"])
    assert res.exit_code == EXIT_USAGE and "--batch-sizes" in res.output


def test_time_runs_counts_and_orders():
    calls = []
    stats = time_runs(lambda: calls.append(1), batch=4, min_seconds=0.0, min_runs=12, warmup=2)
    assert stats["runs"] == 12 and len(calls) == 14
    assert stats["p95_ms"] >= stats["p50_ms"] >= 0


def test_broken_file_in_data_is_left_out_of_the_metrics(tmp_path, labelled_folder):
    (labelled_folder / "NORMAL" / "broken.jpeg").write_bytes(b"")
    a = make_tiny_onnx(tmp_path / "a.onnx")
    out = tmp_path / "bench"
    res = runner.invoke(app, ["benchmark", "--models", str(a), "--data", str(labelled_folder),
                              "--batch-sizes", "1", "--seconds", "0", "--out", str(out)])
    assert res.exit_code == EXIT_OK, res.output
    doc = json.loads((out / "benchmark.json").read_text())
    assert doc["n_images"] == 9
    metrics = doc["rows"][0]["metrics"]
    assert metrics["n_labelled"] == 8 and metrics["accuracy"] == pytest.approx(0.75)
