"""Training side (TensorFlow): data split, pipeline parity, augmentation, runs, resume."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

tf = pytest.importorskip("tensorflow")

from pneumo_edge.preprocess import PreprocessConfig, load_image  # noqa: E402
from training.augment import AugmentConfig, make_augment  # noqa: E402
from training.data import (DataError, class_weights, discover, load_arrays,  # noqa: E402
                           make_dataset, patient_id, patient_split)
from training.train import TrainConfig, TrainInterrupted, train  # noqa: E402

from helpers import SHARED_TRAIN  # noqa: E402
from synthetic import make_dataset as make_synthetic  # noqa: E402

pytestmark = pytest.mark.tf


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    return make_synthetic(tmp_path_factory.mktemp("data") / "train", n_patients=12)


def tiny_cfg(data: Path, out: Path, **kw) -> TrainConfig:
    base = dict(data=str(data), out=str(out), arch="resnet_tiny", img_size=32, epochs=1,
                batch_size=8, patience=3, val_fraction=0.25, seed=1)
    base.update(kw)
    return TrainConfig(**base)


@pytest.mark.parametrize("name, patient", [
    ("person12_bacteria_45.jpeg", "person12"), ("person7_virus_3.jpeg", "person7"),
    ("person447_virus_921_1.jpeg", "person447"),
    ("IM-0115-0001.jpeg", "IM-0115"), ("NORMAL2-IM-0456-0001-0002.jpeg", "NORMAL2-IM-0456"),
    ("scan.jpeg", None),
])
def test_patient_id_from_names(name, patient):
    assert patient_id(name) == patient


def test_split_is_patient_disjoint_and_stratified(data_dir):
    samples, no_patient = discover(data_dir)
    assert no_patient == 0 and len(samples) == 48
    train_s, val_s = patient_split(samples, 0.25, seed=3)
    assert not {s.patient for s in train_s} & {s.patient for s in val_s}
    assert {s.label for s in val_s} == {0, 1} and {s.label for s in train_s} == {0, 1}
    assert 8 <= len(val_s) <= 16
    again = patient_split(samples, 0.25, seed=3)
    assert [s.path for s in again[1]] == [s.path for s in val_s]


def test_discover_errors(tmp_path, data_dir):
    with pytest.raises(DataError, match="not found"):
        discover(tmp_path / "nope")
    only_normal = tmp_path / "one"
    (only_normal / "NORMAL").mkdir(parents=True)
    for f in list((data_dir / "NORMAL").iterdir())[:3]:
        (only_normal / "NORMAL" / f.name).write_bytes(f.read_bytes())
    with pytest.raises(DataError, match="PNEUMONIA"):
        discover(only_normal)
    samples, _ = discover(data_dir)
    with pytest.raises(DataError, match="too few"):
        patient_split([s for s in samples if s.patient in ("IM-0100", "person1")], 0.3, 0)


def test_class_weights_balance_the_loss(data_dir):
    samples, _ = discover(data_dir)
    unbalanced = samples + [s for s in samples if s.label == 1] * 2  # 3 PNEUMONIA per NORMAL
    w = class_weights(unbalanced)
    n0 = sum(s.label == 0 for s in unbalanced)
    n1 = len(unbalanced) - n0
    assert w[0] * n0 == pytest.approx(w[1] * n1)
    assert w[0] == pytest.approx(len(unbalanced) / (2 * n0)) and w[0] > 1 > w[1]


def test_tf_pipeline_matches_runtime_preprocessing(data_dir):
    samples, _ = discover(data_dir)
    cfg = PreprocessConfig(40, 40, 3)
    images, labels = load_arrays(samples[:6], cfg)
    ds = make_dataset(images, labels, cfg, batch_size=6, training=False, seed=0)
    batch, y = next(iter(ds))
    for i, s in enumerate(samples[:6]):
        runtime = load_image(s.path, cfg)
        assert np.abs(batch[i].numpy() - runtime).max() <= 1.0  # within 1/255 of the range
    assert y.numpy().tolist() == [float(s.label) for s in samples[:6]]


def test_augmentation_keeps_shape_range_and_labels(data_dir):
    samples, _ = discover(data_dir)
    cfg = PreprocessConfig(32, 32, 3)
    images, labels = load_arrays(samples, cfg)
    aug = make_augment(AugmentConfig())
    ds = make_dataset(images, labels, cfg, batch_size=len(labels), training=True, seed=0,
                      augment=aug)
    x, y = next(iter(ds))
    assert x.shape == (len(labels), 32, 32, 3) and x.dtype == tf.float32
    assert float(tf.reduce_min(x)) >= 0.0 and float(tf.reduce_max(x)) <= 255.0
    assert sorted(y.numpy().tolist()) == sorted(labels.tolist())  # shuffled, not changed
    one = images[0]
    a = aug(one, tf.constant([1, 2], tf.int64)).numpy()
    b = aug(one, tf.constant([1, 2], tf.int64)).numpy()
    c = aug(one, tf.constant([3, 4], tf.int64)).numpy()
    assert np.array_equal(a, b) and not np.array_equal(a, c)  # stateless: seed decides
    assert make_augment(AugmentConfig.off()) is None


def test_augmentation_zooms_out_with_black_border_and_crops_in():
    """Scale is two-sided: zoomed-out draws leave black (0) corners, crops fill the frame."""
    one = tf.fill((64, 64, 1), tf.constant(200, tf.uint8))
    only_geometry = dict(flip=False, aspect=0.0, rotation=0.0, shift=0.0, brightness=0.0,
                         contrast=0.0, gamma=0.0, noise=0.0, lowres=0.0)
    out = make_augment(AugmentConfig(crop_area=1.0, zoom_out=0.5, **only_geometry))
    corners = [float(out(one, tf.constant([s, 1], tf.int64))[0, 0, 0]) for s in range(20)]
    assert min(corners) == 0.0  # a black border, not edge replication
    crop = make_augment(AugmentConfig(crop_area=0.3, zoom_out=0.0, **only_geometry))
    for s in range(20):
        img = crop(one, tf.constant([s, 1], tf.int64)).numpy()
        assert img.min() == pytest.approx(200.0, abs=1e-3)  # crops never show a border


def test_one_epoch_run_folder(data_dir, tmp_path):
    seen = []
    result = train(tiny_cfg(data_dir, tmp_path / "run"), on_epoch=lambda e, l: seen.append(l))
    run = tmp_path / "run"
    for name in ("best.keras", "history.csv", "split.csv", "val_metrics.json", "config.json",
                 "curves.png"):
        assert (run / name).is_file(), name
    assert not (run / "backup").exists()  # removed once training finished
    with open(run / "split.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 48
    train_p = {r["patient"] for r in rows if r["subset"] == "train"}
    val_p = {r["patient"] for r in rows if r["subset"] == "val"}
    assert train_p and val_p and not train_p & val_p
    val = json.loads((run / "val_metrics.json").read_text())
    assert 0.0 <= val["threshold"] <= 1.0
    from pneumo_edge.robustness import FRAMING_ROWS
    assert val["threshold_rule"] == f"worst_row_youden_plateau({1 + len(FRAMING_ROWS)} rows)"
    assert set(val["shifted_metrics"]) == set(FRAMING_ROWS)
    assert {"border_black_3", "letterbox_lr_10", "text_label"} <= set(FRAMING_ROWS)
    cal = val["calibration"]
    assert cal["temperature"] > 0 and 0.0 <= cal["ece_after"] <= 1.0
    with open(run / "history.csv") as fh:
        hist = list(csv.DictReader(fh))
    robust = float(hist[0]["val_robust_auc"])
    assert robust == pytest.approx(min(float(hist[0][f"val_{r}_auc"])
                                       for r in ("clean", "zoom_in_15", "zoom_out_15",
                                                 "border_black_3")))
    assert val["metrics"]["n_labelled"] == len(val_p) * 2 == result.n_val
    assert set(val["metrics"]) >= {"auc", "recall", "specificity", "accuracy"}
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["arch"] == "resnet_tiny" and cfg["img_size"] == 32
    assert len(seen) == 1 and "val_auc" in seen[0] and "learning_rate" in seen[0]
    assert seen[0]["epoch_seconds"] > 0


def test_block_split_run_reports_both_views_in_bf16(data_dir, tmp_path):
    train(tiny_cfg(data_dir, tmp_path / "run", split="block", precision="bf16", epochs=1,
                   select_rows=("clean", "border_black_3")))
    run = tmp_path / "run"
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["split"] == "block" and cfg["precision_policy"] == "mixed_bfloat16"
    with open(run / "split.csv") as fh:
        rows = list(csv.DictReader(fh))
    block = [r for r in rows if r["part"] == "block"]
    train_normals = [int(r["patient"].rsplit("-", 1)[1]) for r in rows
                     if r["subset"] == "train" and r["label"] == "NORMAL"]
    assert block and max(int(r["patient"].rsplit("-", 1)[1]) for r in block) < min(train_normals)
    val = json.loads((run / "val_metrics.json").read_text())
    assert set(val["views"]) == {"block", "patient"}
    assert "x 2 views" in val["threshold_rule"]
    n_pneu = sum(r["subset"] == "val" and r["label"] == "PNEUMONIA" for r in rows)
    assert val["views"]["block"]["n"] == len(block) + n_pneu
    assert set(val["views"]["block"]["shifted_metrics"]) == set(val["shifted_metrics"])
    with open(run / "history.csv") as fh:
        hist = list(csv.DictReader(fh))[0]
    keys = [f"val_{r}_{v}_auc" for r in ("clean", "border_black_3") for v in ("block", "patient")]
    assert float(hist["val_robust_auc"]) == pytest.approx(min(float(hist[k]) for k in keys))

    # export keeps the views: val_split.csv names each file's part, and the metadata holds
    # every robustness row per view, as a suite run over that view's files scores it
    from pneumo_edge.robustness import read_split_csv, run_suite
    from pneumo_edge.runtime import load_model, read_metadata
    from training.export import export_run

    out = tmp_path / "onnx"
    result = export_run(run, out, int8=True, calib_method="minmax", calib_size=16, heads=False)
    with open(out / "val_split.csv") as fh:
        exported = list(csv.DictReader(fh))
    assert [r["part"] for r in exported] == [r["part"] for r in rows if r["subset"] == "val"]
    data = cfg["data"]
    for r in result.files:
        rob = read_metadata(r.path)[0]["robustness"]
        assert set(rob["views"]) == {"block", "patient"}
        model = load_model(r.path, device="cpu")
        for view, stored in rob["views"].items():
            files, labels = read_split_csv(out / "val_split.csv", data, view=view)
            assert stored["n_images"] == len(files) == val["views"][view]["n"]
            suite = run_suite(model.run, model.preprocess, files, labels, model.threshold)
            for row, kept in zip(suite.rows, stored["rows"]):
                assert row.perturbation == kept["perturbation"]
                assert row.specificity == pytest.approx(kept["specificity"], abs=1e-9)
                assert row.auc == pytest.approx(kept["auc"], abs=1e-6)
            if r.precision == "int8":
                assert set(stored["agreement_with_fp32"]) == {x["perturbation"]
                                                              for x in stored["rows"]}
                assert stored["min_agreement_with_fp32"] == min(
                    stored["agreement_with_fp32"].values())


def test_precision_policy_resolution(monkeypatch):
    from training import train as train_mod
    assert train_mod.precision_policy("fp32", on_gpu=True) == "float32"
    assert train_mod.precision_policy("auto", on_gpu=True) == "mixed_float16"
    monkeypatch.setattr(train_mod, "cpu_has_bf16", lambda: True)
    assert train_mod.precision_policy("auto", on_gpu=False) == "mixed_bfloat16"
    monkeypatch.setattr(train_mod, "cpu_has_bf16", lambda: False)
    assert train_mod.precision_policy("auto", on_gpu=False) == "float32"
    # a 0.2 run folder's config resumes with its own precision
    old = TrainConfig(data="d").to_dict()
    old.pop("precision")
    assert TrainConfig.from_dict(old | {"mixed_precision": "off"}).precision == "fp32"
    with pytest.raises(ValueError, match="--precision"):
        TrainConfig(data="d", precision="int4")
    with pytest.raises(ValueError, match="--split"):
        TrainConfig(data="d", split="random")


def test_target_sensitivity_rule(data_dir, tmp_path):
    train(tiny_cfg(data_dir, tmp_path / "run", target_sensitivity=1.0))
    val = json.loads((tmp_path / "run" / "val_metrics.json").read_text())
    assert val["threshold_rule"].startswith("sensitivity>=1")
    assert val["metrics"]["recall"] == 1.0


def test_interrupted_run_resumes(data_dir, tmp_path):
    out = tmp_path / "run"

    def interrupt(epoch, logs):
        if epoch == 0:
            raise KeyboardInterrupt

    with pytest.raises(TrainInterrupted, match="--resume"):
        train(tiny_cfg(data_dir, out, epochs=2), on_epoch=interrupt)
    assert (out / "backup").is_dir() and (out / "config.json").is_file()
    epochs = []
    train(tiny_cfg(data_dir, out, epochs=2), resume=True, on_epoch=lambda e, l: epochs.append(e))
    assert epochs == [1]  # continued with the second epoch, not from scratch
    with open(out / "history.csv") as fh:
        assert [int(r["epoch"]) for r in csv.DictReader(fh)] == [0, 1]
    assert (out / "val_metrics.json").is_file() and not (out / "backup").exists()


def test_resume_of_finished_run_only_re_evaluates(data_dir, tmp_path):
    out = tmp_path / "run"
    train(tiny_cfg(data_dir, out))
    first = json.loads((out / "val_metrics.json").read_text())
    best_mtime = (out / "best.keras").stat().st_mtime_ns
    epochs = []
    cfg = tiny_cfg(data_dir, out, target_sensitivity=1.0)
    train(cfg, resume=True, on_epoch=lambda e, l: epochs.append(e))
    again = json.loads((out / "val_metrics.json").read_text())
    assert epochs == [] and (out / "best.keras").stat().st_mtime_ns == best_mtime
    assert again["threshold_rule"].startswith("sensitivity>=1") and again["metrics"]["recall"] == 1.0
    assert again["metrics"]["auc"] == pytest.approx(first["metrics"]["auc"])
    assert again["train_seconds"] == pytest.approx(first["train_seconds"], abs=0.1)


def test_mirrored_strategy_on_two_logical_cpus(data_dir, tmp_path):
    script = textwrap.dedent(f"""
        import tensorflow as tf
        cpu = tf.config.list_physical_devices("CPU")[0]
        tf.config.set_logical_device_configuration(
            cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
        import sys; sys.path.insert(0, {str(Path(__file__).parent)!r})
        from training.train import TrainConfig, train
        r = train(TrainConfig(data={str(data_dir)!r}, out={str(tmp_path / 'mirror')!r},
                              arch="resnet_tiny", img_size=32, epochs=1, batch_size=8,
                              val_fraction=0.25, strategy="mirrored"))
        print("DEVICES", len(r.devices), r.devices)
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "DEVICES 2" in proc.stdout
    assert (tmp_path / "mirror" / "best.keras").is_file()


def test_train_cli_errors_and_table(data_dir, tmp_path):
    from typer.testing import CliRunner
    from pneumo_edge.cli import EXIT_USAGE, app

    runner = CliRunner()
    res = runner.invoke(app, ["train", "--data", str(tmp_path / "missing"), "--out",
                              str(tmp_path / "r")])
    assert res.exit_code == EXIT_USAGE and "not found" in res.output
    res = runner.invoke(app, ["train", "--data", str(data_dir), "--out", str(tmp_path / "r"),
                              "--arch", "resnet_tiny", "--img-size", "32", "--epochs", "1",
                              "--batch-size", "8", "--val-fraction", "0.25", "--precision", "fp32"])
    assert res.exit_code == 0, res.output
    assert "best epoch" in res.output and "threshold" in res.output and "val AUC" in res.output
    assert "on /device:CPU:0 (float32)" in " ".join(res.output.split())
    assert "patient split" in " ".join(res.output.split())


@pytest.mark.slow
def test_real_subset_trains(tmp_path):
    from typer.testing import CliRunner
    from pneumo_edge.cli import app

    res = CliRunner().invoke(app, ["train", "--data", str(SHARED_TRAIN), "--max-images", "120",
                                   "--epochs", "1", "--img-size", "64", "--batch-size", "16",
                                   "--out", str(tmp_path / "run")])
    assert res.exit_code == 0, res.output
    rows = list(csv.DictReader(open(tmp_path / "run" / "split.csv")))
    assert len(rows) == 120
    assert not ({r["patient"] for r in rows if r["subset"] == "train"}
                & {r["patient"] for r in rows if r["subset"] == "val"})
    assert json.loads((tmp_path / "run" / "val_metrics.json").read_text())["threshold"] >= 0


@pytest.mark.parametrize("args, message", [
    (["--arch", "resnet19"], "--arch must be one of resnet18, resnet_tiny"),
    (["--strategy", "mirorred"], "--strategy must be one of"),
    (["--schedule", "linear"], "--schedule must be one of cosine, plateau"),
    (["--threshold-rule", "best"], "--threshold-rule must be one of robust, clean"),
])
def test_train_options_are_checked_before_any_work(data_dir, tmp_path, args, message):
    from typer.testing import CliRunner
    from pneumo_edge.cli import EXIT_USAGE, app

    res = CliRunner().invoke(app, ["train", "--data", str(data_dir), "--out",
                                   str(tmp_path / "r"), *args])
    assert res.exit_code == EXIT_USAGE and message in res.output, res.output
    assert not (tmp_path / "r").exists()  # refused before the run folder or any decoding


def test_config_defaults_live_in_one_place():
    cfg = TrainConfig(data="x")
    assert cfg.epochs == 30 and cfg.arch == "resnet18" and cfg.augment == AugmentConfig()
    with pytest.raises(ValueError, match="--val-fraction"):
        TrainConfig(data="x", val_fraction=1.5)


def _free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_workers_on_loopback_make_one_run_folder(data_dir, tmp_path):
    """MultiWorkerMirroredStrategy: two `pneumo-edge train --cluster` processes, one epoch;
    the chief writes the run folder, the other worker leaves nothing behind, and the
    model loads and exports."""
    from training.export import export_run

    cluster = ",".join(f"127.0.0.1:{_free_port()}" for _ in range(2))
    out = tmp_path / "run"
    code = "import sys; from pneumo_edge.cli import main; sys.argv[0] = 'pneumo-edge'; main()"
    procs = [subprocess.Popen(
        [sys.executable, "-c", code, "train", "--data", str(data_dir), "--out", str(out),
         "--arch", "resnet_tiny", "--img-size", "32", "--epochs", "1", "--batch-size", "8",
         "--val-fraction", "0.25", "--cluster", cluster, "--task-index", str(i)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in range(2)]
    outputs = [p.communicate(timeout=600)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], "\n".join(o[-1500:] for o in outputs)
    assert "worker 1 of 2: the chief writes" in outputs[1]
    for name in ("best.keras", "val_metrics.json", "history.csv", "split.csv", "config.json"):
        assert (out / name).is_file(), name
    assert not (out / "worker-1").exists() and not (out / "backup").exists()
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["strategy"] == "multiworker"
    with open(out / "history.csv") as fh:
        assert len(list(csv.DictReader(fh))) == 1
    result = export_run(out, tmp_path / "onnx")
    assert [r.precision for r in result.files] == ["fp32"]
    from pneumo_edge.runtime import load_model
    assert load_model(result.files[0].path).threshold == pytest.approx(
        json.loads((out / "val_metrics.json").read_text())["threshold"])


def test_worker_role_and_cluster_options(monkeypatch, data_dir, tmp_path):
    from typer.testing import CliRunner

    from pneumo_edge.cli import EXIT_USAGE, app
    from training.train import cluster_tf_config, worker_role

    monkeypatch.setenv("TF_CONFIG", cluster_tf_config(["a:1", "b:2", "c:3"], 2))
    assert (worker_role().n_workers, worker_role().index, worker_role().chief) == (3, 2, False)
    monkeypatch.setenv("TF_CONFIG", json.dumps({"cluster": {"chief": ["a:1"], "worker": ["b:2"]},
                                                "task": {"type": "worker", "index": 0}}))
    assert (worker_role().n_workers, worker_role().index, worker_role().chief) == (2, 1, False)
    monkeypatch.setenv("TF_CONFIG", "{not json")
    with pytest.raises(ValueError, match="TF_CONFIG"):
        worker_role()
    monkeypatch.delenv("TF_CONFIG")
    assert worker_role().chief and worker_role().n_workers == 1
    runner = CliRunner()
    base = ["train", "--data", str(data_dir), "--out", str(tmp_path / "r")]
    for extra, message in ((["--cluster", "a:1,b:2"], "go together"),
                           (["--cluster", "a:1", "--task-index", "0"], "at least two"),
                           (["--cluster", "a:1,b:2", "--task-index", "5"], "must be in 0..1")):
        result = runner.invoke(app, base + extra)
        assert result.exit_code == EXIT_USAGE and message in result.output, result.output
    assert not (tmp_path / "r").exists()
