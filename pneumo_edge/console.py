"""Terminal rendering of the library's results (rich). The CLI parses and calls; this draws.

Every user-controlled string (paths, file names, metadata, error messages) goes
through :func:`plain`: shown literally, never as rich markup, with control
characters escaped, so a file named ``chest[pa].jpeg`` or one carrying terminal
escape bytes prints as it is named.
"""

from __future__ import annotations

import json
from contextlib import contextmanager
from pathlib import Path

from rich.console import Console
from rich.table import Table
from rich.text import Text

__all__ = ["console", "err", "plain", "say", "warn", "fail_line", "progress",
           "render_train_start", "render_epoch", "render_train_result", "render_export",
           "render_ensemble", "render_predictions", "render_failures", "render_run",
           "render_summary", "render_info", "render_robustness", "render_benchmark",
           "render_calibration"]

console = Console()
err = Console(stderr=True)

_CONTROL = {c: f"\\x{c:02x}" for c in (*range(0x20), *range(0x7f, 0xa0))}


def plain(value: object, style: str | None = None) -> Text:
    """A user-controlled string shown literally: no markup, control characters escaped,
    bytes that are not UTF-8 shown as \\udcXX."""
    text = str(value).encode("utf-8", "backslashreplace").decode("utf-8")
    return Text(text.translate(_CONTROL), style=style or "")


def say(message: str) -> None:
    """A dim progress line on stderr."""
    err.print(plain(message, "dim"), highlight=False)


def warn(message: str) -> None:
    """A yellow note on stderr."""
    err.print(plain(message, "yellow"), highlight=False)


#: Longer messages (a library quoting a whole tensor) are cut: one readable line.
MAX_ERROR_CHARS = 600


def fail_line(message: str) -> None:
    """The one line of an error, on stderr."""
    if len(message) > MAX_ERROR_CHARS:
        message = (message[:MAX_ERROR_CHARS]
                   + f"... [{len(message) - MAX_ERROR_CHARS} more characters]")
    err.print(Text("error: ", style="bold red") + plain(message), highlight=False,
              soft_wrap=True)


@contextmanager
def progress(total: int, description: str, quiet: bool = False):
    """A transient progress bar on stderr; yields the callback taking the files done
    (None when quiet or for a single file)."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeRemainingColumn

    if quiet or total < 2:
        yield None
        return
    with Progress("[progress.description]{task.description}", BarColumn(),
                  MofNCompleteColumn(), TimeRemainingColumn(), console=err,
                  transient=True) as bar:
        task = bar.add_task(description, total=total)
        yield lambda n: bar.update(task, completed=n)


def render_train_start(resolved: dict) -> None:
    console.print(
        f"training {resolved['arch']} at {resolved['img_size']} px on "
        f"{', '.join(resolved['devices'])} ({resolved['precision_policy']}): "
        f"{resolved['n_train']} train / {resolved['n_val']} validation images, "
        f"{resolved['split']} split", highlight=False)


def render_epoch(epoch: int, logs: dict) -> None:
    nan = float("nan")
    console.print(
        f"epoch {epoch + 1:>3}  loss {logs.get('loss', nan):.4f}  "
        f"auc {logs.get('auc', nan):.4f}  val_loss {logs.get('val_loss', nan):.4f}  "
        f"val_auc {logs.get('val_auc', nan):.4f}  "
        f"robust {logs.get('val_robust_auc', nan):.4f}  lr {logs.get('learning_rate', 0):.2e}  "
        f"{logs.get('epoch_seconds', 0):.0f} s",
        highlight=False)


def _fmt(v, spec: str = ".4f") -> str:
    return "n/a" if v is None else format(v, spec)


def render_train_result(result) -> None:
    m = result.val_metrics
    if result.worker_note:  # a worker that is not the chief of a multi-worker run
        console.print(plain(f"training finished: {result.worker_note} "
                            f"({result.epochs_run} epochs, {result.seconds / 60:.1f} min)"),
                      highlight=False)
        return
    table = Table(title="training finished", show_header=False)
    for key, value in [
        ("devices", ", ".join(result.devices)),
        ("images train / val", f"{result.n_train} / {result.n_val} "
                               f"({result.split} split, by patient)"),
        ("best epoch", f"{result.best_epoch} of {result.epochs_run}"),
        ("val AUC", f"{m['auc']:.4f}"),
        ("sensitivity", f"{m['recall']:.4f}"),
        ("specificity", f"{m['specificity']:.4f}"),
        ("accuracy", f"{m['accuracy']:.4f}"),
        ("threshold", f"{result.threshold:.4f} ({result.threshold_rule})"),
        ("wall time", f"{result.seconds / 60:.1f} min"),
        ("run folder", plain(result.run_dir)),
    ]:
        table.add_row(key, value)
    console.print(table)
    if result.no_patient_files:
        console.print(f"[yellow]note:[/] {result.no_patient_files} files carry no patient id "
                      "in their name and were split per file.")
    console.print("[dim]Validation carved from the training folder overestimates performance "
                  "on new sites; not a medical device.[/]")


def render_export(result, set_default: bool) -> None:
    table = Table(title=f"exported (threshold {result.threshold:.4f}, {result.threshold_rule}; "
                        f"{result.n_val} validation images)", title_justify="left")
    for col in ("precision", "file", "MB", "max|Δp| vs Keras", "agree", "AUC", "sens", "spec"):
        table.add_column(col)
    for r in result.files:
        m = r.val_metrics or {}
        table.add_row(r.precision, plain(r.path), f"{r.size_bytes / 1e6:.1f}",
                      _fmt(r.max_abs_diff, ".2e"), _fmt(r.label_agreement),
                      _fmt(m.get("auc")), _fmt(m.get("recall")), _fmt(m.get("specificity")))
    console.print(table)
    for r in result.files:
        rob, ood = r.extra.get("robustness"), r.extra.get("ood")
        parts = []
        if rob:
            w = rob["worst"]
            parts.append(f"robustness worst AUC {w['auc']['value']:.4f} ({w['auc']['row']}), "
                         f"sens {w['sensitivity']['value']:.3f} ({w['sensitivity']['row']}), "
                         f"spec {w['specificity']['value']:.3f} ({w['specificity']['row']})")
            if "min_agreement_with_fp32" in rob:
                parts.append(f"agreement with fp32 >= {rob['min_agreement_with_fp32']:.4f}")
        if ood:
            parts.append(f"OOD threshold {ood['threshold']:.2f}, "
                         f"{100 * ood['val_flag_rate']:.1f} % of validation flagged")
        if parts:
            console.print(plain(f"{r.precision}: " + "; ".join(parts)), highlight=False)
    if set_default:
        out = result.out_dir
        default = (out / "default.txt").read_text().strip()
        console.print(plain(f"predict's default model: {out / default}"), highlight=False)


def render_ensemble(val: dict, out: Path) -> None:
    """Each member at its own threshold and the ensemble at its new one: clean AUC and
    the lowest sensitivity / specificity over the zoom rows (validation, Keras FP32)."""
    from .robustness import ZOOM_ROWS

    table = Table(title=plain(f"seed ensemble in {out} ({val['n_val']} validation images)"),
                  title_justify="left")
    for col in ("model", "threshold", "AUC", "sens", "spec", "lowest zoom sens",
                "lowest zoom spec"):
        table.add_column(col)

    def row(name, rec):
        m, shifted = rec.get("metrics") or {}, rec.get("shifted_metrics") or {}
        zoom = [shifted[k] for k in ZOOM_ROWS if k in shifted]
        low = lambda key: min((v[key] for v in zoom if v.get(key) is not None),  # noqa: E731
                              default=None)
        table.add_row(plain(name), _fmt(rec.get("threshold")), _fmt(m.get("auc")),
                      _fmt(m.get("recall")), _fmt(m.get("specificity")),
                      _fmt(low("recall")), _fmt(low("specificity")))

    for member in val.get("members", []):
        row(member["run"], member)
    row("ensemble", val)
    console.print(table)
    cal = val.get("calibration") or {}
    if cal:
        console.print(f"Platt scaling folded into the model: temperature {cal['temperature']}, "
                      f"bias {cal['bias']}; ECE {cal['ece_before']} -> {cal['ece_after']}",
                      highlight=False)
    console.print(plain(f"export it: pneumo-edge export {out} --fp16 --int8"), highlight=False)


def render_predictions(run, limit: int, csv_path: Path | None) -> None:
    table = Table(title=f"predictions ({len(run.predictions)})", title_justify="left")
    for col in ("file", "P(PNEUMONIA)", "label", "truth", "OOD", "flags"):
        table.add_column(col, overflow="fold")
    for p in run.predictions[:limit]:
        wrong = p.truth is not None and p.truth != p.label
        table.add_row(plain(p.path), f"{p.probability:.4f}", plain(p.label), plain(p.truth or ""),
                      "" if p.ood_score is None else f"{p.ood_score:.1f}",
                      plain("; ".join(p.warnings)), style="red" if wrong else None)
    if run.predictions:
        console.print(table)
    if limit < len(run.predictions) and csv_path is not None:
        console.print(Text(f"showing {limit} of {len(run.predictions)}; all rows are in ",
                           style="dim") + plain(csv_path))


def render_failures(run) -> None:
    for f in run.failures:
        err.print(Text("failed: ", style="red") + plain(f"{f.path}: {f.error}"),
                  highlight=False, soft_wrap=True)


def render_serving(where: dict, ae_title: str) -> None:
    """The line ``serve`` prints once both doors are open."""
    h, p = where["http"]
    line = f"serving http://{h}:{p}"
    if where["dicom"]:
        line += f" and DICOM {ae_title}@{where['dicom'][0]}:{where['dicom'][1]}"
    if where["recovered"]:
        line += f"; {where['recovered']} instances recovered from the spool"
    err.print(plain(line), highlight=False)


def render_run(run, written: dict, limit: int, quiet: bool, notes=(),
               disclaimer: str = "") -> None:
    """The terminal side of predict, either engine: table, failures, summary, files."""
    if not quiet:
        render_predictions(run, limit, written.get("csv"))
    render_failures(run)
    render_summary(run)
    for path in written.values():
        console.print(Text("wrote ") + plain(path), highlight=False)
    for text, style in notes:
        console.print(plain(text, style or None), highlight=False)
    console.print(Text(disclaimer, style="dim"))


def render_summary(run) -> None:
    lat = run.latency_ms
    table = Table(title="summary", show_header=False, title_justify="left")
    table.add_row("model", plain(f"{run.model['path']} ({run.model['precision']}, "
                                 f"{run.model['provider']})"))
    table.add_row("threshold", f"{run.model['threshold']:.4f}")
    table.add_row("images", f"{run.n_images} ({run.n_predicted} predicted, "
                            f"{run.n_failed} failed)")
    table.add_row("flagged", f"{run.n_flagged} (input checks or out of distribution; "
                             f"--flagged-as {run.flagged_as})")
    m = run.metrics
    if m is not None:
        table.add_row("labelled", str(m.n_labelled))
        table.add_row("accuracy", f"{m.accuracy:.4f}")
        table.add_row("sensitivity", f"{m.recall:.4f}  (TP {m.tp}, FN {m.fn})")
        table.add_row("specificity", f"{m.specificity:.4f}  (TN {m.tn}, FP {m.fp})")
        table.add_row("precision / F1", f"{m.precision:.4f} / {m.f1:.4f}")
        table.add_row("ROC AUC", "n/a (one class)" if m.auc is None else f"{m.auc:.4f}")
    if lat["mean"] is not None:
        table.add_row("model ms/image", f"mean {lat['mean']:.2f}, p50 {lat['p50']:.2f}, "
                                        f"p95 {lat['p95']:.2f}, p99 {lat['p99']:.2f} "
                                        f"(batch {run.batch_size})")
    table.add_row("end-to-end", f"{run.seconds:.2f} s, {run.images_per_second:.1f} images/s")
    console.print(table)


def render_info(model: Path, sha256: str, meta: dict, inputs: list, outputs: list) -> None:
    table = Table(title=plain(model), show_header=False, title_justify="left")
    table.add_row("size", f"{model.stat().st_size / 1e6:.2f} MB")
    table.add_row("sha256", sha256)
    for i in inputs:
        table.add_row("input", plain(f"{i['name']} {i['shape']} {i['type']}"))
    for o in outputs:
        table.add_row("output", plain(f"{o['name']} {o['shape']} {o['type']}"))
    site = meta.get("site_adaptation")
    if isinstance(site, dict):  # an adapted model: where it came from, before the raw keys
        chain = [f"{p.get('file')} ({str(p.get('sha256'))[:12]}, {p.get('method')})"
                 for p in site.get("lineage") or [] if isinstance(p, dict)]
        table.add_row("lineage", plain(" -> ".join(chain + [f"this file ({site.get('method')}, "
                                                            f"{site.get('created')})"])))
    for key, value in meta.items():
        text = json.dumps(value) if isinstance(value, (dict, list)) else str(value)
        table.add_row(plain(key), plain(text))
    console.print(table)


def render_robustness(source, result, threshold: float, agreement: dict | None) -> None:
    table = Table(title=plain(f"robustness of {source} on {len(result.labels)} images "
                              f"(threshold {threshold:.4f})"), title_justify="left")
    cols = ["perturbation", "AUC", "sens", "spec", "acc", "mean|Δp|", "flipped"]
    cols += ["agree vs ref"] if agreement else []
    for col in cols:
        table.add_column(col, justify="left" if col == "perturbation" else "right")
    for r in result.rows:
        cells = [r.perturbation, _fmt(r.auc), _fmt(r.sensitivity), _fmt(r.specificity),
                 _fmt(r.accuracy), _fmt(r.mean_abs_dp), _fmt(r.flipped, ".3f")]
        if agreement:
            cells.append(_fmt(agreement.get(r.perturbation)))
        table.add_row(*cells)
    console.print(table)
    worst = result.worst()
    console.print(plain("worst: " + ", ".join(f"{k} {v['value']:.4f} ({v['row']})"
                                              for k, v in worst.items())), highlight=False)
    if result.n_failed:
        console.print(plain(f"{result.n_failed} files could not be decoded and were left out"))


def render_benchmark(result, sizes: list[int]) -> None:
    m = result.machine
    table = Table(title=plain(f"{m['cpu']} | {m['physical_cores']} cores, {m['threads']} threads | "
                              f"onnxruntime {m['onnxruntime']} ({m.get('provider')}) | "
                              f"{result.n_images} images, {result.n_labelled} labelled"),
                  title_justify="left")
    for col in ["format", "MB", "acc", "AUC", "sens", "spec"] + [f"ms b{b}" for b in sizes] + [
            f"img/s b{sizes[-1]}", "speedup"]:
        table.add_column(col, justify="left" if col == "format" else "right", overflow="fold")
    for r in result.rows:
        mt = r.metrics or {}
        table.add_row(f"{r.fmt} {r.precision}", f"{r.size_mb:.1f}", _fmt(mt.get("accuracy"), ".3f"),
                      _fmt(mt.get("auc"), ".3f"), _fmt(mt.get("recall"), ".3f"),
                      _fmt(mt.get("specificity"), ".3f"),
                      *[_fmt(r.latency[str(b)]["p50_ms"], ".2f") for b in sizes],
                      _fmt(r.latency[str(sizes[-1])]["images_per_second"], ".0f"),
                      _fmt(r.speedup_vs_first, ".2f") + "x")
    console.print(table)
    console.print(plain("ms: p50 model time per image at each batch size (p95 in "
                        "benchmark.json/.md); metrics at each model's own threshold. Rows: "
                        + ", ".join(r.name for r in result.rows), "dim"), highlight=False)


def render_calibration(result) -> None:
    """Before/after table of ``pneumo-edge calibrate`` with the 95 % intervals."""
    def cell(m):
        if not m:
            return "n/a"
        lo, hi = m["ci95"]
        return f"{m['value']:.3f} [{lo:.3f}, {hi:.3f}]"

    table = Table(title=plain(f"site adaptation ({result.method}): "
                              f"{result.counts['NORMAL']} NORMAL / {result.counts['PNEUMONIA']} "
                              f"PNEUMONIA images, {sum(result.patients.values())} patients"),
                  title_justify="left")
    table.add_column("metric (95 % interval)")
    table.add_column("before", justify="right")
    table.add_column("after (out-of-fold)", justify="right")
    for key, name in (("auc", "AUC"), ("sensitivity", "sensitivity"),
                      ("specificity", "specificity"), ("ece", "calibration error (ECE)"),
                      ("ood_flag_rate", "OOD flag rate")):
        table.add_row(name, cell(result.before.get(key)), cell(result.after.get(key)))
    console.print(table)
    console.print(plain(f"threshold {result.threshold:.4f} ({result.threshold_rule})"),
                  highlight=False)
    if result.ood:
        console.print(plain(f"OOD threshold {result.ood['threshold']:.2f} "
                            f"({result.ood['threshold_rule']})"), highlight=False)
    for w in result.warnings:
        err.print(plain(f"warning: {w}", "yellow"), highlight=False)
    console.print(Text("wrote ") + plain(result.out) + Text(" and ") + plain(result.report_path),
                  highlight=False)
    console.print(Text("An adapted model is a new model: validate it on images it has not "
                       "seen before using it.", style="dim"))
