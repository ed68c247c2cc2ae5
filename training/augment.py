"""Augmentation inside the tf.data pipeline (never inside the model: ONNX export).

Geometry is one projective transform per image with a **black** border, because
that is what a wider-framed X-ray looks like (edge replication is not):

- scale drawn log-uniformly between a zoom-out (the image shrunk to
  ``1 / (1 + zoom_out)`` of its side inside a black border) and a
  random-resized crop keeping ``crop_area`` of the image; the known failure of
  this dataset is framing (training normals are framed wide, pneumonia tight),
  so the model must see both framings for both classes;
- aspect change (``aspect``: log-ratio range), rotation, flip, and a shift that
  lets a crop wander over the whole image.

Intensity (gamma, contrast, brightness) models exposure and processing
differences between machines; sensor noise and a down-and-up resample model
cheaper detectors and recompressed files.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields


@dataclass(frozen=True)
class AugmentConfig:
    flip: bool = True          # random horizontal flip (as in the origin report)
    crop_area: float = 0.40    # random-resized crop keeps at least this share of the area
    zoom_out: float = 0.40     # or the image shrinks to 1/(1 + zoom_out) of its side, black border
    aspect: float = 0.15       # log aspect ratio drawn from [-aspect, aspect]
    rotation: float = 10.0     # degrees, drawn from [-rotation, rotation]
    shift: float = 0.05        # extra translation as a fraction of the side
    brightness: float = 0.10   # additive, fraction of the full range
    contrast: float = 0.20     # multiplicative around the image mean, [1 - c, 1 + c]
    gamma: float = 0.40        # log-uniform gamma in [1/(1+g), 1+g]
    noise: float = 6.0         # Gaussian noise, sigma drawn from [0, noise] grey levels
    lowres: float = 0.25       # probability of a down-and-up resample (0.5 to 1 of the size)

    def __post_init__(self) -> None:
        # the ranges the options accept (0 switches a crop off, as off() does)
        if not (self.crop_area == 0 or 0.05 <= self.crop_area <= 1.0):
            raise ValueError(f"--crop-area must be in 0.05..1, got {self.crop_area!r}")
        if not 0.0 <= self.zoom_out <= 2.0:
            raise ValueError(f"--zoom-out must be in 0..2, got {self.zoom_out!r}")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "AugmentConfig":
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})

    @classmethod
    def off(cls) -> "AugmentConfig":
        return cls(**{f.name: (False if f.type == "bool" else 0) for f in fields(cls)})

    @property
    def geometric(self) -> bool:
        return bool(self.flip or self.crop_area < 1.0 or self.zoom_out or self.aspect
                    or self.rotation or self.shift) and self.crop_area > 0

    @property
    def enabled(self) -> bool:
        return self.geometric or any((self.brightness, self.contrast, self.gamma, self.noise,
                                      self.lowres))


def make_augment(cfg: AugmentConfig):
    """Return ``fn(uint8 (H, W, 1), seed (2,) int64) -> float32 (H, W, 1)`` in 0..255.

    Stateless: the random draws depend only on the per-element seed the
    pipeline supplies, so a run with the same ``--seed`` is repeatable.
    Returns None if every augmentation is switched off.
    """
    import tensorflow as tf

    if not cfg.enabled:
        return None
    crop_area = cfg.crop_area if 0.0 < cfg.crop_area <= 1.0 else 1.0
    log_lo = -math.log1p(max(cfg.zoom_out, 0.0))      # zoom out: scale < 1
    log_hi = -0.5 * math.log(crop_area)                 # zoom in (crop): scale > 1

    def augment(image, element_seed):
        x = tf.cast(image, tf.float32)
        shape = tf.shape(x)[:2]
        h = tf.cast(shape[0], tf.float32)
        w = tf.cast(shape[1], tf.float32)
        u = tf.random.stateless_uniform([12], seed=element_seed, minval=-1.0, maxval=1.0)
        if cfg.geometric:
            angle = u[0] * (cfg.rotation * math.pi / 180.0)
            log_s = log_lo + (u[1] + 1.0) * 0.5 * (log_hi - log_lo)
            a = u[2] * cfg.aspect
            sx, sy = tf.exp(log_s + a), tf.exp(log_s - a)  # >1 zooms in
            flip = tf.where(u[3] < 0.0, -1.0, 1.0) if cfg.flip else tf.constant(1.0)
            # a crop may sit anywhere inside the image; a zoomed-out image anywhere in the frame
            room_x = tf.abs(1.0 - 1.0 / sx) / 2.0 + cfg.shift
            room_y = tf.abs(1.0 - 1.0 / sy) / 2.0 + cfg.shift
            tx, ty = u[4] * room_x * w, u[5] * room_y * h
            cos, sin = tf.cos(angle), tf.sin(angle)
            cx, cy = (w - 1.0) / 2.0, (h - 1.0) / 2.0
            # output (x, y) -> input: centre, un-flip, scale, rotate, re-centre, shift
            a0, a1 = flip * cos / sx, -sin / sy
            b0, b1 = flip * sin / sx, cos / sy
            a2 = cx - a0 * cx - a1 * cy - tx
            b2 = cy - b0 * cx - b1 * cy - ty
            transform = tf.stack([a0, a1, a2, b0, b1, b2, 0.0, 0.0])[None, :]
            x = tf.raw_ops.ImageProjectiveTransformV3(
                images=x[None], transforms=transform, output_shape=shape,
                fill_value=0.0, interpolation="BILINEAR", fill_mode="CONSTANT")[0]
        if cfg.lowres:
            f = 0.75 + 0.25 * u[6]  # 0.5 .. 1 of the size
            small = tf.cast(tf.cast(shape, tf.float32) * f, tf.int32)
            low = tf.image.resize(tf.image.resize(x, small, method="area"), shape,
                                  method="bilinear")
            x = tf.where(u[7] < 2.0 * cfg.lowres - 1.0, low, x)
        if cfg.gamma:
            g = tf.exp(u[8] * math.log1p(cfg.gamma))
            x = 255.0 * tf.pow(tf.maximum(x, 0.0) / 255.0, g)
        if cfg.contrast:
            mean = tf.reduce_mean(x)
            x = (x - mean) * (1.0 + u[9] * cfg.contrast) + mean
        if cfg.brightness:
            x = x + u[10] * cfg.brightness * 255.0
        if cfg.noise:
            sigma = (u[11] + 1.0) * 0.5 * cfg.noise
            seed2 = element_seed + tf.constant([7, 11], element_seed.dtype)
            x = x + sigma * tf.random.stateless_normal(tf.shape(x), seed=seed2)
        return tf.clip_by_value(x, 0.0, 255.0)

    return augment
