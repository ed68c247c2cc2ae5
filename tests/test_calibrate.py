"""pneumo-edge calibrate on tiny export-shaped models and synthetic sites (no TensorFlow)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from pneumo_edge.calibrate import (CalibrateError, _with_outputs, bootstrap_intervals,
                                   calibrate, find_tail, fit_logistic, grouped_folds)
from pneumo_edge.cli import EXIT_OK, EXIT_USAGE, app
from pneumo_edge.metrics import roc_auc
from pneumo_edge.runtime import load_model

import site_models as sm
from helpers import make_tiny_onnx

runner = CliRunner()


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """One tiny model (FP32 and INT8) and three sites, built once for the module."""
    root = tmp_path_factory.mktemp("calib")
    rng = np.random.default_rng(0)
    fp32 = sm.build_with_ood(root / "model_fp32.onnx", rng)
    int8 = sm.quantize(fp32, root / "model_int8.onnx", rng)
    bright = sm.write_site(root / "bright", rng, 40, label_in_ramp=False)  # the head's cue
    ramp = sm.write_site(root / "ramp", rng, 60)                           # another cue
    ramp_test = sm.write_site(root / "ramp_test", rng, 40, prefix="t")     # held out
    return {"root": root, "fp32": fp32, "int8": int8, "bright": bright, "ramp": ramp,
            "ramp_test": ramp_test, "rng": rng}


def _inputs(folder: Path) -> tuple[np.ndarray, np.ndarray]:
    from pneumo_edge.images import collect_labelled
    from pneumo_edge.preprocess import PreprocessConfig, load_image

    cfg = PreprocessConfig(sm.SIZE, sm.SIZE, 3)
    found = collect_labelled([folder])
    return (np.stack([load_image(p, cfg) for p, _ in found]),
            np.array([t == "PNEUMONIA" for _, t in found], int))


def _logits(model: Path, x: np.ndarray) -> np.ndarray:
    import onnx
    import onnxruntime as ort

    proto = onnx.load(str(model))
    tail = find_tail(proto)
    sess = ort.InferenceSession(_with_outputs(proto, [tail.logit]),
                                providers=["CPUExecutionProvider"])
    return sess.run([tail.logit], {"image": x})[0].reshape(-1).astype(np.float64)


def _meta(path: Path) -> dict:
    return load_model(path, warmup=0).meta


@pytest.mark.parametrize("precision", ["fp32", "int8"])
def test_platt_file_is_sigmoid_of_a_logit_plus_c(world, precision, tmp_path):
    src = world[precision]
    out = tmp_path / f"platt_{precision}.onnx"
    result = calibrate(src, world["bright"], out, bootstrap=200)
    a, c = result.params["a"], result.params["c"]
    assert a > 0 and abs(a - 1.0) > 0.1  # the tiny model's logit is far from calibrated
    x, y = _inputs(world["bright"])
    want = 1.0 / (1.0 + np.exp(-(a * _logits(src, x) + c)))
    got = load_model(out, warmup=0).run(x)
    assert np.max(np.abs(got - want)) <= 1e-6
    # ranking unchanged, calibration better
    assert roc_auc(y, got) == pytest.approx(roc_auc(y, load_model(src, warmup=0).run(x)))
    assert result.after["ece"]["value"] < result.before["ece"]["value"]
    meta = _meta(out)
    block = meta["site_adaptation"]
    assert meta["precision"] == precision and meta["threshold"] == result.threshold
    assert block["parent"]["sha256"] == load_model(src, warmup=0).sha256
    assert block["data"]["per_class"] == {"NORMAL": 40, "PNEUMONIA": 40}
    assert block["data"]["patients"] == 40  # two images per patient
    assert block["weights_sha256"] != block["parent"]["weights_sha256"]
    assert block["parity"]["max_abs_diff_prob"] <= 1e-4
    # the parent's validation numbers describe the parent: kept, but as provenance
    assert "val_metrics" not in meta and "val_metrics" in block["parent_provenance"]
    for key in ("auc", "sensitivity", "specificity", "ece", "ood_flag_rate"):
        m = block["after"][key]
        assert m["ci95"][0] <= m["value"] <= m["ci95"][1]
    report = json.loads(result.report_path.read_text())
    assert report["before"] == block["before"] and report["data"] == block["data"]


def test_cam_mean_stays_the_logit(world, tmp_path):
    out = tmp_path / "head.onnx"
    calibrate(world["fp32"], world["ramp"], out, refit_head=True, bootstrap=100)
    x, _ = _inputs(world["ramp_test"])
    res = load_model(out, warmup=0).run_all(x)
    logit = _logits(out, x)  # the new file's own logit
    assert np.max(np.abs(res["cam"].reshape(len(x), -1).mean(axis=1) - logit)) < 1e-4
    assert np.max(np.abs(res["prob"] - 1.0 / (1.0 + np.exp(-logit)))) < 1e-6


def test_head_refit_learns_a_site_whose_label_lives_in_the_features(world, tmp_path):
    out = tmp_path / "head.onnx"
    result = calibrate(world["fp32"], world["ramp"], out, refit_head=True, bootstrap=200)
    assert result.before["auc"]["value"] < 0.65          # the shipped head reads brightness
    assert result.after["auc"]["value"] > 0.95           # out of fold
    assert result.after["auc"]["ci95"][0] > result.before["auc"]["ci95"][1]
    assert result.params["lambda"] in [r["lambda"] for r in result.params["lambda_grid"]]
    # on a held-out draw of the same site
    x, y = _inputs(world["ramp_test"])
    assert roc_auc(y, load_model(world["fp32"], warmup=0).run(x)) < 0.65
    p = load_model(out, warmup=0).run(x)
    assert roc_auc(y, p) > 0.95
    t = result.threshold
    assert np.mean(p[y == 1] >= t) > 0.85 and np.mean(p[y == 0] < t) > 0.85


def test_int8_head_refit_reads_the_int8_features(world, tmp_path):
    out = tmp_path / "head_int8.onnx"
    result = calibrate(world["int8"], world["ramp"], out, refit_head=True, bootstrap=100)
    assert result.after["auc"]["value"] > 0.95 and _meta(out)["precision"] == "int8"
    assert result.parity["max_abs_diff_prob"] <= 1e-4


def test_ood_refit_lowers_the_site_flag_rate_and_keeps_far_inputs_flagged(world, tmp_path):
    out = tmp_path / "ood.onnx"
    result = calibrate(world["fp32"], world["ramp"], out, refit_head=True, refit_ood=True,
                       bootstrap=200)
    assert result.before["ood_flag_rate"]["value"] > 0.9
    assert result.after["ood_flag_rate"]["value"] < 0.1
    x, _ = _inputs(world["ramp_test"])
    base, new = load_model(world["fp32"], warmup=0), load_model(out, warmup=0)
    assert np.mean(base.run_all(x)["ood"] > base.ood_threshold) > 0.9
    assert np.mean(new.run_all(x)["ood"] > new.ood_threshold) < 0.1
    rng = np.random.default_rng(5)
    far = rng.uniform(0, 255, (40, sm.SIZE, sm.SIZE, 3)).astype(np.float32)  # noise
    assert np.mean(base.run_all(far)["ood"] > base.ood_threshold) == 1.0
    assert np.mean(new.run_all(far)["ood"] > new.ood_threshold) == 1.0
    meta = new.meta
    assert meta["ood"]["parent"]["threshold"] == base.ood_threshold
    assert "Ledoit-Wolf" in meta["ood"]["covariance"]


def test_sensitivity_rule_and_lineage_shown_by_info(world, tmp_path):
    first = tmp_path / "first.onnx"
    second = tmp_path / "second.onnx"
    res = runner.invoke(app, ["calibrate", str(world["fp32"]), "--data", str(world["ramp"]),
                              "--out", str(first), "--refit-head", "--rule", "sensitivity",
                              "--target-sensitivity", "0.95"])
    assert res.exit_code == EXIT_OK, res.output
    assert "AUC" in res.output and "before" in res.output and "OOD flag rate" in res.output
    assert "warning: only 60 NORMAL images" in res.output
    meta = _meta(first)
    assert meta["site_adaptation"]["threshold"]["target_sensitivity"] == 0.95
    assert "sensitivity>=0.95" in meta["threshold_rule"]
    res = runner.invoke(app, ["calibrate", str(first), "--data", str(world["ramp"]),
                              "--out", str(second)])
    assert res.exit_code == EXIT_OK, res.output
    lineage = _meta(second)["site_adaptation"]["lineage"]
    assert [e["file"] for e in lineage] == ["model_fp32.onnx", "first.onnx"]
    assert [e["method"] for e in lineage] == ["export", "head"]
    res = runner.invoke(app, ["info", str(second)])
    assert res.exit_code == EXIT_OK
    assert "lineage" in res.output and "model_fp32.onnx" in res.output
    assert "first.onnx" in res.output


def _refused(args: list[str], fragment: str, out: Path | None = None) -> None:
    res = runner.invoke(app, ["calibrate", *args])
    assert res.exit_code == EXIT_USAGE, res.output
    assert fragment in res.output, res.output
    lines = [ln for ln in res.output.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in res.output
    if out is not None:
        assert not out.exists() and not out.with_name(out.stem + ".site_adaptation.json").exists()


def test_refusals(world, tmp_path):
    fp32, ramp = str(world["fp32"]), str(world["ramp"])
    out = tmp_path / "new.onnx"
    one_class = tmp_path / "one"
    sm.write_site(one_class, np.random.default_rng(1), 25)
    import shutil
    shutil.rmtree(one_class / "NORMAL")
    _refused([fp32, "--data", str(one_class), "--out", str(out)], "only one class", out)
    few = sm.write_site(tmp_path / "few", np.random.default_rng(2), 10)
    _refused([fp32, "--data", str(few), "--out", str(out)],
             "too few labelled images (NORMAL 10, PNEUMONIA 10; --min-per-class is 20)", out)
    _refused([fp32, "--data", str(tmp_path / "nowhere"), "--out", str(out)], "no such folder",
             out)
    empty = tmp_path / "empty"
    empty.mkdir()
    _refused([fp32, "--data", str(empty), "--out", str(out)], "no labelled images", out)
    foreign = make_tiny_onnx(tmp_path / "mean_brightness.onnx")
    _refused([str(foreign), "--data", ramp, "--out", str(out)], "no classifier tail found", out)
    no_ood = sm.build(tmp_path / "no_heads.onnx", heads=False)
    _refused([str(no_ood), "--data", ramp, "--out", str(out), "--refit-ood"],
             "no 'ood' output to refit", out)
    quantised = sm.quantize(world["fp32"], tmp_path / "all_int8.onnx",
                            np.random.default_rng(3), keep_tail_float=False)
    _refused([str(quantised), "--data", ramp, "--out", str(out)],
             "the classifier tail is quantised", out)
    fp16 = sm.build(tmp_path / "fp16.onnx", meta={"precision": "fp16"})
    _refused([str(fp16), "--data", ramp, "--out", str(out)], "an FP16 file", out)
    bare = make_tiny_onnx(tmp_path / "bare.onnx", with_metadata=False)
    _refused([str(bare), "--data", ramp, "--out", str(out)], "no 'pneumo_edge' metadata", out)
    _refused([str(tmp_path / "missing.onnx"), "--data", ramp, "--out", str(out)],
             "model file not found", out)
    _refused([fp32, "--data", ramp, "--out", fp32], "never overwrites")
    taken = tmp_path / "taken.onnx"
    taken.write_bytes(b"keep me")
    _refused([fp32, "--data", ramp, "--out", str(taken)], "already exists")
    assert taken.read_bytes() == b"keep me"
    _refused([fp32, "--data", ramp, "--out", str(tmp_path / "no" / "dir.onnx")],
             "does not exist")
    _refused([fp32, "--data", ramp, "--out", str(tmp_path / "x.txt")], "must end in .onnx")
    _refused([fp32, "--data", ramp, "--out", str(out), "--rule", "sensitivity"],
             "needs --target-sensitivity", out)
    _refused([fp32, "--data", ramp, "--out", str(out), "--target-sensitivity", "0.9"],
             "goes with --rule sensitivity", out)
    _refused([fp32, "--data", ramp, "--out", str(out), "--rule", "sensitivity",
              "--target-sensitivity", "1.5"], "must be in (0, 1]", out)
    _refused([fp32, "--data", ramp, "--out", str(out), "--min-per-class", "1"],
             "at least 2", out)
    # Platt cannot fix an inverted ranking and says so
    flipped = sm.write_site(tmp_path / "flipped", np.random.default_rng(4), 30,
                            label_in_ramp=False)
    (flipped / "NORMAL").rename(flipped / "tmp")   # bright NORMAL, dark PNEUMONIA
    (flipped / "PNEUMONIA").rename(flipped / "NORMAL")
    (flipped / "tmp").rename(flipped / "PNEUMONIA")
    _refused([fp32, "--data", str(flipped), "--out", str(out)], "would invert", out)


def test_undecodable_site_file_is_left_out_and_exit_1(world, tmp_path):
    import shutil

    site = tmp_path / "site"
    shutil.copytree(world["bright"], site)
    (site / "NORMAL" / "broken.png").write_bytes(b"not a png")
    out = tmp_path / "new.onnx"
    res = runner.invoke(app, ["calibrate", str(world["fp32"]), "--data", str(site),
                              "--out", str(out)])
    assert res.exit_code == 1, res.output
    assert "broken.png" in res.output and out.is_file()
    assert _meta(out)["site_adaptation"]["data"]["n_failed"] == 1


def test_grouped_folds_keep_patients_together():
    rng = np.random.default_rng(0)
    patients = [f"p{i // 3}" for i in range(90)]
    labels = [int(i // 3 % 2) for i in range(90)]
    fold = grouped_folds(patients, labels, 5, seed=1)
    for p in set(patients):
        assert len({fold[i] for i, q in enumerate(patients) if q == p}) == 1
    for f in range(5):
        assert {labels[i] for i in np.flatnonzero(fold == f)} == {0, 1}
    assert np.bincount(fold).min() >= 15
    del rng


def test_fit_logistic_shrinks_towards_the_shipped_head():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(200, 30))
    y = (x[:, 3] + 0.3 * rng.normal(size=200) > 0).astype(float)
    w0 = np.zeros(30)
    w0[0] = 2.0
    w_strong, _ = fit_logistic(x, y, w0, 0.0, 1e4)
    assert np.max(np.abs(w_strong - w0)) < 1e-2  # held at the shipped head
    w_weak, _ = fit_logistic(x, y, w0, 0.0, 1e-3)
    assert np.argmax(np.abs(w_weak)) == 3        # the data's feature wins
    assert roc_auc(y, x @ w_weak) > 0.95 > roc_auc(y, x @ w_strong) + 0.2


def test_bootstrap_resamples_patients():
    rng = np.random.default_rng(0)
    y1 = np.r_[np.zeros(30, int), np.ones(30, int)]
    p1 = np.clip(0.5 + 0.25 * (y1 - 0.5) + rng.normal(0, 0.2, 60), 0, 1)
    # every patient imaged four times with the same result: 60 patients, 240 images
    y, p = np.repeat(y1, 4), np.repeat(p1, 4)
    pred = p >= 0.5
    by_patient = bootstrap_intervals(y, p, pred, None, [f"g{i // 4}" for i in range(240)], 400)
    by_image = bootstrap_intervals(y, p, pred, None, [f"i{i}" for i in range(240)], 400)
    assert by_patient["ood_flag_rate"] is None
    width = lambda ci, k: ci[k]["ci95"][1] - ci[k]["ci95"][0]
    for key in ("auc", "sensitivity", "specificity"):
        # copies of a patient carry no new information: the interval must not shrink
        assert width(by_patient, key) > 1.5 * width(by_image, key)
        assert by_patient[key]["ci95"][0] <= by_patient[key]["value"] <= by_patient[key]["ci95"][1]


def test_calibrate_import_stays_light():
    code = ("import sys, pneumo_edge.calibrate; "
            "bad = [m for m in ('tensorflow', 'keras', 'training', 'sklearn') "
            "if m in sys.modules]; print(bad); sys.exit(1 if bad else 0)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_find_tail_reads_gemm_tails(tmp_path):
    import onnx

    path = sm.build(tmp_path / "gemm.onnx", gemm=True, heads=False)
    tail = find_tail(onnx.load(str(path)))
    assert tail.weight == "dense/kernel" and tail.bias == "dense/bias" and tail.dim == sm.DIM
    with pytest.raises(CalibrateError, match="no classifier tail"):
        find_tail(onnx.load(str(make_tiny_onnx(tmp_path / "t.onnx"))))
