"""Options with upper limits, help printed literally, heatmap folders that cannot be
written (issue 19, classes 9, 10 and 12)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from pneumo_edge.cli import EXIT_OK, EXIT_USAGE, app

from helpers import make_tiny_onnx, write_gray_jpeg

runner = CliRunner()


@pytest.fixture
def folder(tmp_path) -> Path:
    for i, level in enumerate((60, 120, 200)):
        write_gray_jpeg(tmp_path / "in" / f"{i}.jpeg", level)
    return tmp_path / "in"


@pytest.mark.parametrize("args, flag", [
    (["predict", "{in}", "--workers", "1000000"], "--workers"),
    (["predict", "{in}", "--threads", "1000000000"], "--threads"),
    (["benchmark", "--models", "{model}", "--batch-sizes", "1,100000000"], "--batch-sizes"),
    (["benchmark", "--models", "{model}", "--threads", "1000000000"], "--threads"),
    (["predict", "{in}", "--engine", "ray", "--workers", "1000000"], "--workers"),
])
def test_options_without_a_sane_upper_limit_are_usage_errors(tmp_path, folder, args, flag):
    model = make_tiny_onnx(tmp_path / "m.onnx")
    args = [a.format(**{"in": folder, "model": model}) for a in args]
    if args[0] == "predict":
        args += ["--model", str(model)]
    res = runner.invoke(app, args)
    assert res.exit_code == EXIT_USAGE, res.output
    assert flag in res.output and "internal error" not in res.output


def test_library_calls_check_the_same_limits(tmp_path, folder):
    from pneumo_edge.predict import predict_paths
    from pneumo_edge.runtime import load_model

    model = load_model(make_tiny_onnx(tmp_path / "m.onnx"), device="cpu")
    with pytest.raises(ValueError, match="--workers"):
        predict_paths(model, sorted(folder.iterdir()), workers=10**6)
    with pytest.raises(ValueError, match="--batch-size"):
        predict_paths(model, sorted(folder.iterdir()), batch_size=10**8)
