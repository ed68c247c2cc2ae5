"""Helpers shared by the tests: tiny ONNX models with metadata, grey JPEGs, data paths."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np

from pneumo_edge.metadata import ModelMetadata, PreprocessConfig

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
SHARED_TRAIN = SHARED / "chest_xray" / "train"
SHARED_ORIGINALS = SHARED / "originals"


def tiny_metadata(**overrides) -> dict:
    """The metadata of the tiny test models, written by the contract's own type."""
    meta = ModelMetadata(
        schema=1, input_name="image", preprocess=PreprocessConfig(16, 16, 3), threshold=0.5,
        threshold_rule="fixed_for_tests", precision="fp32",
        provenance={"arch": "mean_brightness", "trained_on": "nothing (test model)",
                    "val_metrics": {}, "created": "2026-01-01T00:00:00+00:00",
                    "pneumo_edge_version": "test"}).to_dict()
    meta.update(overrides)
    return meta


def make_tiny_onnx(path: Path, meta: dict | None = None, *, size: int = 16, channels: int = 3,
                   slope: float = 10.0, with_metadata: bool = True, heads: bool = False,
                   ood_threshold: float = 5.0, prob_scale: float = 1.0) -> Path:
    """An NHWC model: P(PNEUMONIA) = sigmoid(slope * (mean pixel / 255 - 0.5)).

    Brighter images score higher, so tests can build images with known outputs.
    With ``heads``: ``cam`` (N, 2, 2) is the same logit per image quadrant (its
    mean is the image's logit) and ``ood`` (N, 1) is |mean pixel - 128| / 10,
    with ``ood_threshold`` in the metadata. ``prob_scale`` multiplies the
    probability (a broken model for tests when it is not 1).
    """
    import onnx
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("image", TensorProto.FLOAT, ["N", size, size, channels])
    y = helper.make_tensor_value_info("pneumonia_prob", TensorProto.FLOAT, ["N", 1])
    inits = [
        helper.make_tensor("scale", TensorProto.FLOAT, [], [slope / 255.0]),
        helper.make_tensor("shift", TensorProto.FLOAT, [], [-slope * 0.5]),
        helper.make_tensor("shape", TensorProto.INT64, [2], [-1, 1]),
    ]
    nodes = [
        helper.make_node("Transpose", ["image"], ["nchw"], perm=[0, 3, 1, 2]),
        helper.make_node("GlobalAveragePool", ["nchw"], ["pooled"]),
        helper.make_node("Flatten", ["pooled"], ["flat"]),
        helper.make_node("ReduceMean", ["flat"], ["mean"], keepdims=1, axes=[1]),
        helper.make_node("Mul", ["mean", "scale"], ["scaled"]),
        helper.make_node("Add", ["scaled", "shift"], ["logit"]),
        helper.make_node("Sigmoid", ["logit"], ["prob0"]),
        helper.make_node("Mul", ["prob0", "prob_scale"], ["prob"]),
        helper.make_node("Reshape", ["prob", "shape"], ["pneumonia_prob"]),
    ]
    inits.append(helper.make_tensor("prob_scale", TensorProto.FLOAT, [], [prob_scale]))
    outputs = [y]
    if heads:
        half = size // 2
        inits += [helper.make_tensor("c128", TensorProto.FLOAT, [], [128.0]),
                  helper.make_tensor("c10", TensorProto.FLOAT, [], [0.1])]
        nodes += [
            helper.make_node("AveragePool", ["nchw"], ["quads"], kernel_shape=[half, half],
                             strides=[half, half]),
            helper.make_node("ReduceMean", ["quads"], ["qmean"], keepdims=0, axes=[1]),
            helper.make_node("Mul", ["qmean", "scale"], ["qscaled"]),
            helper.make_node("Add", ["qscaled", "shift"], ["cam"]),
            helper.make_node("Sub", ["mean", "c128"], ["centred"]),
            helper.make_node("Abs", ["centred"], ["dist"]),
            helper.make_node("Mul", ["dist", "c10"], ["ood"]),
        ]
        outputs += [helper.make_tensor_value_info("cam", TensorProto.FLOAT, ["N", 2, 2]),
                    helper.make_tensor_value_info("ood", TensorProto.FLOAT, ["N", 1])]
        meta = {"ood": {"kind": "test", "threshold": ood_threshold}, **(meta or {})}
    graph = helper.make_graph(nodes, "tiny", [x], outputs, initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    if with_metadata:
        m = tiny_metadata(**({"input_size": [size, size], "channels": channels} | (meta or {})))
        helper.set_model_props(model, {"pneumo_edge": json.dumps(m)})
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def prob_for_gray(level: float, slope: float = 10.0) -> float:
    return float(1.0 / (1.0 + np.exp(-slope * (level / 255.0 - 0.5))))


def write_gray_jpeg(path: Path, level: int, size=(40, 30)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    img = np.full((size[1], size[0]), level, np.uint8)
    ok, buf = cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, 95])
    assert ok
    buf.tofile(str(path))
    return path
