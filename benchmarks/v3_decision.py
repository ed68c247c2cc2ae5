"""Score ONNX models on a ``--split block`` run's validation views, every robustness row.

    python benchmarks/v3_decision.py --split runs/v3/split.csv \
        --model v2=exported_v2/pneumo_resnet18_fp32.onnx --model v3=exported/pneumo_resnet18_fp32.onnx \
        --seen v2=exported_v2/val_split.csv --out benchmarks/v3_decision.md

Each model runs the robustness suite once over all validation files of the split (the
runtime's own decoding and preprocessing, each model at its stored threshold); the rows are
then cut per view (``block``: the earliest NORMAL patients plus the shared PNEUMONIA
patients; ``patient``: random NORMAL patients plus the same PNEUMONIA patients).

A model trained on another split may have seen some of these images in training:
``--seen NAME=VAL_SPLIT.csv`` names that model's own validation list, and every file of
the split's data folder not in it counts as seen. Its numbers are then printed twice: on
the whole view (optimistic for it) and on the files it never trained on ("unseen").
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pneumo_edge.robustness import FRAMING_ROWS, PERTURBATIONS, run_suite, view_masks  # noqa: E402
from pneumo_edge.runtime import load_model  # noqa: E402


def read_views(split_csv: Path) -> tuple[list[str], np.ndarray, dict[str, np.ndarray]]:
    with open(split_csv, newline="", encoding="utf-8") as fh:
        rows = [r for r in csv.DictReader(fh) if r.get("subset", "val") == "val"]
    if not rows or not rows[0].get("part"):
        sys.exit(f"{split_csv}: no 'part' column (not a --split block run)")
    files = [r["path"] for r in rows]
    labels = np.array([int(r["label"] == "PNEUMONIA") for r in rows])
    return files, labels, view_masks([r["part"] for r in rows])


def unseen_mask(files: list[str], data: Path, own_val_csv: Path) -> np.ndarray:
    """True where the file is in the other model's own validation list (never trained on)."""
    with open(own_val_csv, newline="", encoding="utf-8") as fh:
        own = {r["path"] for r in csv.DictReader(fh)}
    return np.array([Path(os.path.relpath(f, data)).as_posix() in own for f in files])


def summary(res) -> dict:
    rows = {r.perturbation: r for r in res.rows}
    framing = [rows[n] for n in ("clean", *FRAMING_ROWS) if n in rows]
    normal = res.labels == 0
    # threshold-free: how far a framing change moves the healthy X-rays' probability
    return {"n": int(res.labels.size), "n_normal": int(normal.sum()),
            "clean": rows["clean"].to_dict(),
            "lowest_auc": min(r.auc for r in rows.values()),
            "lowest_framing_sens": min(r.sensitivity for r in framing),
            "lowest_framing_spec": min(r.specificity for r in framing),
            "border3_spec_drop": rows["clean"].specificity - rows["border_black_3"].specificity,
            "normal_mean_p": {n: float(np.mean(p[normal])) for n, p in res.probs.items()},
            "rows": {n: r.to_dict() for n, r in rows.items()}}


def render(out: dict) -> str:
    names = list(out["models"])
    lines = [f"Split: `{out['split']}` ({out['n']} validation images); each model at its stored "
             "threshold; onnxruntime, the runtime's own decoding.", ""]
    for view in out["views"]:
        cols = [(m, s) for m in names for s in out["models"][m] if s.startswith(view)]
        lines += [f"### {view} view", "",
                  "| | " + " | ".join(f"{m} ({s.replace(view, '').strip(' ,') or 'all'})"
                                     for m, s in cols) + " |",
                  "| --- |" + " --- |" * len(cols)]
        get = [out["models"][m][s] for m, s in cols]
        lines.append("| images (NORMAL) | " + " | ".join(f"{g['n']} ({g['n_normal']})"
                                                        for g in get) + " |")
        for label, value in (
                ("clean AUC", lambda g: g["clean"]["auc"]),
                ("clean sensitivity", lambda g: g["clean"]["sensitivity"]),
                ("clean specificity", lambda g: g["clean"]["specificity"]),
                ("lowest AUC, any row", lambda g: g["lowest_auc"]),
                ("lowest sensitivity, clean/framing rows", lambda g: g["lowest_framing_sens"]),
                ("lowest specificity, clean/framing rows", lambda g: g["lowest_framing_spec"]),
                ("specificity lost to a 3 % black border", lambda g: g["border3_spec_drop"])):
            lines.append(f"| {label} | " + " | ".join(f"{value(g):.4f}" for g in get) + " |")
        lines.append("| mean P(PNEUMONIA) of NORMAL: clean -> 3 % black border | " + " | ".join(
            f"{g['normal_mean_p']['clean']:.3f} -> {g['normal_mean_p']['border_black_3']:.3f}"
            for g in get) + " |")
        lines.append("")
        lines += ["| row (AUC / sens / spec) | " + " | ".join(f"{m} ({s})" for m, s in cols)
                  + " |", "| --- |" + " --- |" * len(cols)]
        for row in get[0]["rows"]:
            lines.append(f"| {row} | " + " | ".join(
                f"{g['rows'][row]['auc']:.4f} / {g['rows'][row]['sensitivity']:.4f} / "
                f"{g['rows'][row]['specificity']:.4f}" for g in get) + " |")
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--split", type=Path, required=True, help="a --split block run's split.csv")
    ap.add_argument("--data", type=Path, default=None,
                    help="the split's data folder (default: the run's config.json)")
    ap.add_argument("--model", action="append", required=True, help="NAME=MODEL.onnx")
    ap.add_argument("--seen", action="append", default=[], help="NAME=ITS_OWN_VAL_SPLIT.csv")
    ap.add_argument("--rows", default=None,
                    help="comma-separated rows (default: every row; clean and border_black_3 "
                         "are always scored)")
    ap.add_argument("--out", type=Path, help="write markdown here (and .json beside it)")
    args = ap.parse_args()
    files, labels, views = read_views(args.split)
    rows = PERTURBATIONS if args.rows is None else tuple(dict.fromkeys(
        ["clean", "border_black_3", *args.rows.split(",")]))
    data = args.data or Path(json.loads((args.split.parent / "config.json").read_text())["data"])
    seen = dict(s.split("=", 1) for s in args.seen)
    out = {"split": str(args.split), "n": len(files), "views": list(views), "models": {}}
    for spec in args.model:
        name, path = spec.split("=", 1)
        model = load_model(path, device="cpu")
        res = run_suite(model.run, model.preprocess, files, labels, model.threshold,
                        perturbations=rows, model_name=name, batch_size=8)
        if res.n_failed:
            sys.exit(f"{path}: {res.n_failed} files failed to decode")
        unseen = unseen_mask(files, data, Path(seen[name])) if name in seen else None
        per = {}
        for view, mask in views.items():
            per[view] = summary(res.subset(mask))
            if unseen is not None:
                per[f"{view}, unseen"] = summary(res.subset(mask & unseen))
        out["models"][name] = per
        print(f"{name}: scored", file=sys.stderr)
    text = render(out)
    print(text)
    if args.out:
        args.out.write_text(text, encoding="utf-8")
        args.out.with_suffix(".json").write_text(json.dumps(out, indent=1), encoding="utf-8")


if __name__ == "__main__":
    main()
