"""Export a trained run to ONNX (FP32, FP16, INT8) with metadata and parity checks.

Every file carries the ``pneumo_edge`` metadata (DESIGN.md): preprocessing,
class names, the validation threshold and its rule, precision, architecture,
training data, validation metrics measured on that very file, and its parity
with the Keras model. Nothing is written unless every check passes; each file
is renamed into place from a temporary name.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from pneumo_edge import __version__
from pneumo_edge.metrics import binary_metrics
from pneumo_edge.preprocess import PreprocessConfig, load_image
from pneumo_edge.report import atomic_write
from pneumo_edge.runtime import METADATA_KEY, SCHEMA_VERSION

from .data import CLASS_NAMES, read_split
from .models import INPUT_NAME

PARITY_TOLERANCE = {"fp32": 1e-4, "fp16": 1e-2}
CALIB_METHODS = ("minmax", "entropy", "percentile")


class ExportError(RuntimeError):
    """Export refused or a parity check failed; nothing was written."""


@dataclass
class PrecisionResult:
    precision: str
    path: Path
    size_bytes: int
    max_abs_diff: float | None
    label_agreement: float | None
    val_metrics: dict | None
    extra: dict = field(default_factory=dict)


@dataclass
class ExportResult:
    files: list[PrecisionResult]
    threshold: float
    threshold_rule: str
    n_val: int
    seconds: float


# ---------------------------------------------------------------- the source

@dataclass
class _Source:
    keras_path: Path
    config: dict
    threshold: float
    threshold_rule: str
    val_paths: list[str]
    val_patients: list[str]
    val_labels: np.ndarray
    train_paths: list[str]
    trained_on: str


def _load_source(source: Path) -> _Source:
    if source.is_dir():
        keras_path = source / "best.keras"
        if not keras_path.is_file():
            raise ExportError(f"{source}: no best.keras in this run folder")
        config = json.loads((source / "config.json").read_text()) if (source / "config.json").exists() else {}
        val_file = source / "val_metrics.json"
        if not val_file.exists():
            raise ExportError(f"{source}: no val_metrics.json (training did not finish?)")
        val = json.loads(val_file.read_text())
        train_s, val_s = read_split(source / "split.csv")
        n_tr, n_va = len(train_s), len(val_s)
        trained_on = (
            f"{config.get('data', '?')}: {n_tr + n_va} images, patient-level split "
            f"(seed {config.get('seed', '?')}): {n_tr} train / {n_va} validation "
            f"({len({s.patient for s in val_s})} validation patients)")
        return _Source(keras_path, config, float(val["threshold"]), str(val["threshold_rule"]),
                       [s.path for s in val_s], [s.patient for s in val_s],
                       np.array([s.label for s in val_s]),
                       [s.path for s in train_s], trained_on)
    if source.is_file() and source.suffix == ".keras":
        return _Source(source, {}, 0.5, "default_0.5_not_validated", [], [], np.array([]), [],
                       "unknown (exported from a bare .keras file)")
    raise ExportError(f"{source}: expected a run folder or a .keras file")


def inference_model(keras_path: Path):
    """The trained model rebuilt in float32 with augmentation layers replaced by Identity.

    Random* preprocessing layers (flip, zoom, rotation...) are training-time only
    and break every ONNX route; a mixed-precision model is rebuilt in float32.
    """
    import keras

    src = keras.models.load_model(keras_path, compile=False)
    keras.mixed_precision.set_global_policy("float32")
    dropped: list[str] = []

    def clone(layer):
        if type(layer).__name__.startswith("Random"):
            dropped.append(layer.name)
            return keras.layers.Identity(name=layer.name)
        cfg = layer.get_config()
        if "dtype" in cfg:
            cfg["dtype"] = "float32"
        return layer.__class__.from_config(cfg)

    clean = keras.models.clone_model(src, clone_function=clone)
    for layer in clean.layers:
        if layer.name in dropped or not layer.weights:
            continue
        layer.set_weights(src.get_layer(layer.name).get_weights())
    return clean, dropped


# ---------------------------------------------------------------- conversion

def _to_onnx(model, cfg: PreprocessConfig, opset: int):
    import tensorflow as tf
    import tf2onnx

    spec = [tf.TensorSpec([None, cfg.height, cfg.width, cfg.channels], tf.float32, name=INPUT_NAME)]
    proto, _ = tf2onnx.convert.from_keras(model, input_signature=spec, opset=opset)
    return proto


def _to_fp16(proto):
    from onnxconverter_common import float16

    return float16.convert_float_to_float16(proto, keep_io_types=True)


class _CalibReader:
    """onnxruntime CalibrationDataReader over image files, via the runtime preprocessing."""

    # One image per batch: the histogram calibrators (Entropy, Percentile) of
    # onnxruntime 1.31 fail on a last batch of a different size.
    def __init__(self, paths: list[str], cfg: PreprocessConfig, input_name: str, batch: int = 1):
        self.paths, self.cfg, self.input_name, self.batch = paths, cfg, input_name, batch
        self.rewind()

    def rewind(self):
        self._it = iter(range(0, len(self.paths), self.batch))

    def get_next(self):
        start = next(self._it, None)
        if start is None:
            return None
        x = np.stack([load_image(p, self.cfg) for p in self.paths[start:start + self.batch]])
        return {self.input_name: x}


def _prepare_for_int8(fp32_path: Path, out_path: Path) -> None:
    """onnxruntime's quantisation pre-processing (shape inference, graph clean-up), once."""
    from onnxruntime.quantization.shape_inference import quant_pre_process

    quant_pre_process(str(fp32_path), str(out_path), skip_symbolic_shape=False)


def _to_int8(pre_path: Path, out_path: Path, calib_paths: list[str], cfg: PreprocessConfig,
             method: str) -> None:
    """Static INT8 (QDQ, per-channel) of a pre-processed FP32 model, calibrated by ``method``."""
    import onnx
    from onnxruntime.quantization import (CalibrationMethod, QuantFormat, QuantType,
                                          quantize_static)

    methods = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
               "percentile": CalibrationMethod.Percentile}
    input_name = onnx.load(str(pre_path), load_external_data=False).graph.input[0].name
    quantize_static(
        str(pre_path), str(out_path), _CalibReader(calib_paths, cfg, input_name),
        quant_format=QuantFormat.QDQ, per_channel=True, activation_type=QuantType.QUInt8,
        weight_type=QuantType.QInt8, calibrate_method=methods[method])


# ---------------------------------------------------------------- evaluation

def _ort_probs(proto_bytes: bytes, images: np.ndarray, batch: int = 32) -> np.ndarray:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    sess = ort.InferenceSession(proto_bytes, sess_options=so, providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    out = [sess.run(None, {name: images[i:i + batch]})[0].reshape(-1)
           for i in range(0, len(images), batch)]
    return np.concatenate(out).astype(np.float64) if out else np.zeros(0)


def _compare(p: np.ndarray, p_ref: np.ndarray, labels: np.ndarray, thr: float):
    diff = float(np.max(np.abs(p - p_ref)))
    agree = float(np.mean((p >= thr) == (p_ref >= thr)))
    metrics = binary_metrics(labels, p, thr).to_dict() if labels.size else None
    return diff, agree, metrics


def _metadata(src: _Source, cfg: PreprocessConfig, precision: str, result: PrecisionResult,
              keras_metrics: dict | None, opset: int, arch: str, parity_images: str,
              n_parity: int) -> dict:
    meta = {
        "schema": SCHEMA_VERSION,
        "input_name": INPUT_NAME,
        **cfg.to_metadata(),
        "class_names": list(CLASS_NAMES),
        "positive_class": "PNEUMONIA",
        "output": "P(PNEUMONIA), shape (N, 1)",
        "threshold": src.threshold,
        "threshold_rule": src.threshold_rule,
        "precision": precision,
        "arch": arch,
        "trained_on": src.trained_on,
        "val_metrics": result.val_metrics,
        "val_metrics_keras": keras_metrics,
        "parity": {"reference": "keras fp32", "images": parity_images, "n_images": n_parity,
                   "max_abs_diff": result.max_abs_diff,
                   "label_agreement": result.label_agreement},
        "training": {k: src.config.get(k) for k in (
            "img_size", "epochs", "batch_size", "lr", "weight_decay", "dropout",
            "label_smoothing", "schedule", "seed", "augment", "class_balance")
            if k in src.config},
        "opset": opset,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "pneumo_edge_version": __version__,
        "disclaimer": "Research and engineering tool, not a medical device.",
    }
    meta.update(result.extra)
    return meta


def _finalise(proto, meta: dict) -> bytes:
    import onnx
    from onnx import helper

    del proto.metadata_props[:]
    helper.set_model_props(proto, {METADATA_KEY: json.dumps(meta)})
    proto.producer_name = "pneumo-edge"
    proto.producer_version = __version__
    onnx.checker.check_model(proto)
    return proto.SerializeToString()


def export_run(source: str | os.PathLike, out_dir: str | os.PathLike = "exported", *,
               fp16: bool = False, int8: bool = False, name: str | None = None, opset: int = 17,
               calib: str | os.PathLike | None = None, calib_size: int = 300,
               calib_method: str = "auto", force: bool = False, max_val: int | None = None,
               set_default: bool = False, progress=None) -> ExportResult:
    """Export a run folder (or a .keras file) to ONNX files in ``out_dir``.

    Args:
        source: a run folder from ``train`` or a ``.keras`` file.
        fp16, int8: also write those precisions (FP32 is always written).
        name: file name stem (default: the architecture); files are NAME_PRECISION.onnx.
        calib: folder of images for INT8 calibration (default: the run's training split).
        calib_size: how many calibration images (random, seeded).
        calib_method: minmax, entropy, percentile, or auto (each tried, best validation AUC kept).
        force: overwrite existing files.
        max_val: evaluate on at most this many validation images (default all).
        set_default: write ``out_dir/default.txt`` naming the model ``predict`` uses by
            default (see :func:`choose_default`).
        progress: optional callable(str) for status lines.

    Raises:
        ExportError: refused (files exist, bad source) or FP32/FP16 parity failed.
    """
    import onnx

    say = progress or (lambda msg: None)
    t0 = time.perf_counter()
    source = Path(source)
    out_dir = Path(out_dir)
    src = _load_source(source)
    model, dropped = inference_model(src.keras_path)
    shape = model.inputs[0].shape
    cfg = PreprocessConfig(int(shape[1]), int(shape[2]), int(shape[3]))
    arch = src.config.get("arch") or model.name
    name = name or arch
    precisions = ["fp32"] + (["fp16"] if fp16 else []) + (["int8"] if int8 else [])
    targets = {p: out_dir / f"{name}_{p}.onnx" for p in precisions}
    existing = [str(p) for p in targets.values() if p.exists()]
    if existing and not force:
        raise ExportError(f"refusing to overwrite {', '.join(existing)} (use --force)")
    if calib_method not in CALIB_METHODS + ("auto",):
        raise ExportError(f"unknown calibration method {calib_method!r}")

    rng = np.random.default_rng(0)
    idx = np.arange(len(src.val_paths))
    if max_val and len(idx) > max_val:
        idx = np.sort(rng.permutation(len(idx))[:max_val])
    val_paths = [src.val_paths[i] for i in idx]
    val_patients = [src.val_patients[i] for i in idx]
    val_labels = src.val_labels[idx] if len(src.val_labels) else src.val_labels
    say(f"validation images: {len(val_paths)}")
    if val_paths:
        val_x = np.stack([load_image(p, cfg) for p in val_paths])
    else:  # no validation split: parity is still checked, on random images
        val_x = rng.uniform(0, 255, (16, cfg.height, cfg.width, cfg.channels)).astype(np.float32)
    p_keras = model.predict(val_x, batch_size=32, verbose=0).reshape(-1).astype(np.float64)
    parity_images = "validation" if val_paths else "random"
    keras_metrics = (binary_metrics(val_labels, p_keras, src.threshold).to_dict()
                     if val_labels.size else None)

    results: list[PrecisionResult] = []
    payloads: dict[str, bytes] = {}
    with tempfile.TemporaryDirectory(prefix="pneumo-export-") as tmp:
        tmp = Path(tmp)
        say("converting to ONNX (tf2onnx)")
        proto32 = _to_onnx(model, cfg, opset)
        onnx.checker.check_model(proto32)
        fp32_path = tmp / "fp32.onnx"
        onnx.save(proto32, str(fp32_path))
        protos = {"fp32": proto32}
        if fp16:
            say("converting to FP16")
            protos["fp16"] = _to_fp16(onnx.load(str(fp32_path)))
        for precision, proto in protos.items():
            p = _ort_probs(proto.SerializeToString(), val_x)
            diff, agree, metrics = _compare(p, p_keras, val_labels, src.threshold)
            tol = PARITY_TOLERANCE[precision]
            if diff > tol:
                raise ExportError(f"{precision} parity failed: max |p - p_keras| = {diff:.2e} "
                                  f"> {tol:g} on {len(val_x)} {parity_images} images; "
                                  "nothing written")
            results.append(PrecisionResult(precision, targets[precision], 0, diff, agree, metrics,
                                           {"stripped_layers": dropped} if dropped else {}))
        if int8:
            calib_paths = _calibration_paths(src, calib, calib_size, rng)
            say(f"INT8 calibration on {len(calib_paths)} images")
            methods = CALIB_METHODS if calib_method == "auto" else (calib_method,)
            tried = {}
            best = None
            pre_path = tmp / "fp32_pre.onnx"
            _prepare_for_int8(fp32_path, pre_path)
            for method in methods:
                qpath = tmp / f"int8_{method}.onnx"
                _to_int8(pre_path, qpath, calib_paths, cfg, method)
                qproto = onnx.load(str(qpath))
                p = _ort_probs(qproto.SerializeToString(), val_x)
                diff, agree, metrics = _compare(p, p_keras, val_labels, src.threshold)
                auc = metrics["auc"] if metrics and metrics["auc"] is not None else -1.0
                tried[method] = {"val_auc": None if auc < 0 else auc, "max_abs_diff": diff,
                                 "label_agreement": agree}
                say(f"  {method}: val AUC {'n/a' if auc < 0 else f'{auc:.4f}'}, "
                    f"label agreement with Keras {agree:.4f}")
                key = (auc, agree or 0.0)
                if best is None or key > best[0]:
                    best = (key, method, qproto, diff, agree, metrics)
            _, method, qproto, diff, agree, metrics = best
            protos["int8"] = qproto
            results.append(PrecisionResult("int8", targets["int8"], 0, diff, agree, metrics, {
                "calibration": {"method": method, "n_images": len(calib_paths),
                                "source": str(calib) if calib else "training split of the run",
                                "methods_tried": tried, "format": "QDQ",
                                "per_channel": True, "activations": "uint8",
                                "weights": "int8"}}))
        for r in results:
            payloads[r.precision] = _finalise(
                protos[r.precision], _metadata(src, cfg, r.precision, r, keras_metrics, opset, arch,
                                               parity_images, len(val_x)))
            r.size_bytes = len(payloads[r.precision])
    for r in results:
        atomic_write(r.path, payloads[r.precision])
    if set_default:
        atomic_write(out_dir / "default.txt", choose_default(results).path.name + "\n")
    if val_paths:
        write_val_split(Path(src.config.get("data", ".")), val_paths, val_patients, val_labels,
                        out_dir / "val_split.csv")
    return ExportResult(results, src.threshold, src.threshold_rule, int(val_labels.size),
                        time.perf_counter() - t0)


INT8_MAX_AUC_LOSS = 0.005


def write_val_split(data: Path, paths: list[str], patients: list[str], labels: np.ndarray,
                    out: Path) -> None:
    """The validation files behind the metadata's numbers, relative to the data folder.

    With the data at hand, ``pneumo-edge predict`` over these files reproduces
    ``val_metrics`` (see tests/test_release.py).
    """
    import csv
    import io

    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["path", "patient", "label"])
    for p, patient, label in zip(paths, patients, labels):
        w.writerow([Path(os.path.relpath(p, data)).as_posix(), patient, CLASS_NAMES[int(label)]])
    atomic_write(out, buf.getvalue())


def choose_default(results: list[PrecisionResult]) -> PrecisionResult:
    """INT8 when its validation AUC is within 0.005 of FP32's (it is ~3x faster on CPUs), else FP32."""
    by = {r.precision: r for r in results}
    fp32, int8 = by["fp32"], by.get("int8")
    if int8 is None or not fp32.val_metrics or not int8.val_metrics:
        return fp32
    if int8.val_metrics["auc"] >= fp32.val_metrics["auc"] - INT8_MAX_AUC_LOSS:
        return int8
    return fp32


def _calibration_paths(src: _Source, calib, calib_size: int, rng) -> list[str]:
    if calib:
        from pneumo_edge.images import collect_images
        paths = [str(p) for p in collect_images([calib])]
    else:
        paths = list(src.train_paths)
    if not paths:
        raise ExportError("INT8 needs calibration images: pass --calib DIR "
                          "(the source has no training split)")
    if len(paths) > calib_size:
        paths = [paths[i] for i in np.sort(rng.permutation(len(paths))[:calib_size])]
    return paths
