"""``train --init-from MODEL.onnx``: start training from an exported FP32 file.

No converter turns an ONNX file back into a trainable Keras model
(onnx/tensorflow-onnx#1702, onnx2tf#801), and tf2onnx folds every BatchNorm
into the convolution before it. So the Keras ResNet of the file's input size is
built by our own builder and its weights are read from the graph by structure:

- Convolutions are matched by where they sit in the network, not by name: each
  tensor gets a structural signature (the op that made it and the signatures of
  its inputs; pass-through ops such as ReLU, BatchNorm, Transpose, Pad, the
  input scaling are skipped), and a Conv2D layer takes the ONNX Conv with the
  same signature, kernel shape and stride.
- Kernels go OIHW -> HWIO. The folded BatchNorm is re-split exactly: gamma 1,
  beta the folded bias, moving mean 0, moving variance 1 - epsilon, so that
  gamma * (x - mean) / sqrt(var + eps) + beta = x + bias; those BatchNorm
  layers are frozen (their statistics would otherwise drift from the folded
  values on a few hundred images).
- The dense unit comes from the classifier tail (:func:`pneumo_edge.calibrate.find_tail`).

Before any training step the Keras model is checked against onnxruntime on
sample inputs (max |dp| <= 1e-4). Fine-tuning then adds ``--freeze-until
STAGE``, a lower learning rate, and a decoupled pull of every trainable weight
towards its initial value (L2-SP, Li et al. 2018) in place of weight decay.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np

from .models import LUNG_MODELS

PARITY_TOLERANCE = 1e-4
#: the builders whose graphs the structural matcher knows; in the lung-field models the
#: lung stage (segmenter, box, crop) is not read from the file: the model is built with
#: its segmenter (``--segmenter``, default the shipped one) and the parity check proves
#: it is the file's
PLAIN_RESNETS = ("resnet18", "resnet_tiny")
LUNG_RESNETS = LUNG_MODELS
FREEZE_STAGES = ("none", "stem", "stage1", "stage2", "stage3", "stage4")
#: what --init-from changes when the option is not given (the rest is the usual recipe)
DEFAULTS = {"lr": 1e-4, "weight_decay": 0.0, "warmup_epochs": 0, "freeze_until": "stage2",
            "pull": 1.0, "precision": "fp32"}

_PASS_KERAS = ("BatchNormalization", "ReLU", "Activation", "Rescaling", "Dropout", "Identity",
               "InputLayer", "LungCrop")
_SKELETON_ONNX = {"Conv": "conv", "Add": "add", "Sum": "add", "MaxPool": "maxpool",
                  "GlobalAveragePool": "gap", "MatMul": "dense", "Gemm": "dense"}
_SKELETON_KERAS = {"Conv2D": "conv", "Add": "add", "MaxPooling2D": "maxpool",
                   "GlobalAveragePooling2D": "gap", "Dense": "dense"}


class InitFromError(ValueError):
    """The file cannot seed training (one-line message)."""


def _h(*parts) -> str:
    return hashlib.sha256(repr(parts).encode()).hexdigest()[:16]


def file_config(path: str | Path) -> dict:
    """arch, input size and channels of an exported file, from its metadata.

    Raises:
        InitFromError: not a readable FP32 file with ``pneumo_edge`` metadata.
    """
    import onnx

    from pneumo_edge.metadata import MetadataError, parse

    path = Path(path)
    if not path.is_file():
        raise InitFromError(f"--init-from {path}: model file not found")
    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # protobuf DecodeError and friends
        raise InitFromError(f"--init-from {path}: not a loadable ONNX model "
                            f"({(str(exc).splitlines() or [type(exc).__name__])[0]})") from None
    try:
        meta = parse({p.key: p.value for p in proto.metadata_props})
    except MetadataError as exc:
        raise InitFromError(f"--init-from {path}: {exc}") from None
    if meta.precision != "fp32":
        raise InitFromError(f"--init-from {path}: a {meta.precision} file; training starts "
                            "from the FP32 file's weights (quantised or half weights would "
                            "not reproduce it)")
    arch = str(meta.provenance.get("arch", ""))
    if arch not in PLAIN_RESNETS + LUNG_RESNETS:
        raise InitFromError(f"--init-from {path}: arch {arch!r}; training starts from "
                            f"{', '.join(PLAIN_RESNETS + LUNG_RESNETS)} files only")
    cfg = meta.preprocess
    if cfg.height != cfg.width:
        raise InitFromError(f"--init-from {path}: input {cfg.height}x{cfg.width} is not square")
    out = {"arch": arch, "img_size": cfg.height,
           "channels": cfg.channels, "value_range": cfg.value_range}
    if arch in LUNG_RESNETS:
        crop = (meta.provenance.get("lung_field") or {}).get("crop")
        if not isinstance(crop, int) or crop < 8:
            raise InitFromError(f"--init-from {path}: a lung-field model without its crop "
                                "size in the metadata (lung_field.crop)")
        out["crop_size"] = crop
    return out


# ---------------------------------------------------------------- ONNX side

def _onnx_convs(proto) -> tuple[dict, dict]:
    """{signature: (W OIHW, b)} of every Conv, and the onnx initializers by name."""
    from onnx import numpy_helper

    from .heads import lung_stage_nodes

    inits = {i.name: numpy_helper.to_array(i) for i in proto.graph.initializer}
    producer = {o: n for n in proto.graph.node for o in n.output}
    # the lung-field stage counts as the input: its segmenter is not matched (see
    # LUNG_RESNETS), and Keras's LungCrop passes the frame through
    stage = set(lung_stage_nodes(proto))
    memo: dict[str, str] = {}
    convs: dict[str, tuple] = {}

    def sig(tensor: str) -> str:
        if tensor in memo:
            return memo[tensor]
        node = producer.get(tensor)
        if node is None or node.name in stage:
            memo[tensor] = "input"
            return "input"
        data = [i for i in node.input if i and i not in inits and not _constant(i, producer)]
        kind = _SKELETON_ONNX.get(node.op_type)
        if kind is None or (kind == "add" and len(data) < 2):
            # pass-through: ReLU, Transpose, Pad, Mul/Add by a constant, Squeeze...
            out = sig(data[0]) if data else "const"
        elif kind == "add":
            out = _h("add", tuple(sorted(sig(i) for i in data)))
        elif kind == "conv":
            w = inits.get(node.input[1])
            if w is None:
                raise InitFromError("a convolution's weights are not constants (a quantised "
                                    "file?)")
            strides = tuple(_ints(node, "strides") or (1, 1))
            out = _h("conv", sig(data[0]), tuple(w.shape), strides)
            b = inits[node.input[2]] if len(node.input) > 2 and node.input[2] else \
                np.zeros(w.shape[0], np.float32)
            if out in convs:
                raise InitFromError("two convolutions share a place in the network; cannot "
                                    "match weights by structure")
            convs[out] = (w, b)
        else:
            out = _h(kind, sig(data[0]))
        memo[tensor] = out
        return out

    for o in proto.graph.output:
        sig(o.name)
    return convs, inits


def _constant(name: str, producer: dict) -> bool:
    node = producer.get(name)
    return node is not None and node.op_type == "Constant"


def _ints(node, name: str):
    for a in node.attribute:
        if a.name == name:
            return list(a.ints)
    return None


# ---------------------------------------------------------------- Keras side

def _keras_signatures(model) -> dict[str, object]:
    """{signature: Conv2D layer}, computed the same way on the Keras graph."""
    memo: dict[str, str] = {}
    convs: dict[str, object] = {}

    def inbound(layer):
        node = layer._inbound_nodes[0]
        return [t._keras_history[0] for t in node.input_tensors]

    def sig(layer) -> str:
        if layer.name in memo:
            return memo[layer.name]
        cls = type(layer).__name__
        parents = inbound(layer) if cls != "InputLayer" else []
        kind = _SKELETON_KERAS.get(cls)
        if cls == "InputLayer":
            out = "input"
        elif kind is None:
            if cls not in _PASS_KERAS:
                raise InitFromError(f"layer {layer.name} ({cls}) has no ONNX counterpart rule")
            out = sig(parents[0])
        elif kind == "add":
            out = _h("add", tuple(sorted(sig(p) for p in parents)))
        elif kind == "conv":
            k = layer.kernel.shape  # HWIO
            out = _h("conv", sig(parents[0]), (int(k[3]), int(k[2]), int(k[0]), int(k[1])),
                     tuple(int(s) for s in layer.strides))
            convs[out] = layer
        else:
            out = _h(kind, sig(parents[0]))
        memo[layer.name] = out
        return out

    for t in model.outputs:
        sig(t._keras_history[0])
    return convs


def _next_bn(model, conv):
    """The BatchNormalization layer that reads ``conv``'s output (our builders put one
    after every convolution)."""
    for layer in model.layers:
        if type(layer).__name__ != "BatchNormalization":
            continue
        node = layer._inbound_nodes[0]
        if node.input_tensors[0]._keras_history[0] is conv:
            return layer
    return None


def load_onnx_weights(model, path: str | Path) -> dict:
    """Copy an FP32 file's weights into ``model`` (one of our builders' ResNets).

    Returns a summary (layers matched, BatchNorm layers re-split).

    Raises:
        InitFromError: a convolution or the dense unit has no counterpart.
    """
    import onnx

    from pneumo_edge.calibrate import CalibrateError, find_tail

    proto = onnx.load(str(path))
    onnx_convs, inits = _onnx_convs(proto)
    keras_convs = _keras_signatures(model)
    missing = [layer.name for s, layer in keras_convs.items() if s not in onnx_convs]
    if missing or len(onnx_convs) != len(keras_convs):
        raise InitFromError(f"--init-from {path}: the file's {len(onnx_convs)} convolutions do "
                            f"not match the {model.name} of its size ({len(keras_convs)}; "
                            f"unmatched: {', '.join(missing[:3]) or 'none'})")
    resplit = 0
    for s, conv in keras_convs.items():
        w, b = onnx_convs[s]
        conv.kernel.assign(np.transpose(w, (2, 3, 1, 0)).astype(np.float32))
        bn = _next_bn(model, conv)
        if bn is None:
            if conv.use_bias:
                conv.bias.assign(b.astype(np.float32))
                continue
            raise InitFromError(f"--init-from {path}: {conv.name} has no BatchNorm and no "
                                "bias to hold the folded bias")
        eps = float(bn.epsilon)
        ones = np.ones_like(b, np.float32)
        # gamma * (x - 0) / sqrt((1 - eps) + eps) + beta = x + b, exactly
        bn.set_weights([ones, b.astype(np.float32), np.zeros_like(ones), ones - eps])
        bn.trainable = False
        resplit += 1
    try:
        tail = find_tail(proto, str(path))
    except CalibrateError as exc:
        raise InitFromError(str(exc)) from None
    dense = next(layer for layer in model.layers if type(layer).__name__ == "Dense")
    w = inits[tail.weight].reshape(-1, 1) if not tail.trans_b else inits[tail.weight].T
    dense.set_weights([w.astype(np.float32), inits[tail.bias].reshape(1).astype(np.float32)])
    return {"convolutions": len(keras_convs), "batchnorm_resplit": resplit,
            "dense": tail.weight}


def onnx_probabilities(path: str | Path, x: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    sess = ort.InferenceSession(str(path), sess_options=so, providers=["CPUExecutionProvider"])
    out = sess.run(None, {sess.get_inputs()[0].name: x.astype(np.float32)})[0]
    return np.asarray(out, np.float64).reshape(len(x), -1)[:, 0]


def check_parity(model, path: str | Path, x: np.ndarray) -> float:
    """max |p_keras - p_onnxruntime| on ``x``.

    Raises:
        InitFromError: above :data:`PARITY_TOLERANCE`.
    """
    p_keras = np.asarray(model(x, training=False), np.float64).reshape(-1)
    diff = float(np.max(np.abs(p_keras - onnx_probabilities(path, x))))
    if not diff <= PARITY_TOLERANCE:
        raise InitFromError(f"--init-from {path}: the rebuilt Keras model differs from "
                            f"onnxruntime by max |dp| = {diff:.2e} > {PARITY_TOLERANCE:g} on "
                            f"{len(x)} images; not training from it")
    return diff


def freeze(model, until: str) -> list[str]:
    """Make the stem and the stages up to ``until`` not trainable; returns their names."""
    if until not in FREEZE_STAGES:
        raise InitFromError(f"--freeze-until must be one of {', '.join(FREEZE_STAGES)}, "
                            f"got {until!r}")
    if until == "none":
        return []
    upto = FREEZE_STAGES.index(until)
    prefixes = FREEZE_STAGES[1:upto + 1]
    frozen = []
    for layer in model.layers:
        if layer.weights and layer.name.split("_")[0] in prefixes:
            layer.trainable = False
            frozen.append(layer.name)
    return frozen


def pull_callback(model, strength: float):
    """After each step, w <- w - lr * strength * (w - w_init) for every trainable weight
    (the decoupled form of an L2 penalty towards the initial weights)."""
    import keras
    import tensorflow as tf

    variables = [getattr(v, "value", v) for v in model.trainable_weights]
    initial = [tf.constant(v.numpy()) for v in variables]

    class Pull(keras.callbacks.Callback):
        @tf.function
        def _step(self, rate):
            for v, v0 in zip(variables, initial):
                v.assign_sub(tf.cast(rate, v.dtype) * (v - tf.cast(v0, v.dtype)))

        def on_train_batch_end(self, batch, logs=None):
            lr = float(keras.ops.convert_to_numpy(self.model.optimizer.learning_rate))
            self._step(tf.constant(lr * strength, tf.float32))

    return Pull()


def prepare(model, path: str | Path, x_check: np.ndarray, freeze_until: str) -> dict:
    """Load the file into ``model``, check parity, freeze: the record for config.json."""
    loaded = load_onnx_weights(model, path)
    diff = check_parity(model, path, x_check)
    frozen = freeze(model, freeze_until)
    from pneumo_edge.runtime import file_sha256

    return {"file": str(path), "sha256": file_sha256(path), "parity_max_abs_diff": diff,
            "parity_images": int(len(x_check)), **loaded, "frozen_layers": len(frozen),
            "freeze_until": freeze_until}


def record(run_dir: Path, info: dict) -> None:
    (run_dir / "init_from.json").write_text(json.dumps(info, indent=2) + "\n")
