"""Options with upper limits, help printed literally, heatmap folders that cannot be
written (issue 19, classes 9, 10 and 12)."""

from __future__ import annotations

import errno
import json
import re
from pathlib import Path

import numpy as np
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
    (["serve", "--model", "{model}", "--workers", "1000000", "--port", "0"], "--workers"),
    (["serve", "--model", "{model}", "--threads", "1000000000", "--port", "0"], "--threads"),
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


def test_heatmaps_on_a_file_names_heatmaps(tmp_path, folder):
    model = make_tiny_onnx(tmp_path / "m.onnx", heads=True)
    target = tmp_path / "a_file"
    target.write_text("x")
    res = runner.invoke(app, ["predict", str(folder), "--model", str(model),
                              "--heatmaps", str(target)])
    assert res.exit_code == EXIT_USAGE, res.output
    assert "--heatmaps" in res.output and "--out" not in res.output


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EACCES, errno.EROFS])
def test_heatmaps_that_cannot_be_written_leave_the_report(tmp_path, folder, monkeypatch, code):
    import os

    import pneumo_edge.io as io

    model = make_tiny_onnx(tmp_path / "m.onnx", heads=True)
    heat, out = tmp_path / "heat", tmp_path / "out"
    real = io._write_temp

    def no_room_for_heatmaps(path, data):
        if Path(path).parent == heat:
            raise OSError(code, os.strerror(code))
        return real(path, data)

    monkeypatch.setattr(io, "_write_temp", no_room_for_heatmaps)
    res = runner.invoke(app, ["predict", str(folder), "--model", str(model), "--report",
                              "--out", str(out), "--heatmaps", str(heat), "-q"])
    assert res.exit_code == EXIT_OK, res.output
    report = json.loads((out / "report.json").read_text())
    assert report["n_images"] == 3 and report["n_failed"] == 0
    assert (out / "report.html").is_file() and (out / "predictions.csv").is_file()
    notes = [line for line in res.output.splitlines() if "heatmap" in line]
    assert any(os.strerror(code) in line and str(heat) in line for line in notes), res.output
    assert "internal error" not in res.output and "Traceback" not in res.output
    assert not list(heat.glob("*.png"))


def _help(*command: str) -> str:
    res = runner.invoke(app, [*command, "--help"], env={"COLUMNS": "250"})
    assert res.exit_code == EXIT_OK, res.output
    return res.output


def _flat(text: str) -> str:
    return " ".join(re.sub(r"[│╭╮╰╯─]", " ", text).split())


COMMANDS = ["predict", "info", "robustness", "benchmark", "train", "export", "ensemble",
            "serve", "calibrate"]


@pytest.mark.parametrize("command", COMMANDS)
def test_help_is_printed_literally(command):
    import click
    import click.testing
    import typer.main

    group = typer.main.get_command(app)
    if command not in group.commands:
        pytest.skip(f"no {command} command")
    res = click.testing.CliRunner().invoke(group, [command, "--help"], env={"COLUMNS": "250"})
    assert res.exit_code == EXIT_OK, res.output
    shown = _flat(res.output)
    assert "<bool>" not in shown
    assert "inspect._empty" not in shown  # a required option shows no default
    cmd = group.commands[command]
    # every option's help as the code wrote it (brackets included; the training side's
    # texts are filled in when the help is shown) is on the screen
    assert _flat(inspect_doc(cmd.help)) in shown
    for param in cmd.get_params(click.Context(cmd)):
        text = getattr(param, "help", None)
        if text and param.name != "help":
            assert _flat(text) in shown, (param.name, text)


def inspect_doc(text: str | None) -> str:
    """The first paragraph of a command's docstring, as help shows it."""
    import inspect

    return inspect.cleandoc(text or "").split("\n\n")[0]


def test_predict_help_names_the_extra_with_its_brackets():
    assert "pneumo-edge[scale]" in _flat(_help("predict"))


def test_ray_engine_stderr_has_only_our_lines(tmp_path, folder):
    """Ray's core writes its own lines (log level notes, actor warnings) to the process's
    stderr; a run shows only pneumo-edge's."""
    import os
    import subprocess
    import sys

    pytest.importorskip("ray", reason="the scale extra (ray[data]) is not installed")
    model = make_tiny_onnx(tmp_path / "m.onnx")
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env["PYTHONPATH"] = str(Path(__file__).resolve().parents[1])
    proc = subprocess.run([sys.executable, "-m", "pneumo_edge.cli", "predict", str(folder),
                           "--model", str(model), "--engine", "ray", "--actors", "1",
                           "--out", str(tmp_path / "out"), "-q"],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == EXIT_OK, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert lines and all(line.startswith("model: ") for line in lines), proc.stderr
    rows = (tmp_path / "out" / "predictions.csv").read_text().splitlines()
    assert len(rows) == 1 + 3


def test_huge_cam_logits_raise_no_numpy_warnings(tmp_path, folder):
    import warnings

    from pneumo_edge.predict import predict_paths
    from pneumo_edge.runtime import load_model

    model = load_model(make_tiny_onnx(tmp_path / "m.onnx", heads=True, slope=1e6),
                       device="cpu")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        run = predict_paths(model, sorted(folder.iterdir()), heatmap_dir=tmp_path / "h")
    assert len(run.heatmaps) == 3
    for p in run.predictions:
        assert np.all(np.isfinite(p.cam.astype(np.float32)))
