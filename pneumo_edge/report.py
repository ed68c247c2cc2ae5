"""Report files of a prediction run: report.json, predictions.csv, report.html.

Every file is written to a temporary name in the same folder and renamed, so a
reader never sees half a report. The HTML is self-contained (inline SVG and
CSS, no scripts, no network) and opens offline.
"""

from __future__ import annotations

import csv
import html
import io
import json
import math
import os
import platform
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from . import __version__
from .io import write_set
from .metadata import finite_json
from .metrics import roc_curve
from .predict import PredictionRun
from .records import DISCLAIMER, FAILURE_KEYS, PREDICTION_KEYS, csv_header, csv_row, to_dict

__all__ = ["DISCLAIMER", "REPORT_KEYS", "report_dict", "write_report"]



def _finite(x):
    return None if x is None or not np.isfinite(x) else round(float(x), 6)


#: The keys of report.json that other tools read; their names are fixed. More keys
#: may be added, never renamed. ``metrics`` is null when no file is labelled.
REPORT_KEYS = {
    "model": ("path", "sha256", "precision", "threshold", "provider"),
    "n_images": (), "n_failed": (),
    "metrics": ("accuracy", "precision", "recall", "specificity", "f1", "auc",
                "tp", "fp", "tn", "fn", "n_labelled"),
    "latency_ms": ("mean", "p50", "p95", "p99"),
    "end_to_end": ("seconds", "images_per_second", "batch_size"),
    "failures": FAILURE_KEYS,
    "predictions": PREDICTION_KEYS,
}


def report_dict(run: PredictionRun) -> dict:
    """report.json: the fixed keys of :data:`REPORT_KEYS`, plus provenance."""
    lat = run.latency_ms
    return {
        "model": run.model,
        "n_images": run.n_images,
        "n_failed": run.n_failed,
        "metrics": None if run.metrics is None else run.metrics.to_dict(),
        "latency_ms": {k: _finite(v) for k, v in lat.items()},
        "end_to_end": {"seconds": round(run.seconds, 4),
                       "images_per_second": round(run.images_per_second, 3),
                       "batch_size": run.batch_size},
        "failures": [to_dict(f) for f in run.failures],
        "predictions": [to_dict(p) for p in run.predictions],
        "n_flagged": run.n_flagged,
        "flagged_as": run.flagged_as,
        "heatmaps": run.heatmaps or None,
        "model_metadata": run.model_meta,
        "n_predicted": run.n_predicted,
        "engine": run.engine,
        # large Ray runs: the per-file records live only in predictions.csv
        "predictions_omitted": run.omitted_predictions + run.omitted_failures,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "pneumo_edge_version": __version__,
        "host": {"python": platform.python_version(), "machine": platform.machine(),
                 "system": platform.system()},
        "disclaimer": DISCLAIMER,
    }


def predictions_csv(run: PredictionRun) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(csv_header())
    for rec in [*run.predictions, *run.failures]:
        w.writerow(csv_row(rec))
    return buf.getvalue()


# ---------------------------------------------------------------- HTML report

def _svg_roc(run: PredictionRun, size: int = 300) -> str:
    labelled = [p for p in run.predictions if p.truth is not None]
    y = [p.truth == "PNEUMONIA" for p in labelled]
    if not labelled or all(y) or not any(y):
        return "<p class='muted'>ROC curve needs labelled images of both classes.</p>"
    fpr, tpr, _ = roc_curve(y, [p.probability for p in labelled])
    m, s = 36, size - 46
    pts = " ".join(f"{m + f * s:.1f},{m + (1 - t) * s - 26:.1f}" for f, t in zip(fpr, tpr))
    mt = run.metrics
    op = (f"<circle cx='{m + (1 - mt.specificity) * s:.1f}' cy='{m + (1 - mt.recall) * s - 26:.1f}'"
          f" r='5' fill='#d62728'><title>threshold {run.model['threshold']:.3f}</title></circle>")
    ticks = "".join(
        f"<text x='{m + v * s:.0f}' y='{size - 14}' class='tick'>{v:g}</text>"
        f"<text x='{m - 8}' y='{m + (1 - v) * s - 22:.0f}' class='tick' text-anchor='end'>{v:g}</text>"
        for v in (0, 0.5, 1))
    return (f"<svg width='{size}' height='{size + 8}' role='img' aria-label='ROC curve'>"
            f"<rect x='{m}' y='{m - 26}' width='{s}' height='{s}' fill='#fafafa' stroke='#999'/>"
            f"<line x1='{m}' y1='{m + s - 26}' x2='{m + s}' y2='{m - 26}' stroke='#bbb' stroke-dasharray='4'/>"
            f"<polyline points='{pts}' fill='none' stroke='#1f77b4' stroke-width='2'/>{op}{ticks}"
            f"<text x='{m + s / 2}' y='{size + 4}' text-anchor='middle' class='axis'>1 - specificity</text>"
            f"<text x='10' y='{m + s / 2 - 26}' text-anchor='middle' class='axis' "
            f"transform='rotate(-90 10 {m + s / 2 - 26})'>sensitivity</text></svg>")


def _svg_histogram(values: list[float], width: int = 420, height: int = 220,
                   label: str = "ms per image") -> str:
    if not values:
        return "<p class='muted'>No timings.</p>"
    v = np.asarray(values)
    lo, hi = float(v.min()), float(v.max())
    if hi <= lo:
        hi = lo + 1e-3
    counts, edges = np.histogram(v, bins=min(30, max(5, int(np.sqrt(v.size)))), range=(lo, hi))
    m, w, h = 40, width - 50, height - 50
    bw = w / len(counts)
    top = max(int(counts.max()), 1)
    bars = "".join(
        f"<rect x='{m + i * bw:.1f}' y='{10 + h - c / top * h:.1f}' width='{max(bw - 1, 1):.1f}'"
        f" height='{c / top * h:.1f}' fill='#2ca02c'><title>{edges[i]:.2f}-{edges[i + 1]:.2f} ms:"
        f" {c}</title></rect>" for i, c in enumerate(counts))
    return (f"<svg width='{width}' height='{height}' role='img' aria-label='latency histogram'>"
            f"<line x1='{m}' y1='{10 + h}' x2='{m + w}' y2='{10 + h}' stroke='#999'/>{bars}"
            f"<text x='{m}' y='{h + 26}' class='tick'>{lo:.2f}</text>"
            f"<text x='{m + w}' y='{h + 26}' class='tick' text-anchor='end'>{hi:.2f}</text>"
            f"<text x='{m - 4}' y='18' class='tick' text-anchor='end'>{top}</text>"
            f"<text x='{m + w / 2}' y='{height - 4}' text-anchor='middle' class='axis'>{label}</text></svg>")


def _confusion_html(run: PredictionRun) -> str:
    mt = run.metrics
    if mt is None:
        return "<p class='muted'>No labelled images (folders named NORMAL or PNEUMONIA).</p>"
    return ("<table class='cm'><tr><th></th><th>predicted NORMAL</th><th>predicted PNEUMONIA</th></tr>"
            f"<tr><th>truth NORMAL</th><td class='ok'>{mt.tn}<small>TN</small></td>"
            f"<td class='bad'>{mt.fp}<small>FP</small></td></tr>"
            f"<tr><th>truth PNEUMONIA</th><td class='bad'>{mt.fn}<small>FN</small></td>"
            f"<td class='ok'>{mt.tp}<small>TP</small></td></tr></table>")


def _rows(pairs) -> str:
    return "".join(f"<tr><th>{html.escape(str(k))}</th><td>{html.escape(str(v))}</td></tr>"
                   for k, v in pairs)


def _fmt(x, digits=4):
    return "n/a" if x is None else f"{x:.{digits}f}"


GALLERY_LIMITS = {"false positives": 8, "false negatives": 8, "least certain": 8, "flagged": 12}


def _logit(p: float) -> float:
    p = min(max(float(p), 1e-7), 1.0 - 1e-7)
    return math.log(p / (1.0 - p))


def _gallery_groups(run: PredictionRun) -> dict[str, list]:
    preds = run.predictions
    thr = run.model["threshold"]
    fp = sorted((p for p in preds if p.truth == "NORMAL" and p.label == "PNEUMONIA"),
                key=lambda p: -p.probability)
    fn = sorted((p for p in preds if p.truth == "PNEUMONIA" and p.label == "NORMAL"),
                key=lambda p: p.probability)
    # distance on the logit scale: calibrated probabilities crowd near 0 and 1, so
    # |p - thr| would call 1.000 "less certain" than 0.5 when thr is 0.98
    thr_logit = float(_logit(thr))
    unsure = sorted(preds, key=lambda p: abs(float(_logit(p.probability)) - thr_logit))
    flagged = [p for p in preds if p.flagged]
    groups = {"false positives": fp, "false negatives": fn, "least certain": unsure,
              "flagged": flagged}
    return {k: v[:GALLERY_LIMITS[k]] for k, v in groups.items()}


def _thumbnail(p, size: int = 200) -> str | None:
    """A base64 PNG of the image with its heatmap (or plain when the model has none)."""
    import base64

    import cv2

    from .heatmap import overlay
    from .images import ImageDecodeError, decode_gray

    try:
        gray = decode_gray(p.path, target=size)
    except (ImageDecodeError, OSError):
        return None
    if p.cam is not None:
        img = overlay(gray, p.cam.astype(np.float32), None, max_side=size,
                      box=p.lung_box)
    else:
        scale = min(1.0, size / max(gray.shape))
        img = cv2.resize(gray, (max(int(gray.shape[1] * scale), 1),
                                max(int(gray.shape[0] * scale), 1)), interpolation=cv2.INTER_AREA)
    ok, buf = cv2.imencode(".png", img)
    return base64.b64encode(buf.tobytes()).decode("ascii") if ok else None


def _gallery_html(run: PredictionRun) -> str:
    e = html.escape
    groups = _gallery_groups(run)
    if not any(groups.values()):
        return "<p class='muted'>No predictions.</p>"
    has_cam = any(p.cam is not None for p in run.predictions)
    parts = [] if has_cam else ["<p class='muted'>This model has no <code>cam</code> output: "
                                "thumbnails without heatmaps (re-export to add it).</p>"]
    cache: dict[str, str | None] = {}
    for title, preds in groups.items():
        if not preds:
            continue
        figs = []
        for p in preds:
            if p.path not in cache:
                cache[p.path] = _thumbnail(p)
            b64 = cache[p.path]
            img = (f"<img alt='heatmap of {e(p.path)}' src='data:image/png;base64,{b64}'>"
                   if b64 else "<div class='muted'>(image not readable)</div>")
            truth = f" &middot; truth {e(p.truth)}" if p.truth else ""
            ood = "" if p.ood_score is None else f" &middot; OOD {p.ood_score:.1f}"
            warns = "".join(f"<div class='warn'>{e(w)}</div>" for w in p.warnings)
            figs.append(f"<figure>{img}<figcaption><b>{p.probability:.3f}</b> {e(p.label)}"
                        f"{truth}{ood}<div class='path'>{e(p.path)}</div>{warns}</figcaption>"
                        "</figure>")
        parts.append(f"<h3>{e(title)} ({len(preds)})</h3><div class='gallery'>{''.join(figs)}</div>")
    parts.append("<p class='muted'>Heatmap: the model's class activation map, normalised to "
                 "its own range: red where the evidence for PNEUMONIA is strongest in that "
                 "image, blue where it is weakest. Read it with the probability.</p>")
    return "".join(parts)


def dicom_summary(facts: dict | None) -> str:
    """One line of a DICOM file's acquisition facts, e.g. ``CR PA MONOCHROME1 12-bit RLE Lossless``."""
    if not facts:
        return ""
    parts = [facts.get("modality"), facts.get("view_position"),
             facts.get("photometric_interpretation"),
             None if facts.get("bits_stored") is None else f"{facts['bits_stored']}-bit",
             facts.get("transfer_syntax")]
    return " ".join(str(x) for x in parts if x)


def render_html(run: PredictionRun, report: dict) -> str:
    mt = run.metrics
    e = html.escape
    metric_rows = [("labelled images", mt.n_labelled if mt else 0)]
    if mt:
        metric_rows += [("accuracy", _fmt(mt.accuracy)), ("sensitivity (recall)", _fmt(mt.recall)),
                        ("specificity", _fmt(mt.specificity)), ("precision", _fmt(mt.precision)),
                        ("F1", _fmt(mt.f1)), ("ROC AUC", _fmt(mt.auc))]
    lat = report["latency_ms"]
    speed_rows = [("provider", run.model["provider"]), ("batch size", run.batch_size),
                  ("model ms/image mean / p50 / p95 / p99",
                   " / ".join(_fmt(lat[k], 2) for k in ("mean", "p50", "p95", "p99"))),
                  ("end-to-end", f"{run.seconds:.2f} s, {run.images_per_second:.1f} images/s")]
    meta = dict(run.model_meta)
    meta_rows = [(k, json.dumps(v) if isinstance(v, (dict, list)) else v)
                 for k, v in meta.items()]
    failures = ("".join(f"<tr><td>{e(f.path)}</td><td>{e(f.error)}</td></tr>" for f in run.failures)
                or "<tr><td colspan='2' class='muted'>none</td></tr>")
    any_dicom = any(p.dicom for p in run.predictions)
    pred_rows = "".join(
        f"<tr class='{'mis' if p.truth and p.truth != p.label else ''}'><td>{e(p.path)}</td>"
        f"<td>{p.probability:.4f}</td><td>{e(p.label)}</td><td>{e(p.truth or '')}</td>"
        f"<td>{'' if p.ood_score is None else f'{p.ood_score:.1f}'}</td>"
        f"<td>{e('; '.join(p.warnings))}</td>"
        + (f"<td>{e(dicom_summary(p.dicom))}</td>" if any_dicom else "") + "</tr>"
        for p in run.predictions)
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>pneumo-edge report</title>
<style>
body{{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:24px auto;max-width:1100px;color:#222;padding:0 16px}}
h1{{font-size:1.5em;margin-bottom:0}} h2{{font-size:1.15em;margin-top:28px;border-bottom:1px solid #ddd}}
.disclaimer{{background:#fff4e5;border:1px solid #f0b429;padding:10px 14px;border-radius:6px;margin:14px 0}}
table{{border-collapse:collapse;font-size:.92em}} th,td{{padding:4px 10px;border-bottom:1px solid #eee;text-align:left;vertical-align:top}}
.grid{{display:flex;flex-wrap:wrap;gap:28px;align-items:flex-start}}
.cm td{{font-size:1.3em;text-align:center;width:120px}} .cm small{{display:block;font-size:.55em;color:#666}}
.ok{{background:#e8f5e9}} .bad{{background:#fdecea}} .muted{{color:#777}} tr.mis td{{background:#fdecea}}
.tick{{font-size:11px;fill:#555}} .axis{{font-size:12px;fill:#333}}
.scroll{{max-height:420px;overflow:auto;border:1px solid #eee}} code{{font-size:.9em}}
.gallery{{display:flex;flex-wrap:wrap;gap:12px}} figure{{margin:0;width:200px;font-size:.8em}}
figure img{{width:200px;border-radius:4px;display:block}} .path{{color:#666;word-break:break-all}}
.warn{{color:#a15c00}} h3{{font-size:1em;margin:14px 0 6px}}
</style></head><body>
<h1>pneumo-edge prediction report</h1>
<div class="muted">{e(report['created'])} &middot; pneumo-edge {e(__version__)} &middot; model <code>{e(run.model['path'])}</code> ({e(run.model['precision'])}, sha256 <code>{e(run.model['sha256'][:16])}&hellip;</code>)</div>
<div class="disclaimer"><b>Not a medical device.</b> {e(DISCLAIMER)}</div>
<p>{run.n_images} images: {run.n_predicted} predicted, {run.n_failed} failed, {run.n_flagged} flagged (input checks or out of distribution; treated as {e(run.flagged_as)}). Decision threshold {run.model['threshold']:.4f} on P(PNEUMONIA).</p>
<div class="grid">
<div><h2>Metrics</h2><table>{_rows(metric_rows)}</table></div>
<div><h2>Confusion matrix</h2>{_confusion_html(run)}</div>
<div><h2>ROC curve</h2>{_svg_roc(run)}</div>
</div>
<div class="grid">
<div><h2>Speed</h2><table>{_rows(speed_rows)}</table></div>
<div><h2>Model time per image</h2>{_svg_histogram(run.model_ms_per_image)}</div>
</div>
<h2>Gallery</h2>
{_gallery_html(run)}
<h2>Failures ({run.n_failed}{f", {len(run.failures)} listed" if run.omitted_failures else ""})</h2>
<table><tr><th>file</th><th>reason</th></tr>{failures}</table>
<h2>Predictions ({run.n_predicted}{"; listed in predictions.csv only" if run.omitted_predictions else ""})</h2>
<div class="scroll"><table><tr><th>file</th><th>P(PNEUMONIA)</th><th>label</th><th>truth</th><th>OOD</th><th>warnings</th>{'<th>DICOM</th>' if any_dicom else ''}</tr>{pred_rows}</table></div>
<h2>Model metadata</h2>
<table>{_rows(meta_rows)}</table>
</body></html>
"""


def write_report(run: PredictionRun, out_dir: str | os.PathLike, *, html_report: bool = True,
                 json_report: bool = True, csv_data=None) -> dict[str, Path]:
    """Write report.json, predictions.csv and report.html into ``out_dir`` as one set.

    ``csv_data``: the CSV content instead of the run's records (a string, or a
    callable writing to a text file: the Ray engine streams large runs from its
    journal).
    """
    out = Path(out_dir)
    report = report_dict(run) if json_report or html_report else None
    paths = {"csv": out / "predictions.csv"}
    files = {paths["csv"]: predictions_csv(run) if csv_data is None else csv_data}
    if json_report:
        paths["json"] = out / "report.json"
        files[paths["json"]] = json.dumps(finite_json(report), indent=2, ensure_ascii=False,
                                          allow_nan=False) + "\n"
    if html_report:
        paths["html"] = out / "report.html"
        files[paths["html"]] = render_html(run, report)
    write_set(files)
    return paths
