"""Tiny models shaped like an export (conv -> GAP -> dense -> sigmoid, with cam and ood
heads sharing the tail's tensors) and synthetic sites for the calibrate tests.

Features of the tiny model (3x3 convolutions, stride 2, ReLU, global average):
0 brightness, 1 and 2 left/right edges of a horizontal ramp, 3 and 4 vertical
ramp edges, 5-7 random filters. The shipped head reads brightness only, so a
site whose label lives in the ramp direction is at chance for it, while the
features carry everything a refit head needs.
"""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np

from helpers import tiny_metadata

SIZE = 16
DIM = 8


def _filters(seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    k = np.zeros((DIM, 3, 3, 3), np.float32)  # OIHW
    k[0] = 1.0 / 27.0
    dx = np.array([[-1, 0, 1]] * 3, np.float32) / 3.0
    k[1] = dx
    k[2] = -dx
    k[3] = dx.T
    k[4] = -dx.T
    k[5:] = rng.normal(0, 0.3, (DIM - 5, 3, 3, 3))
    return k


def build(path: Path, *, weight=None, bias: float = -5.0, ood_mean=None, ood_whiten=None,
          ood_threshold: float = 3.0, heads: bool = True, meta: dict | None = None,
          gemm: bool = False) -> Path:
    """Write the tiny model; the dense unit defaults to 10 * brightness - 5."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    w = np.zeros((DIM, 1), np.float32) if weight is None else np.asarray(weight, np.float32)
    if weight is None:
        w[0, 0] = 10.0
    mean = np.zeros(DIM) if ood_mean is None else np.asarray(ood_mean)
    whiten = np.eye(DIM) if ood_whiten is None else np.asarray(ood_whiten)
    half = SIZE // 2
    inits = [
        numpy_helper.from_array(np.float32(1 / 255.0).reshape(()), "inv255"),
        numpy_helper.from_array(_filters(), "conv_w"),
        numpy_helper.from_array(np.zeros(DIM, np.float32), "conv_b"),
        numpy_helper.from_array(np.array([2, 3], np.int64), "sq_axes"),
        numpy_helper.from_array(w.reshape(DIM, 1), "dense/kernel"),
        numpy_helper.from_array(np.array([bias], np.float32), "dense/bias"),
    ]
    nodes = [
        helper.make_node("Transpose", ["image"], ["nchw"], perm=[0, 3, 1, 2]),
        helper.make_node("Mul", ["nchw", "inv255"], ["scaled"]),
        helper.make_node("Conv", ["scaled", "conv_w", "conv_b"], ["conv"], pads=[1, 1, 1, 1],
                         strides=[2, 2]),
        helper.make_node("Relu", ["conv"], ["fmap"]),
        helper.make_node("GlobalAveragePool", ["fmap"], ["gap"]),
        helper.make_node("Squeeze", ["gap", "sq_axes"], ["pooled"]),
    ]
    if gemm:
        nodes.append(helper.make_node("Gemm", ["pooled", "dense/kernel", "dense/bias"],
                                      ["logit"]))
    else:
        nodes += [helper.make_node("MatMul", ["pooled", "dense/kernel"], ["mm"]),
                  helper.make_node("Add", ["mm", "dense/bias"], ["logit"])]
    nodes.append(helper.make_node("Sigmoid", ["logit"], ["pneumonia_prob"]))
    outputs = [helper.make_tensor_value_info("pneumonia_prob", TensorProto.FLOAT, ["N", 1])]
    extra = {}
    if heads:
        inits += [
            numpy_helper.from_array(np.array([-1, DIM], np.int64), "flat_shape"),
            numpy_helper.from_array(np.array([-1, half, half], np.int64), "cam_shape"),
            numpy_helper.from_array(whiten.astype(np.float32), "ood/whiten"),
            numpy_helper.from_array((-mean @ whiten).astype(np.float32), "ood/shift"),
            numpy_helper.from_array(np.array([1], np.int64), "sum_axes"),
        ]
        nodes += [
            helper.make_node("Transpose", ["fmap"], ["fmap_nhwc"], perm=[0, 2, 3, 1]),
            helper.make_node("Reshape", ["fmap_nhwc", "flat_shape"], ["flat"]),
            helper.make_node("MatMul", ["flat", "dense/kernel"], ["cam_mm"]),
            helper.make_node("Add", ["cam_mm", "dense/bias"], ["cam_add"]),
            helper.make_node("Reshape", ["cam_add", "cam_shape"], ["cam"]),
            helper.make_node("MatMul", ["pooled", "ood/whiten"], ["z_mm"]),
            helper.make_node("Add", ["z_mm", "ood/shift"], ["z"]),
            helper.make_node("Mul", ["z", "z"], ["z2"]),
            helper.make_node("ReduceSum", ["z2", "sum_axes"], ["ss"], keepdims=1),
            helper.make_node("Sqrt", ["ss"], ["ood"]),
        ]
        outputs += [helper.make_tensor_value_info("cam", TensorProto.FLOAT, ["N", half, half]),
                    helper.make_tensor_value_info("ood", TensorProto.FLOAT, ["N", 1])]
        extra["ood"] = {"kind": "mahalanobis", "output": "ood", "threshold": ood_threshold}
    for node in nodes:  # named like an export's nodes (quantisation excludes by name)
        node.name = "node/" + node.output[0]
    x = helper.make_tensor_value_info("image", TensorProto.FLOAT, ["N", SIZE, SIZE, 3])
    graph = helper.make_graph(nodes, "tiny_site", [x], outputs, initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    m = tiny_metadata(input_size=[SIZE, SIZE], channels=3, arch="tiny_site", **extra,
                      **(meta or {}))
    helper.set_model_props(model, {"pneumo_edge": json.dumps(m)})
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def features(path: Path, images: np.ndarray) -> np.ndarray:
    """Pooled features of float32 (N, SIZE, SIZE, 3) inputs."""
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper

    proto = onnx.load(str(path))
    proto.graph.output.append(helper.make_tensor_value_info("pooled", TensorProto.FLOAT, None))
    sess = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(["pooled"], {"image": images.astype(np.float32)})[0].astype(np.float64)


def flat_images(rng, n: int, lo: float = 60, hi: float = 200) -> np.ndarray:
    """Flat grey images (the 'training distribution' of the tiny model), noisy."""
    levels = rng.uniform(lo, hi, n)
    x = levels[:, None, None] + rng.normal(0, 4, (n, SIZE, SIZE))
    return np.repeat(np.clip(x, 0, 255)[..., None], 3, axis=-1).astype(np.float32)


def build_with_ood(path: Path, rng, **kwargs) -> Path:
    """The tiny model with OOD statistics fitted on flat images (threshold: their 99th
    percentile)."""
    from pneumo_edge.ood import fit_ood

    build(path, **kwargs)
    fit = fit_ood(features(path, flat_images(rng, 400)))
    thr = float(np.percentile(fit.distance(features(path, flat_images(rng, 200))), 99))
    return build(path, ood_mean=fit.mean, ood_whiten=fit.whiten, ood_threshold=thr, **kwargs)


def ramp_image(rng, label: int, size: int = 32, slope_scale: float = 1.0) -> np.ndarray:
    """A site image: random brightness, a horizontal ramp falling (NORMAL) or rising
    (PNEUMONIA) left to right, a little noise; uint8 (size, size)."""
    level = rng.uniform(70, 180)
    slope = rng.uniform(40, 80) * slope_scale * (1 if label else -1)
    ramp = np.linspace(-0.5, 0.5, size)[None, :] * slope
    img = level + ramp + rng.normal(0, 3, (size, size))
    return np.clip(img, 0, 255).astype(np.uint8)


def write_site(root: Path, rng, n_per_class: int, *, images_per_patient: int = 2,
               label_in_ramp: bool = True, prefix: str = "") -> Path:
    """NORMAL/ and PNEUMONIA/ PNG files with Kermany-style names (patients of
    ``images_per_patient`` images each)."""
    for label, cls in ((0, "NORMAL"), (1, "PNEUMONIA")):
        folder = root / cls
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(n_per_class):
            patient = i // images_per_patient
            if label_in_ramp:
                img = ramp_image(rng, label)
            else:  # brightness carries the label, as the shipped head expects
                img = np.clip(rng.uniform(40, 110) + 100 * label + rng.normal(0, 3, (32, 32)),
                              0, 255).astype(np.uint8)
            name = (f"{prefix}person{patient}_bacteria_{i}.png" if label else
                    f"{prefix}IM-{patient:04d}-{i:04d}.png")
            cv2.imwrite(str(folder / name), img)
    return root


def quantize(src: Path, dst: Path, rng, *, keep_tail_float: bool = True) -> Path:
    """Static INT8 (QDQ) of the tiny model as export does it: the heads and the
    classifier tail stay float unless ``keep_tail_float`` is False."""
    import onnx
    from onnx import helper
    from onnxruntime.quantization import (CalibrationDataReader, QuantFormat, QuantType,
                                          quantize_static)

    from training.heads import classifier_tail, head_nodes

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.it = iter([{"image": flat_images(rng, 1)} for _ in range(16)])

        def get_next(self):
            return next(self.it, None)

    pre = onnx.load(str(src))
    exclude = (head_nodes(pre, "pneumonia_prob") + classifier_tail(pre, "pneumonia_prob")
               if keep_tail_float else [])
    quantize_static(str(src), str(dst), Reader(), quant_format=QuantFormat.QDQ,
                    per_channel=True, activation_type=QuantType.QUInt8,
                    weight_type=QuantType.QInt8, nodes_to_exclude=exclude)
    q = onnx.load(str(dst))
    meta = json.loads({p.key: p.value for p in q.metadata_props}["pneumo_edge"])
    del q.metadata_props[:]
    helper.set_model_props(q, {"pneumo_edge": json.dumps(meta | {"precision": "int8"})})
    onnx.save(q, str(dst))
    return dst
