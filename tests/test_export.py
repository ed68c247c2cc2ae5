"""Export: a one-epoch tiny run to FP32/FP16/INT8, metadata, parity, runtime round trip."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest

tf = pytest.importorskip("tensorflow")

from typer.testing import CliRunner  # noqa: E402

from pneumo_edge.cli import EXIT_OK, EXIT_USAGE, app  # noqa: E402
from pneumo_edge.runtime import load_model, read_metadata  # noqa: E402
from training.export import ExportError, export_run, inference_model  # noqa: E402
from training.train import TrainConfig, train  # noqa: E402

from synthetic import make_dataset  # noqa: E402

pytestmark = pytest.mark.tf
runner = CliRunner()


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("exp")
    data = make_dataset(root / "data", n_patients=12)
    out = root / "run"
    train(TrainConfig(data=str(data), out=str(out), arch="resnet_tiny", img_size=32, epochs=1,
                      batch_size=8, val_fraction=0.25, seed=2))
    return out


@pytest.fixture(scope="module")
def exported(run_dir, tmp_path_factory) -> tuple[Path, object]:
    out = tmp_path_factory.mktemp("onnx")
    result = export_run(run_dir, out, fp16=True, int8=True, calib_method="minmax", calib_size=24)
    return out, result


def test_three_files_with_metadata(exported, run_dir):
    out, result = exported
    val = json.loads((run_dir / "val_metrics.json").read_text())
    assert [r.precision for r in result.files] == ["fp32", "fp16", "int8"]
    for r in result.files:
        assert r.path == out / f"resnet_tiny_{r.precision}.onnx" and r.path.is_file()
        meta, inputs, outputs = read_metadata(r.path)
        assert meta["schema"] == 1 and meta["input_size"] == [32, 32] and meta["channels"] == 3
        assert meta["class_names"] == ["NORMAL", "PNEUMONIA"] and meta["precision"] == r.precision
        assert meta["threshold"] == pytest.approx(val["threshold"])
        assert meta["threshold_rule"] == val["threshold_rule"]
        assert meta["arch"] == "resnet_tiny" and "patient-level split" in meta["trained_on"]
        assert meta["val_metrics"]["n_labelled"] == val["n_val"]
        assert meta["parity"]["n_images"] == val["n_val"]
        assert inputs[0]["name"] == "image" and inputs[0]["shape"][1:] == [32, 32, 3]
        assert inputs[0]["type"] == "tensor(float)"  # FP16/INT8 keep float32 I/O
        assert r.size_bytes == r.path.stat().st_size
    sizes = {r.precision: r.size_bytes for r in result.files}
    assert sizes["fp16"] < 0.6 * sizes["fp32"] and sizes["int8"] < 0.6 * sizes["fp32"]


def test_val_split_lists_the_evaluated_files(exported, run_dir):
    import csv
    out, result = exported
    rows = list(csv.DictReader(open(out / "val_split.csv")))
    split = [r for r in csv.DictReader(open(run_dir / "split.csv")) if r["subset"] == "val"]
    assert [r["label"] for r in rows] == [r["label"] for r in split]
    assert [r["patient"] for r in rows] == [r["patient"] for r in split]
    data = Path(json.loads((run_dir / "config.json").read_text())["data"])
    assert [str(data / r["path"]) for r in rows] == [r["path"] for r in split]
    assert len(rows) == result.files[0].val_metrics["n_labelled"]


def test_parity_numbers(exported, run_dir):
    _, result = exported
    by = {r.precision: r for r in result.files}
    assert by["fp32"].max_abs_diff <= 1e-4
    assert by["fp16"].max_abs_diff <= 1e-2
    assert by["fp32"].label_agreement == 1.0
    assert by["int8"].label_agreement >= 0.8
    cal = read_metadata(by["int8"].path)[0]["calibration"]
    assert cal["method"] == "minmax" and cal["n_images"] == 24 and cal["format"] == "QDQ"
    # the stored validation metrics are reproduced by the runtime on the listed files
    import csv
    rows = [r for r in csv.DictReader(open(run_dir / "split.csv")) if r["subset"] == "val"]
    model = load_model(by["fp32"].path, device="cpu")
    from pneumo_edge.predict import predict_paths
    run = predict_paths(model, [Path(r["path"]) for r in rows])
    stored = by["fp32"].val_metrics
    assert run.metrics.auc == pytest.approx(stored["auc"], abs=1e-6)
    assert (run.metrics.tp, run.metrics.tn) == (stored["tp"], stored["tn"])


def test_each_file_predicts_and_info_round_trips(exported, run_dir, tmp_path):
    out, result = exported
    data = Path(json.loads((run_dir / "config.json").read_text())["data"])
    for r in result.files:
        res = runner.invoke(app, ["predict", str(data), "--model", str(r.path), "--report",
                                  "--out", str(tmp_path / r.precision), "-q"])
        assert res.exit_code == EXIT_OK, res.output
        rep = json.loads((tmp_path / r.precision / "report.json").read_text())
        assert rep["model"]["precision"] == r.precision and rep["metrics"]["n_labelled"] == 48
        info = runner.invoke(app, ["info", str(r.path)])
        assert info.exit_code == EXIT_OK
        assert re.search(rf"│ precision\s+│ {r.precision}\s", info.output)
        assert "threshold_rule" in info.output and r.path.name in info.output


def test_choose_default_rule(exported):
    from training.export import PrecisionResult, choose_default

    def pr(precision, auc):
        return PrecisionResult(precision, Path(f"m_{precision}.onnx"), 1, 0.0, 1.0, {"auc": auc})

    assert choose_default([pr("fp32", 0.980), pr("int8", 0.9751)]).precision == "int8"
    assert choose_default([pr("fp32", 0.980), pr("int8", 0.9749)]).precision == "fp32"
    assert choose_default([pr("fp32", 0.980)]).precision == "fp32"


def test_refuses_to_overwrite_without_force(exported, run_dir):
    out, result = exported
    before = {r.path: r.path.stat().st_mtime_ns for r in result.files}
    with pytest.raises(ExportError, match="--force"):
        export_run(run_dir, out)
    assert {p: p.stat().st_mtime_ns for p in before} == before
    res = runner.invoke(app, ["export", str(run_dir), "--out", str(out)])
    assert res.exit_code == EXIT_USAGE and "--force" in res.output
    res = runner.invoke(app, ["export", str(run_dir), "--out", str(out), "--force",
                              "--set-default"])
    assert res.exit_code == EXIT_OK, res.output
    assert (out / "default.txt").read_text().strip() == "resnet_tiny_fp32.onnx"
    fp32 = out / "resnet_tiny_fp32.onnx"
    assert fp32.stat().st_mtime_ns > before[fp32]
    assert not list(out.glob(".*tmp"))  # atomic writes leave no temporaries


def test_failed_parity_leaves_no_file(run_dir, tmp_path, monkeypatch):
    import training.export as ex
    monkeypatch.setitem(ex.PARITY_TOLERANCE, "fp32", -1.0)  # impossible to meet
    with pytest.raises(ExportError, match="parity failed"):
        export_run(run_dir, tmp_path / "none", fp16=True)
    assert not (tmp_path / "none").exists() or not list((tmp_path / "none").iterdir())


def _umask() -> int:
    import os
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_augmentation_layers_are_stripped(tmp_path):
    import keras

    inp = keras.Input((24, 24, 3), name="image")
    x = keras.layers.RandomFlip("horizontal")(inp)
    x = keras.layers.RandomRotation(0.1)(x)
    x = keras.layers.Rescaling(1 / 255.0)(x)
    x = keras.layers.Conv2D(4, 3, activation="relu")(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    out = keras.layers.Dense(1, activation="sigmoid", name="pneumonia_prob")(x)
    model = keras.Model(inp, out)
    path = tmp_path / "aug.keras"
    model.save(path)
    clean, dropped = inference_model(path)
    assert len(dropped) == 2
    imgs = np.random.default_rng(0).uniform(0, 255, (4, 24, 24, 3)).astype(np.float32)
    ref = model(imgs, training=False).numpy()
    np.testing.assert_allclose(clean.predict(imgs, verbose=0), ref, atol=1e-6)
    result = export_run(path, tmp_path / "out")
    fp32 = result.files[0]
    m = load_model(fp32.path, device="cpu")
    np.testing.assert_allclose(m.run(imgs), ref.reshape(-1), atol=1e-4)
    meta = read_metadata(fp32.path)[0]
    assert meta["threshold_rule"] == "default_0.5_not_validated" and len(meta["stripped_layers"]) == 2
    assert meta["parity"]["images"] == "random" and meta["parity"]["max_abs_diff"] <= 1e-4
    assert fp32.path.stat().st_mode & 0o777 == 0o666 & ~_umask()


def test_benchmark_keras_row_first(exported, run_dir, tmp_path):
    out, result = exported
    data = json.loads((run_dir / "config.json").read_text())["data"]
    res = runner.invoke(app, ["benchmark", "--keras", str(run_dir), "--models",
                              str(result.files[0].path), "--data", data, "--batch-sizes", "1,4",
                              "--seconds", "0", "--out", str(tmp_path)])
    assert res.exit_code == EXIT_OK, res.output
    rows = json.loads((tmp_path / "benchmark.json").read_text())["rows"]
    assert [r["fmt"] for r in rows] == ["keras", "onnx"]
    assert rows[0]["speedup_vs_first"] == pytest.approx(1.0)
    # same model, same images, same threshold: the same clinical numbers
    assert rows[1]["metrics"]["auc"] == pytest.approx(rows[0]["metrics"]["auc"], abs=1e-4)
    assert rows[1]["metrics"]["tp"] == rows[0]["metrics"]["tp"]


def test_cam_and_ood_outputs(exported, run_dir):
    import keras

    from pneumo_edge.preprocess import load_image
    from training.data import read_split
    from training.heads import cam_reference, feature_model

    out, result = exported
    _, val = read_split(run_dir / "split.csv")
    x = np.stack([load_image(s.path, load_model(result.files[0].path).preprocess)
                  for s in val[:8]])
    src = keras.models.load_model(run_dir / "best.keras", compile=False)
    _, fmap = feature_model(src).predict(x, verbose=0)
    kernel, bias = src.get_layer("pneumonia_prob").get_weights()
    ref = cam_reference(fmap, kernel, bias)
    for r in result.files:
        meta, _, outputs = read_metadata(r.path)
        assert [o["name"] for o in outputs] == ["pneumonia_prob", "cam", "ood"]
        assert [o["name"] for o in meta["outputs"]] == ["pneumonia_prob", "cam", "ood"]
        assert meta["ood"]["threshold"] > 0 and "percentile" in meta["ood"]["threshold_rule"]
        assert 0.0 <= meta["ood"]["val_flag_rate"] <= 1.0
        model = load_model(r.path, device="cpu")
        assert model.has_cam and model.ood_threshold == pytest.approx(meta["ood"]["threshold"])
        got = model.run_all(x)
        assert got["cam"].shape == ref.shape and got["ood"].shape == (8,)
        tol = 1e-3 if r.precision == "fp32" else 0.5
        assert np.max(np.abs(got["cam"] - ref)) < tol, r.precision
        hp = meta["heads_parity"]
        if r.precision == "fp32":
            assert hp["cam_max_abs_diff_vs_keras"] < 1e-3
        assert -1.0 <= hp["cam_mean_correlation_vs_fp32"] <= 1.0


def test_robustness_suite_in_metadata(exported):
    out, result = exported
    meta = {r.precision: read_metadata(r.path)[0] for r in result.files}
    rows = [row["perturbation"] for row in meta["fp32"]["robustness"]["rows"]]
    from pneumo_edge.robustness import PERTURBATIONS
    assert rows == list(PERTURBATIONS) and "border_black_3" in rows
    int8 = meta["int8"]["robustness"]
    assert set(int8["agreement_with_fp32"]) == set(rows)
    assert int8["min_agreement_with_fp32"] == min(int8["agreement_with_fp32"].values())
    assert meta["int8"]["calibration"]["shifted"] is True
    # the probability calibration survives in the INT8 file beside its quantisation record
    assert meta["int8"]["probability_calibration"] == meta["fp32"]["calibration"]
    assert meta["fp32"]["probability_calibration"]["temperature"] > 0
    clean = meta["fp32"]["robustness"]["rows"][0]
    assert clean["auc"] == pytest.approx(meta["fp32"]["val_metrics"]["auc"], abs=1e-9)


def test_default_rule_needs_int8_to_hold_up_under_shift():
    from training.export import PrecisionResult, choose_default

    def int8(loss, agree):
        return PrecisionResult("int8", Path("m_int8.onnx"), 1, 0.0, 1.0, {"auc": 0.98},
                               {"robustness": {"max_auc_loss_vs_fp32": loss,
                                               "min_agreement_with_fp32": agree}})

    fp32 = PrecisionResult("fp32", Path("m_fp32.onnx"), 1, 0.0, 1.0, {"auc": 0.98})
    assert choose_default([fp32, int8(0.004, 0.995)]).precision == "int8"
    assert choose_default([fp32, int8(0.006, 0.995)]).precision == "fp32"
    assert choose_default([fp32, int8(0.001, 0.985)]).precision == "fp32"


def test_int8_keeps_the_classifier_tail_and_heads_in_float(exported):
    import onnx

    from training.heads import classifier_tail

    out, result = exported
    by = {r.precision: r.path for r in result.files}
    fp32 = onnx.load(str(by["fp32"]))
    tail = classifier_tail(fp32, fp32.graph.output[0].name)
    ops = {n.name: n.op_type for n in fp32.graph.node}
    assert ops[tail[0]] == "Sigmoid" and ops[tail[-1]] in ("GlobalAveragePool", "ReduceMean")
    int8 = onnx.load(str(by["int8"]))
    producer = {o: n for n in int8.graph.node for o in n.output}
    dense = [n for n in int8.graph.node
             if n.op_type in ("MatMul", "Gemm") and "pneumonia_prob" in n.name]
    assert dense, "the output layer's MatMul is in the INT8 graph"
    for node in dense:  # fed by float tensors, not by DequantizeLinear
        assert all(producer[i].op_type != "DequantizeLinear" for i in node.input if i in producer)
    assert any(n.op_type == "DequantizeLinear" for n in int8.graph.node)  # the body is quantised
