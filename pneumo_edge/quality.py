"""Cheap input checks before the model: is this plausibly a frontal chest radiograph?

Each check looks at the decoded greyscale image (and a small colour decode of
colour files) and, when it fires, adds a one-line warning to that prediction.
None is a failure by itself (``predict --flagged-as fail`` makes flagged images
failures). The model's own ``ood`` output is the other half: it measures how
far the image's features are from the training split's.

| check | fires when | why |
| --- | --- | --- |
| uniform | grey-level standard deviation below 4 | blank, black or saturated frames |
| colour | mean max-min over B, G, R above 12 | photographs and screenshots, not radiographs |
| small | shorter side below 128 px as stored | thumbnails carry too little detail |
| aspect | longer / shorter side above 2.0 | crops, panoramas, text pages |
| inverted | centre strip darker than the lung fields by 12 grey levels | MONOCHROME1-like polarity (bone dark) |

The inverted check compares the mediastinum (the middle fifth of the width,
rows 20-80 %) with the two lung fields (15-35 % and 65-85 % of the width,
rows 25-70 %): on a frontal X-ray displayed as usual the mediastinum is
brighter.
"""

from __future__ import annotations

import numpy as np

__all__ = ["input_warnings", "UNIFORM_STD", "CHROMA", "MIN_SIDE", "MAX_ASPECT", "INVERTED_MARGIN"]

UNIFORM_STD = 4.0
CHROMA = 12.0
MIN_SIDE = 128
MAX_ASPECT = 2.0
INVERTED_MARGIN = 12.0


def polarity_margin(gray: np.ndarray) -> float:
    """Mean grey level of the mediastinum strip minus that of the lung fields."""
    h, w = gray.shape
    g = gray.astype(np.float32)
    centre = g[int(0.2 * h):int(0.8 * h), int(0.4 * w):int(0.6 * w)]
    rows = slice(int(0.25 * h), int(0.7 * h))
    lungs = np.concatenate([g[rows, int(0.15 * w):int(0.35 * w)].ravel(),
                            g[rows, int(0.65 * w):int(0.85 * w)].ravel()])
    if centre.size == 0 or lungs.size == 0:
        return 0.0
    return float(centre.mean() - lungs.mean())


def input_warnings(gray: np.ndarray, info: dict | None = None) -> list[str]:
    """Warnings for one decoded image (2-D uint8); ``info`` from ``decode_gray(info=...)``."""
    info = info or {}
    out: list[str] = []
    std = float(gray.std())
    if std < UNIFORM_STD:
        out.append(f"nearly uniform image (grey-level std {std:.1f} < {UNIFORM_STD:g})")
    chroma = info.get("chroma")
    if chroma is not None and chroma > CHROMA:
        out.append(f"colour image (chroma {chroma:.0f} > {CHROMA:g}): a photograph, "
                   "not a radiograph?")
    h, w = int(info.get("height", gray.shape[0])), int(info.get("width", gray.shape[1]))
    if min(h, w) < MIN_SIDE:
        out.append(f"very small image ({w}x{h} px; shorter side < {MIN_SIDE})")
    if min(h, w) > 0 and max(h, w) / min(h, w) > MAX_ASPECT:
        out.append(f"extreme aspect ratio ({w}x{h} px)")
    if std >= UNIFORM_STD:
        margin = polarity_margin(gray)
        if margin < -INVERTED_MARGIN:
            out.append(f"likely inverted polarity (mediastinum {-margin:.0f} grey levels darker "
                       "than the lung fields)")
    out += dicom_warnings(info)
    return out


def dicom_warnings(info: dict) -> list[str]:
    """Warnings from a DICOM file's acquisition facts (``info['dicom']``)."""
    from .dicom import LATERAL_VIEWS, RADIOGRAPH_MODALITIES

    facts = info.get("dicom") or {}
    out: list[str] = []
    view = (facts.get("view_position") or "").upper()
    if view in LATERAL_VIEWS:
        out.append(f"lateral view (ViewPosition {view}): the model was trained on frontal "
                   "chest X-rays")
    modality = (facts.get("modality") or "").upper()
    if modality and modality not in RADIOGRAPH_MODALITIES:
        out.append(f"DICOM modality {modality}: the model was trained on chest radiographs "
                   "(CR/DX)")
    if info.get("dicom_burned_in"):
        out.append("burned-in annotation (DICOM): the pixels may show patient data, and "
                   "thumbnails and heatmaps reproduce them")
    return out
