"""Site adaptation on a simulated hospital: base vs calibrated vs head refit vs fine-tuned.

The site comes from ``benchmarks/make_site.py`` (the shipped model's validation
patients re-processed to look like another hospital, split by patient into
``adapt/`` and ``test/``). Every adapted model is made from ``adapt/`` with the
real commands (recorded below) and scored on ``test/``, which no adaptation
saw: AUC, sensitivity and specificity at the file's own threshold, calibration
error and OOD flag rate, each with a patient-grouped bootstrap 95 % interval.

Usage::

    python benchmarks/make_site.py --out /tmp/site_b --per-class 100
    nice -n 10 python benchmarks/site_adaptation.py --site /tmp/site_b --work /tmp/site_work \\
        [--fine-tune-epochs 2] [--skip-fine-tune]

Writes benchmarks/site_adaptation.json and benchmarks/site_adaptation.md.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pneumo_edge.calibrate import bootstrap_intervals  # noqa: E402
from pneumo_edge.images import collect_labelled  # noqa: E402
from pneumo_edge.metrics import roc_auc  # noqa: E402
from pneumo_edge.patients import patient_key  # noqa: E402
from pneumo_edge.predict import predict_paths  # noqa: E402
from pneumo_edge.runtime import load_model  # noqa: E402

FP32 = ROOT / "exported" / "pneumo_resnet18_fp32.onnx"
INT8 = ROOT / "exported" / "pneumo_resnet18_int8.onnx"


def run(cmd: list[str], log: list[dict]) -> None:
    shown = " ".join(shlex.quote(str(c)) for c in cmd)
    print(f"$ {shown}", flush=True)
    t0 = time.perf_counter()
    proc = subprocess.run([str(c) for c in cmd], cwd=ROOT, capture_output=True, text=True,
                          env=os.environ | {"PYTHONPATH": str(ROOT)})
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        sys.exit(f"failed ({proc.returncode}): {shown}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    log.append({"command": shown.replace(str(ROOT) + "/", ""), "seconds": round(seconds, 1)})


def score(model_path: Path, test: Path) -> dict:
    """The file on the test half: metrics at its own threshold, with intervals."""
    found = collect_labelled([test])
    files = [p for p, t in found if t]
    model = load_model(model_path, device="cpu")
    out = predict_paths(model, files, batch_size=16, truths=[t for p, t in found if t])
    preds = out.predictions
    y = np.array([p.truth == "PNEUMONIA" for p in preds], int)
    prob = np.array([p.probability for p in preds])
    flags = (np.array([not p.in_distribution for p in preds])
             if preds and preds[0].in_distribution is not None else None)
    groups = [patient_key(p.path) or p.path for p in preds]
    ci = bootstrap_intervals(y, prob, prob >= model.threshold, flags, groups, 1000, seed=0)
    return {"file": str(model_path.relative_to(ROOT) if model_path.is_relative_to(ROOT)
                        else model_path.name),
            "threshold": model.threshold, "n_images": len(preds), "n_failed": out.n_failed,
            "patients": len(set(groups)), **ci}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--site", type=Path, required=True)
    ap.add_argument("--work", type=Path, required=True)
    ap.add_argument("--fine-tune-epochs", type=int, default=2)
    ap.add_argument("--skip-fine-tune", action="store_true")
    ap.add_argument("--render", action="store_true",
                    help="only rewrite site_adaptation.md from site_adaptation.json")
    args = ap.parse_args()
    if args.render:
        rec = json.loads((ROOT / "benchmarks" / "site_adaptation.json").read_text())
        (ROOT / "benchmarks" / "site_adaptation.md").write_text(markdown(rec))
        return
    adapt, test, work = args.site / "adapt", args.site / "test", args.work
    work.mkdir(parents=True, exist_ok=True)
    cli = [sys.executable, "-m", "pneumo_edge.cli"]
    log: list[dict] = []
    models = {"base fp32": FP32, "base int8": INT8}
    variants = {
        "calibrated (Platt) int8": (INT8, []),
        "head refit int8": (INT8, ["--refit-head"]),
        "head refit + OOD refit int8": (INT8, ["--refit-head", "--refit-ood"]),
        "head refit + OOD refit fp32": (FP32, ["--refit-head", "--refit-ood"]),
    }
    fits = {}
    for name, (src, extra) in variants.items():
        out = work / (name.replace(" ", "_").replace("(", "").replace(")", "")
                      .replace("+", "and") + ".onnx")
        for stale in (out, out.with_name(out.stem + ".site_adaptation.json")):
            stale.unlink(missing_ok=True)
        run(cli + ["calibrate", src, "--data", adapt, "--out", out, *extra], log)
        models[name] = out
        block = json.loads(out.with_name(out.stem + ".site_adaptation.json").read_text())
        fits[name] = {"after_out_of_fold_on_adapt": block["after"],
                      "before_on_adapt": block["before"], "fit": {
                          k: v for k, v in block["fit"].items() if k != "lambda_grid"}}
    if not args.skip_fine_tune:
        run_dir = work / "finetune_run"
        onnx_dir = work / "finetune_onnx"
        import shutil
        shutil.rmtree(run_dir, ignore_errors=True)
        shutil.rmtree(onnx_dir, ignore_errors=True)
        run(cli + ["train", "--data", adapt, "--out", run_dir, "--init-from", FP32,
                   "--epochs", str(args.fine_tune_epochs), "--batch-size", "16",
                   "--val-fraction", "0.25", "--patience", "2"], log)
        run(cli + ["export", run_dir, "--out", onnx_dir, "--int8", "--calib-size", "100",
                   "--calib-method", "minmax", "--no-robustness", "--name", "finetuned"], log)
        models["fine-tuned fp32"] = onnx_dir / "finetuned_fp32.onnx"
        models["fine-tuned int8"] = onnx_dir / "finetuned_int8.onnx"
        fits["fine-tuned"] = {"init_from": json.loads((run_dir / "init_from.json").read_text()),
                              "val_metrics": json.loads(
                                  (run_dir / "val_metrics.json").read_text())["metrics"]}
    results = {}
    for name, path in models.items():
        print(f"scoring {name}", flush=True)
        results[name] = score(path, test)
    record = {"site": "simulated (benchmarks/make_site.py): the shipped model's validation "
                      "patients re-rendered as another hospital; adapt/ and test/ are "
                      "patient-disjoint halves",
              "adapt": {c: len(list((adapt / c).iterdir())) for c in ("NORMAL", "PNEUMONIA")},
              "test": {c: len(list((test / c).iterdir())) for c in ("NORMAL", "PNEUMONIA")},
              "site_command": f"python benchmarks/make_site.py --out {args.site} "
                              f"--per-class {record_per_class(adapt)}",
              "commands": log, "results_on_test": results, "fits": fits,
              "cpu_note": "shared, busy 2-core CPU; the fine-tune is deliberately short "
                          f"({args.fine_tune_epochs} epochs on the adapt half, run with nice)"}
    (ROOT / "benchmarks" / "site_adaptation.json").write_text(json.dumps(record, indent=2) + "\n")
    (ROOT / "benchmarks" / "site_adaptation.md").write_text(markdown(record))
    print(markdown(record))


def record_per_class(adapt: Path) -> int:
    return min(len(list((adapt / c).iterdir())) for c in ("NORMAL", "PNEUMONIA"))


def markdown(rec: dict) -> str:
    def cell(m):
        if not m:
            return "n/a"
        return f"{m['value']:.3f} [{m['ci95'][0]:.3f}, {m['ci95'][1]:.3f}]"

    lines = ["# Site adaptation on a simulated hospital", "",
             "Generated by `benchmarks/site_adaptation.py` (do not edit by hand).", "",
             f"Site: {rec['site']}. Adapt half: {rec['adapt']}; test half: {rec['test']}. "
             f"Every row is scored on the test half, which no adaptation saw, at the file's "
             "own threshold; 95 % intervals from 1,000 patient-grouped bootstrap resamples.",
             "", "| model | AUC | sensitivity | specificity | ECE | OOD flag rate | threshold |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for name, r in rec["results_on_test"].items():
        lines.append(f"| {name} | {cell(r['auc'])} | {cell(r['sensitivity'])} | "
                     f"{cell(r['specificity'])} | {cell(r['ece'])} | "
                     f"{cell(r.get('ood_flag_rate'))} | {r['threshold']:.4f} |")
    lines += ["", "Out-of-fold estimates that `calibrate` itself reported on the adapt half "
              "(what a site sees without a separate test set):", "",
              "| model | AUC after (adapt, out of fold) | ECE after | OOD flag rate after |",
              "| --- | --- | --- | --- |"]
    for name, f in rec["fits"].items():
        if "after_out_of_fold_on_adapt" in f:
            a = f["after_out_of_fold_on_adapt"]
            lines.append(f"| {name} | {cell(a['auc'])} | {cell(a['ece'])} | "
                         f"{cell(a.get('ood_flag_rate'))} |")
    ft = rec["fits"].get("fine-tuned")
    if ft:
        i, v = ft["init_from"], ft["val_metrics"]
        lines += ["", f"Fine-tune: {i['convolutions']} convolutions and the dense unit read from "
                  f"the FP32 file, Keras vs onnxruntime max |dp| {i['parity_max_abs_diff']:.1e} "
                  f"on {i['parity_images']} images before training; stem to "
                  f"{i['freeze_until']} frozen; its own validation split of the adapt half "
                  f"({v['n_labelled']} images): AUC {v['auc']:.3f}, sensitivity "
                  f"{v['recall']:.3f}, specificity {v['specificity']:.3f}."]
    lines += ["", f"CPU: {rec['cpu_note']}.", "", "Commands (from the repository root):", ""]
    lines.append(f"- `{rec.get('site_command', 'python benchmarks/make_site.py')}`")
    prefix = f"{sys.executable} -m pneumo_edge.cli"
    lines += [f"- `{c['command'].replace(prefix, 'pneumo-edge')}` ({c['seconds']} s)"
              for c in rec["commands"]]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
