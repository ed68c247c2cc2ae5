"""Model builders behind a small name -> builder table.

Every model takes ``image``: float32 (N, H, W, C) in the metadata's value range
(0..255 by default) and does its own scaling in the graph, so the runtime only
decodes and resizes. The output ``pneumonia_prob`` is P(PNEUMONIA), shape (N, 1).
"""

from __future__ import annotations

from typing import Callable

INPUT_NAME = "image"
OUTPUT_NAME = "pneumonia_prob"


def _layers():
    import keras
    return keras, keras.layers


def _conv_bn(x, filters, kernel, stride, name, weight_decay):
    keras, layers = _layers()
    reg = keras.regularizers.L2(weight_decay) if weight_decay else None
    x = layers.Conv2D(filters, kernel, strides=stride, padding="same", use_bias=False,
                      kernel_initializer="he_normal", kernel_regularizer=reg,
                      name=f"{name}_conv")(x)
    return layers.BatchNormalization(momentum=0.9, epsilon=1e-5, name=f"{name}_bn")(x)


def _basic_block(x, filters, stride, name, weight_decay):
    """Two 3x3 convolutions with an identity or 1x1 projection shortcut (He et al. 2016)."""
    _, layers = _layers()
    shortcut = x
    if stride != 1 or x.shape[-1] != filters:
        shortcut = _conv_bn(x, filters, 1, stride, f"{name}_proj", weight_decay)
    y = _conv_bn(x, filters, 3, stride, f"{name}_1", weight_decay)
    y = layers.ReLU(name=f"{name}_1_relu")(y)
    y = _conv_bn(y, filters, 3, 1, f"{name}_2", weight_decay)
    y = layers.Add(name=f"{name}_add")([y, shortcut])
    return layers.ReLU(name=f"{name}_out")(y)


def _resnet(input_shape, stage_filters, blocks_per_stage, stem_filters, stem_kernel,
            dropout, weight_decay, value_range, name):
    keras, layers = _layers()
    lo, hi = value_range
    inputs = keras.Input(shape=input_shape, name=INPUT_NAME)
    # scale to [-1, 1] inside the graph: preprocessing travels with the model
    x = layers.Rescaling(2.0 / (hi - lo), offset=-1.0 - 2.0 * lo / (hi - lo), name="scale")(inputs)
    x = _conv_bn(x, stem_filters, stem_kernel, 2, "stem", weight_decay)
    x = layers.ReLU(name="stem_relu")(x)
    x = layers.MaxPooling2D(3, strides=2, padding="same", name="stem_pool")(x)
    for s, (filters, blocks) in enumerate(zip(stage_filters, blocks_per_stage)):
        for b in range(blocks):
            stride = 2 if (b == 0 and s > 0) else 1
            x = _basic_block(x, filters, stride, f"stage{s + 1}_block{b + 1}", weight_decay)
    x = layers.GlobalAveragePooling2D(name="gap")(x)
    if dropout:
        x = layers.Dropout(dropout, name="dropout")(x)
    # float32 output even under a mixed-precision policy (stable sigmoid and loss)
    outputs = layers.Dense(1, activation="sigmoid", dtype="float32", name=OUTPUT_NAME)(x)
    return keras.Model(inputs, outputs, name=name)


def resnet18(input_shape=(180, 180, 3), dropout=0.3, weight_decay=0.0,
             value_range=(0.0, 255.0)):
    """The standard ResNet-18: 7x7/2 stem, max-pool, 4 stages x 2 basic blocks."""
    return _resnet(input_shape, (64, 128, 256, 512), (2, 2, 2, 2), 64, 7, dropout,
                   weight_decay, value_range, "resnet18")


def resnet_tiny(input_shape=(64, 64, 3), dropout=0.0, weight_decay=0.0,
                value_range=(0.0, 255.0)):
    """Same topology at toy width (8..64 filters, one block a stage): for tests."""
    return _resnet(input_shape, (8, 16, 32, 64), (1, 1, 1, 1), 8, 3, dropout, weight_decay,
                   value_range, "resnet_tiny")


MODELS: dict[str, Callable] = {"resnet18": resnet18, "resnet_tiny": resnet_tiny}


def create_model(name: str, **kwargs):
    """Build a model by name (see ``MODELS``)."""
    try:
        builder = MODELS[name]
    except KeyError:
        raise ValueError(f"unknown model {name!r}; choose from {', '.join(MODELS)}") from None
    return builder(**kwargs)
