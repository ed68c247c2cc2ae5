"""The one preprocessing function: an image file becomes a model input.

Training (through ``tf.numpy_function``), evaluation, export calibration and
inference all call :func:`load_image`, so the bytes-to-array path cannot drift.
What it does is read from the model's ``pneumo_edge`` metadata, never assumed.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Mapping

import cv2
import numpy as np

from .images import decode_gray

__all__ = ["PreprocessConfig", "load_gray", "load_image", "to_model_input"]


@dataclass(frozen=True)
class PreprocessConfig:
    """How a decoded image becomes the model's input tensor (one image, HWC).

    Attributes:
        height, width: the model's input size in pixels.
        channels: 1, or 3 for the grey level repeated (the X-ray is greyscale).
        value_range: the input values that pixel 0 and pixel 255 map to.
        resize: OpenCV interpolation name used to reach ``height`` x ``width``.
    """

    height: int
    width: int
    channels: int = 3
    value_range: tuple[float, float] = (0.0, 255.0)
    resize: str = "area"

    @classmethod
    def from_metadata(cls, meta: Mapping[str, Any]) -> "PreprocessConfig":
        """Build from the ``pneumo_edge`` metadata dict of a model."""
        height, width = (int(v) for v in meta["input_size"])
        lo, hi = (float(v) for v in meta.get("value_range", (0.0, 255.0)))
        return cls(height=height, width=width, channels=int(meta.get("channels", 3)),
                   value_range=(lo, hi), resize=str(meta.get("resize", "area")))

    def to_metadata(self) -> dict[str, Any]:
        return {"input_size": [self.height, self.width], "channels": self.channels,
                "value_range": list(self.value_range), "resize": self.resize,
                "color": "grayscale", "layout": "NHWC"}


_INTERPOLATION = {"area": cv2.INTER_AREA, "linear": cv2.INTER_LINEAR,
                  "cubic": cv2.INTER_CUBIC, "nearest": cv2.INTER_NEAREST}


def resize_gray(gray: np.ndarray, cfg: PreprocessConfig) -> np.ndarray:
    """Resize a 2-D uint8 image to the model size (aspect ratio not kept, as in training)."""
    if gray.shape == (cfg.height, cfg.width):
        return gray
    # INTER_AREA is right for shrinking; for enlarging tiny images it behaves like linear.
    return cv2.resize(gray, (cfg.width, cfg.height), interpolation=_INTERPOLATION[cfg.resize])


def to_model_input(gray: np.ndarray, cfg: PreprocessConfig) -> np.ndarray:
    """Resized 2-D uint8 image -> float32 (H, W, C) in ``cfg.value_range``."""
    lo, hi = cfg.value_range
    x = resize_gray(gray, cfg).astype(np.float32)
    if (lo, hi) != (0.0, 255.0):
        x = x * np.float32((hi - lo) / 255.0) + np.float32(lo)
    return np.repeat(x[:, :, None], cfg.channels, axis=2)


def load_image(path: str | os.PathLike, cfg: PreprocessConfig) -> np.ndarray:
    """Decode ``path`` and return the model input for one image (float32 HWC).

    Raises:
        ImageDecodeError: with a one-line reason when the file is not an image.
    """
    return to_model_input(load_gray(path, cfg), cfg)


def load_gray(path: str | os.PathLike, cfg: PreprocessConfig) -> np.ndarray:
    """Decode ``path`` and resize it to the model size: 2-D uint8.

    The compact form the training pipeline caches; :func:`to_model_input` (or its
    TensorFlow twin in ``training.data``) finishes the job.
    """
    return resize_gray(decode_gray(path, target=max(cfg.height, cfg.width)), cfg)
