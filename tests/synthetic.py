"""Synthetic labelled X-ray folders with Kermany-style names (patients with several images)."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np


def make_dataset(root: Path, n_patients: int = 12, images_per_patient: int = 2, size: int = 48,
                 seed: int = 0) -> Path:
    """PNEUMONIA images get a bright blob in one lung field; NORMAL ones do not."""
    rng = np.random.default_rng(seed)
    for label in ("NORMAL", "PNEUMONIA"):
        (root / label).mkdir(parents=True, exist_ok=True)
    for p in range(n_patients):
        for k in range(images_per_patient):
            for label in ("NORMAL", "PNEUMONIA"):
                img = rng.normal(90, 12, (size, size)).clip(0, 255)
                if label == "PNEUMONIA":
                    cy, cx = rng.integers(size // 4, 3 * size // 4, 2)
                    yy, xx = np.mgrid[:size, :size]
                    img += 110 * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * (size / 8) ** 2))
                    name = f"person{p + 1}_bacteria_{p * 10 + k}.jpeg"
                else:
                    name = f"IM-{p + 100:04d}-{k + 1:04d}.jpeg"
                ok, buf = cv2.imencode(".jpg", img.clip(0, 255).astype(np.uint8))
                assert ok
                buf.tofile(str(root / label / name))
    return root
