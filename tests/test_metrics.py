"""Metrics against hand-computed cases."""

from __future__ import annotations

import numpy as np
import pytest

from pneumo_edge.metrics import (binary_metrics, choose_threshold, latency_summary, roc_auc,
                                 roc_curve)


def test_confusion_counts_and_rates():
    y = [1, 1, 1, 1, 0, 0, 0]
    s = [0.9, 0.8, 0.4, 0.7, 0.6, 0.2, 0.1]
    m = binary_metrics(y, s, 0.5)
    assert (m.tp, m.fn, m.fp, m.tn) == (3, 1, 1, 2)
    assert m.accuracy == pytest.approx(5 / 7)
    assert m.precision == pytest.approx(3 / 4)
    assert m.recall == pytest.approx(3 / 4)
    assert m.specificity == pytest.approx(2 / 3)
    assert m.f1 == pytest.approx(0.75)
    assert m.n_labelled == 7
    # AUC: pairs (pos > neg) = 4*3 = 12; 0.4 loses to 0.6 only -> 11/12
    assert m.auc == pytest.approx(11 / 12)


def test_threshold_is_inclusive():
    m = binary_metrics([1, 0], [0.5, 0.49], 0.5)
    assert (m.tp, m.tn) == (1, 1)


def test_auc_with_ties_counts_half():
    # one positive and one negative tied at 0.5: that pair counts 1/2
    assert roc_auc([1, 0, 1, 0], [0.5, 0.5, 0.9, 0.1]) == pytest.approx((1 + 1 + 1 + 0.5) / 4)
    assert roc_auc([1, 1, 0, 0], [0.3, 0.3, 0.3, 0.3]) == pytest.approx(0.5)


def test_auc_matches_brute_force_on_random_scores():
    rng = np.random.default_rng(1)
    y = rng.integers(0, 2, 300)
    s = np.round(rng.random(300), 2)  # many ties
    pos, neg = s[y == 1], s[y == 0]
    brute = ((pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()) / (
        pos.size * neg.size)
    assert roc_auc(y, s) == pytest.approx(brute, abs=1e-12)
    fpr, tpr, _ = roc_curve(y, s)
    assert np.trapezoid(tpr, fpr) == pytest.approx(brute, abs=1e-12)


def test_auc_undefined_for_one_class():
    assert roc_auc([1, 1], [0.2, 0.3]) is None
    assert binary_metrics([0, 0], [0.2, 0.9], 0.5).auc is None


def test_youden_plateau_takes_the_centre_of_near_best_thresholds():
    # separable: J = 1 at 0.6; within one image (1/3) of it: thresholds 0.3 .. 0.7
    y = [0, 0, 0, 1, 1, 1]
    s = [0.1, 0.2, 0.3, 0.6, 0.7, 0.8]
    thr, rule = choose_threshold(y, s)
    assert thr == pytest.approx(0.5)
    assert rule == "youden_plateau"


def test_youden_plateau_ignores_far_worse_thresholds():
    # J by threshold: 0.9->.25, 0.7->.5, 0.65->.25, 0.5->.5, 0.4->.75 (best), 0.3->.5,
    # 0.2->.25. Within one image (1/4) of the best: 0.3, 0.4, 0.5, 0.7 -> centre 0.5
    y = [0, 0, 0, 0, 1, 1, 1, 1]
    s = [0.1, 0.2, 0.3, 0.65, 0.4, 0.5, 0.7, 0.9]
    thr, _ = choose_threshold(y, s)
    assert thr == pytest.approx(0.5)
    # with 40 images a class the tolerance shrinks to 1/40 and the best point wins
    y40 = [0] * 40 + [1] * 40
    s40 = [i / 100 for i in range(40)] + [0.395] + [0.5 + i / 100 for i in range(39)]
    thr40, _ = choose_threshold(y40, s40)
    m = binary_metrics(y40, s40, thr40)
    assert thr40 == pytest.approx(0.445) and (m.fp, m.fn) == (0, 1)


def test_target_sensitivity_picks_highest_threshold_reaching_it():
    y = [0, 0, 1, 0, 1, 1, 1]
    s = [0.1, 0.2, 0.25, 0.3, 0.6, 0.7, 0.8]
    thr, _ = choose_threshold(y, s, target_sensitivity=0.75)
    assert thr == pytest.approx((0.6 + 0.3) / 2)
    m = binary_metrics(y, s, thr)
    assert m.recall == pytest.approx(0.75) and m.specificity == pytest.approx(1.0)
    thr_all, _ = choose_threshold(y, s, target_sensitivity=1.0)
    assert binary_metrics(y, s, thr_all).recall == 1.0 and thr_all == pytest.approx(0.225)


def test_threshold_needs_both_classes():
    with pytest.raises(ValueError):
        choose_threshold([1, 1], [0.1, 0.2])


def test_latency_summary():
    lat = latency_summary(list(range(1, 101)))
    assert lat["mean"] == pytest.approx(50.5)
    assert lat["p50"] == pytest.approx(50.5)
    assert lat["p95"] == pytest.approx(95.05)
    assert lat["p99"] >= lat["p95"] >= lat["p50"]
    assert latency_summary([])["p50"] is None
