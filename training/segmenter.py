"""The lung segmenter: a small U-Net trained from scratch on public lung masks.

Input ``(N, 96, 96, 1)`` grey values in [0, 255] (the 192 px frame pooled 2 x 2,
``pneumo_edge.lung.seg_input``), scaled inside the graph; output the lung
probability ``(N, 96, 96, 1)`` (sigmoid). It runs frozen inside
``training.lungcrop.LungCrop``.
"""

from __future__ import annotations

SEG_SIZE = 96


def _block(x, filters: int, name: str):
    from keras import layers

    for k in (1, 2):
        x = layers.Conv2D(filters, 3, padding="same", use_bias=False,
                          kernel_initializer="he_normal", name=f"{name}_conv{k}")(x)
        x = layers.BatchNormalization(momentum=0.9, name=f"{name}_bn{k}")(x)
        x = layers.ReLU(name=f"{name}_relu{k}")(x)
    return x


def build_unet(size: int = SEG_SIZE, base: int = 8, depth: int = 4, max_filters: int = 48,
               name: str = "lung_unet"):
    """A plain U-Net: ``depth`` poolings, ``base * 2**level`` filters (at most
    ``max_filters``), skip concatenations, bilinear upsampling.

    ``size`` must be divisible by ``2**depth``. The defaults have about 0.2 M parameters.
    """
    import keras
    from keras import layers

    if size % (2 ** depth):
        raise ValueError(f"size {size} is not divisible by 2**{depth}")
    inputs = keras.Input((size, size, 1), name="image")
    x = layers.Rescaling(1.0 / 127.5, offset=-1.0, name="scale")(inputs)
    widths = [min(base * 2 ** level, max_filters) for level in range(depth + 1)]
    skips = []
    for level in range(depth):
        x = _block(x, widths[level], f"down{level}")
        skips.append(x)
        x = layers.MaxPooling2D(2, name=f"pool{level}")(x)
    x = _block(x, widths[depth], "bottom")
    for level in reversed(range(depth)):
        x = layers.UpSampling2D(2, interpolation="bilinear", name=f"up{level}")(x)
        x = layers.Concatenate(name=f"skip{level}")([x, skips[level]])
        x = _block(x, widths[level], f"dec{level}")
    outputs = layers.Conv2D(1, 1, activation="sigmoid", dtype="float32", name="lung")(x)
    return keras.Model(inputs, outputs, name=name)
