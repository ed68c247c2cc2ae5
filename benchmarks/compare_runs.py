"""Compare training runs on their validation views, row by row, against the v3 targets.

Reads each run folder's ``val_metrics.json`` (written by ``pneumo-edge train``; runs with
``--split block`` carry the ``block`` and ``patient`` views) and prints one markdown
table per view: AUC / sensitivity / specificity in every robustness row the run
evaluated, the worst framing row, and the release targets of issue 18 checked (defined
once, in ``model_card_tables.TARGETS``, for the model card too):

- block view: specificity >= 0.90 and sensitivity >= 0.95 in the clean, zoom and border
  rows, AUC >= 0.98 in every row;
- patient view: AUC >= 0.99 in every row;
- both views: the 3 % black border moves specificity by at most 0.03 from the clean row.

Usage::

    python benchmarks/compare_runs.py runs/a runs/b [--names A,B] [--out FILE.md]

The numbers are validation numbers of the runs' own threshold (Keras, before export).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pneumo_edge.robustness import BORDER_ROWS, ZOOM_ROWS  # noqa: E402


def _views(val: dict) -> dict[str, dict]:
    views = val.get("views") or {}
    if not views:
        return {"all": {"n": val.get("n_val"), "metrics": val["metrics"],
                        "shifted_metrics": val.get("shifted_metrics", {})}}
    return views


def _rows(view: dict) -> dict[str, dict]:
    return {"clean": view["metrics"]} | view.get("shifted_metrics", {})


def checks(view_name: str, rows: dict[str, dict]) -> list[tuple[str, bool, str]]:
    """(target, met, measured) for one view: the model card's targets
    (``model_card_tables.criteria``) on the run's Keras validation rows."""
    from model_card_tables import criteria

    record = {"rows": [{"perturbation": n, "auc": m["auc"], "sensitivity": m["recall"],
                        "specificity": m["specificity"]} for n, m in rows.items()]}
    return [(f"{key} {op} {target:g}", met, f"{value:.4f}, {row}")
            for key, (value, row, target, op, met) in criteria(view_name, record).items()]


def render(runs: list[Path], names: list[str]) -> str:
    vals = [json.loads((r / "val_metrics.json").read_text()) for r in runs]
    cfgs = [json.loads((r / "config.json").read_text()) for r in runs]
    lines = ["| run | arch | input | crop | epochs (best) | precision | split | threshold (rule) |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for n, v, c in zip(names, vals, cfgs):
        lines.append(f"| {n} | {c['arch']} | {c['img_size']} | {c.get('crop_size') or '-'} | "
                     f"{v.get('epochs_run')} ({v.get('best_epoch')}) | "
                     f"{c.get('precision_policy', c.get('precision'))} | {c.get('split', 'patient')} | "
                     f"{v['threshold']:.4f} ({v['threshold_rule']}) |")
    view_names = list(_views(vals[0]))
    for view in view_names:
        per = [_rows(_views(v)[view]) for v in vals]
        n = _views(vals[0])[view].get("n")
        lines += ["", f"### view: {view} ({n} images)", "",
                  "| row | " + " | ".join(f"{m} AUC / sens / spec" for m in names) + " |",
                  "| --- |" + " --- |" * len(names)]
        for row in per[0]:
            cells = [f"{p[row]['auc']:.4f} / {p[row]['recall']:.4f} / {p[row]['specificity']:.4f}"
                     if row in p else "-" for p in per]
            lines.append(f"| {row} | " + " | ".join(cells) + " |")
        for label, group in (("worst zoom row", ZOOM_ROWS), ("worst border row", BORDER_ROWS)):
            cells = []
            for p in per:
                rs = [p[r] for r in group if r in p]
                cells.append("-" if not rs else
                             f"{min(m['auc'] for m in rs):.4f} / {min(m['recall'] for m in rs):.4f}"
                             f" / {min(m['specificity'] for m in rs):.4f}")
            lines.append(f"| **{label}** | " + " | ".join(cells) + " |")
        lines += ["", "| target | " + " | ".join(names) + " |", "| --- |" + " --- |" * len(names)]
        results = [checks(view, p) for p in per]
        for i, (target, _, _) in enumerate(results[0]):
            lines.append(f"| {target} | " + " | ".join(
                f"{'met' if r[i][1] else 'missed'} ({r[i][2]})" for r in results) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="+", type=Path)
    ap.add_argument("--names", help="comma-separated column names [default: folder names]")
    ap.add_argument("--out", type=Path, help="also write the tables to this markdown file")
    args = ap.parse_args()
    names = args.names.split(",") if args.names else [r.name for r in args.runs]
    if len(names) != len(args.runs):
        ap.error("--names needs one name per run")
    text = render(args.runs, names)
    print(text, end="")
    if args.out:
        args.out.write_text(text, encoding="utf-8")


if __name__ == "__main__":
    main()
