"""Seed ensembles: runs that differ only in --init-seed combined into one graph."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest

tf = pytest.importorskip("tensorflow")

from training.ensemble import EnsembleError, build_ensemble, ensemble_runs  # noqa: E402
from training.train import TrainConfig, train  # noqa: E402

from synthetic import make_dataset as make_synthetic  # noqa: E402

pytestmark = pytest.mark.tf


def _cfg(data: Path, out: Path, **kw) -> TrainConfig:
    # float32: the graph's mean logit is compared with the members' to 1e-4
    base = dict(data=str(data), out=str(out), arch="resnet_tiny", img_size=32, epochs=1,
                batch_size=8, patience=3, val_fraction=0.25, seed=1, precision="fp32")
    return TrainConfig(**(base | kw))


@pytest.fixture(scope="module")
def members(tmp_path_factory) -> tuple[Path, list[Path]]:
    root = tmp_path_factory.mktemp("ens")
    data = make_synthetic(root / "data" / "train", n_patients=12)
    runs = []
    for init in (1, 2):
        train(_cfg(data, root / f"m{init}", init_seed=init))
        runs.append(root / f"m{init}")
    return data, runs


def _logits(model, x) -> np.ndarray:
    p = np.clip(model.predict(x, verbose=0).reshape(-1).astype(np.float64), 1e-7, 1 - 1e-7)
    return np.log(p / (1 - p))


def test_init_seed_changes_weights_not_split(members):
    import keras

    _, (a, b) = members
    assert (a / "split.csv").read_text() == (b / "split.csv").read_text()
    assert json.loads((a / "config.json").read_text())["init_seed"] == 1
    wa = keras.models.load_model(a / "best.keras").get_layer("pneumonia_prob").get_weights()[0]
    wb = keras.models.load_model(b / "best.keras").get_layer("pneumonia_prob").get_weights()[0]
    assert np.max(np.abs(wa - wb)) > 1e-3


def test_graph_logit_is_the_members_mean(members):
    import keras

    from training.heads import feature_model

    _, runs = members
    models = [keras.models.load_model(r / "best.keras") for r in runs]
    ens = build_ensemble(models)
    x = np.random.default_rng(0).uniform(0, 255, (6, 32, 32, 3)).astype(np.float32)
    want = np.mean([_logits(m, x) for m in models], axis=0)
    np.testing.assert_allclose(_logits(ens, x), want, atol=1e-4)
    # one flat graph (the export strips and renames layers one by one), both trunks
    names = [layer.name for layer in ens.layers]
    assert "gap" in names and "member_maps" in names
    assert any(n.startswith("m1_") for n in names) and any(n.startswith("m2_") for n in names)
    assert not any(isinstance(layer, keras.Model) for layer in ens.layers)
    pooled, fmap = feature_model(ens).predict(x, verbose=0)
    width = models[0].get_layer("gap").output.shape[-1]
    assert pooled.shape == (6, 2 * width) and fmap.shape[-1] == 2 * width


def test_ensemble_run_folder_calibrated_and_thresholded(members, tmp_path):
    import keras

    _, runs = members
    out = tmp_path / "ens"
    val = ensemble_runs(runs, out)
    for name in ("best.keras", "split.csv", "config.json", "val_metrics.json", "val_probs.npy"):
        assert (out / name).is_file(), name
    saved = json.loads((out / "val_metrics.json").read_text())
    assert saved["threshold"] == val["threshold"]
    assert saved["threshold_rule"] == json.loads(
        (runs[0] / "val_metrics.json").read_text())["threshold_rule"]
    assert [m["run"] for m in saved["members"]] == [str(r) for r in runs]
    assert [m["init_seed"] for m in saved["members"]] == [1, 2]
    assert set(saved["shifted_metrics"]) >= {"zoom_in_5", "zoom_out_15"}
    assert saved["metrics"]["n_labelled"] == saved["n_val"]
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["ensemble"]["init_seeds"] == [1, 2] and cfg["arch"].endswith("_x2")
    # the stored probabilities are the calibrated graph's, Platt applied to the mean logit
    from training.data import read_split
    from pneumo_edge.preprocess import PreprocessConfig, load_image

    _, val_s = read_split(out / "split.csv")
    x = np.stack([load_image(s.path, PreprocessConfig(32, 32, 3)) for s in val_s])
    ens = keras.models.load_model(out / "best.keras")
    np.testing.assert_allclose(ens.predict(x, verbose=0).reshape(-1),
                               np.load(out / "val_probs.npy"), atol=1e-5)
    mean = np.mean([_logits(keras.models.load_model(r / "best.keras"), x) for r in runs], axis=0)
    cal = saved["calibration"]
    expected = mean / cal["temperature"] + cal["bias"] if (
        abs(np.log(cal["temperature"])) > 0.01 or abs(cal["bias"]) > 0.01) else mean
    # the record rounds temperature and bias to 4 decimals
    assert np.all(np.abs(_logits(ens, x) - expected) <= 2e-3 * (1 + np.abs(expected)))


def test_ensemble_exports_with_heads(members, tmp_path):
    import onnxruntime as ort

    from pneumo_edge.runtime import read_metadata
    from training.export import export_run

    _, runs = members
    ensemble_runs(runs, tmp_path / "ens")
    result = export_run(tmp_path / "ens", tmp_path / "onnx", name="ens", robustness=False,
                        ood_size=40)
    path = result.files[0].path
    meta = read_metadata(path)[0]
    assert meta["ensemble"]["members"] == [str(r) for r in runs]
    assert meta["training"]["init_seed"] == 1 and meta["arch"].endswith("_x2")
    assert result.files[0].max_abs_diff < 1e-4
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    x = np.random.default_rng(1).uniform(0, 255, (4, 32, 32, 3)).astype(np.float32)
    prob, cam, ood = sess.run(None, {sess.get_inputs()[0].name: x})
    logit = np.log(prob.reshape(-1) / (1 - prob.reshape(-1)))
    np.testing.assert_allclose(cam.reshape(4, -1).mean(axis=1), logit, atol=1e-3)
    assert ood.shape == (4, 1) and np.all(ood > 0)
    import keras

    width = keras.models.load_model(runs[0] / "best.keras").get_layer("gap").output.shape[-1]
    assert meta["ood"]["feature_dim"] == 2 * width


def test_refusals_name_the_run(members, tmp_path):
    data, runs = members
    with pytest.raises(EnsembleError, match="at least two"):
        ensemble_runs(runs[:1], tmp_path / "e1")
    with pytest.raises(EnsembleError, match="listed twice"):
        ensemble_runs([runs[0], runs[0]], tmp_path / "e2")
    with pytest.raises(EnsembleError, match="no best.keras"):
        ensemble_runs([runs[0], tmp_path], tmp_path / "e3")
    other = tmp_path / "other"
    train(_cfg(data, other, seed=7))  # another patient split
    with open(other / "split.csv") as fh:
        assert list(csv.DictReader(fh)) != list(csv.DictReader(open(runs[0] / "split.csv")))
    with pytest.raises(EnsembleError, match=f"{other}: its patient split differs"):
        ensemble_runs([runs[0], other], tmp_path / "e4")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("keep")
    with pytest.raises(EnsembleError, match="not empty"):
        ensemble_runs(runs, tmp_path / "full")
    assert (tmp_path / "full" / "x").read_text() == "keep"


def test_cli(members, tmp_path):
    from typer.testing import CliRunner

    from pneumo_edge.cli import EXIT_USAGE, app

    _, runs = members
    runner = CliRunner()
    res = runner.invoke(app, ["ensemble", str(runs[0]), "--out", str(tmp_path / "e")])
    assert res.exit_code == EXIT_USAGE
    assert res.output.strip().splitlines()[-1].startswith("error: an ensemble needs at least two")
    broken = tmp_path / "broken"
    broken.mkdir()
    for name in ("config.json", "split.csv", "val_metrics.json"):
        (broken / name).write_bytes((runs[1] / name).read_bytes())
    (broken / "best.keras").write_text("not a model")
    res = runner.invoke(app, ["ensemble", str(runs[0]), str(broken), "--out",
                              str(tmp_path / "eb")])
    assert res.exit_code == EXIT_USAGE and "Traceback" not in res.output
    assert res.output.strip().splitlines()[-1].startswith("error: ")
    assert "best.keras" in res.output and not (tmp_path / "eb").exists()
    res = runner.invoke(app, ["ensemble", *map(str, runs), "--out", str(tmp_path / "[b]e")])
    assert res.exit_code == 0, res.output
    assert "seed ensemble in" in res.output and "[b]e" in res.output
    assert f"pneumo-edge export {tmp_path / '[b]e'}" in res.output.replace("\n", "")
