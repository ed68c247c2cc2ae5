"""The ``pneumo-edge`` command line: parse, call one library function, render.

Defaults, bounds and choices come from the library (:mod:`pneumo_edge.options`,
:mod:`training.recipe`, :func:`training.export.export_run`, ServeConfig); the library
(:mod:`pneumo_edge.jobs`, ``training``) works, :mod:`pneumo_edge.console` draws. Exit
codes: 0 ok; 1 some files failed (report still written); 2 usage error; 3 a bug; 130 Ctrl-C.
"""

from __future__ import annotations

import importlib
import inspect
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.text import Text

from . import __version__
from . import options as o
from .console import (console, err, fail_line, plain, progress, render_benchmark, render_ensemble,
                      render_export, render_info, render_robustness, render_run,
                      render_train_result, say, warn)
from .clihelp import Command as _Command, library_help as _library_help
from .errors import Interrupted, UsageError

EXIT_OK, EXIT_SOME_FAILED, EXIT_USAGE, EXIT_INTERNAL, EXIT_INTERRUPTED = 0, 1, 2, 3, 130

app = typer.Typer(
    add_completion=False, no_args_is_help=True, rich_markup_mode="rich",
    help="Chest X-ray pneumonia screening on edge boxes: train, export, predict, info, benchmark. "
         "A research and engineering tool, not a medical device.")


def _fail(message: object, code: int = EXIT_USAGE) -> "typer.Exit":
    fail_line(str(message))
    return typer.Exit(code)


def _call(job, *args, **kwargs):  # job(...), user-caused errors turned into exit codes
    try:
        return job(*args, **kwargs)
    except UsageError as exc:
        raise _fail(exc)
    except Interrupted as exc:
        raise _fail(exc, EXIT_INTERRUPTED)


def _training(module: str, what: str):
    """A module of the training package, imported only when a command needs it."""
    try:
        return importlib.import_module(f"training.{module}")
    except ImportError as exc:
        raise _fail(f"{what} needs the train extra (pip install 'pneumo-edge[train]'): {exc}")


def _given(**kwargs) -> dict:  # the options given: the library has the defaults
    return {k: v for k, v in kwargs.items() if v is not None}


def _with_options(spec: str):
    """Add keyword options ``name:type`` (int, float, str, path, bool: --x/--no-x), each
    None unless given, to a command that takes them as ``**options``."""
    types = {"int": int, "float": float, "str": str, "path": Path, "bool": bool}

    def option(name: str, kind: str) -> inspect.Parameter:
        flag = name.replace("_", "-")
        decls = (f"--{flag}/--no-{flag}",) if kind == "bool" else ()
        return inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=None,
                                 annotation=Annotated[Optional[types[kind]], Opt(*decls)])

    def add(command):
        sig = inspect.signature(command, eval_str=True)
        fixed = [p for p in sig.parameters.values() if p.kind is not p.VAR_KEYWORD]
        command.__signature__ = sig.replace(parameters=fixed + [
            option(*word.split(":")) for word in spec.split()])
        return command
    return add


def _version(value: bool) -> None:
    if value:
        console.print(f"pneumo-edge {__version__}")
        raise typer.Exit()


@app.callback()
def _main(version: Annotated[bool, typer.Option("--version", callback=_version,
                                                is_eager=True, help="Print the version.")] = False,
          debug: Annotated[bool, typer.Option("--debug", help="Show the Python traceback of an "
                                                             "internal error.")] = False):
    """``--debug`` is read by :func:`main` before the command runs."""


Opt = typer.Option
OptInt, OptFloat, OptStr = Optional[int], Optional[float], Optional[str]


@app.command(cls=_library_help("training.recipe:option_help"))
@_with_options("out:path epochs:int batch_size:int img_size:int val_fraction:float lr:float "
               "patience:int seed:int init_seed:int target_sensitivity:float arch:str schedule:str "
               "weight_decay:float dropout:float label_smoothing:float augment:bool flip:bool "
               "intensity:bool crop_area:float zoom_out:float ema_decay:float threshold_rule:str "
               "calibrate:bool class_balance:bool max_images:int segmenter:path crop_size:int "
               "split:str precision:str strategy:str cluster:str task_index:int "
               "init_from:path freeze_until:str pull:float")
def train(data: Annotated[Path, Opt()], resume: Annotated[bool, Opt("--resume")] = False,
          **options):
    """Train a ResNet-18 on labelled chest X-rays (needs the train extra: pip install 'pneumo-edge[train]').

    Options left out take the defaults of training.train.TrainConfig and AugmentConfig;
    the whole configuration is checked before any image is decoded.
    """
    from .console import render_epoch, render_train_start

    recipe = _training("recipe", "training")
    options = _given(**options) | {k: str(options[k]) for k in ("out", "segmenter", "init_from")
                                   if options[k]}
    result = _call(recipe.train_job, str(data), resume=resume, on_epoch=render_epoch,
                   on_start=render_train_start, **options)
    render_train_result(result)


@app.command(cls=_library_help("training.export:option_help"))
@_with_options("out:path name:str opset:int calib:path calib_size:int calib_method:str "
               "max_val:int heads:bool robustness:bool")
def export(
    source: Annotated[Path, typer.Argument(help="A run folder from `train`, or a .keras file.")],
    fp16: Annotated[bool, Opt("--fp16")] = False, int8: Annotated[bool, Opt("--int8")] = False,
    force: Annotated[bool, Opt("--force")] = False,
    set_default: Annotated[bool, Opt("--set-default")] = False, **options,
):
    """Export a trained run to ONNX with preprocessing, threshold and parity in its metadata."""
    export_mod = _training("export", "export")
    options["out_dir"] = options.pop("out")
    try:
        result = export_mod.export_run(source, **_given(**options), fp16=fp16, int8=int8,
                                       force=force, set_default=set_default, progress=say)
    except export_mod.ExportError as exc:
        raise _fail(exc)
    render_export(result, set_default)


@app.command(cls=_Command)
def ensemble(
    runs: Annotated[list[Path], typer.Argument(help="Finished run folders of one recipe on one split (same --seed, different --init-seed).")],
    out: Annotated[Path, Opt(help="Run folder to write (export it like any run).")] = Path("runs/ensemble"),
    force: Annotated[bool, Opt("--force", help="Write into a non-empty --out.")] = False,
):
    """Combine runs into one seed-ensemble model (mean logit), calibrated and thresholded on validation."""
    ensemble_mod = _training("ensemble", "ensemble")
    try:
        val = ensemble_mod.ensemble_runs(runs, out, force=force, progress=say)
    except (ValueError, OSError) as exc:
        # EnsembleError and the data's DataError are ValueErrors; Keras names an
        # unreadable best.keras in a ValueError
        raise _fail(exc)
    render_ensemble(val, out)


@app.command(cls=_Command)
def predict(
    paths: Annotated[list[Path], typer.Argument(help="Image files and/or folders (recursive).")],
    model: Annotated[Optional[Path], Opt("--model", "-m", help="ONNX model with pneumo_edge metadata (default: the release model in exported/).")] = None,
    report: Annotated[bool, Opt("--report", help="Write report.json, predictions.csv and report.html to --out.")] = False,
    out: Annotated[Optional[Path], Opt(help="Output folder (default with --report: pneumo_edge_report).")] = None,
    device: Annotated[o.Device, Opt(help=o.Device.__doc__)] = o.Device.auto,
    batch_size: Annotated[int, Opt(min=o.BATCH_SIZE.lo, max=o.BATCH_SIZE.hi)] = o.BATCH_SIZE.default,
    threads: Annotated[OptInt, Opt(min=o.THREADS.lo, max=o.THREADS.hi, help="onnxruntime intra-op threads (default: physical cores).")] = None,
    workers: Annotated[OptInt, Opt(min=o.WORKERS.lo, max=o.WORKERS.hi, help="Decoding threads (default: CPU count, at most 8).")] = None,
    threshold: Annotated[OptFloat, Opt(min=0.0, max=1.0, help="Override the model's decision threshold.")] = None,
    heatmaps: Annotated[Optional[Path], Opt(help="Write a heatmap overlay PNG per image here (models with a cam output).")] = None,
    flagged_as: Annotated[o.FlaggedAs, Opt(help=o.FlaggedAs.__doc__)] = o.FlaggedAs.warn,
    show: Annotated[int, Opt(min=o.SHOW.lo, help="Rows of per-image results to print when files are written (all are in predictions.csv).")] = o.SHOW.default,
    quiet: Annotated[bool, Opt("--quiet", "-q", help="No progress bar or per-image table.")] = False,
    engine: Annotated[o.Engine, Opt(help="local: this process; ray: Ray Data (pip install 'pneumo-edge[scale]'), local or --ray-address.")] = o.Engine.local,
    actors: Annotated[int, Opt(min=o.ACTORS.lo, max=o.ACTORS.hi, help="--engine ray: model actors (one onnxruntime session each).")] = o.ACTORS.default,
    ray_address: Annotated[OptStr, Opt(help="--engine ray: an existing cluster (e.g. auto, ray://head:10001); default a local Ray.")] = None,
    ray_decode: Annotated[o.RayDecode, Opt(help="--engine ray: " + o.RayDecode.__doc__)] = o.RayDecode.actors,
    resume: Annotated[bool, Opt("--resume", help="--engine ray: skip files already in --out's journal (an interrupted run).")] = False,
    parquet: Annotated[bool, Opt("--parquet", help="--engine ray: also write predictions.parquet (always for runs over --report-limit).")] = False,
    report_limit: Annotated[int, Opt(min=o.REPORT_LIMIT.lo, help="--engine ray: above this many files, report.json and report.html keep aggregates only; every record is in predictions.csv.")] = o.REPORT_LIMIT.default,
):
    """Predict NORMAL/PNEUMONIA for X-ray images; with labelled folders, evaluate.

    Exit codes: 0 all files predicted, 1 some files failed (listed; reports still
    written), 2 usage error or unusable model.
    """
    from .jobs import predict_job
    from .records import DISCLAIMER

    outcome = _call(predict_job, paths, model=model, report=report, out=out,
                    device=device.value, batch_size=batch_size, threads=threads,
                    workers=workers, threshold=threshold, heatmaps=heatmaps,
                    flagged_as=flagged_as.value, engine=engine.value, actors=actors,
                    ray_address=ray_address, ray_decode=ray_decode.value, resume=resume,
                    parquet=parquet, report_limit=report_limit, say=say, warn=warn,
                    progress=lambda total, what: progress(total, what, quiet))
    run = outcome.run
    render_run(run, outcome.written, show if outcome.written else len(run.predictions), quiet,
               outcome.notes, DISCLAIMER)
    if run.n_failed:
        raise typer.Exit(EXIT_SOME_FAILED)


@app.command(cls=_Command)
def info(model: Annotated[Path, typer.Argument(help="An exported ONNX model.")]):
    """Show a model's pneumo_edge metadata, inputs, outputs, size and sha256."""
    from .runtime import ModelError, file_sha256, read_metadata

    try:
        if not model.is_file():
            raise ModelError(f"{model}: model file not found")
        meta, inputs, outputs = read_metadata(model)
    except ModelError as exc:
        raise _fail(exc)
    render_info(model, file_sha256(model), meta, inputs, outputs)


@app.command(cls=_library_help("pneumo_edge.jobs:robustness_help"))
@_with_options("data:path split:path root:path reference:path rows:str max_images:int out:path")
def robustness(
    source: Annotated[Path, typer.Argument(help="An exported ONNX model, or a run folder from `train` (needs TensorFlow).")],
    device: Annotated[o.Device, Opt(help=o.Device.__doc__)] = o.Device.auto, **options,
):
    """Re-run labelled X-rays under fixed perturbations (zoom, shift, rotation, gamma, blur,
    noise, JPEG, resampling): AUC, sensitivity, specificity, |dp| and flipped labels per row."""
    from .jobs import robustness_job

    evaluate = _training("evaluate", "a run folder") if source.is_dir() else None
    run_folder = evaluate and (evaluate.run_predictor, evaluate.record_worst)
    done = _call(robustness_job, source, device=device.value, run_folder=run_folder, say=say,
                 **options)
    render_robustness(source, done.result, done.threshold, done.agreement)
    if done.written is not None:
        console.print(plain(f"wrote {done.written}"), highlight=False)


@app.command(cls=_Command, context_settings={"allow_extra_args": True})
def benchmark(
    ctx: typer.Context,
    models: Annotated[Optional[list[Path]], Opt("--models", help="ONNX files: `--models exported/*.onnx` or the option repeated (default: the release model).")] = None,
    data: Annotated[Optional[Path], Opt(help="Images (labelled folders give metrics).")] = None,
    keras: Annotated[Optional[Path], Opt(help="Run folder or .keras file to time first (needs TensorFlow).")] = None,
    batch_sizes: Annotated[str, Opt(help="Comma-separated batch sizes.")] = ",".join(map(str, o.BENCH_BATCH_SIZES)),
    threads: Annotated[OptInt, Opt(min=o.THREADS.lo, max=o.THREADS.hi)] = None,
    device: Annotated[o.Device, Opt(help=o.Device.__doc__)] = o.Device.cpu,
    seconds: Annotated[float, Opt(min=o.BENCH_SECONDS.lo, help="Minimum timing per batch size and model.")] = o.BENCH_SECONDS.default,
    out: Annotated[Optional[Path], Opt(help="Write benchmark.json and benchmark.md here.")] = None,
):
    """One table of formats: size, accuracy, AUC, sensitivity, specificity, ms per image."""
    from .jobs import benchmark_job

    # `--models exported/*.onnx`: the shell expands the glob into several words,
    # and the words after the first arrive as extra arguments
    extra = [Path(a) for a in ctx.args]
    if extra and not models:
        raise _fail(f"unexpected arguments: {' '.join(ctx.args)}")
    keras_loader = None if keras is None else _training("evaluate", "--keras").keras_predictor
    done = _call(benchmark_job, [*(models or []), *extra], data=data, keras=keras,
                 keras_loader=keras_loader, batch_sizes=batch_sizes, threads=threads,
                 device=device.value, seconds=seconds, out=out, say=say)
    render_benchmark(done.result, done.batch_sizes)
    if done.written:
        console.print(plain(f"wrote {done.written[0]} and {done.written[1]}"), highlight=False)


@app.command(cls=_library_help("pneumo_edge.jobs:serve_help"))
@_with_options("host:str port:int dicom_port:int ae_title:str spool:path token_file:path "
               "max_batch:int max_wait_ms:float queue:int max_body_mb:float body_timeout_s:float "
               "max_connections:int dicom_timeout_s:float forward:str forward_retries:int "
               "workers:int threads:int log_level:str")
def serve(
    model: Annotated[Optional[Path], Opt("--model", "-m")] = None,
    allow_ae: Annotated[Optional[list[str]], Opt("--allow-ae")] = None,
    keep_spool: Annotated[bool, Opt("--keep-spool")] = False,
    device: Annotated[o.Device, Opt(help=o.Device.__doc__)] = o.Device.auto, **options,
):
    """Serve predictions over HTTP (and DICOM with --dicom-port) until SIGTERM or Ctrl-C
    (needs the serve extra: pip install 'pneumo-edge[serve]'). See docs/serve.md."""
    from .console import render_serving
    from .jobs import serve_job

    ae = options["ae_title"]
    result = _call(serve_job, model, allow_ae=allow_ae, keep_spool=keep_spool, device=device,
                   on_started=lambda where: render_serving(where, ae), **_given(**options))
    if result.signal == "SIGINT":
        raise typer.Exit(EXIT_INTERRUPTED)


@app.command(cls=_library_help("pneumo_edge.jobs:calibrate_help"))
@_with_options("rule:str target_sensitivity:float min_per_class:int threads:int")
def calibrate(
    model: Annotated[Path, typer.Argument(help="An exported FP32 or INT8 ONNX model.")],
    data: Annotated[Path, Opt()], out: Annotated[Path, Opt()],
    refit_head: Annotated[bool, Opt("--refit-head")] = False,
    refit_ood: Annotated[bool, Opt("--refit-ood")] = False, **options,
):
    """Adapt a model to a site's labelled X-rays without TensorFlow: Platt scaling or a head
    refit, a new threshold, optionally new OOD statistics; before/after with 95 % intervals."""
    from .console import render_calibration
    from .jobs import calibrate_job

    result = _call(calibrate_job, model, data, out, refit_head=refit_head,
                   refit_ood=refit_ood, progress=say, **_given(**options))
    render_calibration(result)
    if result.failures:
        raise typer.Exit(EXIT_SOME_FAILED)


def main() -> None:
    """Entry point: an exception that escapes a command is a bug of pneumo-edge, reported
    on one line with exit 3 (``--debug`` re-raises it); Ctrl-C anywhere exits 130."""
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
        fail_line(f"internal error ({type(exc).__name__}: {first}); this is a bug of "
                  "pneumo-edge: please report it with the output of --debug")
        sys.exit(EXIT_INTERNAL)


if __name__ == "__main__":
    main()
