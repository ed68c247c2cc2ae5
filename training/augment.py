"""Augmentation inside the tf.data pipeline (never inside the model: ONNX export).

Geometry (flip, zoom, rotation, shift) is one projective transform per image;
intensity (brightness, contrast, gamma) models the exposure and processing
differences between X-ray machines, the shift that hurts most on new sites.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class AugmentConfig:
    flip: bool = True          # random horizontal flip (as in the origin report)
    zoom: float = 0.10         # scale drawn from [1 - zoom, 1 + zoom]
    rotation: float = 10.0     # degrees, drawn from [-rotation, rotation]
    shift: float = 0.05        # translation as a fraction of the side
    brightness: float = 0.10   # additive, fraction of the full range
    contrast: float = 0.20     # multiplicative around the image mean, [1 - c, 1 + c]
    gamma: float = 0.25        # log-uniform gamma in [1/(1+g), 1+g]

    def to_dict(self) -> dict:
        return asdict(self)

    @property
    def enabled(self) -> bool:
        return any((self.flip, self.zoom, self.rotation, self.shift, self.brightness,
                    self.contrast, self.gamma))


def make_augment(cfg: AugmentConfig):
    """Return ``fn(uint8 (H, W, 1), seed (2,) int64) -> float32 (H, W, 1)`` in 0..255.

    Stateless: the random draws depend only on the per-element seed the
    pipeline supplies, so a run with the same ``--seed`` is repeatable.
    Returns None if every augmentation is switched off.
    """
    import tensorflow as tf

    if not cfg.enabled:
        return None

    def augment(image, element_seed):
        x = tf.cast(image, tf.float32)
        h = tf.cast(tf.shape(x)[0], tf.float32)
        w = tf.cast(tf.shape(x)[1], tf.float32)
        u = tf.random.stateless_uniform([8], seed=element_seed, minval=-1.0, maxval=1.0)
        if cfg.flip or cfg.zoom or cfg.rotation or cfg.shift:
            angle = u[0] * (cfg.rotation * math.pi / 180.0)
            scale = 1.0 + u[1] * cfg.zoom  # >1 zooms in
            flip = tf.where(u[2] < 0.0, -1.0, 1.0) if cfg.flip else tf.constant(1.0)
            tx, ty = u[3] * cfg.shift * w, u[4] * cfg.shift * h
            cos, sin = tf.cos(angle) / scale, tf.sin(angle) / scale
            cx, cy = (w - 1.0) / 2.0, (h - 1.0) / 2.0
            # output (x, y) -> input: centre, un-flip, rotate/scale, re-centre, shift
            a0, a1 = flip * cos, -sin
            b0, b1 = flip * sin, cos
            a2 = cx - a0 * cx - a1 * cy - tx
            b2 = cy - b0 * cx - b1 * cy - ty
            transform = tf.stack([a0, a1, a2, b0, b1, b2, 0.0, 0.0])[None, :]
            x = tf.raw_ops.ImageProjectiveTransformV3(
                images=x[None], transforms=transform, output_shape=tf.shape(x)[:2],
                fill_value=0.0, interpolation="BILINEAR", fill_mode="NEAREST")[0]
        if cfg.gamma:
            g = tf.exp(u[5] * math.log1p(cfg.gamma))
            x = 255.0 * tf.pow(x / 255.0, g)
        if cfg.contrast:
            mean = tf.reduce_mean(x)
            x = (x - mean) * (1.0 + u[6] * cfg.contrast) + mean
        if cfg.brightness:
            x = x + u[7] * cfg.brightness * 255.0
        return tf.clip_by_value(x, 0.0, 255.0)

    return augment
