"""The one preprocessing function: an image file becomes a model input.

Inference, evaluation and export calibration call :func:`load_image`; training
caches :func:`load_gray`'s model-size images and finishes them with
:func:`to_model_input` (or its TensorFlow twin in ``training.data``, tested to
match), so the bytes-to-array path cannot drift. What it does is read from the
model's ``pneumo_edge`` metadata (:class:`~pneumo_edge.metadata.PreprocessConfig`),
never assumed.
"""

from __future__ import annotations

import os

import cv2
import numpy as np

from .images import decode_gray
from .metadata import PreprocessConfig

__all__ = ["PreprocessConfig", "load_gray", "load_image", "to_model_input"]


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
