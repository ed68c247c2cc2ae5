"""Export a trained run to ONNX (FP32, FP16, INT8) with metadata and parity checks.

Every file carries the ``pneumo_edge`` metadata (``pneumo_edge/metadata.py``): preprocessing,
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
from pneumo_edge.io import atomic_write, check_output_folder
from pneumo_edge.metadata import (CAM_OUTPUT, CLASS_NAMES, LUNG_AREA_OUTPUT, LUNG_BOX_OUTPUT,
                                  METADATA_KEY, OOD_OUTPUT, PROB_OUTPUT, SCHEMA_VERSION, MetadataError, ModelMetadata, OutputSpec,
                                  PreprocessConfig, finite_json, validate)
from pneumo_edge.metrics import binary_metrics
from pneumo_edge.preprocess import load_image

from . import environment
from .models import INPUT_NAME
from .runfolder import RunFolder, keras_preprocess

PARITY_TOLERANCE = {"fp32": 1e-4, "fp16": 1e-2}
CALIB_METHODS = ("minmax", "entropy", "percentile")
#: The ONNX opsets export supports (tf2onnx and onnxruntime agree on these), and the default.
OPSETS, DEFAULT_OPSET = (13, 21), 17


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
    out_dir: Path = Path("exported")


# ---------------------------------------------------------------- step 1: validate

@dataclass
class _Source:
    """What an export reads: a run folder, or a bare .keras file (no split, no threshold)."""

    keras_path: Path
    arch: str
    threshold: float
    threshold_rule: str
    run: RunFolder | None = None

    @property
    def val_samples(self) -> list:
        return self.run.validation if self.run else []

    @property
    def train_paths(self) -> list[str]:
        return [s.path for s in self.run.train] if self.run else []

    @property
    def trained_on(self) -> str:
        return self.run.trained_on if self.run else "unknown (exported from a bare .keras file)"


@dataclass
class _Plan:
    """Every argument of an export, checked before TensorFlow loads."""

    src: _Source
    out_dir: Path
    targets: dict[str, Path]
    calib: Path | None
    calib_size: int
    calib_methods: tuple[str, ...]
    opset: int
    max_val: int | None


def _keras_file_name(path: Path) -> str:
    """The model name stored in a .keras file (a zip with config.json), read without Keras."""
    import zipfile

    try:
        with zipfile.ZipFile(path) as zf:
            return str(json.loads(zf.read("config.json"))["config"]["name"])
    except (OSError, KeyError, ValueError, TypeError, zipfile.BadZipFile) as exc:
        raise ExportError(f"{path}: not a readable .keras file ({exc})") from None


def _load_source(source: Path) -> _Source:
    if source.is_dir():
        try:
            run = RunFolder.load(source)
        except (OSError, ValueError, KeyError) as exc:
            raise ExportError(str(exc)) from None
        arch = run.config.get("arch") or _keras_file_name(run.keras_path)
        return _Source(run.keras_path, arch, run.val.threshold, run.val.threshold_rule, run)
    if source.is_file() and source.suffix == ".keras":
        return _Source(source, _keras_file_name(source), 0.5, "default_0.5_not_validated")
    raise ExportError(f"{source}: expected a run folder or a .keras file")


def validate_export(source: str | os.PathLike, out_dir: str | os.PathLike, *, fp16: bool,
                    int8: bool, name: str | None, opset: int, calib: str | os.PathLike | None,
                    calib_size: int, calib_method: str, force: bool,
                    max_val: int | None) -> _Plan:
    """Check every argument, the source and the output folder (no TensorFlow).

    Raises:
        ExportError: the first problem, naming the argument or the file.
    """
    if calib_method not in CALIB_METHODS + ("auto",):
        raise ExportError(f"unknown calibration method {calib_method!r}; choose from "
                          f"{', '.join(CALIB_METHODS + ('auto',))}")
    if not OPSETS[0] <= opset <= OPSETS[1]:
        raise ExportError(f"--opset must be in {OPSETS[0]}..{OPSETS[1]}, got {opset}")
    if calib_size < 1 or (max_val is not None and max_val < 1):
        raise ExportError("--calib-size and --max-val must be at least 1")
    out_dir = Path(out_dir)
    try:
        check_output_folder(out_dir)
    except OSError as exc:
        raise ExportError(f"--out {exc}") from None
    if calib is not None and not Path(calib).is_dir():
        raise ExportError(f"--calib {calib}: no such folder")
    src = _load_source(Path(source))
    if int8 and calib is None and not src.train_paths:
        raise ExportError("INT8 needs calibration images: pass --calib DIR "
                          "(the source has no training split)")
    name = name or src.arch
    precisions = ["fp32"] + (["fp16"] if fp16 else []) + (["int8"] if int8 else [])
    targets = {p: out_dir / f"{name}_{p}.onnx" for p in precisions}
    existing = [str(p) for p in targets.values() if p.exists()]
    if existing and not force:
        raise ExportError(f"refusing to overwrite {', '.join(existing)} (use --force)")
    methods = CALIB_METHODS if calib_method == "auto" else (calib_method,)
    return _Plan(src, out_dir, targets, None if calib is None else Path(calib), calib_size,
                 methods, opset, max_val)


def inference_model(keras_path: Path):
    """The trained model rebuilt in float32 with augmentation layers replaced by Identity.

    Random* preprocessing layers (flip, zoom, rotation...) are training-time only
    and break every ONNX route; a mixed-precision model is rebuilt in float32.
    """
    import keras

    from .models import register_custom_layers

    register_custom_layers()
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


def _to_fp16(proto, keep_fp32: list[str] | None = None):
    """FP16 weights and activations, float32 inputs and outputs; ``keep_fp32`` nodes stay.

    A model with the lung-field stage is cut into parts instead: the stage (float32:
    the converter's block list breaks on its boolean masks and casts, and the box
    must not move with the precision), the classifier (FP16), and the nodes of
    ``keep_fp32`` that only the ``ood`` output needs (float32), joined again.
    """
    from onnxconverter_common import float16

    from .heads import lung_boundary

    boundary = lung_boundary(proto)
    if boundary is None:
        return float16.convert_float_to_float16(proto, keep_io_types=True,
                                                node_block_list=keep_fp32 or None)
    import onnx
    from onnx import compose, utils

    outputs = [o.name for o in proto.graph.output]
    lung_out = [n for n in outputs if n.startswith("lung_")]
    keep = set(keep_fp32 or [])
    producer = {o: n.name for n in proto.graph.node for o in n.output}
    # the tensors the float32 tail reads from the classifier (the pooled features)
    tail_in = sorted({i for n in proto.graph.node if n.name in keep for i in n.input
                      if i in producer and producer[i] not in keep})
    if tail_in:  # a copy of each for the tail: an FP16 output no node inside reads
        import copy

        from onnx import helper
        proto = copy.deepcopy(proto)
        for node in proto.graph.node:
            if node.name in keep:
                node.input[:] = [i + ":float32" if i in tail_in else i for i in node.input]
        proto.graph.node.extend(helper.make_node("Identity", [t], [t + ":float32"],
                                                 name=t + ":float32") for t in tail_in)
        tail_in = [t + ":float32" for t in tail_in]
    tail_out = [n for n in outputs if n not in lung_out and producer.get(n) in keep]
    mid_out = [n for n in outputs if n not in lung_out and n not in tail_out]
    extractor = utils.Extractor(onnx.shape_inference.infer_shapes(proto))
    parts = [extractor.extract_model([proto.graph.input[0].name], [boundary] + lung_out),
             float16.convert_float_to_float16(
                 extractor.extract_model([boundary], mid_out + tail_in), keep_io_types=True)]
    links = [[(boundary, boundary)]]
    if tail_out:
        parts.append(extractor.extract_model(tail_in, tail_out))
        links.append([(t, t) for t in tail_in])
    # constants shared by the parts were copied into each: prefix all but the joins
    parts[1:] = [_prefixed(part, prefix) for part, prefix in zip(parts[1:], ("fp16/", "ood/"))]
    merged = parts[0]
    for part, io_map in zip(parts[1:], links):
        for g in (merged, part):  # intermediate shapes only; the merge checks the joins
            del g.graph.value_info[:]
        wanted = [o.name for o in merged.graph.output] + [o.name for o in part.graph.output]
        merged = compose.merge_models(merged, part, io_map=io_map,
                                      outputs=[n for n in wanted if n in outputs
                                               or (part is not parts[-1] and n in tail_in)])
    order = {n: i for i, n in enumerate(outputs)}
    kept = sorted((o for o in merged.graph.output if o.name in order),
                  key=lambda o: order[o.name])
    del merged.graph.output[:]
    merged.graph.output.extend(kept)
    merged.graph.name = proto.graph.name
    onnx.checker.check_model(merged)
    return merged


def _prefixed(model, prefix: str):
    """``model`` with ``prefix`` on every internal name; its inputs and outputs keep theirs."""
    from onnx import compose

    io = [v.name for v in model.graph.input] + [v.name for v in model.graph.output]
    out = compose.add_prefix(model, prefix)
    back = {prefix + n: n for n in io}
    for node in out.graph.node:
        node.input[:] = [back.get(i, i) for i in node.input]
        node.output[:] = [back.get(o, o) for o in node.output]
    for v in list(out.graph.input) + list(out.graph.output):
        v.name = back.get(v.name, v.name)
    return out


class _CalibReader:
    """onnxruntime CalibrationDataReader over image files, via the runtime preprocessing.

    With ``shifted``, image i goes through perturbation i mod len(PERTURBATIONS)
    of the robustness suite (clean, zooms, shift, rotations, gamma, blur, noise,
    JPEG, resampling), so the activation ranges cover the inputs the suite and
    other sites produce, not only clean training images.
    """

    # One image per batch: the histogram calibrators (Entropy, Percentile) of
    # onnxruntime 1.31 fail on a last batch of a different size.
    def __init__(self, paths: list[str], cfg: PreprocessConfig, input_name: str, batch: int = 1,
                 shifted: bool = True):
        self.paths, self.cfg, self.input_name, self.batch = paths, cfg, input_name, batch
        self.shifted = shifted
        self.rewind()

    def _load(self, i: int) -> np.ndarray:
        if not self.shifted:
            return _named(load_image, self.paths[i], self.cfg)
        from pneumo_edge.robustness import PERTURBATIONS, perturbed_input

        return _named(perturbed_input, self.paths[i], self.cfg,
                      PERTURBATIONS[i % len(PERTURBATIONS)], seed=i)

    def rewind(self):
        self._it = iter(range(0, len(self.paths), self.batch))

    def get_next(self):
        start = next(self._it, None)
        if start is None:
            return None
        x = np.stack([self._load(i) for i in range(start, min(start + self.batch,
                                                               len(self.paths)))])
        return {self.input_name: x}


def _prepare_for_int8(fp32_path: Path, out_path: Path) -> None:
    """onnxruntime's quantisation pre-processing (shape inference, graph clean-up), once."""
    from onnxruntime.quantization.shape_inference import quant_pre_process

    import onnx

    from .heads import lung_boundary

    # the lung stage's data-dependent slices defeat symbolic shape inference (which
    # then fails and leaves a temporary file in the working folder): ONNX's own only
    lung = lung_boundary(onnx.load(str(fp32_path), load_external_data=False)) is not None
    quant_pre_process(str(fp32_path), str(out_path), skip_symbolic_shape=lung)


def _to_int8(pre_path: Path, out_path: Path, calib_paths: list[str], cfg: PreprocessConfig,
             method: str, shifted: bool = True) -> None:
    """Static INT8 (QDQ, per-channel) of a pre-processed FP32 model, calibrated by ``method``."""
    import onnx
    from onnxruntime.quantization import (CalibrationMethod, QuantFormat, QuantType,
                                          quantize_static)

    methods = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
               "percentile": CalibrationMethod.Percentile}
    pre = onnx.load(str(pre_path), load_external_data=False)
    input_name = pre.graph.input[0].name
    from .heads import classifier_tail, head_nodes, lung_stage_nodes

    quantize_static(
        str(pre_path), str(out_path), _CalibReader(calib_paths, cfg, input_name, shifted=shifted),
        quant_format=QuantFormat.QDQ, per_channel=True, activation_type=QuantType.QUInt8,
        weight_type=QuantType.QInt8, calibrate_method=methods[method],
        nodes_to_exclude=head_nodes(pre, pre.graph.output[0].name)
        + classifier_tail(pre, pre.graph.output[0].name) + lung_stage_nodes(pre))


# ---------------------------------------------------------------- evaluation

def _ort_predictor(proto_bytes: bytes, batch: int = 32):
    """A function float32 (N, H, W, C) -> P(PNEUMONIA) (N,) on an in-memory ONNX model."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    sess = ort.InferenceSession(proto_bytes, sess_options=so, providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name

    def predict(images: np.ndarray) -> np.ndarray:
        out = [sess.run(None, {name: images[i:i + batch]})[0].reshape(len(images[i:i + batch]),
                                                                      -1)[:, 0]
               for i in range(0, len(images), batch)]
        return np.concatenate(out).astype(np.float64) if out else np.zeros(0)

    return predict


def _ort_probs(proto_bytes: bytes, images: np.ndarray, batch: int = 32) -> np.ndarray:
    return _ort_predictor(proto_bytes, batch)(images)


def _compare(p: np.ndarray, p_ref: np.ndarray, labels: np.ndarray, thr: float):
    diff = float(np.max(np.abs(p - p_ref)))
    agree = float(np.mean((p >= thr) == (p_ref >= thr)))
    metrics = binary_metrics(labels, p, thr).to_dict() if labels.size else None
    return diff, agree, metrics


OUTPUT_DESCRIPTIONS = {
    PROB_OUTPUT: "P(PNEUMONIA), float32 (N, 1); PNEUMONIA when >= threshold",
    CAM_OUTPUT: ("class activation logits at the last convolution stage, float32 (N, h, w): the "
            "output layer applied at each position; their mean is the logit of the probability"),
    OOD_OUTPUT: ("Mahalanobis distance of the pooled features from the training split's, float32 "
            "(N, 1); above ood.threshold the image is out of distribution"),
    LUNG_BOX_OUTPUT: ("the lung box the classifier saw, float32 (N, 4): (y0, x0, y1, x1) as "
                 "fractions of the input frame, margin included; (0, 0, 1, 1) when no lung "
                 "field was found"),
    LUNG_AREA_OUTPUT: ("share of the segmenter's pixels that are lung, float32 (N, 1); 0 when no "
                  "lung field was found"),
}


def _lung_meta(model, config: dict) -> dict:
    """The ``lung_field`` metadata block of a model with the lung-field stage, else {}.

    The segmenter's provenance (sources, commits, licences, held-out IoU) comes from
    the JSON beside the segmenter the run was trained with.
    """
    from pneumo_edge import lung

    from .models import DEFAULT_SEGMENTER, LUNG_LAYER

    if LUNG_LAYER not in {layer.name for layer in model.layers}:
        return {}
    layer = model.get_layer(LUNG_LAYER)
    provenance = Path(config.get("segmenter") or DEFAULT_SEGMENTER).with_suffix(".json")
    return {"lung_field": {
        "stage": "in the graph: segmenter -> lung box -> bilinear crop -> classifier",
        "outputs": {"box": "lung_box", "area": "lung_area"},
        "frame": int(model.inputs[0].shape[1]), "segmenter_input": int(model.inputs[0].shape[1]) // 2,
        "crop": layer.crop_size, "mask_threshold": layer.threshold,
        "min_fraction": layer.min_fraction, "margin": layer.margin,
        "flag": lung.NO_LUNG_FIELD,
        "plausible": {"min_box_area": lung.MIN_BOX_AREA, "centre_x": list(lung.CENTRE_X),
                      "centre_y": list(lung.CENTRE_Y)},
        "segmenter": (json.loads(provenance.read_text()) if provenance.is_file()
                      else {"parameters": int(layer.segmenter.count_params())}),
    }}


def _outputs_meta(proto) -> tuple[OutputSpec, ...]:
    out = []
    for o in proto.graph.output:
        dims = [d.dim_param or d.dim_value for d in o.type.tensor_type.shape.dim]
        out.append(OutputSpec(o.name, tuple("N" if not d or isinstance(d, str) else d
                                            for d in dims),
                              OUTPUT_DESCRIPTIONS.get(o.name, "")))
    return tuple(out)


def _add_heads(model, src: _Source, calib, cfg: PreprocessConfig, ood_size: int, rng, say):
    """The model with ``cam`` and ``ood`` outputs, and the OOD metadata (or the model
    unchanged and None when the architecture or the data do not allow it)."""
    from pneumo_edge.robustness import PERTURBATIONS, perturbed_input

    from .heads import feature_model, fit_ood, has_heads_support, with_heads

    from .heads import with_lung_outputs

    if not has_heads_support(model):
        say("no cam/ood outputs: the model does not end in 'gap' + one dense unit")
        return with_lung_outputs(model), None
    try:
        paths = _calibration_paths(src, calib, 10**9, rng)
    except ExportError:
        say("no cam/ood outputs: no training images to fit the OOD statistics")
        return with_lung_outputs(model), None
    paths = [paths[i] for i in rng.permutation(len(paths))]
    n_thr = min(500, len(paths) // 4)
    fit_paths, thr_paths = paths[n_thr:n_thr + ood_size], paths[:n_thr]
    if len(fit_paths) < 8 or n_thr < 2:
        say("no cam/ood outputs: too few training images for the OOD statistics")
        return with_lung_outputs(model), None
    say(f"fitting the OOD statistics on {len(fit_paths)} training images")

    def image(i: int, path: str, shifted: bool) -> np.ndarray:
        # every other fitting image goes through a robustness-suite perturbation, so a
        # wider framing or another exposure is not "out of distribution" by itself
        name = PERTURBATIONS[(i // 2) % len(PERTURBATIONS)] if shifted and i % 2 else "clean"
        return _named(perturbed_input, path, cfg, name, seed=i)

    feats = feature_model(model)

    def pooled(paths_, shifted):
        out = []
        for start in range(0, len(paths_), 64):
            x = np.stack([image(start + j, p, shifted)
                          for j, p in enumerate(paths_[start:start + 64])])
            out.append(np.asarray(feats.predict(x, verbose=0)[0], np.float64))
        return np.concatenate(out)

    fit = fit_ood(pooled(fit_paths, True))
    held = fit.distance(pooled(thr_paths, False))
    threshold = float(np.percentile(held, 99))
    meta = {"kind": "mahalanobis", "output": "ood", "threshold": round(threshold, 4),
            "threshold_rule": f"99th percentile of {len(thr_paths)} held-out training-split "
                              "images (clean)",
            "fitted_on": f"{len(fit_paths)} training-split images, every other one perturbed "
                         "by a robustness-suite row",
            "covariance": "Ledoit-Wolf shrinkage", "shrinkage": round(fit.shrinkage, 4),
            "feature_dim": int(fit.mean.size)}
    return with_heads(model, fit), meta


def _check_heads(results: list[PrecisionResult], protos: dict, keras_out, val_x: np.ndarray,
                 ood_meta: dict) -> None:
    """FP32 ``cam`` within 1e-3 of the Keras map; FP16/INT8 maps correlated with FP32."""
    import onnxruntime as ort

    outs = {}
    for r in results:
        so = ort.SessionOptions()
        so.log_severity_level = 3
        sess = ort.InferenceSession(protos[r.precision].SerializeToString(), sess_options=so,
                                    providers=["CPUExecutionProvider"])
        got = [sess.run(None, {sess.get_inputs()[0].name: val_x[i:i + 32]})
               for i in range(0, len(val_x), 32)]
        outs[r.precision] = [np.concatenate([g[k] for g in got]) for k in range(3)]
    cam_keras = np.asarray(keras_out[1], np.float64)
    cam_diff = float(np.max(np.abs(outs["fp32"][1] - cam_keras)))
    if cam_diff > 1e-3:
        raise ExportError(f"cam parity failed: max |cam - cam_keras| = {cam_diff:.2e} > 1e-3; "
                          "nothing written")
    ref_cam, ref_ood = outs["fp32"][1], outs["fp32"][2].reshape(-1)
    thr = ood_meta["threshold"]
    for r in results:
        cam, ood = outs[r.precision][1], outs[r.precision][2].reshape(-1)
        corr = [np.corrcoef(a.ravel(), b.ravel())[0, 1] if a.size > 1 and np.std(b) > 0 else 1.0
                for a, b in zip(cam, ref_cam)]
        r.extra["heads_parity"] = {
            "cam_max_abs_diff_vs_keras": float(np.max(np.abs(cam - cam_keras))),
            "cam_mean_correlation_vs_fp32": float(np.nanmean(corr)),
            "cam_min_correlation_vs_fp32": float(np.nanmin(corr)),
            "ood_max_rel_diff_vs_fp32": float(np.max(np.abs(ood - ref_ood) / np.maximum(ref_ood,
                                                                                      1e-6))),
        }
        r.extra["ood"] = dict(ood_meta, val_flag_rate=float(np.mean(ood > thr)))


def _metadata(src: _Source, cfg: PreprocessConfig, precision: str, result: PrecisionResult,
              keras_metrics: dict | None, opset: int, arch: str, parity_images: str,
              n_parity: int, outputs: tuple[OutputSpec, ...],
              lung: dict | None = None) -> ModelMetadata:
    run = src.run
    extra = dict(result.extra)
    ood = extra.pop("ood", None)
    provenance = {
        "color": "grayscale", "layout": "NHWC",
        "output": "P(PNEUMONIA), shape (N, 1)",
        "arch": arch,
        "trained_on": src.trained_on,
        "val_metrics": result.val_metrics,
        "val_metrics_keras": keras_metrics,
        "parity": {"reference": "keras fp32", "images": parity_images, "n_images": n_parity,
                   "max_abs_diff": result.max_abs_diff,
                   "label_agreement": result.label_agreement},
        "training": run.recipe if run else {},
        "calibration": run.val.calibration if run else None,
        # the Platt fit folded into the output layer; kept in every precision, since
        # an INT8 file's "calibration" is its quantisation record
        "probability_calibration": run.val.calibration if run else None,
        **({"ensemble": run.config["ensemble"]} if run and run.config.get("ensemble") else {}),
        "opset": opset,
        "versions": {"export": environment(), "training": run.config.get("versions") if run
                     else None},
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "pneumo_edge_version": __version__,
        "disclaimer": "Research and engineering tool, not a medical device.",
    } | extra | (lung or {})  # an INT8 file's "calibration" is its quantisation record
    return ModelMetadata(schema=SCHEMA_VERSION, input_name=INPUT_NAME, preprocess=cfg,
                         threshold=src.threshold, threshold_rule=src.threshold_rule,
                         precision=precision, outputs=outputs, ood=ood, provenance=provenance)


def _finalise(proto, meta: ModelMetadata) -> bytes:
    import onnx
    from onnx import helper

    try:  # what export writes must parse as the runtime reads it
        checked = validate(finite_json(meta.to_dict()))
    except MetadataError as exc:
        raise ExportError(f"refusing to write metadata that breaks the contract: {exc}") from None
    del proto.metadata_props[:]
    helper.set_model_props(proto, {METADATA_KEY: json.dumps(checked.to_dict(), allow_nan=False)})
    proto.producer_name = "pneumo-edge"
    proto.producer_version = __version__
    onnx.checker.check_model(proto)
    return proto.SerializeToString()


def export_run(source: str | os.PathLike, out_dir: str | os.PathLike = "exported", *,
               fp16: bool = False, int8: bool = False, name: str | None = None,
               opset: int = DEFAULT_OPSET,
               calib: str | os.PathLike | None = None, calib_size: int = 300,
               calib_method: str = "auto", force: bool = False, max_val: int | None = None,
               set_default: bool = False, calib_shift: bool = True, robustness: bool = True,
               heads: bool = True, ood_size: int = 1500, progress=None) -> ExportResult:
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
        calib_shift: calibrate INT8 on perturbed copies of the calibration images
            (the robustness suite's rows in turn), not only clean ones.
        robustness: run the robustness suite on the validation images for every
            file; its rows and worst values go into the metadata, and INT8 is the
            default only if it holds up against FP32 in every row.
        heads: add the ``cam`` and ``ood`` outputs (see :mod:`training.heads`); the
            OOD statistics are fitted on up to ``ood_size`` training-split images
            and the threshold set on 500 others.
        progress: optional callable(str) for status lines.

    Steps: validate (every argument, the source and ``out_dir``, before TensorFlow
    loads), convert, verify parity, quantise, verify the heads and robustness, write.

    Raises:
        ExportError: refused (bad argument or source, files exist) or a check failed;
            nothing was written.
    """
    say = progress or (lambda msg: None)
    t0 = time.perf_counter()
    plan = validate_export(source, out_dir, fp16=fp16, int8=int8, name=name, opset=opset,
                           calib=calib, calib_size=calib_size, calib_method=calib_method,
                           force=force, max_val=max_val)
    src = plan.src
    model, dropped = inference_model(src.keras_path)
    cfg = src.run.preprocess if src.run else keras_preprocess(model)
    rng = np.random.default_rng(0)
    val = _validation_set(plan, cfg, rng, say)
    ood_meta = None
    if heads:
        model, ood_meta = _add_heads(model, src, plan.calib, cfg, ood_size, rng, say)
    ref = _Reference.of(model, val, src.threshold)

    with tempfile.TemporaryDirectory(prefix="pneumo-export-") as tmp:
        protos, pre_path = _convert(model, cfg, plan, Path(tmp), say)
        results = _verify_parity(plan, protos, val, ref, dropped)
        if "int8" in plan.targets:
            protos["int8"], int8_result = _quantise(plan, pre_path, cfg, val, ref, rng,
                                                    calib_shift, say)
            results.append(int8_result)
        if ood_meta is not None:
            _check_heads(results, protos, ref.outputs, val.x, ood_meta)
        if robustness and val.paths:
            _robustness(results, protos, cfg, val.paths, val.labels, src.threshold, say,
                        val.views)
        lung = _lung_meta(model, src.run.config if src.run else {})
        payloads = {r.precision: _finalise(protos[r.precision], _metadata(
            src, cfg, r.precision, r, ref.metrics, plan.opset, src.arch, val.kind, len(val.x),
            _outputs_meta(protos[r.precision]), lung)) for r in results}
    for r in results:
        r.size_bytes = len(payloads[r.precision])
    _write(plan, results, payloads, val, set_default)
    return ExportResult(results, src.threshold, src.threshold_rule, int(val.labels.size),
                        time.perf_counter() - t0, plan.out_dir)


# ---------------------------------------------------------------- steps 2-5

@dataclass
class _ValidationSet:
    """The validation images parity and metrics are measured on (random images when the
    source has no split: parity is still checked)."""

    paths: list[str]
    patients: list[str]
    labels: np.ndarray
    x: np.ndarray
    parts: list[str] = field(default_factory=list)

    @property
    def views(self) -> dict[str, np.ndarray]:
        """Name -> mask over the images, for a run with validation views (``--split block``)."""
        from pneumo_edge.robustness import view_masks

        return view_masks(self.parts) if self.parts else {}

    @property
    def kind(self) -> str:
        return "validation" if self.paths else "random"


def _validation_set(plan: _Plan, cfg: PreprocessConfig, rng, say) -> _ValidationSet:
    samples = plan.src.val_samples
    idx = np.arange(len(samples))
    if plan.max_val and len(idx) > plan.max_val:
        idx = np.sort(rng.permutation(len(idx))[:plan.max_val])
    chosen = [samples[i] for i in idx]
    paths = [s.path for s in chosen]
    say(f"validation images: {len(paths)}")
    if paths:
        x = np.stack([load_image(p, cfg) for p in paths])
    else:
        x = rng.uniform(0, 255, (16, cfg.height, cfg.width, cfg.channels)).astype(np.float32)
    return _ValidationSet(paths, [s.patient for s in chosen],
                          np.array([s.label for s in chosen]), x, [s.part for s in chosen])


@dataclass
class _Reference:
    """The Keras model's outputs on the validation set: what every file is compared to."""

    outputs: list
    probs: np.ndarray
    metrics: dict | None
    labels: np.ndarray
    threshold: float

    @classmethod
    def of(cls, model, val: _ValidationSet, threshold: float) -> "_Reference":
        out = model.predict(val.x, batch_size=32, verbose=0)
        out = list(out) if isinstance(out, (list, tuple)) else [out]
        probs = np.asarray(out[0]).reshape(-1).astype(np.float64)
        metrics = (binary_metrics(val.labels, probs, threshold).to_dict()
                   if val.labels.size else None)
        return cls(out, probs, metrics, val.labels, threshold)

    def compare(self, p: np.ndarray):
        return _compare(p, self.probs, self.labels, self.threshold)


def _convert(model, cfg: PreprocessConfig, plan: _Plan, tmp: Path, say):
    """Step 2: the FP32 graph (and FP16); returns the protos and the FP32 model prepared
    for quantisation (None without INT8)."""
    import onnx

    say("converting to ONNX (tf2onnx)")
    proto32 = _to_onnx(model, cfg, plan.opset)
    onnx.checker.check_model(proto32)
    fp32_path = tmp / "fp32.onnx"
    onnx.save(proto32, str(fp32_path))
    protos = {"fp32": proto32}
    if "fp16" in plan.targets:
        from .heads import lung_stage_nodes, ood_only_nodes
        say("converting to FP16")
        protos["fp16"] = _to_fp16(onnx.load(str(fp32_path)),
                                   ood_only_nodes(proto32) + lung_stage_nodes(proto32))
    pre_path = None
    if "int8" in plan.targets:
        pre_path = tmp / "fp32_pre.onnx"
        _prepare_for_int8(fp32_path, pre_path)
    return protos, pre_path


def _verify_parity(plan: _Plan, protos: dict, val: _ValidationSet, ref: _Reference,
                   dropped: list[str]) -> list[PrecisionResult]:
    """Step 3: FP32 and FP16 against Keras, within :data:`PARITY_TOLERANCE`."""
    results = []
    for precision, proto in protos.items():
        diff, agree, metrics = ref.compare(_ort_probs(proto.SerializeToString(), val.x))
        tol = PARITY_TOLERANCE[precision]
        if diff > tol:
            raise ExportError(f"{precision} parity failed: max |p - p_keras| = {diff:.2e} "
                              f"> {tol:g} on {len(val.x)} {val.kind} images; nothing written")
        results.append(PrecisionResult(precision, plan.targets[precision], 0, diff, agree,
                                       metrics, {"stripped_layers": dropped} if dropped else {}))
    return results


def _quantise(plan: _Plan, pre_path: Path, cfg: PreprocessConfig, val: _ValidationSet,
              ref: _Reference, rng, calib_shift: bool, say):
    """Step 4: static INT8 by every calibration method asked for; the best validation
    AUC (then label agreement with Keras) is kept."""
    import onnx

    calib_paths = _calibration_paths(plan.src, plan.calib, plan.calib_size, rng)
    say(f"INT8 calibration on {len(calib_paths)} images")
    tried = {}
    best = None
    for method in plan.calib_methods:
        qpath = pre_path.with_name(f"int8_{method}.onnx")
        _to_int8(pre_path, qpath, calib_paths, cfg, method, shifted=calib_shift)
        qproto = onnx.load(str(qpath))
        diff, agree, metrics = ref.compare(_ort_probs(qproto.SerializeToString(), val.x))
        auc = metrics["auc"] if metrics and metrics["auc"] is not None else -1.0
        tried[method] = {"val_auc": None if auc < 0 else auc, "max_abs_diff": diff,
                         "label_agreement": agree}
        say(f"  {method}: val AUC {'n/a' if auc < 0 else f'{auc:.4f}'}, "
            f"label agreement with Keras {agree:.4f}")
        key = (auc, agree or 0.0)
        if best is None or key > best[0]:
            best = (key, method, qproto, diff, agree, metrics)
    _, method, qproto, diff, agree, metrics = best
    return qproto, PrecisionResult("int8", plan.targets["int8"], 0, diff, agree, metrics, {
        "calibration": {"method": method, "n_images": len(calib_paths),
                        "source": str(plan.calib) if plan.calib else "training split of the run",
                        "shifted": calib_shift, "methods_tried": tried, "format": "QDQ",
                        "per_channel": True, "activations": "uint8", "weights": "int8"}})


def _write(plan: _Plan, results: list[PrecisionResult], payloads: dict[str, bytes],
           val: _ValidationSet, set_default: bool) -> None:
    """Step 5: the model files (and default.txt, val_split.csv), each renamed into place."""
    for r in results:
        atomic_write(r.path, payloads[r.precision])
    if set_default:
        atomic_write(plan.out_dir / "default.txt", choose_default(results).path.name + "\n")
    if val.paths:
        write_val_split(Path(plan.src.run.config.get("data", ".")), val.paths, val.patients,
                        val.labels, plan.out_dir / "val_split.csv", val.parts)


#: What each export option means (``pneumo-edge export --help``; defaults and choices
#: are appended from :func:`export_run` itself).
HELP = {
    "fp16": "Also write an FP16 model (half size; for GPU and Arm).",
    "int8": "Also write a static INT8 (QDQ) model (fast on CPUs).",
    "out_dir": "Output folder.",
    "name": "File stem (default: the architecture); files are NAME_fp32.onnx etc.",
    "opset": "ONNX opset",
    "calib": "Images for INT8 calibration (default: the run's training split).",
    "calib_size": "How many calibration images (random, seeded).",
    "calib_method": "Calibration method; auto tries each and keeps the best validation AUC",
    "max_val": "Evaluate on at most N validation images.",
    "force": "Overwrite existing files.",
    "heads": "Add the cam (heatmap) and ood outputs to the graph.",
    "robustness": "Run the robustness suite on every file (metadata; the INT8 default rule "
                  "needs it).",
}


def option_help() -> dict[str, str]:
    """Help text per ``export`` option (the CLI's parameter names), with its default."""
    import inspect

    from pneumo_edge.options import described

    defaults = {k: p.default for k, p in inspect.signature(export_run).parameters.items()}
    out = described(HELP, defaults, {"calib_method": CALIB_METHODS + ("auto",)},
                    {"opset": f"{OPSETS[0]}..{OPSETS[1]}"})
    out["out"] = out.pop("out_dir")
    out["set_default"] = (
        "Make this export predict's default (OUT/default.txt): INT8 if it holds up against "
        f"FP32 (validation AUC within {INT8_MAX_AUC_LOSS} and, where the robustness suite "
        f"ran, every row's AUC within {INT8_MAX_AUC_LOSS} and label agreement at least "
        f"{INT8_MIN_AGREEMENT:.0%}), else FP32.")
    return out


INT8_MAX_AUC_LOSS = 0.005
INT8_MIN_AGREEMENT = 0.99


def _robustness(results: list[PrecisionResult], protos: dict, cfg: PreprocessConfig,
                val_paths: list[str], val_labels: np.ndarray, threshold: float, say,
                views: dict[str, np.ndarray] | None = None) -> None:
    """The robustness suite on every precision; rows, worst values and (for FP16/INT8) the
    label agreement with FP32 per row go into each file's metadata, for all validation
    images and, under ``views``, for each validation view (the same scores, subset)."""
    from pneumo_edge.robustness import run_suite

    suites = {}
    for r in results:
        say(f"robustness suite: {r.precision}")
        suites[r.precision] = run_suite(_ort_predictor(protos[r.precision].SerializeToString()),
                                        cfg, val_paths, val_labels, threshold,
                                        model_name=r.precision)
    def record(suite, ref, fp32: bool) -> dict:
        entry = {"images": "validation", "n_images": int(len(suite.labels)),
                 "rows": [row.to_dict() for row in suite.rows], "worst": suite.worst()}
        if not fp32:
            agree = suite.agreement_with(ref)
            entry["agreement_with_fp32"] = agree
            entry["max_auc_loss_vs_fp32"] = max(
                (ref.row(n).auc or 0.0) - (suite.row(n).auc or 0.0) for n in agree)
            entry["min_agreement_with_fp32"] = min(agree.values())
        return entry

    ref = suites["fp32"]
    for r in results:
        suite, fp32 = suites[r.precision], r.precision == "fp32"
        entry = record(suite, ref, fp32)
        if views:
            entry["views"] = {name: record(suite.subset(mask), ref.subset(mask), fp32)
                              for name, mask in views.items()}
        r.extra["robustness"] = entry


def write_val_split(data: Path, paths: list[str], patients: list[str], labels: np.ndarray,
                    out: Path, parts: list[str] | None = None) -> None:
    """The validation files behind the metadata's numbers, relative to the data folder,
    with each file's validation view (``part``: block, patient or both) when the run has
    views.

    With the data at hand, ``pneumo-edge predict`` over these files reproduces
    ``val_metrics`` (see tests/test_release.py).
    """
    import csv
    import io

    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    with_parts = bool(parts) and any(parts)
    w.writerow(["path", "patient", "label"] + (["part"] if with_parts else []))
    for i, (p, patient, label) in enumerate(zip(paths, patients, labels)):
        w.writerow([Path(os.path.relpath(p, data)).as_posix(), patient, CLASS_NAMES[int(label)]]
                   + ([parts[i]] if with_parts else []))
    atomic_write(out, buf.getvalue())


def choose_default(results: list[PrecisionResult]) -> PrecisionResult:
    """INT8 when it holds up against FP32 (it is ~2.5x faster on CPUs), else FP32.

    Holding up: its validation AUC is within 0.005 of FP32's, and, where the
    robustness suite ran, in every row its AUC is within 0.005 of FP32's and its
    labels agree with FP32's on at least 99 % of the images.
    """
    by = {r.precision: r for r in results}
    fp32, int8 = by["fp32"], by.get("int8")
    if int8 is None or not fp32.val_metrics or not int8.val_metrics:
        return fp32
    if int8.val_metrics["auc"] < fp32.val_metrics["auc"] - INT8_MAX_AUC_LOSS:
        return fp32
    rob = int8.extra.get("robustness")
    if rob and (rob["max_auc_loss_vs_fp32"] > INT8_MAX_AUC_LOSS
                or rob["min_agreement_with_fp32"] < INT8_MIN_AGREEMENT):
        return fp32
    return int8


def _named(load, path, *args, **kwargs) -> np.ndarray:
    """``load(path, ...)``; an undecodable file ends the export naming it."""
    from pneumo_edge.images import ImageDecodeError

    try:
        return load(path, *args, **kwargs)
    except ImageDecodeError as exc:
        raise ExportError(f"{path}: {exc} (remove it from the calibration images)") from None


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
