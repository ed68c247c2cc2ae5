"""Model outputs checked against the contract on every batch (issue 19, class 6): a model
whose outputs do not have one row per image is refused naming the model (exit 2), never
run with another image's numbers; a model with a fixed batch of 1 runs one image at a time."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper
from typer.testing import CliRunner

from pneumo_edge.cli import EXIT_OK, EXIT_USAGE, app
from pneumo_edge.runtime import ModelError, load_model

from helpers import make_tiny_onnx, prob_for_gray, write_gray_jpeg

runner = CliRunner()


def _rewire(path: Path, output: str, nodes, new_shape, *, inits=()) -> Path:
    """The tiny heads model with ``output`` replaced: its producer now writes
    ``output + '_raw'`` and ``nodes`` turn that into the new ``output``."""
    model = onnx.load(str(path))
    g = model.graph
    for node in g.node:
        node.output[:] = [output + "_raw" if o == output else o for o in node.output]
    g.node.extend(nodes)
    g.initializer.extend(inits)
    for vi in g.output:
        if vi.name == output:
            vi.CopyFrom(helper.make_tensor_value_info(output, TensorProto.FLOAT, new_shape))
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def _bad_model(tmp_path: Path, kind: str) -> Path:
    path = make_tiny_onnx(tmp_path / f"{kind}.onnx", heads=True)
    if kind == "prob_2n_rows":  # two rows per image: the second image would get the first's
        return _rewire(path, "pneumonia_prob",
                       [helper.make_node("Concat", ["pneumonia_prob_raw"] * 2,
                                         ["pneumonia_prob"], axis=0)], ["M", 1])
    if kind == "ood_n_by_2":
        return _rewire(path, "ood", [helper.make_node("Concat", ["ood_raw"] * 2, ["ood"],
                                                      axis=1)], ["N", 2])
    if kind == "cam_rank_2":
        shape = helper.make_tensor("cam_shape", TensorProto.INT64, [2], [-1, 4])
        return _rewire(path, "cam", [helper.make_node("Reshape", ["cam_raw", "cam_shape"],
                                                      ["cam"])], ["N", 4], inits=[shape])
    if kind == "ignores_batch":  # the mean over the batch: one number whatever N is
        return _rewire(path, "pneumonia_prob",
                       [helper.make_node("ReduceMean", ["pneumonia_prob_raw"],
                                         ["pneumonia_prob"], axes=[0], keepdims=1)], [1, 1])
    raise ValueError(kind)


def _images(root: Path, levels=(40, 90, 150, 220, 250)) -> Path:
    for i, level in enumerate(levels):
        write_gray_jpeg(root / f"{i}_{level}.jpeg", level)
    return root


@pytest.mark.parametrize("kind, what", [("prob_2n_rows", "pneumonia_prob"),
                                        ("ood_n_by_2", "ood"), ("cam_rank_2", "cam"),
                                        ("ignores_batch", "pneumonia_prob")])
def test_outputs_that_break_the_contract_are_refused_naming_the_model(tmp_path, kind, what):
    model = _bad_model(tmp_path, kind)
    root = _images(tmp_path / "in")
    out = tmp_path / "out"
    res = runner.invoke(app, ["predict", str(root), "--model", str(model), "--report",
                              "--out", str(out), "--batch-size", "4",
                              "--heatmaps", str(tmp_path / "h")])
    assert res.exit_code == EXIT_USAGE, res.output
    assert str(model) in res.output and what in res.output and "shape" in res.output
    assert "internal error" not in res.output and "Traceback" not in res.output
    assert not (out / "report.json").exists()
    with pytest.raises(ModelError, match="shape"):
        m = load_model(model, device="cpu", warmup=0)
        m.run_all(np.zeros((3, 16, 16, 3), np.float32))


def test_a_batch_ignoring_model_is_refused_when_loaded(tmp_path):
    # caught before any image is decoded: a probe of two images at load time
    with pytest.raises(ModelError, match="2 images"):
        load_model(_bad_model(tmp_path, "ignores_batch"), device="cpu")


def _fixed_batch_one(tmp_path: Path) -> Path:
    path = make_tiny_onnx(tmp_path / "fixed1.onnx", heads=True)
    model = onnx.load(str(path))
    model.graph.input[0].type.tensor_type.shape.dim[0].dim_value = 1
    onnx.save(model, str(path))
    return path


def test_a_model_with_a_fixed_batch_of_one_runs_one_image_at_a_time(tmp_path):
    model = _fixed_batch_one(tmp_path)
    assert load_model(model, device="cpu").max_batch == 1
    root = _images(tmp_path / "in")
    out = tmp_path / "out"
    res = runner.invoke(app, ["predict", str(root), "--model", str(model), "--report",
                              "--out", str(out), "--batch-size", "4"])
    assert res.exit_code == EXIT_OK, res.output
    report = json.loads((out / "report.json").read_text())
    got = {Path(p["path"]).name: p["probability"] for p in report["predictions"]}
    assert len(got) == 5
    for name, p in got.items():
        assert p == pytest.approx(prob_for_gray(int(name.split("_")[1].split(".")[0])), abs=0.01)
    ood = [p["ood_score"] for p in sorted(report["predictions"], key=lambda p: p["path"])]
    assert ood == pytest.approx([abs(v - 128) / 10 for v in (40, 90, 150, 220, 250)], abs=0.2)


@pytest.mark.parametrize("depth", [200, 100_000])
def test_deeply_nested_metadata_is_refused(tmp_path, depth):
    model = make_tiny_onnx(tmp_path / "deep.onnx")
    m = onnx.load(str(model))
    meta = json.loads(m.metadata_props[0].value)
    deep = "[" * depth + "]" * depth  # provenance nobody reads, but every report writes
    raw = json.dumps(meta)[:-1] + ', "notes": ' + deep + "}"
    m.metadata_props[0].value = raw
    onnx.save(m, str(model))
    root = _images(tmp_path / "in", (100,))
    for args in (["predict", str(root), "--model", str(model), "--report", "--out",
                  str(tmp_path / "o")], ["info", str(model)]):
        res = runner.invoke(app, args)
        assert res.exit_code == EXIT_USAGE, res.output
        assert str(model) in res.output and "nested" in res.output
