"""The ``pneumo-edge`` command line: parse, call one library function, render.

Exit codes: 0 success; 1 some input files failed (the report is still
written); 2 usage error, unusable model or data folder; 130 interrupted.
"""

from __future__ import annotations

import os
from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.text import Text

from . import __version__
from .console import (console, err, plain, render_benchmark, render_ensemble, render_export,
                      render_failures, render_info, render_predictions, render_robustness,
                      render_summary, render_train_result, say)

EXIT_OK = 0
EXIT_SOME_FAILED = 1
EXIT_USAGE = 2
EXIT_INTERNAL = 3
EXIT_INTERRUPTED = 130

app = typer.Typer(
    add_completion=False, no_args_is_help=True, rich_markup_mode="rich",
    help="Chest X-ray pneumonia screening on edge boxes: train, export, predict, info, benchmark. "
         "A research and engineering tool, not a medical device.")


class Device(str, Enum):
    auto = "auto"
    cpu = "cpu"
    cuda = "cuda"


#: Longer messages (a library quoting a whole tensor) are cut: one readable line.
MAX_ERROR_CHARS = 600


def _fail(message: str, code: int = EXIT_USAGE) -> "typer.Exit":
    message = str(message)
    if len(message) > MAX_ERROR_CHARS:
        message = message[:MAX_ERROR_CHARS] + f"... [{len(message) - MAX_ERROR_CHARS} more characters]"
    err.print(Text("error: ", style="bold red") + plain(message), highlight=False,
              soft_wrap=True)
    return typer.Exit(code)


def _version(value: bool) -> None:
    if value:
        console.print(f"pneumo-edge {__version__}")
        raise typer.Exit()


@app.callback()
def _main(version: Annotated[bool, typer.Option("--version", callback=_version,
                                                is_eager=True, help="Print the version.")] = False,
          debug: Annotated[bool, typer.Option("--debug", help="Show the Python traceback of an "
                                                             "internal error.")] = False):
    pass


@app.command()
def train(
    data: Annotated[Path, typer.Option(help="Folder with NORMAL/ and PNEUMONIA/ (maybe one level down).")],
    out: Annotated[Optional[Path], typer.Option(help="Run folder to write [default: runs/latest].")] = None,
    epochs: Annotated[Optional[int], typer.Option(min=1, help="Total epochs [default: 30; with --resume: the run's own].")] = None,
    batch_size: Annotated[Optional[int], typer.Option(min=1, help="[default: 32]")] = None,
    img_size: Annotated[Optional[int], typer.Option(min=16, help="Square input size in pixels [default: 180].")] = None,
    val_fraction: Annotated[Optional[float], typer.Option(min=0.01, max=0.9, help="[default: 0.15]")] = None,
    lr: Annotated[Optional[float], typer.Option(help="Peak learning rate (AdamW) [default: 1e-3].")] = None,
    patience: Annotated[Optional[int], typer.Option(min=1, help="EarlyStopping patience on the robust validation AUC [default: 8].")] = None,
    seed: Annotated[Optional[int], typer.Option(help="Seed of the patient split [default: 42].")] = None,
    init_seed: Annotated[Optional[int], typer.Option(help="Seed of the weights and augmentation [default: --seed]; seed-ensemble members share --seed and differ here.")] = None,
    target_sensitivity: Annotated[Optional[float], typer.Option(
        min=0.0, max=1.0, help="Pick the highest threshold with this validation sensitivity "
                               "(default: the threshold rule).")] = None,
    arch: Annotated[Optional[str], typer.Option(help="resnet18, resnet18_lung (lung-field crop inside), or resnet_tiny / resnet_tiny_lung (tests) [default: resnet18].")] = None,
    schedule: Annotated[Optional[str], typer.Option(help="cosine (warm-up + cosine) or plateau [default: cosine].")] = None,
    weight_decay: Annotated[Optional[float], typer.Option(help="[default: 1e-4]")] = None,
    dropout: Annotated[Optional[float], typer.Option(min=0.0, max=0.9, help="[default: 0.3]")] = None,
    label_smoothing: Annotated[Optional[float], typer.Option(min=0.0, max=0.5, help="[default: 0.05]")] = None,
    augment: Annotated[bool, typer.Option(help="All augmentation on/off.")] = True,
    flip: Annotated[bool, typer.Option(help="Random horizontal flip.")] = True,
    intensity: Annotated[bool, typer.Option(help="Brightness/contrast/gamma/noise/resample jitter.")] = True,
    crop_area: Annotated[Optional[float], typer.Option(min=0.05, max=1.0, help="Random-resized crops keep at least this share of the area [default: 0.4].")] = None,
    zoom_out: Annotated[Optional[float], typer.Option(min=0.0, max=2.0, help="Zoom-out range: the image shrinks to 1/(1+Z) of its side in a black border [default: 0.4].")] = None,
    ema_decay: Annotated[Optional[float], typer.Option(min=0.0, max=0.99999, help="Weight averaging (EMA) decay per step; 0 turns it off [default: 0.998].")] = None,
    threshold_rule: Annotated[Optional[str], typer.Option(help="robust (worst zoom row of validation) or clean [default: robust].")] = None,
    calibrate: Annotated[bool, typer.Option(help="Fit a temperature and bias on validation and fold them into the model.")] = True,
    class_balance: Annotated[bool, typer.Option(help="Class weights from training frequencies.")] = True,
    max_images: Annotated[Optional[int], typer.Option(min=4, help="Random subset, for quick trials.")] = None,
    segmenter: Annotated[Optional[Path], typer.Option(help="With --arch resnet18_lung: the lung segmenter (.keras) [default: the one shipped in training/weights].")] = None,
    crop_size: Annotated[Optional[int], typer.Option(min=16, help="With --arch resnet18_lung: side of the lung-field crop the classifier sees [default: 3/4 of --img-size].")] = None,
    split: Annotated[Optional[str], typer.Option(help="patient (random patients) or block (the earliest NORMAL patients of each name family held out as well: two validation views) [default: patient].")] = None,
    precision: Annotated[Optional[str], typer.Option(help="auto, fp32, bf16 or fp16 compute (auto: bf16 on CPUs with bf16 instructions, fp16 on GPUs); export is float32 [default: auto].")] = None,
    strategy: Annotated[Optional[str], typer.Option(help="auto, mirrored, default or multiworker [default: auto: multiworker when TF_CONFIG names several workers].")] = None,
    resume: Annotated[bool, typer.Option(help="Continue the interrupted run in --out.")] = False,
    cluster: Annotated[Optional[str], typer.Option(help="Multi-worker training: host:port of every worker, comma-separated, the chief first (sets TF_CONFIG); start the same command on each machine with its --task-index.")] = None,
    task_index: Annotated[Optional[int], typer.Option(min=0, help="With --cluster: this machine's position in the list (0 = chief, writes the run folder).")] = None,
    init_from: Annotated[Optional[Path], typer.Option(help="Start from an exported FP32 file's weights (checked against onnxruntime first); its input size and arch are used, and the defaults become --lr 1e-4, --weight-decay 0, --freeze-until stage2, --pull 1, --precision fp32.")] = None,
    freeze_until: Annotated[Optional[str], typer.Option(help="With --init-from: keep the stem and the stages up to this one fixed (none, stem, stage1..stage4).")] = None,
    pull: Annotated[Optional[float], typer.Option(min=0.0, help="With --init-from: after each step pull every weight towards its initial value by lr * PULL * (w - w_init).")] = None,
):
    """Train a ResNet-18 on labelled chest X-rays (needs the [bold]train[/] extra).

    Defaults live in one place, training.train.TrainConfig and
    training.augment.AugmentConfig; every option left out takes theirs, and the
    whole configuration is checked before any image is decoded.
    """
    try:
        from training.augment import AugmentConfig
        from training.data import DataError
        from training.train import TrainConfig, TrainInterrupted
        from training.train import train as run_training
    except ImportError as exc:
        raise _fail(f"training needs the train extra (pip install 'pneumo-edge[train]'): {exc}")

    given = lambda **kw: {k: v for k, v in kw.items() if v is not None}
    if (cluster is None) != (task_index is None):
        raise _fail("--cluster and --task-index go together")
    if cluster is not None:
        from training.train import cluster_tf_config
        workers = [w.strip() for w in cluster.split(",") if w.strip()]
        if len(workers) < 2 or not all(w.rpartition(":")[2].isdigit() for w in workers):
            raise _fail(f"--cluster must list at least two host:port entries, got {cluster!r}")
        try:
            os.environ["TF_CONFIG"] = cluster_tf_config(workers, task_index)
        except ValueError as exc:
            raise _fail(str(exc))
        strategy = strategy or "multiworker"
    try:
        aug = AugmentConfig(**given(crop_area=crop_area, zoom_out=zoom_out))
        if not augment:
            aug = AugmentConfig.off()
        else:
            if not flip:
                aug = AugmentConfig(**(aug.to_dict() | {"flip": False}))
            if not intensity:
                aug = AugmentConfig(**(aug.to_dict() | {"brightness": 0, "contrast": 0,
                                                        "gamma": 0, "noise": 0, "lowres": 0}))
        if epochs is None and not resume:
            epochs = TrainConfig.__dataclass_fields__["epochs"].default
        seeded = {}
        if init_from is not None:  # the file decides size and arch; lighter defaults
            from training.init_from import DEFAULTS, InitFromError, file_config
            try:
                fc = file_config(init_from)
            except InitFromError as exc:
                raise _fail(str(exc))
            for name, mine in (("img_size", img_size), ("arch", arch)):
                if mine is not None and mine != fc[name]:
                    raise _fail(f"--{name.replace('_', '-')} {mine} differs from the "
                                f"--init-from file's {fc[name]}")
            seeded = DEFAULTS | {"img_size": fc["img_size"], "arch": fc["arch"],
                                 "channels": fc["channels"], "init_from": str(init_from)}
        cfg = TrainConfig(data=str(data), augment=aug, class_balance=class_balance,
                          calibrate=calibrate, epochs=epochs, **(seeded | given(
                              out=None if out is None else str(out), arch=arch,
                              img_size=img_size, batch_size=batch_size, lr=lr,
                              weight_decay=weight_decay, dropout=dropout,
                              label_smoothing=label_smoothing, schedule=schedule,
                              patience=patience, val_fraction=val_fraction, seed=seed,
                              init_seed=init_seed,
                              target_sensitivity=target_sensitivity, max_images=max_images,
                              strategy=strategy, ema_decay=ema_decay, split=split,
                              precision=precision, crop_size=crop_size,
                              segmenter=None if segmenter is None else str(segmenter),
                              threshold_rule=threshold_rule, freeze_until=freeze_until,
                              pull=pull)))
    except ValueError as exc:
        raise _fail(str(exc))
    if not data.is_dir():
        raise _fail(f"{data}: data folder not found")
    out = Path(cfg.out)

    def on_epoch(epoch: int, logs: dict) -> None:
        console.print(
            f"epoch {epoch + 1:>3}  loss {logs.get('loss', float('nan')):.4f}  "
            f"auc {logs.get('auc', float('nan')):.4f}  val_loss {logs.get('val_loss', float('nan')):.4f}  "
            f"val_auc {logs.get('val_auc', float('nan')):.4f}  "
            f"robust {logs.get('val_robust_auc', float('nan')):.4f}  lr {logs.get('learning_rate', 0):.2e}  "
            f"{logs.get('epoch_seconds', 0):.0f} s",
            highlight=False)

    def on_start(resolved: dict) -> None:
        console.print(
            f"training {resolved['arch']} at {resolved['img_size']} px on "
            f"{', '.join(resolved['devices'])} ({resolved['precision_policy']}): "
            f"{resolved['n_train']} train / {resolved['n_val']} validation images, "
            f"{resolved['split']} split", highlight=False)

    try:
        result = run_training(cfg, resume=resume, on_epoch=on_epoch, on_start=on_start)
    except (DataError, FileNotFoundError, ValueError) as exc:
        raise _fail(str(exc))
    except TrainInterrupted as exc:
        raise _fail(str(exc), EXIT_INTERRUPTED)

    render_train_result(result)


@app.command()
def export(
    source: Annotated[Path, typer.Argument(help="A run folder from `train`, or a .keras file.")],
    fp16: Annotated[bool, typer.Option("--fp16", help="Also write an FP16 model (half size; for GPU and Arm).")] = False,
    int8: Annotated[bool, typer.Option("--int8", help="Also write a static INT8 (QDQ) model (fast on CPUs).")] = False,
    out: Annotated[Path, typer.Option(help="Output folder.")] = Path("exported"),
    name: Annotated[Optional[str], typer.Option(help="File stem [default: the architecture]; files are NAME_fp32.onnx etc.")] = None,
    opset: Annotated[int, typer.Option(min=13, max=21)] = 17,
    calib: Annotated[Optional[Path], typer.Option(help="Images for INT8 calibration [default: the run's training split].")] = None,
    calib_size: Annotated[int, typer.Option(min=1)] = 300,
    calib_method: Annotated[str, typer.Option(help="minmax, entropy, percentile, or auto (best validation AUC).")] = "auto",
    max_val: Annotated[Optional[int], typer.Option(min=1, help="Evaluate on at most N validation images.")] = None,
    force: Annotated[bool, typer.Option("--force", help="Overwrite existing files.")] = False,
    heads: Annotated[bool, typer.Option(help="Add the cam (heatmap) and ood outputs to the graph.")] = True,
    robustness: Annotated[bool, typer.Option(help="Run the robustness suite on every file (metadata; the INT8 default rule needs it).")] = True,
    set_default: Annotated[bool, typer.Option("--set-default", help="Make this export predict's default (OUT/default.txt): INT8 if its val AUC is within 0.005 of FP32, else FP32.")] = False,
):
    """Export a trained run to ONNX with preprocessing, threshold and parity in its metadata."""
    try:
        from training.export import ExportError, export_run
    except ImportError as exc:
        raise _fail(f"export needs the train extra (pip install 'pneumo-edge[train]'): {exc}")
    try:
        result = export_run(source, out, fp16=fp16, int8=int8, name=name, opset=opset,
                            calib=calib, calib_size=calib_size, calib_method=calib_method,
                            force=force, max_val=max_val, set_default=set_default, heads=heads,
                            robustness=robustness,
                            progress=say)
    except ExportError as exc:
        raise _fail(str(exc))
    render_export(result, out, set_default)


@app.command()
def ensemble(
    runs: Annotated[list[Path], typer.Argument(help="Finished run folders of one recipe on one split (same --seed, different --init-seed).")],
    out: Annotated[Path, typer.Option(help="Run folder to write (export it like any run).")] = Path("runs/ensemble"),
    force: Annotated[bool, typer.Option("--force", help="Write into a non-empty --out.")] = False,
):
    """Combine runs into one seed-ensemble model (mean logit), calibrated and thresholded on validation."""
    try:
        from training.ensemble import EnsembleError, ensemble_runs
    except ImportError as exc:
        raise _fail(f"ensemble needs the train extra (pip install 'pneumo-edge[train]'): {exc}")
    try:
        val = ensemble_runs(runs, out, force=force, progress=say)
    except (EnsembleError, ValueError, OSError) as exc:
        # EnsembleError and the data's DataError are ValueErrors; Keras names an
        # unreadable best.keras in a ValueError
        raise _fail(str(exc))
    render_ensemble(val, out)


def _resolve_model(model: Optional[Path]) -> Path:
    from .runtime import default_model_path

    if model is not None:
        return model
    found = default_model_path()
    if found is None:
        raise _fail("no --model given and no release model in exported/ (exported/default.txt "
                    "names it); train and export one, or pass --model FILE.onnx")
    return found


class FlaggedAs(str, Enum):
    warn = "warn"
    fail = "fail"


class Engine(str, Enum):
    local = "local"
    ray = "ray"


class RayDecode(str, Enum):
    actors = "actors"
    tasks = "tasks"


def _check_out(out: Path) -> None:
    """Refuse an unusable --out before any inference (exit 2)."""
    import os

    probe = out
    while not probe.exists():
        if probe.parent == probe:
            break
        probe = probe.parent
    if probe.exists() and not probe.is_dir():
        raise _fail(f"--out {out}: {probe} is a file, not a folder")
    if probe.exists() and not os.access(probe, os.W_OK | os.X_OK):
        raise _fail(f"--out {out}: {probe} is not writable")


@app.command()
def predict(
    paths: Annotated[list[Path], typer.Argument(help="Image files and/or folders (recursive).")],
    model: Annotated[Optional[Path], typer.Option("--model", "-m", help="ONNX model with pneumo_edge metadata (default: the release model in exported/).")] = None,
    report: Annotated[bool, typer.Option("--report", help="Write report.json, predictions.csv and report.html to --out.")] = False,
    out: Annotated[Optional[Path], typer.Option(help="Output folder (default with --report: pneumo_edge_report).")] = None,
    device: Annotated[Device, typer.Option(help="auto: CUDA only if it really loads, else CPU.")] = Device.auto,
    batch_size: Annotated[int, typer.Option(min=1, max=1024)] = 8,
    threads: Annotated[Optional[int], typer.Option(min=1, help="onnxruntime intra-op threads (default: physical cores).")] = None,
    workers: Annotated[Optional[int], typer.Option(min=1, help="Decoding threads.")] = None,
    threshold: Annotated[Optional[float], typer.Option(min=0.0, max=1.0, help="Override the model's decision threshold.")] = None,
    heatmaps: Annotated[Optional[Path], typer.Option(help="Write a heatmap overlay PNG per image here (models with a cam output).")] = None,
    flagged_as: Annotated[FlaggedAs, typer.Option(help="warn: flagged images (input checks, out of distribution) keep their prediction with warnings; fail: they become failures.")] = FlaggedAs.warn,
    show: Annotated[int, typer.Option(min=0, help="Rows of per-image results to print when files are written (all are in predictions.csv).")] = 20,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar or per-image table.")] = False,
    engine: Annotated[Engine, typer.Option(help="local: this process; ray: Ray Data (pip install 'pneumo-edge[scale]'), local or --ray-address.")] = Engine.local,
    actors: Annotated[int, typer.Option(min=1, max=4096, help="--engine ray: model actors (one onnxruntime session each).")] = 2,
    ray_address: Annotated[Optional[str], typer.Option(help="--engine ray: an existing cluster (e.g. auto, ray://head:10001); default a local Ray.")] = None,
    ray_decode: Annotated[RayDecode, typer.Option(help="--engine ray: decode in the model actors (fastest on one node) or in separate Ray tasks (CPU nodes decode, GPU nodes infer).")] = RayDecode.actors,
    resume: Annotated[bool, typer.Option("--resume", help="--engine ray: skip files already in --out's journal (an interrupted run).")] = False,
    parquet: Annotated[bool, typer.Option("--parquet", help="--engine ray: also write predictions.parquet (always for runs over --report-limit).")] = False,
    report_limit: Annotated[int, typer.Option(min=1, help="--engine ray: above this many files, report.json and report.html keep aggregates only; every record is in predictions.csv.")] = 50_000,
):
    """Predict NORMAL/PNEUMONIA for X-ray images; with labelled folders, evaluate.

    Exit codes: 0 all files predicted, 1 some files failed (listed; reports still
    written), 2 usage error or unusable model.
    """
    from .images import collect_labelled
    from .predict import predict_paths
    from .runtime import ModelError, load_model

    try:
        items = collect_labelled(paths)
    except FileNotFoundError as exc:
        raise _fail(str(exc))
    if not items:
        raise _fail(f"no image files found in {', '.join(map(str, paths))}")
    files, truths = [i[0] for i in items], [i[1] for i in items]
    if engine is Engine.local:
        for flag, given in (("--resume", resume), ("--parquet", parquet)):
            if given:
                raise _fail(f"{flag} works with --engine ray only")
    elif heatmaps is not None:
        raise _fail("--heatmaps works with --engine local only")
    if (report or engine is Engine.ray) and out is None:
        out = Path("pneumo_edge_report")
    for folder in (out, heatmaps):
        if folder is not None:
            _check_out(folder)
    model_path = _resolve_model(model)
    if engine is Engine.ray:
        return _predict_ray(model_path, files, truths, out, report=report,
                            batch_size=batch_size, threads=threads, threshold=threshold,
                            flagged_as=flagged_as.value, actors=actors, address=ray_address,
                            decode=ray_decode.value, resume=resume, parquet=parquet,
                            report_limit=report_limit, show=show, quiet=quiet)
    try:
        loaded = load_model(model_path, device=device.value, threads=threads)
    except ModelError as exc:
        raise _fail(str(exc))
    if heatmaps is not None and not loaded.has_cam:
        err.print(plain(f"note: {model_path} has no cam output; no heatmaps are written "
                        "(re-export the model to add it)"), style="yellow")
    err.print(plain(f"model: {model_path} ({loaded.precision}, {loaded.provider})"),
              style="dim", highlight=False)

    kwargs = dict(batch_size=batch_size, workers=workers, threshold=threshold, truths=truths,
                  flagged_as=flagged_as.value,
                  heatmap_dir=heatmaps if loaded.has_cam else None)
    try:
        run = _with_progress(lambda progress: predict_paths(loaded, files, progress=progress,
                                                            **kwargs),
                             len(files), "predicting", quiet)
    except ModelError as exc:
        raise _fail(str(exc))
    except KeyboardInterrupt:
        raise _fail("interrupted; nothing written for this run", EXIT_INTERRUPTED)

    written = {} if out is None else _write_outputs(run, out, report)
    notes = []
    if run.heatmaps:
        notes.append(Text(f"wrote {len(run.heatmaps)} heatmaps to ") + plain(heatmaps))
    _render_run(run, written, len(run.predictions) if out is None else show, quiet, notes)


def _with_progress(call, total: int, description: str, quiet: bool):
    """``call(progress)`` under a transient progress bar on stderr (none when quiet)."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeRemainingColumn

    if quiet or total < 2:
        return call(None)
    with Progress("[progress.description]{task.description}", BarColumn(),
                  MofNCompleteColumn(), TimeRemainingColumn(), console=err,
                  transient=True) as bar:
        task = bar.add_task(description, total=total)
        return call(lambda n: bar.update(task, completed=n))


def _write_outputs(run, out: Path, report: bool, csv_data=None, kept_in: str = "") -> dict:
    """predictions.csv, and with --report report.json and report.html, as one set."""
    from .report import write_report

    try:
        return write_report(run, out, html=report, json_report=report, csv_data=csv_data)
    except OSError as exc:
        raise _fail(f"--out {out}: could not write the report ({exc.strerror or exc}); "
                    f"earlier report files were left as they were{kept_in}")


def _render_run(run, written: dict, limit: int, quiet: bool, notes=()) -> None:
    """The terminal side of predict, either engine; exit 1 when some files failed."""
    from .report import DISCLAIMER

    if not quiet:
        render_predictions(run, limit, written.get("csv"))
    render_failures(run)
    render_summary(run)
    for path in written.values():
        console.print(Text("wrote ") + plain(path), highlight=False)
    for note in notes:
        console.print(note, highlight=False)
    console.print(Text(DISCLAIMER, style="dim"))
    if run.n_failed:
        raise typer.Exit(EXIT_SOME_FAILED)


def _predict_ray(model_path: Path, files, truths, out: Path, *, report: bool, show: int,
                 quiet: bool, parquet: bool, **kwargs) -> None:
    """predict --engine ray: the same outputs as the local engine, via pneumo_edge.scale."""
    from .runtime import ModelError
    from .scale import JOURNAL, RayUnavailable, journal_csv_writer, predict_ray, write_parquet

    err.print(plain(f"model: {model_path} (Ray engine, {kwargs['actors']} actors)"),
              style="dim", highlight=False)
    journal = out / JOURNAL
    try:
        run, journal = _with_progress(
            lambda progress: predict_ray(model_path, files, truths, out, progress=progress,
                                         **kwargs),
            len(files), "predicting (ray)", quiet)
    except (RayUnavailable, ModelError) as exc:
        raise _fail(str(exc))
    except KeyboardInterrupt:
        raise _fail(f"interrupted; finished files are kept in {journal}: rerun with --resume",
                    EXIT_INTERRUPTED)

    omitted = run.omitted_predictions + run.omitted_failures
    kept_in = f"; records are in {journal}"
    if parquet or omitted:
        try:
            write_parquet(journal, out / "predictions.parquet")
        except OSError as exc:
            raise _fail(f"--out {out}: could not write predictions.parquet "
                        f"({exc.strerror or exc}){kept_in}")
    written = _write_outputs(run, out, report,
                             journal_csv_writer(journal) if omitted else None, kept_in)
    notes = []
    if parquet or omitted:
        written["parquet"] = out / "predictions.parquet"
    if omitted:
        notes.append(Text(f"{run.n_images} files is over --report-limit: report.json and "
                          "report.html keep aggregates; every record is in predictions.csv "
                          "and predictions.parquet", style="yellow"))
    _render_run(run, written, show, quiet, notes)


@app.command()
def info(model: Annotated[Path, typer.Argument(help="An exported ONNX model.")]):
    """Show a model's pneumo_edge metadata, inputs, outputs, size and sha256."""
    from .runtime import ModelError, file_sha256, read_metadata

    if not model.is_file():
        raise _fail(f"{model}: model file not found")
    try:
        meta, inputs, outputs = read_metadata(model)
    except ModelError as exc:
        raise _fail(str(exc))
    render_info(model, file_sha256(model), meta, inputs, outputs)


class CalibrationRule(str, Enum):
    youden = "youden"
    sensitivity = "sensitivity"


@app.command()
def calibrate(
    model: Annotated[Path, typer.Argument(help="An exported FP32 or INT8 ONNX model.")],
    data: Annotated[Path, typer.Option(help="The site's labelled X-rays: NORMAL/ and PNEUMONIA/ folders (DICOM included).")],
    out: Annotated[Path, typer.Option(help="The new model file (must not exist); a NAME.site_adaptation.json report is written beside it.")],
    refit_head: Annotated[bool, typer.Option("--refit-head", help="Refit the output layer on the pooled features (L2 towards the shipped head) instead of Platt scaling.")] = False,
    refit_ood: Annotated[bool, typer.Option("--refit-ood", help="Refit the OOD statistics and threshold on the site's images.")] = False,
    rule: Annotated[CalibrationRule, typer.Option(help="Threshold rule on out-of-fold predictions.")] = CalibrationRule.youden,
    target_sensitivity: Annotated[Optional[float], typer.Option(help="With --rule sensitivity: the sensitivity to reach.")] = None,
    min_per_class: Annotated[int, typer.Option(help="Refuse fewer labelled images per class (below 100 a warning).")] = 20,
    threads: Annotated[Optional[int], typer.Option(min=1)] = None,
):
    """Adapt a model to a site's labelled X-rays without TensorFlow: Platt scaling or a head
    refit, a new threshold, optionally new OOD statistics; before/after with 95 % intervals."""
    from .calibrate import CalibrateError
    from .calibrate import calibrate as run_calibration
    from .console import render_calibration
    from .runtime import ModelError

    try:
        result = run_calibration(model, data, out, refit_head=refit_head, refit_ood=refit_ood,
                                 rule=rule.value, target_sensitivity=target_sensitivity,
                                 min_per_class=min_per_class, threads=threads, progress=say)
    except (CalibrateError, ModelError) as exc:
        raise _fail(str(exc))
    except OSError as exc:
        raise _fail(f"--out {out}: could not write ({exc.strerror or exc}); nothing written")
    except KeyboardInterrupt:
        raise _fail("interrupted; nothing written", EXIT_INTERRUPTED)
    render_calibration(result)
    if result.failures:
        raise typer.Exit(EXIT_SOME_FAILED)


@app.command()
def robustness(
    source: Annotated[Path, typer.Argument(help="An exported ONNX model, or a run folder from `train` (needs TensorFlow).")],
    data: Annotated[Optional[Path], typer.Option(help="Labelled folder (NORMAL/, PNEUMONIA/) [default for a run folder: its validation split].")] = None,
    split: Annotated[Optional[Path], typer.Option(help="A val_split.csv or split.csv listing the files (paths relative to --root).")] = None,
    root: Annotated[Optional[Path], typer.Option(help="Folder the --split paths are relative to [default: the CSV's folder].")] = None,
    reference: Annotated[Optional[Path], typer.Option(help="A second ONNX model (e.g. FP32) to measure label agreement against, per row.")] = None,
    rows: Annotated[Optional[str], typer.Option(help="Comma-separated perturbations [default: all].")] = None,
    max_images: Annotated[Optional[int], typer.Option(min=2, help="At most N images (seeded, stratified by order).")] = None,
    out: Annotated[Optional[Path], typer.Option(help="Write robustness.json here [default for a run folder: the run folder].")] = None,
    device: Annotated[Device, typer.Option()] = Device.auto,
):
    """Re-run labelled X-rays under fixed perturbations (zoom, shift, rotation, gamma, blur,
    noise, JPEG, resampling): AUC, sensitivity, specificity, |dp| and flipped labels per row."""
    import json as _json

    from .report import atomic_write
    from .robustness import PERTURBATIONS, labelled_files, read_split_csv, run_suite
    from .runtime import ModelError, load_model

    names = [r.strip() for r in rows.split(",") if r.strip()] if rows else list(PERTURBATIONS)
    unknown = [n for n in names if n not in PERTURBATIONS]
    if unknown:
        raise _fail(f"unknown perturbation {unknown[0]!r}; choose from {', '.join(PERTURBATIONS)}")
    is_run = source.is_dir()
    if not source.exists():
        raise _fail(f"{source}: no such model file or run folder")
    files = labels = None
    try:
        if split is not None:
            if not split.is_file():
                raise _fail(f"{split}: no such file")
            files, labels = read_split_csv(split, root)
        elif data is not None:
            if not data.is_dir():
                raise _fail(f"{data}: no such folder")
            files, labels = labelled_files(data)
        if is_run:
            try:
                from training.evaluate import record_worst, run_predictor
            except ImportError as exc:
                raise _fail(f"a run folder needs the train extra (pip install 'pneumo-edge[train]'): {exc}")
            predict, cfg, thr, vf, vl = run_predictor(source)
            if files is None:
                files, labels = vf, vl
        else:
            model = load_model(source, device=device.value)
            predict, cfg, thr = model.run, model.preprocess, model.threshold
    except (ModelError, FileNotFoundError, KeyError, ValueError) as exc:
        raise _fail(str(exc))
    if not files:
        raise _fail("no labelled images: give --data DIR (NORMAL/, PNEUMONIA/) or --split CSV")
    if max_images and len(files) > max_images:
        import numpy as _np
        keep = _np.sort(_np.random.default_rng(0).permutation(len(files))[:max_images])
        files, labels = [files[i] for i in keep], [labels[i] for i in keep]
    try:
        result = run_suite(predict, cfg, files, labels, thr, perturbations=names,
                           model_name=str(source), progress=say)
        agreement = None
        if reference is not None:
            ref_model = load_model(reference, device=device.value)
            ref = run_suite(ref_model.run, ref_model.preprocess, files, labels,
                            ref_model.threshold, perturbations=names,
                            model_name=str(reference), progress=say)
            agreement = result.agreement_with(ref)
    except (ModelError, ValueError) as exc:
        raise _fail(str(exc))
    render_robustness(source, result, thr, agreement)
    payload = result.to_dict() | ({"reference": str(reference), "agreement": agreement}
                                  if agreement else {})
    target = out if out is not None else (source if is_run else None)
    if target is not None:
        atomic_write(Path(target) / "robustness.json", _json.dumps(payload, indent=2) + "\n")
        console.print(plain(f"wrote {Path(target) / 'robustness.json'}"), highlight=False)
    if is_run:
        record_worst(source, result)


@app.command(context_settings={"allow_extra_args": True})
def benchmark(
    ctx: typer.Context,
    models: Annotated[Optional[list[Path]], typer.Option("--models", help="ONNX files: `--models exported/*.onnx` or the option repeated [default: the release model].")] = None,
    data: Annotated[Optional[Path], typer.Option(help="Images (labelled folders give metrics).")] = None,
    keras: Annotated[Optional[Path], typer.Option(help="Run folder or .keras file to time first (needs TensorFlow).")] = None,
    batch_sizes: Annotated[str, typer.Option(help="Comma-separated batch sizes.")] = "1,8,32",
    threads: Annotated[Optional[int], typer.Option(min=1)] = None,
    device: Annotated[Device, typer.Option()] = Device.cpu,
    seconds: Annotated[float, typer.Option(min=0.0, help="Minimum timing per batch size and model.")] = 1.0,
    out: Annotated[Optional[Path], typer.Option(help="Write benchmark.json and benchmark.md here.")] = None,
):
    """One table of formats: size, accuracy, AUC, sensitivity, specificity, ms per image."""
    import json as _json

    from .benchmark import markdown_table, run_benchmark
    from .report import atomic_write
    from .runtime import ModelError

    try:
        sizes = [int(b) for b in batch_sizes.split(",") if b.strip()]
        if not sizes or min(sizes) < 1:
            raise ValueError
    except ValueError:
        raise _fail(f"--batch-sizes must be positive integers like 1,8,32, got {batch_sizes!r}")
    # `--models exported/*.onnx`: the shell expands the glob into several words,
    # and the words after the first arrive as extra arguments
    extra = [Path(a) for a in ctx.args]
    if extra and not models:
        raise _fail(f"unexpected arguments: {' '.join(ctx.args)}")
    paths = [*models, *extra] if models else [_resolve_model(None)]
    if data is not None and not data.exists():
        raise _fail(f"{data}: no such file or folder")
    keras_loader = None
    if keras is not None:
        try:
            from training.evaluate import keras_predictor as keras_loader
        except ImportError as exc:
            raise _fail(f"--keras needs TensorFlow (the train extra): {exc}")
    try:
        result = run_benchmark(paths, data=data, keras_source=keras, keras_loader=keras_loader,
                               batch_sizes=sizes,
                               threads=threads, device=device.value, min_seconds=seconds,
                               progress=say)
    except ModelError as exc:
        raise _fail(str(exc))
    except ImportError as exc:
        raise _fail(f"--keras needs TensorFlow (the train extra): {exc}")
    render_benchmark(result, sizes)
    if out is not None:
        atomic_write(out / "benchmark.json", _json.dumps(result.to_dict(), indent=2) + "\n")
        atomic_write(out / "benchmark.md", markdown_table(result))
        console.print(plain(f"wrote {out / 'benchmark.json'} and {out / 'benchmark.md'}"),
                      highlight=False)


@app.command()
def serve(
    model: Annotated[Optional[Path], typer.Option("--model", "-m", help="ONNX model with pneumo_edge metadata (default: the release model).")] = None,
    host: Annotated[str, typer.Option(help="Address of both listeners; 127.0.0.1 keeps them on this machine.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=0, max=65535, help="HTTP port.")] = 8000,
    dicom_port: Annotated[Optional[int], typer.Option(min=0, max=65535, help="DICOM port (C-ECHO, C-STORE); none: no DICOM side.")] = None,
    ae_title: Annotated[str, typer.Option(help="This server's DICOM AE title.")] = "PNEUMO_EDGE",
    allow_ae: Annotated[Optional[list[str]], typer.Option("--allow-ae", help="Accept associations only from this calling AE title (repeat the option).")] = None,
    spool: Annotated[Path, typer.Option(help="Folder for received instances, results.sqlite and reports to forward.")] = Path("pneumo_edge_spool"),
    keep_spool: Annotated[bool, typer.Option("--keep-spool", help="Keep received instances (spool/kept) after their result is stored.")] = False,
    token_file: Annotated[Optional[Path], typer.Option(help="File holding the bearer token the /v1 routes require (at least 16 characters).")] = None,
    max_batch: Annotated[int, typer.Option(min=1, max=1024, help="Images per model run, at most.")] = 8,
    max_wait_ms: Annotated[float, typer.Option(min=0.0, max=10000.0, help="How long a batch waits to fill after its first image.")] = 5.0,
    queue: Annotated[int, typer.Option(min=1, help="Images admitted and unfinished, at most; beyond: HTTP 503 / DICOM A700 at once.")] = 64,
    max_body_mb: Annotated[float, typer.Option(min=0.001, max=1024.0, help="HTTP bodies above this get 413.")] = 64.0,
    body_timeout_s: Annotated[float, typer.Option(min=0.1, help="An HTTP body not received within this gets 408.")] = 30.0,
    max_connections: Annotated[int, typer.Option(min=1, help="Concurrent HTTP connections; beyond: 503.")] = 128,
    dicom_timeout_s: Annotated[float, typer.Option(min=0.1, help="DICOM network timeout: a stalled sender is dropped.")] = 30.0,
    forward: Annotated[Optional[str], typer.Option(help="Send a DICOM Structured Report per result to AE@host:port.")] = None,
    forward_retries: Annotated[int, typer.Option(min=1, help="Attempts per report (backoff 1 s doubling to 60 s) before spool/dead-letter.")] = 8,
    workers: Annotated[int, typer.Option(min=1, max=64, help="Decoding threads.")] = 2,
    threads: Annotated[Optional[int], typer.Option(min=1, help="onnxruntime intra-op threads (default: physical cores).")] = None,
    device: Annotated[Device, typer.Option(help="auto: CUDA only if it really loads, else CPU.")] = Device.auto,
    log_level: Annotated[str, typer.Option(help="debug, info, warning or error.")] = "info",
):
    """Serve predictions over HTTP (and DICOM with --dicom-port) until SIGTERM or Ctrl-C
    (needs the [bold]serve[/] extra). See docs/serve.md."""
    try:
        from .serve import ServeConfig, ServeError, parse_forward, run_server
        import fastapi, pynetdicom, uvicorn  # noqa: F401, E401 - fail here, with the fix
    except ImportError as exc:
        raise _fail(f"serve needs the serve extra (pip install 'pneumo-edge[serve]'): {exc}")
    if log_level.lower() not in ("debug", "info", "warning", "error"):
        raise _fail(f"--log-level {log_level!r}: choose debug, info, warning or error")
    try:
        cfg = ServeConfig(model=_resolve_model(model), host=host, port=port,
                          dicom_port=dicom_port, ae_title=ae_title,
                          allowed_aes=tuple(allow_ae or ()), spool=spool, keep_spool=keep_spool,
                          token_file=token_file, max_batch=max_batch, max_wait_ms=max_wait_ms,
                          queue=queue, max_body_mb=max_body_mb, body_timeout_s=body_timeout_s,
                          max_connections=max_connections, dicom_timeout_s=dicom_timeout_s,
                          workers=workers, threads=threads, device=device.value,
                          forward=None if forward is None else parse_forward(forward),
                          forward_retries=forward_retries,
                          log_level=log_level.lower())

        def started(where: dict) -> None:
            h, p = where["http"]
            line = f"serving http://{h}:{p}"
            if where["dicom"]:
                line += f" and DICOM {ae_title}@{where['dicom'][0]}:{where['dicom'][1]}"
            if where["recovered"]:
                line += f"; {where['recovered']} instances recovered from the spool"
            err.print(plain(line), highlight=False)

        result = run_server(cfg, on_started=started)
    except ServeError as exc:
        raise _fail(str(exc))
    if result.signal == "SIGINT":
        raise typer.Exit(EXIT_INTERRUPTED)


def main() -> None:
    """Entry point: anything not already turned into a one-line error becomes one here.

    An exception that escapes a command is a bug of pneumo-edge, not something the
    user did: it is reported on one line with exit code 3 (``--debug`` re-raises it
    with its traceback); Ctrl-C anywhere exits 130.
    """
    import sys

    debug = "--debug" in sys.argv[1:]
    try:
        app(standalone_mode=True)
    except KeyboardInterrupt:
        err.print(Text("interrupted", style="bold red"))
        sys.exit(EXIT_INTERRUPTED)
    except Exception as exc:  # noqa: BLE001 - the last line of defence
        if debug:
            raise
        first = (str(exc).strip().splitlines() or [""])[0]
        err.print(Text("error: ", style="bold red")
                  + plain(f"internal error ({type(exc).__name__}: {first}); this is a bug of "
                          "pneumo-edge: please report it with the output of --debug"),
                  highlight=False, soft_wrap=True)
        sys.exit(EXIT_INTERNAL)


if __name__ == "__main__":
    main()
