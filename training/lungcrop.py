"""The lung-field stage in Keras: frozen segmenter -> lung box -> bilinear crop.

:class:`LungCrop` takes the full frame ``(N, F, F, 3)`` (three identical grey
channels, 0..255) and returns ``(crop (N, C, C, 3), box (N, 4), area (N, 1))``:
the crop of the lung box plus margin that the classifier sees, the box as
``(y0, x0, y1, x1)`` fractions of the frame, and the share of the segmenter's
pixels that are lung (0: none found, the crop is then the whole frame). The
recipe and its constants are those of ``pneumo_edge.lung`` (the numpy twin the
tests hold it to within 1e-4); only elementwise operations, reductions and
matrix products are used, so tf2onnx converts the stage into the model file.

At training time (``training=True`` and ``jitter > 0``) every side of the box
moves by up to ``jitter`` of the box's height (width), drawn from a seeded
generator, so the classifier does not learn the segmenter's exact framing.
"""

from __future__ import annotations

import keras
from keras import ops

from pneumo_edge.lung import CROP, FRAME, JITTER, MARGIN, MASK_THRESHOLD, MIN_FRACTION

__all__ = ["LungCrop", "lung_crop_model", "JITTER"]


@keras.saving.register_keras_serializable(package="pneumo_edge")
class LungCrop(keras.layers.Layer):
    """Frame -> (lung-field crop, box, lung area), with a frozen segmenter inside.

    Args:
        segmenter: a Keras model ``(N, F/2, F/2, 1)`` in 0..255 -> lung probability
            ``(N, F/2, F/2, 1)``; it is frozen (weights not trained, batch
            normalisation in inference mode).
        crop_size: side ``C`` of the crop.
        min_fraction, margin, threshold: the box rule (``pneumo_edge.lung``).
        jitter: training-time box jitter, share of the box size per side (0: off).
        seed: seed of the jitter generator.
    """

    def __init__(self, segmenter, crop_size: int = CROP, min_fraction: float = MIN_FRACTION,
                 margin: float = MARGIN, threshold: float = MASK_THRESHOLD,
                 jitter: float = 0.0, seed: int | None = None, **kwargs):
        # the crop is exact arithmetic on pixel positions: never in reduced precision
        kwargs["dtype"] = "float32"
        super().__init__(**kwargs)
        if isinstance(segmenter, dict):
            segmenter = keras.saving.deserialize_keras_object(segmenter)
        self.segmenter = segmenter
        self.segmenter.trainable = False
        self.crop_size = int(crop_size)
        self.min_fraction = float(min_fraction)
        self.margin = float(margin)
        self.threshold = float(threshold)
        self.jitter = float(jitter)
        self.seed = seed
        self._seed_gen = keras.random.SeedGenerator(seed) if self.jitter > 0 else None

    def build(self, input_shape):
        side = input_shape[1]
        if side is None or side != input_shape[2] or side % 2:
            raise ValueError(f"LungCrop needs a square frame of even side, got {input_shape}")
        self.segmenter.build((None, side // 2, side // 2, 1))
        super().build(input_shape)

    def _extent(self, valid, n: int):
        idx = ops.arange(n, dtype="float32")
        nf = float(n)
        first = ops.min(ops.where(valid, idx, nf), axis=1)
        last = ops.max(ops.where(valid, idx, -1.0), axis=1) + 1.0
        return first / nf, last / nf

    def _matrix(self, lo, hi, n_in: int):
        n_out = self.crop_size
        i = ops.arange(n_out, dtype="float32")
        j = ops.arange(n_in, dtype="float32")
        lo, hi = lo[:, None], hi[:, None]                               # (N, 1)
        s = lo * float(n_in) + (i + 0.5) * (hi - lo) * (n_in / n_out) - 0.5  # (N, C)
        s = ops.clip(s, 0.0, n_in - 1.0)
        w = ops.relu(1.0 - ops.abs(s[:, :, None] - j))                 # (N, C, F)
        return w / ops.sum(w, axis=-1, keepdims=True)

    def call(self, frame, training=False):
        frame = ops.cast(frame, "float32")
        side = frame.shape[1]
        half = side // 2
        grey = ops.mean(frame, axis=-1)                                 # (N, F, F)
        small = ops.mean(ops.reshape(grey, (-1, half, 2, half, 2)), axis=(2, 4))
        prob = self.segmenter(small[..., None], training=False)[..., 0]
        lung = ops.cast(prob > self.threshold, "float32")               # (N, S, S)
        rows = ops.mean(lung, axis=2)
        cols = ops.mean(lung, axis=1)
        rv = rows >= self.min_fraction
        cv = cols >= self.min_fraction
        found = ops.logical_and(ops.max(ops.cast(rv, "float32"), axis=1) > 0.5,
                                ops.max(ops.cast(cv, "float32"), axis=1) > 0.5)
        y0, y1 = self._extent(rv, half)
        x0, x1 = self._extent(cv, half)
        dy, dx = self.margin * (y1 - y0), self.margin * (x1 - x0)
        y0, y1, x0, x1 = y0 - dy, y1 + dy, x0 - dx, x1 + dx
        if training and self._seed_gen is not None:
            u = keras.random.uniform(ops.shape(y0)[:1] + (4,), minval=-1.0, maxval=1.0,
                                     seed=self._seed_gen)
            h, w = (y1 - y0) * self.jitter, (x1 - x0) * self.jitter
            y0, x0 = y0 + u[:, 0] * h, x0 + u[:, 1] * w
            y1, x1 = y1 + u[:, 2] * h, x1 + u[:, 3] * w
        box = ops.clip(ops.stack([y0, x0, y1, x1], axis=1), 0.0, 1.0)
        full = ops.broadcast_to(ops.convert_to_tensor([0.0, 0.0, 1.0, 1.0]), ops.shape(box))
        box = ops.where(found[:, None], box, full)
        area = ops.where(found, ops.mean(lung, axis=(1, 2)), 0.0)[:, None]

        wy = self._matrix(box[:, 0], box[:, 2], side)                   # (N, C, F)
        wx = self._matrix(box[:, 1], box[:, 3], side)
        chw = ops.transpose(frame, (0, 3, 1, 2))                        # (N, ch, F, F)
        out = ops.matmul(ops.matmul(wy[:, None], chw),
                         ops.transpose(wx, (0, 2, 1))[:, None])          # (N, ch, C, C)
        return ops.transpose(out, (0, 2, 3, 1)), box, area

    def compute_output_shape(self, input_shape):
        n, c = input_shape[0], self.crop_size
        return (n, c, c, input_shape[3]), (n, 4), (n, 1)

    def get_config(self):
        cfg = super().get_config()
        cfg.update(segmenter=keras.saving.serialize_keras_object(self.segmenter),
                   crop_size=self.crop_size, min_fraction=self.min_fraction,
                   margin=self.margin, threshold=self.threshold, jitter=self.jitter,
                   seed=self.seed)
        return cfg


def lung_crop_model(segmenter, frame: int = FRAME, crop_size: int = CROP, jitter: float = 0.0,
                    seed: int | None = None, name: str = "lung_crop"):
    """A model ``image (N, frame, frame, 3) -> [crop, box, area]`` around :class:`LungCrop`
    (outputs named ``crop``, ``box``, ``area``)."""
    inputs = keras.Input(shape=(frame, frame, 3), name="image")
    crop, box, area = LungCrop(segmenter, crop_size=crop_size, jitter=jitter, seed=seed,
                               name="lung_crop")(inputs)
    # named identities: the ONNX outputs are then called crop, box and area, in that order
    outputs = [keras.layers.Identity(name=n)(t) for n, t in
               (("crop", crop), ("box", box), ("area", area))]
    return keras.Model(inputs, outputs, name=name)
