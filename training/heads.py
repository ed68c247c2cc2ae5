"""Graph heads added at export: ``cam`` (class activation map) and ``ood`` (Mahalanobis).

Both read tensors the classifier computes anyway, so they cost one 1x1
projection of the last feature map and one small matrix product:

- ``cam``: the output layer's weights and bias applied at every position of the
  last convolution stage's feature map, (N, h, w) logits. Because the model
  ends in global average pooling and one dense unit, the mean of the map is
  exactly the logit of P(PNEUMONIA): the map is the decision, spread in space,
  with no gradients (Zhou et al. 2016, "Learning Deep Features for
  Discriminative Localization").
- ``ood``: the Mahalanobis distance (N, 1) of the pooled features from their
  mean on training-split images, with a Ledoit-Wolf shrinkage covariance (the
  features are 512-dimensional and partly degenerate). Whitening matrix and
  mean are graph constants; the threshold is a percentile of held-out
  training-split distances, stored in the metadata.
"""

from __future__ import annotations

import numpy as np

from pneumo_edge.metadata import CAM_OUTPUT as CAM_NAME
from pneumo_edge.metadata import OOD_OUTPUT as OOD_NAME
from pneumo_edge.ood import OodFit, fit_ood, ledoit_wolf  # noqa: F401 (one copy, numpy only)

GAP_LAYER = "gap"
#: outputs of the lung-field stage (``*_lung`` models): the box the classifier saw,
#: (y0, x0, y1, x1) fractions of the frame, and the share of the frame that is lung
LUNG_BOX_NAME = "lung_box"
LUNG_AREA_NAME = "lung_area"


def has_heads_support(model) -> bool:
    """Our builders' models: global average pooling named ``gap``, one sigmoid unit."""
    from .models import OUTPUT_NAME

    names = {layer.name for layer in model.layers}
    return GAP_LAYER in names and OUTPUT_NAME in names


def feature_model(model):
    """The model up to the pooled features and the last feature map: (pooled, fmap)."""
    import keras

    gap = model.get_layer(GAP_LAYER)
    return keras.Model(model.inputs, [gap.output, gap.input])


def with_heads(model, ood: OodFit):
    """A three-output model: probability, ``cam`` (N, h, w) and ``ood`` (N, 1)."""
    import keras

    from .models import OUTPUT_NAME

    gap = model.get_layer(GAP_LAYER)
    fmap, pooled = gap.input, gap.output
    kernel, bias = model.get_layer(OUTPUT_NAME).get_weights()
    h, w = int(fmap.shape[1]), int(fmap.shape[2])
    cam_dense = keras.layers.Dense(1, name="cam_logits", dtype="float32")
    cam = keras.layers.Reshape((h, w), name=CAM_NAME)(cam_dense(fmap))
    d = int(pooled.shape[-1])
    whiten = keras.layers.Dense(d, name="ood_whiten", dtype="float32")
    z = whiten(pooled)
    dist = _Norm(name=OOD_NAME)(z)
    headed = keras.Model(model.inputs, [model.outputs[0], cam, dist] + lung_outputs(model),
                         name=model.name)
    cam_dense.set_weights([kernel.astype(np.float32), bias.astype(np.float32)])
    whiten.set_weights([ood.whiten.astype(np.float32),
                        (-ood.mean @ ood.whiten).astype(np.float32)])
    return headed


def lung_outputs(model) -> list:
    """``[lung_box, lung_area]`` tensors of a model with the lung-field stage, else []."""
    import keras

    from .models import LUNG_LAYER

    if LUNG_LAYER not in {layer.name for layer in model.layers}:
        return []
    _, box, area = model.get_layer(LUNG_LAYER).output
    return [keras.layers.Identity(name=LUNG_BOX_NAME)(box),
            keras.layers.Identity(name=LUNG_AREA_NAME)(area)]


def with_lung_outputs(model):
    """The model with the lung stage's box and area as extra outputs (unchanged without)."""
    import keras

    extra = lung_outputs(model)
    return keras.Model(model.inputs, list(model.outputs) + extra, name=model.name) \
        if extra else model


def lung_boundary(proto) -> str | None:
    """The tensor the lung-field stage hands to the classifier (the stem convolution's
    input: the crop, scaled), or None for a model without the stage."""
    if LUNG_BOX_NAME not in {o.name for o in proto.graph.output}:
        return None
    needed = _ancestors(proto, proto.graph.output[0].name)
    box_side = _ancestors(proto, LUNG_BOX_NAME)
    # the classifier's stem: the first Conv on the probability's path outside the segmenter
    stem = next(n for n in proto.graph.node
                if n.op_type == "Conv" and n.name in needed and n.name not in box_side)
    return stem.input[0]


def lung_stage_nodes(proto) -> list[str]:
    """ONNX nodes of the lung-field stage: everything before the classifier's first
    convolution (segmenter, box, crop matrices, the crop itself, the input scaling).

    Kept in float32 in the FP16 and INT8 models: the box and the crop are arithmetic
    on pixel positions, and the box must be the same in every precision, or the
    precisions would classify different crops. Empty for a model without the stage.
    """
    boundary = lung_boundary(proto)
    if boundary is None:
        return []
    return sorted(_ancestors(proto, boundary) | _ancestors(proto, LUNG_BOX_NAME)
                  | _ancestors(proto, LUNG_AREA_NAME))


def _norm_layer():
    import keras

    class Norm(keras.layers.Layer):
        """Euclidean norm over the last axis, keeping it: (N, d) -> (N, 1)."""

        def call(self, x):
            return keras.ops.sqrt(keras.ops.sum(keras.ops.square(x), axis=-1, keepdims=True))

    return Norm


def _Norm(**kwargs):
    return _norm_layer()(**kwargs)


def _ancestors(proto, output: str) -> set[str]:
    producer = {o: n for n in proto.graph.node for o in n.output}
    seen: set[str] = set()
    stack = [output]
    while stack:
        node = producer.get(stack.pop())
        if node is None or node.name in seen:
            continue
        seen.add(node.name)
        stack.extend(node.input)
    return seen


def head_nodes(proto, prob_output: str) -> list[str]:
    """Names of the ONNX nodes that only the heads need (not ancestors of the probability).

    Kept out of INT8 quantisation: the distance sums 512 squared whitened
    features, which 8-bit steps do not hold, and the map stays exact.
    """
    needed = _ancestors(proto, prob_output)
    return [n.name for n in proto.graph.node if n.name not in needed]


def classifier_tail(proto, prob_output: str) -> list[str]:
    """The nodes from the global average pooling to the probability output.

    Kept out of INT8 quantisation: a calibrated model's probabilities sit close
    to 0 and 1, and an 8-bit pooled feature or logit would put many images on
    the same value there (ties between NORMAL and PNEUMONIA images cost AUC).
    One 512-wide dot product in float32 costs nothing measurable.
    """
    producer = {o: n for n in proto.graph.node for o in n.output}
    tail: list[str] = []
    node = producer.get(prob_output)
    while node is not None:
        tail.append(node.name)
        if node.op_type in ("GlobalAveragePool", "ReduceMean"):
            return tail
        # follow the data input (the first input produced by another node)
        node = next((producer[i] for i in node.input if i in producer), None)
    return []  # no pooling found: quantise as usual


def ood_only_nodes(proto) -> list[str]:
    """Nodes only the ``ood`` output needs: kept in float32 in the FP16 model (half
    precision overflows on the squared distances of far-away inputs)."""
    names = [o.name for o in proto.graph.output]
    if OOD_NAME not in names:
        return []
    others: set[str] = set()
    for name in names:
        if name != OOD_NAME:
            others |= _ancestors(proto, name)
    return [n for n in _ancestors(proto, OOD_NAME) if n not in others]


def cam_reference(fmap: np.ndarray, kernel: np.ndarray, bias: np.ndarray) -> np.ndarray:
    """numpy CAM: (N, h, w, C) feature maps, dense (C, 1) and (1,) -> (N, h, w) logits."""
    return (np.asarray(fmap, np.float64) @ np.asarray(kernel, np.float64))[..., 0] + float(
        np.asarray(bias).reshape(-1)[0])
