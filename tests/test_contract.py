"""The model contract (pneumo_edge.metadata) and the default model (import boundaries:
test_architecture.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from pneumo_edge.cli import EXIT_USAGE, app
from pneumo_edge.metadata import MetadataError, finite_json, parse, validate
from pneumo_edge.runtime import default_model_path, load_model

from helpers import make_tiny_onnx, tiny_metadata, write_gray_jpeg

runner = CliRunner()


@pytest.mark.parametrize("override, key", [
    ({"input_size": [0, 16]}, "input_size"),
    ({"input_size": [-16, 16]}, "input_size"),
    ({"input_size": [100000, 16]}, "input_size"),
    ({"input_size": ["16", 16]}, "input_size"),
    ({"input_size": [16]}, "input_size"),
    ({"channels": 2}, "channels"),
    ({"channels": True}, "channels"),
    ({"threshold": True}, "threshold"),
    ({"threshold": 1.5}, "threshold"),
    ({"threshold": "0.5"}, "threshold"),
    ({"value_range": [255.0, 0.0]}, "value_range"),
    ({"value_range": [0.0, float("inf")]}, "JSON"),
    ({"value_range": [float("nan"), 1.0]}, "JSON"),
    ({"resize": "lanczos9"}, "resize"),
    ({"precision": "int4"}, "precision"),
    ({"class_names": ["PNEUMONIA", "NORMAL"]}, "class_names"),
    ({"positive_class": "NORMAL"}, "positive_class"),
    ({"schema": 99}, "newer"),
    ({"schema": "1"}, "schema"),
    ({"input_name": "pixels"}, "input is named"),
    ({"channels": 1}, "channels"),
    ({"ood": {"threshold": -1}}, "ood.threshold"),
])
def test_bad_metadata_is_refused_with_the_key_named(tmp_path, override, key):
    model = make_tiny_onnx(tmp_path / "bad.onnx", override)
    write_gray_jpeg(tmp_path / "x" / "a.jpeg", 100)
    res = runner.invoke(app, ["predict", str(tmp_path / "x"), "--model", str(model)])
    assert res.exit_code == EXIT_USAGE, res.output
    assert key in res.output and "Traceback" not in res.output
    assert res.output.count("\n") <= 3  # one line (soft-wrapped at most)


def test_missing_keys_and_non_json():
    with pytest.raises(MetadataError, match="lacks threshold"):
        validate({k: v for k, v in tiny_metadata().items() if k != "threshold"})
    with pytest.raises(MetadataError, match="not valid JSON"):
        parse({"pneumo_edge": "{not json"})
    with pytest.raises(MetadataError, match="no 'pneumo_edge' metadata"):
        parse({})
    meta = validate(tiny_metadata(value_range=[0, 1], resize="linear"))
    assert meta.preprocess.value_range == (0.0, 1.0) and meta.preprocess.resize == "linear"
    assert meta.threshold == 0.5 and meta.precision == "fp32" and meta.ood_threshold is None


def test_metadata_is_parsed_once_per_model(tmp_path, monkeypatch):
    import pneumo_edge.runtime as runtime
    from pneumo_edge.predict import predict_paths

    calls = []
    real = runtime.parse
    monkeypatch.setattr(runtime, "parse", lambda props: calls.append(1) or real(props))
    model = load_model(make_tiny_onnx(tmp_path / "m.onnx"), device="cpu")
    files = [write_gray_jpeg(tmp_path / "x" / f"{i}.jpeg", 50 + 40 * i) for i in range(5)]
    run = predict_paths(model, files, batch_size=2)
    assert len(run.predictions) == 5 and len(calls) == 1  # at load, never per image
    assert model.meta["arch"] == "mean_brightness"


def test_finite_json():
    import numpy as np

    assert finite_json({"a": [1.0, float("nan")], "b": {"c": float("inf")},
                        "d": np.float32(2.5)}) == {"a": [1.0, None], "b": {"c": None}, "d": 2.5}
    json.dumps(finite_json({"x": float("-inf")}), allow_nan=False)


def test_default_model_is_packaged_and_cannot_be_planted(tmp_path, monkeypatch):
    monkeypatch.delenv("PNEUMO_EDGE_MODEL", raising=False)
    planted = tmp_path / "exported"
    planted.mkdir()
    (planted / "default.txt").write_text("evil.onnx\n")
    monkeypatch.chdir(tmp_path)
    found = default_model_path()
    assert found is not None and tmp_path not in found.parents
    assert found.name == (found.parent / "default.txt").read_text().strip()
    monkeypatch.setenv("PNEUMO_EDGE_MODEL", str(tmp_path / "mine.onnx"))
    assert default_model_path() == tmp_path / "mine.onnx"


def test_release_folder_is_a_package_resource():
    from importlib.resources import files

    release = files("pneumo_edge.release")
    name = (release / "default.txt").read_text(encoding="utf-8").strip()
    assert name.endswith("_int8.onnx") and (release / name).is_file()
