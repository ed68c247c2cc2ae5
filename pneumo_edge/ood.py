"""Mahalanobis OOD statistics in numpy: Ledoit-Wolf shrinkage covariance and whitening.

Export fits them on training-split features (``training.heads``) and
``pneumo-edge calibrate --refit-ood`` on a site's features; both write the same
two graph constants (whitening matrix and ``-mean @ whiten``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["OodFit", "ledoit_wolf", "fit_ood"]


@dataclass
class OodFit:
    mean: np.ndarray        # (d,)
    whiten: np.ndarray      # (d, d), symmetric: Sigma^(-1/2)
    shrinkage: float
    n_fit: int

    def distance(self, features: np.ndarray) -> np.ndarray:
        z = (np.asarray(features, np.float64) - self.mean) @ self.whiten
        return np.sqrt(np.sum(z * z, axis=1))


def ledoit_wolf(x: np.ndarray) -> tuple[np.ndarray, float]:
    """Shrinkage covariance of the rows of ``x`` (Ledoit & Wolf 2004): (cov, shrinkage)."""
    x = np.asarray(x, np.float64)
    n, d = x.shape
    xc = x - x.mean(axis=0)
    emp = xc.T @ xc / n
    mu = np.trace(emp) / d
    x2 = xc ** 2
    beta = (np.sum(x2.T @ x2) / n - np.sum(emp ** 2)) / (d * n)
    delta = np.sum((emp - mu * np.eye(d)) ** 2) / d
    shrink = 1.0 if delta <= 0 else float(min(beta, delta) / delta)
    return (1.0 - shrink) * emp + shrink * mu * np.eye(d), shrink


def fit_ood(features: np.ndarray) -> OodFit:
    """Mean and whitening matrix of pooled features (rows are images)."""
    cov, shrink = ledoit_wolf(features)
    vals, vecs = np.linalg.eigh(cov)
    vals = np.maximum(vals, vals.max() * 1e-9)
    whiten = (vecs * (1.0 / np.sqrt(vals))) @ vecs.T
    return OodFit(np.asarray(features, np.float64).mean(axis=0), whiten, shrink, len(features))
