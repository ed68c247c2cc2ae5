"""What each command does, as one library call: the CLI parses its options, calls one
of these and renders the value it returns.

Every problem a user can cause ends in :class:`~pneumo_edge.errors.UsageError`
(or :class:`~pneumo_edge.errors.Interrupted` on Ctrl-C) with a one-line message;
anything else is a bug. Nothing here prints: status lines go to ``say``, progress
to ``progress(total, description)``, a context manager yielding the callback that
takes the number of files done.
"""

from __future__ import annotations

from contextlib import ExitStack, contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, ContextManager, Iterator, Sequence

from .errors import Interrupted, UsageError
from . import options as o
from .options import BENCH_BATCH_SIZES, Engine

__all__ = ["PredictOutcome", "predict_job", "RobustnessOutcome", "robustness_job",
           "BenchmarkOutcome", "benchmark_job", "resolve_model", "DEFAULT_REPORT_DIR"]

#: --out when --report (or the Ray engine) is asked for without it.
DEFAULT_REPORT_DIR = Path("pneumo_edge_report")

Progress = Callable[[int, str], ContextManager[Callable[[int], None] | None]]


def _no_progress(total: int, description: str) -> ContextManager[None]:
    return nullcontext()


def _quiet(message: str) -> None:
    pass


def resolve_model(model: Path | None) -> Path:
    """``model``, or the release model when it is None.

    Raises:
        UsageError: no model given and none released.
    """
    from .runtime import default_model_path

    if model is not None:
        return model
    found = default_model_path()
    if found is None:
        raise UsageError("no --model given and no release model in exported/ "
                         "(exported/default.txt names it); train and export one, or pass "
                         "--model FILE.onnx")
    return found


def _checked_folder(flag: str, folder: Path) -> None:
    from .io import check_output_folder

    try:
        check_output_folder(folder)
    except OSError as exc:
        raise UsageError(f"{flag} {exc}") from None


@contextmanager
def _locked(*folders: Path | None) -> Iterator[None]:
    """Hold every distinct output folder for the run (another run waits, then gives up)."""
    from .io import OutputLocked, output_lock

    distinct = {f.resolve(): f for f in reversed(folders) if f is not None}
    with ExitStack() as stack:
        for folder in reversed(distinct.values()):
            try:
                stack.enter_context(output_lock(folder))
            except OutputLocked as exc:
                raise UsageError(str(exc)) from None
            except OSError as exc:  # a full or read-only disk under the folder
                raise UsageError(f"{folder}: cannot write here ({exc.strerror or exc})"
                                 ) from None
        yield


# ---------------------------------------------------------------- predict

@dataclass
class PredictOutcome:
    """A finished predict: the run, the files written, and notes for the terminal
    (text, style)."""

    run: object
    written: dict[str, Path]
    notes: list[tuple[str, str]] = field(default_factory=list)


def predict_job(paths: Sequence[Path], *, model: Path | None = None, report: bool = False,
                out: Path | None = None, device: str = o.Device.auto.value,
                batch_size: int = o.BATCH_SIZE.default,
                threads: int | None = None, workers: int | None = None,
                threshold: float | None = None, heatmaps: Path | None = None,
                flagged_as: str = o.FlaggedAs.warn.value, engine: str = Engine.local.value,
                actors: int = o.ACTORS.default, ray_address: str | None = None,
                ray_decode: str = o.RayDecode.actors.value, resume: bool = False,
                parquet: bool = False, report_limit: int = o.REPORT_LIMIT.default,
                say: Callable[[str], None] = _quiet, warn: Callable[[str], None] = _quiet,
                progress: Progress = _no_progress) -> PredictOutcome:
    """Predict every image below ``paths`` with either engine and write the outputs.

    The output folders are checked before any inference and held (an output-folder
    lock) from the first file written to the last: a report set is always one run's.

    Raises:
        UsageError: nothing to predict, a bad option, model or folder, a write that
            failed (earlier report files are left as they were).
        Interrupted: Ctrl-C.
    """
    from .images import discover

    _check_bounds(batch_size=batch_size, workers=workers, threads=threads, actors=actors,
                  report_limit=report_limit)
    try:
        found = discover(paths)
    except FileNotFoundError as exc:
        raise UsageError(str(exc)) from None
    items = found.items
    own = [(found.note, "")] if found.note else []  # own heatmaps skipped by the walk
    if not items:
        raise UsageError(f"no image files found in {', '.join(map(str, paths))}"
                         + (f" ({found.note})" if found.note else ""))
    files, truths = [i[0] for i in items], [i[1] for i in items]
    if engine == Engine.local.value:
        for flag, given in (("--resume", resume), ("--parquet", parquet)):
            if given:
                raise UsageError(f"{flag} works with --engine ray only")
    elif heatmaps is not None:
        raise UsageError("--heatmaps works with --engine local only")
    if (report or engine == Engine.ray.value) and out is None:
        out = DEFAULT_REPORT_DIR
    for flag, folder in (("--out", out), ("--heatmaps", heatmaps)):
        if folder is not None:
            _checked_folder(flag, folder)
    model_path = resolve_model(model)
    if engine == Engine.ray.value:
        return _predict_ray(model_path, files, truths, out, report=report, say=say, notes=own,
                            progress=progress, batch_size=batch_size, threads=threads,
                            threshold=threshold, flagged_as=flagged_as, actors=actors,
                            address=ray_address, decode=ray_decode, resume=resume,
                            parquet=parquet, report_limit=report_limit)

    from . import predict
    from .runtime import ModelError, load_model

    try:
        loaded = load_model(model_path, device=device, threads=threads)
    except ModelError as exc:
        raise UsageError(str(exc)) from None
    if heatmaps is not None and not loaded.has_cam:
        warn(f"note: {model_path} has no cam output; no heatmaps are written "
             "(re-export the model to add it)")
    say(f"model: {model_path} ({loaded.precision}, {loaded.provider})")
    heatmap_dir = heatmaps if loaded.has_cam else None
    from .native_stderr import quiet_decoder_lines

    with _locked(out, heatmap_dir):
        try:
            # each bad file gets its own one-line reason: the image libraries' lines go
            with quiet_decoder_lines(), progress(len(files), "predicting") as bar:
                run = predict.predict_paths(loaded, files, batch_size=batch_size,
                                            workers=workers, threshold=threshold,
                                            truths=truths, flagged_as=flagged_as,
                                            heatmap_dir=heatmap_dir, progress=bar)
        except ModelError as exc:
            raise UsageError(str(exc)) from None
        except KeyboardInterrupt:
            raise Interrupted("interrupted; nothing written for this run") from None
        written = {} if out is None else _write_outputs(run, out, report)
    notes = list(own)
    if run.heatmaps and not run.heatmap_error:
        notes.append((f"wrote {len(run.heatmaps)} heatmaps to {heatmaps}", ""))
    if run.heatmap_error:
        notes.append((f"--heatmaps: {run.heatmap_error}", "yellow"))
    return PredictOutcome(run, written, notes)


def _write_outputs(run, out: Path, report: bool, csv_data=None, kept_in: str = "") -> dict:
    """predictions.csv, and with --report report.json and report.html, as one set."""
    from .report import write_report

    try:
        return write_report(run, out, html_report=report, json_report=report,
                            csv_data=csv_data)
    except OSError as exc:
        raise UsageError(f"--out {out}: could not write the report ({exc.strerror or exc}); "
                         f"earlier report files were left as they were{kept_in}") from None


def _predict_ray(model_path: Path, files, truths, out: Path, *, report: bool, parquet: bool,
                 say, progress: Progress, notes: list[tuple[str, str]],
                 **kwargs) -> PredictOutcome:
    """--engine ray: the same outputs as the local engine, via pneumo_edge.scale."""
    from .runtime import ModelError
    from .scale import JOURNAL, RayUnavailable, journal_csv_writer, predict_ray, write_parquet

    say(f"model: {model_path} (Ray engine, {kwargs['actors']} actors)")
    journal = out / JOURNAL
    with _locked(out):
        try:
            with progress(len(files), "predicting (ray)") as bar:
                run, journal = predict_ray(model_path, files, truths, out, progress=bar,
                                           **kwargs)
        except (RayUnavailable, ModelError) as exc:
            raise UsageError(str(exc)) from None
        except KeyboardInterrupt:
            raise Interrupted(f"interrupted; finished files are kept in {journal}: rerun "
                              "with --resume") from None
        omitted = run.omitted_predictions + run.omitted_failures
        kept_in = f"; records are in {journal}"
        if parquet or omitted:
            try:
                write_parquet(journal, out / "predictions.parquet")
            except OSError as exc:
                raise UsageError(f"--out {out}: could not write predictions.parquet "
                                 f"({exc.strerror or exc}){kept_in}") from None
        written = _write_outputs(run, out, report,
                                 journal_csv_writer(journal) if omitted else None, kept_in)
    notes = list(notes)
    if parquet or omitted:
        written["parquet"] = out / "predictions.parquet"
    if omitted:
        notes.append((f"{run.n_images} files is over --report-limit: report.json and "
                      "report.html keep aggregates; every record is in predictions.csv "
                      "and predictions.parquet", "yellow"))
    return PredictOutcome(run, written, notes)


# ---------------------------------------------------------------- robustness

ROBUSTNESS_HELP = {
    "data": "Labelled folder (NORMAL/, PNEUMONIA/) (default for a run folder: its validation "
            "split).",
    "split": "A val_split.csv or split.csv listing the files (paths relative to --root).",
    "root": "Folder the --split paths are relative to (default: the CSV's folder).",
    "reference": "A second ONNX model (e.g. FP32) to measure label agreement against, per row.",
    "rows": "Comma-separated perturbations (default: all).",
    "max_images": "At most N images, N >= 2 (seeded, stratified by order).",
    "out": "Write robustness.json here (default for a run folder: the run folder).",
}


def robustness_help() -> dict[str, str]:
    from .robustness import PERTURBATIONS

    return o.described(ROBUSTNESS_HELP, {}, {"rows": PERTURBATIONS})

@dataclass
class RobustnessOutcome:
    result: object
    threshold: float
    agreement: dict | None
    written: Path | None


def robustness_job(source: Path, *, data: Path | None = None, split: Path | None = None,
                   root: Path | None = None, reference: Path | None = None,
                   rows: str | None = None, max_images: int | None = None,
                   out: Path | None = None, device: str = o.Device.auto.value,
                   run_folder=None,
                   say: Callable[[str], None] = _quiet) -> RobustnessOutcome:
    """The robustness suite on an exported model or a run folder (its validation split by
    default); ``robustness.json`` is written to ``out`` (a run folder: into it, and its
    worst rows into its val_metrics.json).

    ``run_folder``: ``(run_predictor, record_worst)`` of ``training.evaluate``, needed
    for a run folder; the runtime never imports the training side itself.

    Raises:
        UsageError: an unknown row, a missing source, split or data folder, an unusable
            model, no labelled images.
    """
    import numpy as np

    from .io import write_json
    from .robustness import PERTURBATIONS, labelled_files, read_split_csv, run_suite
    from .runtime import ModelError, load_model

    if max_images is not None and max_images < 2:
        raise UsageError(f"--max-images must be at least 2, got {max_images}")
    names = [r.strip() for r in rows.split(",") if r.strip()] if rows else list(PERTURBATIONS)
    unknown = [n for n in names if n not in PERTURBATIONS]
    if unknown:
        raise UsageError(f"unknown perturbation {unknown[0]!r}; choose from "
                         f"{', '.join(PERTURBATIONS)}")
    if not source.exists():
        raise UsageError(f"{source}: no such model file or run folder")
    is_run = source.is_dir()
    files = labels = None
    try:
        if split is not None:
            if not split.is_file():
                raise UsageError(f"{split}: no such file")
            files, labels = read_split_csv(split, root)
        elif data is not None:
            if not data.is_dir():
                raise UsageError(f"{data}: no such folder")
            files, labels = labelled_files(data)
        if is_run:
            run_predictor, record_worst = run_folder
            predict, cfg, thr, vf, vl = run_predictor(source)
            if files is None:
                files, labels = vf, vl
        else:
            model = load_model(source, device=device)
            predict, cfg, thr = model.run, model.preprocess, model.threshold
    except (ModelError, FileNotFoundError, KeyError, ValueError) as exc:
        if isinstance(exc, UsageError):
            raise
        raise UsageError(str(exc)) from None
    if not files:
        raise UsageError("no labelled images: give --data DIR (NORMAL/, PNEUMONIA/) or "
                         "--split CSV")
    if max_images and len(files) > max_images:
        keep = np.sort(np.random.default_rng(0).permutation(len(files))[:max_images])
        files, labels = [files[i] for i in keep], [labels[i] for i in keep]
    try:
        result = run_suite(predict, cfg, files, labels, thr, perturbations=names,
                           model_name=str(source), progress=say)
        agreement = None
        if reference is not None:
            ref_model = load_model(reference, device=device)
            ref = run_suite(ref_model.run, ref_model.preprocess, files, labels,
                            ref_model.threshold, perturbations=names,
                            model_name=str(reference), progress=say)
            agreement = result.agreement_with(ref)
    except (ModelError, ValueError) as exc:
        raise UsageError(str(exc)) from None
    payload = result.to_dict() | ({"reference": str(reference), "agreement": agreement}
                                  if agreement else {})
    target = out if out is not None else (source if is_run else None)
    written = None
    if target is not None:
        written = Path(target) / "robustness.json"
        write_json(written, payload)
    if is_run:
        record_worst(source, result)
    return RobustnessOutcome(result, thr, agreement, written)


# ---------------------------------------------------------------- benchmark

@dataclass
class BenchmarkOutcome:
    result: object
    batch_sizes: list[int]
    written: list[Path]


def parse_batch_sizes(text: str) -> list[int]:
    """``"1,8,32"`` -> [1, 8, 32].

    Raises:
        UsageError: not a list of integers in predict's --batch-size range.
    """
    try:
        sizes = [int(b) for b in text.split(",") if b.strip()]
        if not sizes or min(sizes) < o.BATCH_SIZE.lo or max(sizes) > o.BATCH_SIZE.hi:
            raise ValueError
    except ValueError:
        raise UsageError(f"--batch-sizes must be integers in {o.BATCH_SIZE.lo}.."
                         f"{o.BATCH_SIZE.hi} like {','.join(map(str, BENCH_BATCH_SIZES))}, "
                         f"got {text!r}") from None
    return sizes


def _check_bounds(**values) -> None:
    """The options' ranges (:mod:`pneumo_edge.options`), for library callers too.

    Raises:
        UsageError: the first value out of its range, naming its option.
    """
    for name, value in values.items():
        try:
            getattr(o, name.upper()).check(name, value)
        except ValueError as exc:
            raise UsageError(str(exc)) from None


def benchmark_job(models: Sequence[Path], *, data: Path | None = None,
                  keras: Path | None = None, keras_loader: Callable | None = None,
                  batch_sizes: str = ",".join(map(str, BENCH_BATCH_SIZES)),
                  threads: int | None = None, device: str = o.Device.cpu.value,
                  seconds: float = o.BENCH_SECONDS.default, out: Path | None = None,
                  say: Callable[[str], None] = _quiet) -> BenchmarkOutcome:
    """One table of formats (models default: the release model); benchmark.json and
    benchmark.md into ``out``. ``keras_loader``: ``training.evaluate.keras_predictor``
    for the ``keras`` row (the runtime never imports the training side itself).

    Raises:
        UsageError: bad batch sizes, a missing data folder, an unusable model, --keras
            without TensorFlow.
    """
    import json

    from .benchmark import markdown_table, run_benchmark
    from .io import write_set
    from .runtime import ModelError

    sizes = parse_batch_sizes(batch_sizes)
    _check_bounds(threads=threads)
    paths = list(models) or [resolve_model(None)]
    if data is not None and not data.exists():
        raise UsageError(f"{data}: no such file or folder")
    try:
        result = run_benchmark(paths, data=data, keras_source=keras, keras_loader=keras_loader,
                               batch_sizes=sizes, threads=threads, device=device,
                               min_seconds=seconds, progress=say)
    except ModelError as exc:
        raise UsageError(str(exc)) from None
    except ImportError as exc:
        raise UsageError(f"--keras needs TensorFlow (the train extra): {exc}") from None
    written = []
    if out is not None:
        written = [out / "benchmark.json", out / "benchmark.md"]
        write_set({written[0]: json.dumps(result.to_dict(), indent=2) + "\n",
                   written[1]: markdown_table(result)})
    return BenchmarkOutcome(result, sizes, written)


# ---------------------------------------------------------------- serve, calibrate

SERVE_HELP = {
    "model": "ONNX model with pneumo_edge metadata (default: the release model).",
    "host": "Address of both listeners; 127.0.0.1 keeps them on this machine.",
    "port": "HTTP port.",
    "dicom_port": "DICOM port (C-ECHO, C-STORE); none: no DICOM side.",
    "ae_title": "This server's DICOM AE title.",
    "allow_ae": "Accept associations only from this calling AE title (repeat the option).",
    "spool": "Folder for received instances, results.sqlite and reports to forward.",
    "keep_spool": "Keep received instances (spool/kept) after their result is stored.",
    "token_file": "File holding the bearer token the /v1 routes require (at least 16 "
                  "characters).",
    "max_batch": "Images per model run, at most.",
    "max_wait_ms": "How long a batch waits to fill after its first image.",
    "queue": "Images admitted and unfinished, at most; beyond: HTTP 503 / DICOM A700 at once.",
    "max_body_mb": "HTTP bodies above this get 413.",
    "body_timeout_s": "An HTTP body not received within this gets 408.",
    "max_connections": "Concurrent HTTP connections; beyond: 503.",
    "dicom_timeout_s": "DICOM network timeout: a stalled sender is dropped.",
    "forward": "Send a DICOM Structured Report per result to AE@host:port.",
    "forward_retries": "Attempts per report (backoff doubling to 60 s) before "
                       "spool/dead-letter.",
    "workers": "Decoding threads.",
    "threads": "onnxruntime intra-op threads (default: physical cores).",
    "log_level": "Server log level.",
}


def serve_help() -> dict[str, str]:
    from dataclasses import fields

    from .serve.config import ServeConfig

    import inspect

    console = inspect.signature(serve_job).parameters["log_level"].default
    return o.described(SERVE_HELP, {f.name: f.default for f in fields(ServeConfig)}
                       | {"log_level": console},
                      {"log_level": SERVE_LOG_LEVELS})


#: serve's log levels; the console's default is info (the library's is warning).
SERVE_LOG_LEVELS = ("debug", "info", "warning", "error")


def serve_job(model: Path | None, *, allow_ae: Sequence[str] | None = None,
              forward: str | None = None, device: str = o.Device.auto.value,
              log_level: str = "info", on_started: Callable[[dict], None] | None = None,
              **settings):
    """Run ``pneumo-edge serve`` until SIGTERM or Ctrl-C; returns the server's result.

    ``settings`` are :class:`~pneumo_edge.serve.config.ServeConfig` fields (those not
    given take its defaults).

    Raises:
        UsageError: the serve extra is missing, or an option, the model, the spool or a
            port cannot be used (``ServeConfig.check`` and the server say which).
    """
    try:
        from .serve import ServeConfig, ServeError, parse_forward, run_server
        import fastapi, pynetdicom, uvicorn  # noqa: F401, E401 - fail here, with the fix
    except ImportError as exc:
        raise UsageError("serve needs the serve extra (pip install 'pneumo-edge[serve]'): "
                         f"{exc}") from None
    if log_level.lower() not in SERVE_LOG_LEVELS:
        raise UsageError(f"--log-level {log_level!r}: choose debug, info, warning or error")
    try:
        cfg = ServeConfig(model=resolve_model(model), allowed_aes=tuple(allow_ae or ()),
                          device=getattr(device, "value", device),
                          forward=None if forward is None else parse_forward(forward),
                          log_level=log_level.lower(), **settings)
        return run_server(cfg, on_started=on_started)
    except ServeError as exc:
        raise UsageError(str(exc)) from None


CALIBRATE_HELP = {
    "data": "The site's labelled X-rays: NORMAL/ and PNEUMONIA/ folders (DICOM included).",
    "out": "The new model file (must not exist); a NAME.site_adaptation.json report is "
           "written beside it.",
    "refit_head": "Refit the output layer on the pooled features (L2 towards the shipped "
                  "head) instead of Platt scaling.",
    "refit_ood": "Refit the OOD statistics and threshold on the site's images.",
    "rule": "Threshold rule on out-of-fold predictions.",
    "target_sensitivity": "With --rule sensitivity: the sensitivity to reach.",
    "min_per_class": "Refuse fewer labelled images per class (below 100 a warning).",
    "threads": "onnxruntime intra-op threads (default: physical cores).",
}


def calibrate_help() -> dict[str, str]:
    import inspect

    from .calibrate import RULES, calibrate

    defaults = {k: p.default for k, p in inspect.signature(calibrate).parameters.items()}
    return o.described(CALIBRATE_HELP, defaults, {"rule": RULES})


def calibrate_job(model: Path, data: Path, out: Path, **kwargs):
    """``pneumo_edge.calibrate.calibrate`` with its refusals as usage errors.

    Raises:
        UsageError: a refusal, an unusable model, an --out that cannot be written.
        Interrupted: Ctrl-C (nothing written).
    """
    from .calibrate import CalibrateError, calibrate
    from .runtime import ModelError

    try:
        return calibrate(model, data, out, **kwargs)
    except (CalibrateError, ModelError) as exc:
        raise UsageError(str(exc)) from None
    except OSError as exc:
        raise UsageError(f"--out {out}: could not write ({exc.strerror or exc}); nothing "
                         "written") from None
    except KeyboardInterrupt:
        raise Interrupted("interrupted; nothing written") from None
