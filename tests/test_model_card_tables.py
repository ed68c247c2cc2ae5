"""benchmarks/model_card_tables.py: the per-view release targets read from a record."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from pneumo_edge.robustness import FRAMING_ROWS, PERTURBATIONS

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("model_card_tables",
                                               ROOT / "benchmarks" / "model_card_tables.py")
mct = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(mct)


def _record(spec: dict[str, tuple[float, float, float]], agreement: float | None = None) -> dict:
    rows = [{"perturbation": n, "auc": spec.get(n, (0.99, 0.96, 0.93))[0],
             "sensitivity": spec.get(n, (0.99, 0.96, 0.93))[1],
             "specificity": spec.get(n, (0.99, 0.96, 0.93))[2], "mean_abs_dp": 0.01,
             "flipped": 0.0, "accuracy": 0.95, "n": 100} for n in PERTURBATIONS]
    rec = {"rows": rows, "n_images": 100}
    if agreement is not None:
        agree = {n: 1.0 for n in PERTURBATIONS} | {"noise": agreement}
        rec |= {"agreement_with_fp32": agree, "min_agreement_with_fp32": min(agree.values())}
    return rec


def test_block_view_targets_name_the_worst_row_and_the_miss():
    rec = _record({"clean": (0.99, 0.97, 0.95), "border_black_3": (0.985, 0.97, 0.91),
                   "letterbox_tb_10": (0.99, 0.94, 0.96), "gamma_1.4": (0.975, 0.5, 0.5)},
                  agreement=0.985)
    c = mct.criteria("block", rec)
    v, row, target, op, met = c["lowest AUC, any row"]
    assert (v, row, met) == (0.975, "gamma_1.4", False)  # every row counts for the AUC
    # gamma is not a framing row: its sensitivity 0.5 does not count, the letterbox's does
    assert c["lowest sensitivity, clean/zoom/border rows"][:2] == (0.94, "letterbox_tb_10")
    assert c["lowest specificity, clean/zoom/border rows"][:2] == (0.91, "border_black_3")
    assert c["lowest specificity, clean/zoom/border rows"][4] is True
    drop = c["specificity lost to a 3 % black border"]
    assert abs(drop[0] - 0.04) < 1e-12 and drop[4] is False  # 0.95 -> 0.91 > 0.03
    assert c["INT8 label agreement with FP32, any row"][:2] == (0.985, "noise")
    assert "gamma_1.4" not in FRAMING_ROWS and "letterbox_tb_10" in FRAMING_ROWS


def test_patient_view_checks_auc_border_and_agreement_only():
    c = mct.criteria("patient", _record({}))
    assert set(c) == {"lowest AUC, any row", "specificity lost to a 3 % black border"}
    assert all(x[4] for x in c.values())


def test_view_tables_mark_a_target_missed_in_int8_only():
    fp32 = _record({}) | {"views": {"block": _record({}), "patient": _record({})}}
    int8 = _record({}, 1.0) | {"views": {"block": _record({}, 0.98),
                                         "patient": _record({}, 1.0)}}
    lines = mct.view_tables(fp32, int8, 0.5)
    agree = [l for l in lines if l.startswith("| block | INT8 label agreement")]
    assert agree == ["| block | INT8 label agreement with FP32, any row >= 0.99 |  | "
                     "0.9800 (noise) | **no** |"]
    assert sum(l.endswith("| **no** |") for l in lines) == 1
    assert any(l.startswith("## Robustness suite, temporal-block view") for l in lines)
    assert sum(l.startswith("| border_black_3 |") for l in lines) == 2  # one table per view


def test_criteria_on_a_run_without_views_or_border_rows():
    # compare_runs.py reads older runs through the same targets: a plain split is one view
    # ("all") with the border target only, and a record without the border row has none
    rec = _record({"clean": (0.99, 0.96, 0.95), "border_black_3": (0.99, 0.97, 0.90)})
    c = mct.criteria("all", rec)
    assert list(c) == ["specificity lost to a 3 % black border"] and c[
        "specificity lost to a 3 % black border"][4] is False
    zoom_only = {"rows": [r for r in rec["rows"] if r["perturbation"] in ("clean", "zoom_in_5")]}
    assert set(mct.criteria("patient", zoom_only)) == {"lowest AUC, any row"}
