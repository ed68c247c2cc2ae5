"""Model builders behind a small name -> builder table.

Every model takes ``image``: float32 (N, H, W, C) in the metadata's value range
(0..255 by default) and does its own scaling in the graph, so the runtime only
decodes and resizes. The output ``pneumonia_prob`` is P(PNEUMONIA), shape (N, 1).
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from pneumo_edge.metadata import PROB_OUTPUT as OUTPUT_NAME

INPUT_NAME = "image"
#: the lung-field stage's layer in the ``*_lung`` models (training.lungcrop.LungCrop)
LUNG_LAYER = "lung_crop"
#: the trained lung segmenter shipped with the training package
DEFAULT_SEGMENTER = Path(__file__).resolve().parent / "weights" / "lung_unet96.keras"


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
            dropout, weight_decay, value_range, name, lung: dict | None = None):
    keras, layers = _layers()
    lo, hi = value_range
    inputs = keras.Input(shape=input_shape, name=INPUT_NAME)
    x = inputs
    if lung is not None:
        # the classifier sees the lung box plus a margin, whatever the framing
        from .lungcrop import LungCrop
        x = LungCrop(name=LUNG_LAYER, **lung)(x)[0]
    # scale to [-1, 1] inside the graph: preprocessing travels with the model
    x = layers.Rescaling(2.0 / (hi - lo), offset=-1.0 - 2.0 * lo / (hi - lo), name="scale")(x)
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


def load_segmenter(path: str | Path | None = None):
    """The lung segmenter (``DEFAULT_SEGMENTER`` unless ``path``), a Keras model.

    Raises:
        FileNotFoundError: no such file.
    """
    import keras

    path = Path(path) if path else DEFAULT_SEGMENTER
    if not path.is_file():
        raise FileNotFoundError(f"{path}: lung segmenter not found")
    return keras.models.load_model(path, compile=False)


def _lung_args(input_shape, segmenter, crop_size, jitter, seed) -> dict:
    from pneumo_edge.lung import CROP, FRAME, JITTER

    side = input_shape[0]
    if crop_size is None:  # the crop keeps the frame's scale (144 of 192)
        crop_size = CROP * side // FRAME
    if segmenter is None or isinstance(segmenter, (str, Path)):
        segmenter = load_segmenter(segmenter)
    return {"segmenter": segmenter, "crop_size": int(crop_size),
            "jitter": JITTER if jitter is None else float(jitter), "seed": seed}


def resnet18_lung(input_shape=(192, 192, 3), dropout=0.3, weight_decay=0.0,
                  value_range=(0.0, 255.0), segmenter=None, crop_size=None, jitter=None,
                  seed=None):
    """ResNet-18 behind the lung-field stage: the frame (192 px) is segmented, cropped to
    the lung box plus margin, resized to ``crop_size`` (default 3/4 of the frame), and
    classified. ``segmenter``: a Keras model or a path (default ``DEFAULT_SEGMENTER``)."""
    return _resnet(input_shape, (64, 128, 256, 512), (2, 2, 2, 2), 64, 7, dropout,
                   weight_decay, value_range, "resnet18_lung",
                   _lung_args(input_shape, segmenter, crop_size, jitter, seed))


def resnet_tiny_lung(input_shape=(64, 64, 3), dropout=0.0, weight_decay=0.0,
                     value_range=(0.0, 255.0), segmenter=None, crop_size=None, jitter=None,
                     seed=None):
    """:func:`resnet_tiny` behind the lung-field stage: for tests."""
    return _resnet(input_shape, (8, 16, 32, 64), (1, 1, 1, 1), 8, 3, dropout, weight_decay,
                   value_range, "resnet_tiny_lung",
                   _lung_args(input_shape, segmenter, crop_size, jitter, seed))


MODELS: dict[str, Callable] = {"resnet18": resnet18, "resnet_tiny": resnet_tiny,
                               "resnet18_lung": resnet18_lung,
                               "resnet_tiny_lung": resnet_tiny_lung}
#: the models with the lung-field stage (they take ``segmenter``, ``crop_size``, ``seed``)
LUNG_MODELS = ("resnet18_lung", "resnet_tiny_lung")


def register_custom_layers() -> None:
    """Make the project's own layers known to ``keras.models.load_model``."""
    from . import lungcrop  # noqa: F401  (registers LungCrop on import)


def create_model(name: str, **kwargs):
    """Build a model by name (see ``MODELS``)."""
    try:
        builder = MODELS[name]
    except KeyError:
        raise ValueError(f"unknown model {name!r}; choose from {', '.join(MODELS)}") from None
    return builder(**kwargs)
