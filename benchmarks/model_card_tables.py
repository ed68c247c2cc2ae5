"""Regenerate the numeric tables of exported/MODEL_CARD.md from the release files.

    python benchmarks/model_card_tables.py

Reads the ``pneumo_edge`` metadata of ``exported/*.onnx`` (validation metrics,
robustness suite, calibration, OOD, parity, written by ``export``) and
``benchmarks/results.json`` (latency), and rewrites the card between the
markers ``<!-- tables:start -->`` and ``<!-- tables:end -->``. Every number in
that part of the card comes from these files; nothing is typed by hand. The
threshold trade-off table re-runs the FP32 file on the clean and zoom rows of
the robustness suite over ``exported/val_split.csv`` (about two minutes on two
cores; skipped with ``--no-tradeoff`` or without ``../shared/data``).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pneumo_edge.metrics import binary_metrics  # noqa: E402
from pneumo_edge.io import atomic_write  # noqa: E402
from pneumo_edge.robustness import FRAMING_ROWS, ZOOM_ROWS, read_split_csv, run_suite  # noqa: E402
from pneumo_edge.runtime import load_model, read_metadata  # noqa: E402

DATA = ROOT.parent / "shared" / "data" / "chest_xray" / "train"
TRADEOFF_THRESHOLDS = (0.5, 0.8, 0.9, 0.95)

START, END = "<!-- tables:start -->", "<!-- tables:end -->"


def _latency() -> dict:
    path = ROOT / "benchmarks" / "results.json"
    if not path.exists():
        return {}
    rows = json.loads(path.read_text())["formats"]["rows"]
    return {r["precision"]: r["latency"] for r in rows if r["fmt"] == "onnx"
            and r["name"].startswith("pneumo_resnet18_")}


def tradeoff(fp32_path: Path, threshold: float, view: str | None = None) -> list[str]:
    """What the decision threshold trades on validation: clean sensitivity / specificity
    and the worst row's, at a few thresholds and the stored one; and the range of
    thresholds (if any) that meets the sensitivity and specificity floors in every row.
    Without ``view``: the zoom rows of all validation images, floors 0.95 / 0.92 (v2's
    criteria); with ``view``: that view's images, clean and every framing row, floors
    0.95 / 0.90 (v3's)."""
    import numpy as np

    files, labels = read_split_csv(ROOT / "exported" / "val_split.csv", root=DATA, view=view)
    rows = FRAMING_ROWS if view else ZOOM_ROWS
    kind = "framing" if view else "zoom"
    sens_floor, spec_floor = 0.95, (0.90 if view else 0.92)
    model = load_model(fp32_path, device="cpu")
    res = run_suite(model.run, model.preprocess, files, labels, threshold,
                    perturbations=("clean",) + rows)
    y = res.labels

    def at(t: float) -> tuple:
        clean = binary_metrics(y, res.probs["clean"], t)
        each = {z: binary_metrics(y, res.probs[z], t) for z in ("clean",) + rows}
        sz = min(each, key=lambda z: each[z].recall)
        pz = min(each, key=lambda z: each[z].specificity)
        return clean, (each[sz].recall, sz), (each[pz].specificity, pz)

    where = f"the {view} view" if view else "validation"
    out = ["", f"### What the threshold trades ({len(y)} images of {where}, FP32)", "",
           f"| threshold | clean sensitivity / specificity | lowest sensitivity, clean and "
           f"{kind} rows | lowest specificity, clean and {kind} rows |",
           "| --- | --- | --- | --- |"]
    for t in sorted(set(TRADEOFF_THRESHOLDS) | {threshold}):
        clean, (sv, sz), (pv, pz) = at(t)
        mark = "**" if t == threshold else ""
        out.append(f"| {mark}{t:.4g}{' (stored)' if mark else ''}{mark} | "
                   f"{clean.recall:.3f} / {clean.specificity:.3f} | {sv:.3f} ({sz}) | "
                   f"{pv:.3f} ({pz}) |")
    grid = np.round(np.arange(0.001, 1.0, 0.001), 3)
    ok = [t for t in grid if (r := at(t))[1][0] >= sens_floor and r[2][0] >= spec_floor]
    goal = (f"sensitivity >= {sens_floor} and specificity >= {spec_floor} in the clean and "
            f"every {kind} row")
    out += ["", (f"Thresholds meeting {goal} (grid of 0.001): {len(ok)}, from {ok[0]:.3f} "
                 f"to {ok[-1]:.3f}." if ok else f"No threshold (grid of 0.001) meets {goal}.")]
    return out


_F = lambda v, s=".4f": "n/a" if v is None else format(v, s)  # noqa: E731


def robustness_table(rob32: dict, rob8: dict, title: str) -> list[str]:
    """One robustness record's rows, FP32 beside INT8."""
    out = ["", title, "", "Each row re-runs the validation images under one fixed perturbation "
           "(`pneumo_edge/robustness.py`); |dp| is the mean change of P(PNEUMONIA) against the "
           "clean row, flipped the share of labels that change, agreement the share of INT8 "
           "labels equal to FP32's.", "",
           "| perturbation | FP32 AUC | FP32 sens | FP32 spec | FP32 mean abs dp | FP32 flipped "
           "| INT8 AUC | INT8 sens | INT8 spec | INT8 agreement with FP32 |",
           "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    rows8 = {r["perturbation"]: r for r in rob8.get("rows", [])}
    agree = rob8.get("agreement_with_fp32", {})
    for r in rob32["rows"]:
        name = r["perturbation"]
        q = rows8.get(name, {})
        out.append(f"| {name} | {_F(r['auc'])} | {r['sensitivity']:.4f} | "
                   f"{r['specificity']:.4f} | {r['mean_abs_dp']:.4f} | {r['flipped']:.4f} | "
                   f"{_F(q.get('auc'))} | {_F(q.get('sensitivity'))} | "
                   f"{_F(q.get('specificity'))} | {_F(agree.get(name))} |")
    return out


#: The release targets per validation view (issue "release v3"): sensitivity and
#: specificity floors in the clean and framing rows, an AUC floor in every row, the
#: largest specificity a 3 % black border may cost, INT8 label agreement in every row.
TARGETS = {"block": {"sens": 0.95, "spec": 0.90, "auc": 0.98},
           "patient": {"sens": None, "spec": None, "auc": 0.99}}
BORDER_SPEC_DROP, MIN_AGREEMENT = 0.03, 0.99


def criteria(view: str, rob: dict) -> dict:
    """Each target of ``view`` on one record's rows (a precision's robustness record, or a
    run's validation record as ``compare_runs.py`` reads it): name -> (value, row, target,
    comparison, met). Rows the record lacks (an older run's) are left out; the border
    target needs its row."""
    rows = {r["perturbation"]: r for r in rob["rows"]}
    framing = [n for n in ("clean", *FRAMING_ROWS) if n in rows]
    t = TARGETS.get(view, {"sens": None, "spec": None, "auc": None})  # other views: border
    out = {}
    if t["auc"] is not None:
        low_auc = min(rows.values(), key=lambda r: r["auc"])
        out["lowest AUC, any row"] = (low_auc["auc"], low_auc["perturbation"], t["auc"], ">=")
    for key, floor in (("sensitivity", t["sens"]), ("specificity", t["spec"])):
        if floor is not None:
            r = min((rows[n] for n in framing), key=lambda r: r[key])
            out[f"lowest {key}, clean/zoom/border rows"] = (r[key], r["perturbation"], floor,
                                                             ">=")
    if "border_black_3" in rows:
        drop = rows["clean"]["specificity"] - rows["border_black_3"]["specificity"]
        out["specificity lost to a 3 % black border"] = (drop, "border_black_3",
                                                         BORDER_SPEC_DROP, "<=")
    if "min_agreement_with_fp32" in rob:
        agree = rob["agreement_with_fp32"]
        low = min(agree, key=agree.get)
        out["INT8 label agreement with FP32, any row"] = (agree[low], low, MIN_AGREEMENT, ">=")
    return {k: (v, row, target, op, v >= target if op == ">=" else v <= target)
            for k, (v, row, target, op) in out.items()}


def view_tables(rob32: dict, rob8: dict, threshold: float) -> list[str]:
    """Per validation view: the targets met or missed, then every row."""
    names = {"block": "temporal-block view (the earliest NORMAL patients of each name family "
                      "and the shared PNEUMONIA patients: the honest imitation of a new site)",
             "patient": "patient view (random NORMAL patients and the shared PNEUMONIA "
                        "patients)"}
    out = ["", f"## Release targets per validation view (threshold {threshold:.4f})", "",
           "| view | target | FP32 (row) | INT8 (row) | met |", "| --- | --- | --- | --- | --- |"]
    for view in rob32["views"]:
        c32 = criteria(view, rob32["views"][view])
        c8 = criteria(view, rob8["views"][view]) if rob8.get("views") else {}
        for key in dict.fromkeys([*c32, *c8]):
            cells = [c32.get(key), c8.get(key)]
            met = all(c[4] for c in cells if c)
            target, op = next(c for c in cells if c)[2:4]
            shown = ["" if c is None else f"{c[0]:.4f} ({c[1]})" for c in cells]
            out.append(f"| {view} | {key} {op} {target:g} | {shown[0]} | {shown[1]} | "
                       f"{'yes' if met else '**no**'} |")
    for view, rob in rob32["views"].items():
        out += robustness_table(rob, (rob8.get("views") or {}).get(view, {}),
                                f"## Robustness suite, {names.get(view, view)}: "
                                f"{rob['n_images']} images")
    return out


def tables(with_tradeoff: bool = True) -> str:
    metas = {}
    for p in sorted((ROOT / "exported").glob("pneumo_resnet18_*.onnx")):
        meta = read_metadata(p)[0]
        metas[meta["precision"]] = (p, meta)
    order = [k for k in ("fp32", "fp16", "int8") if k in metas]
    lat = _latency()
    fp32 = metas["fp32"][1]
    n_val = fp32["val_metrics"]["n_labelled"]
    out = [f"## Validation metrics per precision ({n_val} images, threshold "
           f"{fp32['threshold']:.4f})", "",
           "| precision | accuracy | AUC | sensitivity | specificity | TP / FN / TN / FP | size MB "
           "| p50 ms b1 | p50 ms b32 |", "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for k in order:
        path, meta = metas[k]
        m = meta["val_metrics"]
        la = lat.get(k, {})
        out.append(f"| {k} | {m['accuracy']:.4f} | {m['auc']:.4f} | {m['recall']:.4f} | "
                   f"{m['specificity']:.4f} | {m['tp']} / {m['fn']} / {m['tn']} / {m['fp']} | "
                   f"{path.stat().st_size / 1e6:.1f} | {_F(la.get('1', {}).get('p50_ms'), '.2f')} | "
                   f"{_F(la.get('32', {}).get('p50_ms'), '.2f')} |")
    rob32 = fp32["robustness"]
    rob8 = metas.get("int8", (None, {}))[1].get("robustness", {})
    if rob32.get("views"):
        out += view_tables(rob32, rob8, fp32["threshold"])
    else:
        out += robustness_table(rob32, rob8, f"## Robustness suite ({n_val} validation images, "
                                f"threshold {fp32['threshold']:.4f})")
        rows32 = {r["perturbation"]: r for r in rob32["rows"]}
        rows8 = {r["perturbation"]: r for r in rob8.get("rows", [])}
        zoom = [rows32[z] for z in ZOOM_ROWS]
        out += ["", "Against the release criteria (FP32 / INT8): lowest AUC over all rows "
                f"{min(r['auc'] for r in rows32.values()):.4f} / "
                f"{min(r['auc'] for r in rows8.values()):.4f} (target >= 0.99); lowest "
                f"specificity in a zoom row {min(r['specificity'] for r in zoom):.4f} / "
                f"{min(rows8[z]['specificity'] for z in ZOOM_ROWS):.4f} (>= 0.92); lowest "
                f"sensitivity in a zoom row {min(r['sensitivity'] for r in zoom):.4f} / "
                f"{min(rows8[z]['sensitivity'] for z in ZOOM_ROWS):.4f} (>= 0.95); INT8 "
                f"agreement with FP32 at least "
                f"{rob8.get('min_agreement_with_fp32', float('nan')):.4f} in every row "
                f"(>= 0.99), largest INT8 AUC loss "
                f"{rob8.get('max_auc_loss_vs_fp32', float('nan')):.4f} (<= 0.005)."]
    if with_tradeoff and DATA.is_dir():
        out += tradeoff(metas["fp32"][0], fp32["threshold"],
                        view="block" if rob32.get("views") else None)
    cal = fp32.get("calibration") or {}
    if cal:
        out += ["", "## Calibration", "",
                f"Platt scaling fitted on clean validation and folded into the output layer: "
                f"temperature {cal['temperature']:.3f}, bias {cal.get('bias', 0.0):+.3f}. "
                f"Expected calibration error ({cal.get('bins', 15)} bins) "
                f"{cal['ece_before']:.4f} before, {cal['ece_after']:.4f} after."]
    ood = fp32.get("ood") or {}
    if ood:
        hp = {k: metas[k][1].get("heads_parity", {}) for k in order}
        out += ["", "## Heatmap and OOD outputs", "",
                f"`ood`: {ood['kind']} distance of the pooled features, {ood['covariance']} "
                f"(shrinkage {ood['shrinkage']:.3f}), fitted on {ood['fitted_on']}; threshold "
                f"{ood['threshold']:.2f} = {ood['threshold_rule']}; "
                f"{100 * ood['val_flag_rate']:.1f} % of validation images flagged (FP32).", "",
                "| precision | cam max abs diff vs Keras | cam correlation with FP32 (mean / min) "
                "| OOD max rel. diff vs FP32 |", "| --- | --- | --- | --- |"]
        for k in order:
            h = hp[k]
            out.append(f"| {k} | {h['cam_max_abs_diff_vs_keras']:.2e} | "
                       f"{h['cam_mean_correlation_vs_fp32']:.4f} / "
                       f"{h['cam_min_correlation_vs_fp32']:.4f} | "
                       f"{h['ood_max_rel_diff_vs_fp32']:.2e} |")
    return "\n".join(out) + "\n"


def main() -> None:
    card = ROOT / "exported" / "MODEL_CARD.md"
    text = card.read_text()
    if START not in text or END not in text:
        sys.exit(f"{card}: no {START} ... {END} markers")
    head, rest = text.split(START, 1)
    _, tail = rest.split(END, 1)
    generated = tables(with_tradeoff="--no-tradeoff" not in sys.argv[1:])
    atomic_write(card, head + START + "\n" + generated + END + tail)
    print(generated)


if __name__ == "__main__":
    main()
