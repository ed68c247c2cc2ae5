"""Heatmap overlays from the model's ``cam`` output.

The map is the output layer applied at each position of the last feature map
(logits; their mean is the image's logit). A calibrated model adds the same
bias at every position, so absolute values say little about where the
evidence is: the overlay shows the map normalised to its own range, blue where
the evidence for PNEUMONIA is weakest in this image and red where it is
strongest, and writes the image's probability on it. The model sees the whole
image resized to its input (aspect ratio not kept), so the map is stretched
over the whole image.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import cv2
import numpy as np

from .io import atomic_write

__all__ = ["overlay", "write_overlay", "heatmap_name", "cam_mass_in_box", "normalised"]


def overlay(gray: np.ndarray, cam: np.ndarray, text: str | None = None, max_side: int = 512,
            alpha: float = 0.4, box=None) -> np.ndarray:
    """BGR uint8 image: ``gray`` (any size) with the upsampled map blended on top.

    ``box`` (y0, x0, y1, x1 fractions): the map covers only that part of the image
    (the lung box a lung-field model classified); outside it the map reads as its
    minimum, no evidence.
    """
    h, w = gray.shape
    scale = min(1.0, max_side / max(h, w))
    if scale < 1.0:
        gray = cv2.resize(gray, (max(int(w * scale), 1), max(int(h * scale), 1)),
                          interpolation=cv2.INTER_AREA)
    h, w = gray.shape
    if box is None:
        heat = normalised(cv2.resize(np.asarray(cam, np.float32), (w, h),
                                     interpolation=cv2.INTER_CUBIC))
    else:
        from .lung import heatmap_to_frame

        # upsample within the crop first (as without a box), then place it on the image
        fine = cv2.resize(np.asarray(cam, np.float32), (64, 64), interpolation=cv2.INTER_CUBIC)
        heat = normalised(heatmap_to_frame(fine, box, (h, w)))
    colour = cv2.applyColorMap((np.clip(heat, 0, 1) * 255).astype(np.uint8), cv2.COLORMAP_JET)
    out = cv2.addWeighted(cv2.cvtColor(gray, cv2.COLOR_GRAY2BGR), 1.0 - alpha, colour, alpha, 0)
    if text:
        size = max(0.4, w / 900.0)
        thick = max(1, int(round(size * 2)))
        (tw, th), base = cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, size, thick)
        cv2.rectangle(out, (0, 0), (min(tw + 12, w), th + base + 10), (0, 0, 0), -1)
        cv2.putText(out, text, (6, th + 5), cv2.FONT_HERSHEY_SIMPLEX, size, (255, 255, 255),
                    thick, cv2.LINE_AA)
    return out


def normalised(cam: np.ndarray) -> np.ndarray:
    """The map scaled to [0, 1] over its own range (0.5 everywhere when it is flat)."""
    cam = np.asarray(cam, np.float32)
    lo, hi = float(cam.min()), float(cam.max())
    if hi - lo < 1e-6:
        return np.full_like(cam, 0.5)
    return (cam - lo) / (hi - lo)


def heatmap_name(index: int, path: str | os.PathLike) -> str:
    """A safe, unique PNG name: running index and the file's stem (ASCII letters only)."""
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", Path(path).stem)[:80].strip("._") or "image"
    return f"{index:06d}_{stem}.png"


def write_overlay(out_path: str | os.PathLike, image: np.ndarray) -> None:
    from .images import mark_own_png

    ok, buf = cv2.imencode(".png", image)
    if not ok:
        raise OSError(f"{out_path}: PNG encoding failed")
    atomic_write(out_path, mark_own_png(buf.tobytes()))  # a later folder walk skips it


def cam_mass_in_box(cam: np.ndarray, box: tuple[float, float, float, float] = (0.15, 0.1, 0.85, 0.9)
                    ) -> float:
    """Share of the map's evidence inside a box: the map above its own minimum, upsampled.

    ``box`` is (x0, y0, x1, y1) as fractions of the image: by default the chest
    region of a frontal X-ray (56 % of the area); the rest is borders and
    corners. Measured above the minimum so that a bias shared by every position
    (calibration) does not count as evidence; a flat map gives the box's share
    of the area.
    """
    heat = cv2.resize(np.asarray(cam, np.float32), (100, 100), interpolation=cv2.INTER_LINEAR)
    heat = heat - heat.min()
    x0, y0, x1, y1 = (int(round(v * 100)) for v in box)
    total = float(heat.sum())
    if total <= 0:
        return (x1 - x0) * (y1 - y0) / 10000.0
    return float(heat[y0:y1, x0:x1].sum() / total)
