"""Classification metrics in numpy: confusion counts, ROC AUC, threshold rules.

PNEUMONIA is the positive class: ``recall`` is sensitivity and
``specificity`` is the recall of NORMAL.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Sequence

import numpy as np

__all__ = ["BinaryMetrics", "binary_metrics", "choose_threshold", "choose_threshold_robust",
           "roc_auc", "roc_curve", "latency_summary", "apply_temperature", "fit_temperature", "fit_platt",
           "expected_calibration_error"]


@dataclass(frozen=True)
class BinaryMetrics:
    accuracy: float
    precision: float
    recall: float
    specificity: float
    f1: float
    auc: float | None
    tp: int
    fp: int
    tn: int
    fn: int
    n_labelled: int

    def to_dict(self) -> dict:
        return asdict(self)


def _safe_div(num: float, den: float) -> float:
    return float(num) / float(den) if den else 0.0


def roc_auc(y_true: Sequence[int], scores: Sequence[float]) -> float | None:
    """Area under the ROC curve by the rank (Mann-Whitney) formula.

    Tied scores get their average rank, so a tie between a positive and a
    negative counts one half. Returns None when only one class is present.
    """
    y = np.asarray(y_true, dtype=bool)
    s = np.asarray(scores, dtype=np.float64)
    n_pos = int(y.sum())
    n_neg = y.size - n_pos
    if n_pos == 0 or n_neg == 0:
        return None
    order = np.argsort(s, kind="mergesort")
    sorted_s = s[order]
    ranks = np.empty(s.size, dtype=np.float64)
    # average ranks over runs of equal scores
    boundaries = np.flatnonzero(np.diff(sorted_s)) + 1
    starts = np.concatenate(([0], boundaries))
    ends = np.concatenate((boundaries, [s.size]))
    avg = (starts + ends + 1) / 2.0  # mean of ranks start+1 .. end
    ranks[order] = np.repeat(avg, ends - starts)
    return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def roc_curve(y_true: Sequence[int], scores: Sequence[float]
              ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """False-positive rate, true-positive rate and thresholds (decreasing).

    Point i is the rule ``score >= thresholds[i]``; the first point is (0, 0).
    """
    y = np.asarray(y_true, dtype=bool)
    s = np.asarray(scores, dtype=np.float64)
    order = np.argsort(-s, kind="mergesort")
    s_sorted, y_sorted = s[order], y[order]
    last_of_run = np.r_[np.flatnonzero(np.diff(s_sorted)), s.size - 1]
    tps = np.cumsum(y_sorted)[last_of_run]
    fps = (last_of_run + 1) - tps
    n_pos, n_neg = max(int(y.sum()), 1), max(int((~y).sum()), 1)
    fpr = np.r_[0.0, fps / n_neg]
    tpr = np.r_[0.0, tps / n_pos]
    thresholds = np.r_[np.inf, s_sorted[last_of_run]]
    return fpr, tpr, thresholds


def binary_metrics(y_true: Sequence[int], scores: Sequence[float], threshold: float
                   ) -> BinaryMetrics:
    """Metrics of the rule ``score >= threshold`` means PNEUMONIA (label 1)."""
    y = np.asarray(y_true, dtype=bool)
    s = np.asarray(scores, dtype=np.float64)
    pred = s >= threshold
    tp = int(np.sum(pred & y))
    fp = int(np.sum(pred & ~y))
    tn = int(np.sum(~pred & ~y))
    fn = int(np.sum(~pred & y))
    precision = _safe_div(tp, tp + fp)
    recall = _safe_div(tp, tp + fn)
    return BinaryMetrics(
        accuracy=_safe_div(tp + tn, y.size),
        precision=precision,
        recall=recall,
        specificity=_safe_div(tn, tn + fp),
        f1=_safe_div(2 * precision * recall, precision + recall),
        auc=roc_auc(y, s),
        tp=tp, fp=fp, tn=tn, fn=fn, n_labelled=int(y.size),
    )


def choose_threshold(y_true: Sequence[int], scores: Sequence[float],
                     target_sensitivity: float | None = None) -> tuple[float, str]:
    """Pick the decision threshold on validation scores.

    Default rule, ``youden_plateau``: Youden's J (sensitivity + specificity - 1)
    is nearly flat over a wide range of thresholds when validation AUC is high,
    and its exact maximum is decided by one or two validation images. So every
    ROC point whose J is within one image of the best (1 / size of the smaller
    class) is a candidate, and the threshold is the middle of the candidates'
    range of scores: the centre of the plateau, not its first edge.

    With ``target_sensitivity`` S: the highest threshold whose sensitivity is at
    least S, placed midway to the next lower score so it does not sit on an image.

    Returns:
        (threshold, rule) where rule describes how it was chosen.
    """
    y = np.asarray(y_true, dtype=bool)
    s = np.asarray(scores, dtype=np.float64)
    if y.all() or not y.any():
        raise ValueError("threshold selection needs both classes in the validation set")
    fpr, tpr, thr = roc_curve(y, s)
    if target_sensitivity is None:
        j = tpr - fpr
        tolerance = 1.0 / min(int(y.sum()), int((~y).sum()))
        candidates = thr[(j >= j.max() - tolerance - 1e-12) & np.isfinite(thr)]
        if candidates.size:
            return float((candidates.min() + candidates.max()) / 2.0), "youden_plateau"
        idx = int(np.argmax(j))
        rule = "youden_plateau"
    else:
        if not 0.0 < target_sensitivity <= 1.0:
            raise ValueError("target sensitivity must be in (0, 1]")
        idx = int(np.flatnonzero(tpr >= target_sensitivity - 1e-12)[0])
        rule = f"sensitivity>={target_sensitivity:g}_midpoint"
    upper = thr[idx]
    below = s[s < upper]
    lower = float(below.max()) if below.size else 0.0
    if not np.isfinite(upper):
        return float(np.nextafter(lower, np.inf)), rule
    return float((upper + lower) / 2.0), rule


def latency_summary(ms_per_image: Sequence[float]) -> dict[str, float | None]:
    """mean, p50, p95 and p99 of per-image model times in milliseconds."""
    t = np.asarray(ms_per_image, dtype=np.float64)
    if t.size == 0:
        return {"mean": None, "p50": None, "p95": None, "p99": None}
    p50, p95, p99 = np.percentile(t, [50, 95, 99])
    return {"mean": float(t.mean()), "p50": float(p50), "p95": float(p95), "p99": float(p99)}


def choose_threshold_robust(y_true: Sequence[int], scores_by_row: dict[str, Sequence[float]],
                            views: dict[str, np.ndarray] | None = None) -> tuple[float, str]:
    """A threshold that holds under shift: the centre of the worst-row Youden plateau.

    For each candidate threshold t, J_min(t) is the smallest Youden's J over the
    rows (the clean validation set and its perturbed copies, e.g. the zoom rows
    of the robustness suite). Every t whose J_min is within one image of the
    best (1 / size of the smallest class) is a candidate; the middle of their
    range is returned, as in :func:`choose_threshold`.

    ``views`` (name -> boolean mask over the images), e.g. the block and patient
    views of a block split: each row is then judged within each view, and the
    worst over rows and views counts.
    """
    y_all = np.asarray(y_true, dtype=bool)
    masks = list(views.values()) if views else [np.ones(y_all.size, dtype=bool)]
    rows = [np.asarray(s, dtype=np.float64) for s in scores_by_row.values()]
    cand = np.unique(np.concatenate(rows))
    cand = np.r_[cand, np.nextafter(cand[-1], np.inf)]
    j_min = np.full(cand.size, np.inf)
    smallest = np.inf
    for mask in masks:
        mask = np.asarray(mask, dtype=bool)
        y = y_all[mask]
        if y.all() or not y.any():
            raise ValueError("threshold selection needs both classes in the validation set")
        n_pos, n_neg = int(y.sum()), int((~y).sum())
        smallest = min(smallest, n_pos, n_neg)
        for s in rows:
            pos = np.sort(s[mask][y])
            neg = np.sort(s[mask][~y])
            tpr = 1.0 - np.searchsorted(pos, cand, side="left") / n_pos  # share of pos >= t
            fpr = 1.0 - np.searchsorted(neg, cand, side="left") / n_neg
            j_min = np.minimum(j_min, tpr - fpr)
    tolerance = 1.0 / smallest
    ok = cand[j_min >= j_min.max() - tolerance - 1e-12]
    where = f"{len(rows)} rows" + (f" x {len(masks)} views" if views else "")
    return float((ok.min() + ok.max()) / 2.0), f"worst_row_youden_plateau({where})"


def _logit(p: np.ndarray) -> np.ndarray:
    p = np.clip(np.asarray(p, dtype=np.float64), 1e-7, 1 - 1e-7)
    return np.log(p) - np.log1p(-p)


def apply_temperature(p: Sequence[float] | float, temperature: float,
                      bias: float = 0.0) -> np.ndarray:
    """sigmoid(logit(p) / T + bias): what a calibration folded into the model outputs."""
    return 1.0 / (1.0 + np.exp(-(_logit(np.asarray(p)) / float(temperature) + float(bias))))


def fit_temperature(y_true: Sequence[int], scores: Sequence[float]) -> float:
    """The temperature T minimising the log-loss of sigmoid(logit(p) / T) (grid search)."""
    y = np.asarray(y_true, dtype=np.float64)
    z = _logit(scores)
    grid = np.exp(np.linspace(np.log(0.1), np.log(10.0), 801))
    nll = [np.mean(np.logaddexp(0.0, -z / t) * y + np.logaddexp(0.0, z / t) * (1 - y))
           for t in grid]
    return float(grid[int(np.argmin(nll))])


def fit_platt(y_true: Sequence[int], scores: Sequence[float], iterations: int = 50
              ) -> tuple[float, float]:
    """Temperature and bias (T, b) minimising the log-loss of sigmoid(logit(p) / T + b).

    Platt scaling by Newton's method. The bias absorbs the prior shift that
    class-balanced training puts into the logits (the model is trained as if the
    classes were equally common); T alone cannot.
    """
    y = np.asarray(y_true, dtype=np.float64)
    z = _logit(scores)
    a, b = 1.0 / fit_temperature(y, scores), 0.0
    x = np.stack([z, np.ones_like(z)], axis=1)
    for _ in range(iterations):
        q = 1.0 / (1.0 + np.exp(-(a * z + b)))
        grad = x.T @ (q - y)
        hess = (x * (q * (1 - q))[:, None]).T @ x + 1e-9 * np.eye(2)
        step = np.linalg.solve(hess, grad)
        a, b = a - step[0], b - step[1]
        if np.max(np.abs(step)) < 1e-10:
            break
    if not (np.isfinite(a) and np.isfinite(b) and 0.1 <= a <= 10.0):
        return fit_temperature(y, scores), 0.0  # near-separable data: temperature alone
    return float(1.0 / a), float(b)


def expected_calibration_error(y_true: Sequence[int], scores: Sequence[float],
                               bins: int = 15) -> float:
    """ECE of P(PNEUMONIA): mean |observed rate - mean probability| over equal-width bins,
    weighted by the share of images in each bin."""
    y = np.asarray(y_true, dtype=np.float64)
    p = np.asarray(scores, dtype=np.float64)
    if p.size == 0:
        return 0.0
    idx = np.minimum((p * bins).astype(int), bins - 1)
    ece = 0.0
    for b in range(bins):
        m = idx == b
        if m.any():
            ece += m.mean() * abs(y[m].mean() - p[m].mean())
    return float(ece)
