"""Lung-field framing in numpy: the lung box from a segmenter mask, the crop, its check.

This is the exact twin of ``training.lungcrop.LungCrop`` (the Keras/ONNX stage);
tests hold the two to 1e-4. The recipe, for a full frame of ``F`` x ``F`` grey
values in [0, 255] (``F = FRAME = 192``):

1. segmenter input: the frame averaged over 2 x 2 blocks (``SEG = 96`` px);
2. lung mask: segmenter probability > ``MASK_THRESHOLD`` (0.5);
3. for every row and every column, the fraction of its pixels that are lung; the
   box runs from the first to the last row (column) whose fraction is at least
   ``MIN_FRACTION`` (0.03: at least 3 of 96 pixels, so a one- or two-pixel speck
   does not stretch the box), as fractions of the frame: row ``r`` spans
   ``[r / 96, (r + 1) / 96)``;
4. ``MARGIN`` (0.06 of the box's height, resp. width) added on each side, then
   clipped to [0, 1];
5. no row or no column reaches the minimum: the full frame ``(0, 0, 1, 1)`` and a
   lung area of 0;
6. the crop is bilinear, ``C`` x ``C`` (``C = CROP = 144``), written as two
   interpolation matrices: output row ``i`` samples the frame at
   ``s_i = y0 * F + (i + 0.5) * (y1 - y0) * F / C - 0.5`` (pixel centres), clamped
   to ``[0, F - 1]``; ``Wy[i, j] = max(0, 1 - |s_i - j|)``, rows normalised to sum
   1; the same for columns; ``crop = Wy @ frame @ Wx.T`` per channel. Only
   elementwise operations and matrix products: tf2onnx converts them as they are.

Boxes are ``(y0, x0, y1, x1)`` fractions of the frame, the order of
``tf.image.crop_and_resize``. A box is implausible (the input check
``no_lung_field``) when no lung was found, when it covers less than
``MIN_BOX_AREA`` of the frame, or when its centre lies outside ``CENTRE_X`` /
``CENTRE_Y``: a frontal chest X-ray has its lungs near the middle.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

__all__ = [
    "FRAME", "SEG", "CROP", "MASK_THRESHOLD", "MIN_FRACTION", "MARGIN", "JITTER",
    "MIN_BOX_AREA", "CENTRE_X", "CENTRE_Y", "NO_LUNG_FIELD", "FULL_BOX",
    "seg_input", "lung_box", "crop_matrices", "crop", "lung_crop", "lung_field_issue",
    "heatmap_to_frame",
]

FRAME = 192            # full frame side (the model input), pixels
SEG = 96               # segmenter input side: the frame pooled 2 x 2
CROP = 144             # side of the crop the classifier sees
MASK_THRESHOLD = 0.5   # segmenter probability above which a pixel is lung
MIN_FRACTION = 0.03    # a row/column is in the box when >= 3 % of its pixels are lung
MARGIN = 0.06          # added on each side, as a fraction of the box's height/width
JITTER = 0.04          # training only: each side moved by up to this share of the box size
MIN_BOX_AREA = 0.15    # a plausible lung box covers at least this share of the frame
CENTRE_X = (0.30, 0.70)  # plausible range of the box centre, fraction of the width
CENTRE_Y = (0.25, 0.75)  # and of the height
NO_LUNG_FIELD = "no_lung_field"
FULL_BOX = (0.0, 0.0, 1.0, 1.0)


def seg_input(frame: np.ndarray) -> np.ndarray:
    """The segmenter's input: a frame ``(..., F, F)`` or ``(..., F, F, ch)`` averaged 2 x 2.

    A channel axis (three identical grey channels) is averaged away first.
    Returns float32 ``(..., F/2, F/2)``.
    """
    x = np.asarray(frame, np.float32)
    if x.ndim >= 3 and x.shape[-1] in (1, 3):
        x = x.mean(axis=-1)
    h, w = x.shape[-2:]
    if h % 2 or w % 2:
        raise ValueError(f"frame of {h}x{w} px: the side must be even")
    return x.reshape(*x.shape[:-2], h // 2, 2, w // 2, 2).mean(axis=(-3, -1))


def lung_box(mask: np.ndarray, *, threshold: float = MASK_THRESHOLD,
             min_fraction: float = MIN_FRACTION, margin: float = MARGIN
             ) -> tuple[np.ndarray, np.ndarray]:
    """The lung box (with margin) and the lung area fraction of segmenter masks.

    Args:
        mask: probabilities (or booleans) ``(..., H, W)``; a trailing channel of 1 is
            dropped.
        threshold: a pixel is lung when its value is above this.
        min_fraction: share of a row's (column's) pixels that must be lung for the
            row (column) to count.
        margin: added on each side, as a fraction of the box's height / width.

    Returns:
        ``box`` float32 ``(..., 4)`` as ``(y0, x0, y1, x1)`` in [0, 1] and ``area``
        float32 ``(...)``: the share of the mask's pixels that are lung (0 when no
        lung was found, and then the box is the full frame).
    """
    m = np.asarray(mask)
    if m.ndim >= 3 and m.shape[-1] == 1:
        m = m[..., 0]
    lung = (m > threshold).astype(np.float32)
    h, w = lung.shape[-2:]
    rows = lung.mean(axis=-1)
    cols = lung.mean(axis=-2)
    rv = rows >= np.float32(min_fraction)
    cv = cols >= np.float32(min_fraction)
    found = rv.any(axis=-1) & cv.any(axis=-1)

    def extent(valid: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
        idx = np.arange(n, dtype=np.float32)
        first = np.where(valid, idx, np.float32(n)).min(axis=-1)
        last = np.where(valid, idx, np.float32(-1)).max(axis=-1) + np.float32(1)
        return first / np.float32(n), last / np.float32(n)

    y0, y1 = extent(rv, h)
    x0, x1 = extent(cv, w)
    dy = np.float32(margin) * (y1 - y0)
    dx = np.float32(margin) * (x1 - x0)
    box = np.stack([y0 - dy, x0 - dx, y1 + dy, x1 + dx], axis=-1)
    box = np.clip(box, 0.0, 1.0).astype(np.float32)
    box = np.where(found[..., None], box, np.asarray(FULL_BOX, np.float32))
    area = np.where(found, lung.mean(axis=(-2, -1)), np.float32(0)).astype(np.float32)
    return box, area


def _axis_matrix(lo: np.ndarray, hi: np.ndarray, n_in: int, n_out: int) -> np.ndarray:
    i = np.arange(n_out, dtype=np.float32)
    j = np.arange(n_in, dtype=np.float32)
    lo = np.asarray(lo, np.float32)[..., None]
    hi = np.asarray(hi, np.float32)[..., None]
    s = lo * np.float32(n_in) + (i + np.float32(0.5)) * (hi - lo) * np.float32(n_in / n_out) \
        - np.float32(0.5)
    s = np.clip(s, 0.0, n_in - 1.0)
    wts = np.maximum(np.float32(0), np.float32(1) - np.abs(s[..., None] - j))
    return (wts / wts.sum(axis=-1, keepdims=True)).astype(np.float32)


def crop_matrices(box: np.ndarray | Sequence[float], frame: int | tuple[int, int] = FRAME,
                  size: int = CROP) -> tuple[np.ndarray, np.ndarray]:
    """Bilinear interpolation matrices ``Wy (..., size, H)`` and ``Wx (..., size, W)``.

    ``crop = Wy @ image @ Wx.T`` is the ``size`` x ``size`` bilinear crop of ``box``
    (``(y0, x0, y1, x1)`` fractions, any leading batch shape) out of an ``H`` x ``W``
    image.
    """
    h, w = (frame, frame) if isinstance(frame, int) else frame
    b = np.asarray(box, np.float32)
    return (_axis_matrix(b[..., 0], b[..., 2], h, size),
            _axis_matrix(b[..., 1], b[..., 3], w, size))


def crop(image: np.ndarray, box: np.ndarray | Sequence[float], size: int = CROP) -> np.ndarray:
    """The ``size`` x ``size`` bilinear crop of ``box`` from ``image`` ``(H, W)`` or
    ``(H, W, ch)``; a batch ``(N, H, W[, ch])`` with boxes ``(N, 4)`` works too."""
    img = np.asarray(image, np.float32)
    b = np.asarray(box, np.float32)
    batched = b.ndim == 2
    spatial = img.shape[1:3] if batched else img.shape[:2]
    wy, wx = crop_matrices(b, (int(spatial[0]), int(spatial[1])), size)
    has_ch = img.ndim == (4 if batched else 3)
    if not has_ch:
        return wy @ img @ np.swapaxes(wx, -1, -2)
    # channels first for the matrix products, back to channels last
    chw = np.moveaxis(img, -1, -3)
    out = wy[..., None, :, :] @ chw @ np.swapaxes(wx, -1, -2)[..., None, :, :]
    return np.moveaxis(out, -3, -1).astype(np.float32)


def lung_crop(frame: np.ndarray, mask: np.ndarray, size: int = CROP
              ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(crop, box, area)`` of a frame given the segmenter's mask of its pooled copy."""
    box, area = lung_box(mask)
    return crop(frame, box, size), box, area


def lung_field_issue(box: Sequence[float], area: float) -> str | None:
    """Why a lung box is implausible (one line), or None when it looks like a chest."""
    y0, x0, y1, x1 = (float(v) for v in box)
    if not area > 0:
        return "no lung field found"
    covered = max(0.0, y1 - y0) * max(0.0, x1 - x0)
    if covered < MIN_BOX_AREA:
        return (f"lung box covers {100 * covered:.0f} % of the image "
                f"(< {100 * MIN_BOX_AREA:.0f} %)")
    cy, cx = (y0 + y1) / 2, (x0 + x1) / 2
    if not CENTRE_X[0] <= cx <= CENTRE_X[1] or not CENTRE_Y[0] <= cy <= CENTRE_Y[1]:
        return f"lung box off-centre (centre at {100 * cx:.0f} % / {100 * cy:.0f} % of width / height)"
    return None


def heatmap_to_frame(heat: np.ndarray, box: Sequence[float], shape: tuple[int, int],
                     fill: float | None = None) -> np.ndarray:
    """A map over the crop (``h`` x ``w``, any resolution) drawn back onto an image.

    The crop spans ``box`` (fractions) of the image, so output pixel ``(r, c)`` of
    an ``H`` x ``W`` image reads the map at crop position
    ``((r + 0.5) / H - y0) / (y1 - y0) * h - 0.5`` (and likewise for columns),
    bilinearly, the inverse of the forward crop. Pixels outside the box get
    ``fill`` (default: the map's minimum, i.e. "no evidence" once normalised).

    Returns:
        float32 ``(H, W)``.
    """
    import cv2

    hm = np.asarray(heat, np.float32)
    if hm.ndim != 2:
        raise ValueError(f"heatmap of shape {hm.shape}: expected 2-D")
    y0, x0, y1, x1 = (float(v) for v in box)
    big_h, big_w = int(shape[0]), int(shape[1])
    h, w = hm.shape
    fill_value = float(hm.min()) if fill is None else float(fill)
    rows = ((np.arange(big_h, dtype=np.float64) + 0.5) / big_h - y0) / max(y1 - y0, 1e-9) * h - 0.5
    cols = ((np.arange(big_w, dtype=np.float64) + 0.5) / big_w - x0) / max(x1 - x0, 1e-9) * w - 0.5
    inside_r = ((np.arange(big_h) + 0.5) / big_h >= y0) & ((np.arange(big_h) + 0.5) / big_h <= y1)
    inside_c = ((np.arange(big_w) + 0.5) / big_w >= x0) & ((np.arange(big_w) + 0.5) / big_w <= x1)
    map_y = np.repeat(np.clip(rows, 0, h - 1)[:, None], big_w, axis=1).astype(np.float32)
    map_x = np.repeat(np.clip(cols, 0, w - 1)[None, :], big_h, axis=0).astype(np.float32)
    out = cv2.remap(hm, map_x, map_y, interpolation=cv2.INTER_LINEAR,
                    borderMode=cv2.BORDER_REPLICATE)
    out[~(inside_r[:, None] & inside_c[None, :])] = fill_value
    return out.astype(np.float32)
