"""The Ray engine: ``predict --engine ray`` maps the local pipeline over Ray Data.

Nothing is scheduled here: Ray Data lists nothing and stores nothing of ours; it
runs two stages and streams their output back to this process.

1. **decode** (Ray tasks): :func:`pneumo_edge.predict.decode_file`, the local
   engine's own decoding step, on batches of paths; the model-size uint8
   images travel on (a 144 px image is 20 KB), failures travel as reasons;
2. **model** (an actor pool, ``--actors N``): each actor holds one onnxruntime
   session (the model file carries its preprocessing and threshold) and turns
   decoded batches into probabilities, OOD scores and per-image model time.

This process takes the results as they come (streaming, bounded by Ray Data's
backpressure), turns them into records with the local engine's
:func:`~pneumo_edge.predict.batch_records`, appends each batch to a journal
(``predictions.journal.jsonl`` in ``--out``, flushed per batch) and at the end
writes predictions.csv / report.json / report.html (and Parquet) as one set.

Faults: Ray restarts a dead actor and retries its batch; a record is taken once
per file index whatever is retried, so every file is accounted for exactly
once. ``--resume`` reads the journal of an interrupted run and skips the files
already in it.
"""

from __future__ import annotations

import array
import contextlib
import dataclasses
import hashlib
import json
import logging
import math
import os
import sys
import time
import warnings
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np

from .errors import UsageError
from .images import ImageDecodeError
from .metrics import binary_metrics
from . import options
from .io import atomic_path
from .predict import PredictionRun, batch_records, decode_file
from .preprocess import PreprocessConfig
from .records import COLUMNS, Failure, Prediction, csv_header, csv_row, from_journal, row, to_journal

__all__ = ["JOURNAL", "REPORT_LIMIT", "RayUnavailable", "predict_ray", "ray_available",
           "read_journal", "Journal", "JournalError", "journal_binding"]

JOURNAL = "predictions.journal.jsonl"
#: Runs with more files than this keep only aggregates in report.json and
#: report.html; every record is in predictions.csv (and Parquet).
REPORT_LIMIT = options.REPORT_LIMIT.default
_PARQUET_CHUNK = 50_000
_MAX_BLOCKS = 4_000


class RayUnavailable(RuntimeError):
    """The scale extra is not installed, or the cluster cannot be reached."""


def ray_available() -> bool:
    try:
        import ray  # noqa: F401
        import ray.data  # noqa: F401
    except ImportError:
        return False
    return True


# ------------------------------------------------------------------ the journal

#: The first line of a journal binds it to its run (:func:`journal_binding`).
JOURNAL_VERSION = 1
#: A journal line longer than this is not a record (skipped without reading it whole).
_MAX_LINE = 1 << 20


class JournalError(UsageError):
    """The journal cannot be written or read, or belongs to another run (exit 2)."""


def _journal_line(rec: Prediction | Failure) -> str:
    return json.dumps(to_journal(rec), ensure_ascii=False) + "\n"


def journal_binding(model_sha256: str, threshold: float, flagged_as: str,
                    files: Sequence[str | os.PathLike],
                    truths: Sequence[str | None]) -> dict:
    """What a journal's records depend on: the model file, the threshold, --flagged-as and
    the input list (each file with its folder label). ``--resume`` continues a journal
    only when all of them are the same."""
    h = hashlib.sha256()
    for path, truth in zip(files, truths):
        h.update(os.fsencode(str(path)) + b"\0" + (truth or "").encode() + b"\n")
    return {"pneumo_edge_journal": JOURNAL_VERSION, "model_sha256": model_sha256,
            "threshold": float(threshold), "flagged_as": flagged_as,
            "inputs_sha256": h.hexdigest(), "n_inputs": len(files)}


_BOUND = (("model_sha256", "model (sha256)"), ("threshold", "threshold"),
          ("flagged_as", "--flagged-as"), ("inputs_sha256", "input list"))


def _lines(fh) -> Iterator[str]:
    """Complete lines of at most _MAX_LINE characters; a last line cut short by an
    interruption ends the journal, longer lines are skipped in pieces."""
    while True:
        line = fh.readline(_MAX_LINE)
        if not line:
            return
        if not line.endswith("\n"):
            if len(line) < _MAX_LINE:
                return  # the process ended mid-line
            while line and not line.endswith("\n"):
                line = fh.readline(_MAX_LINE)
            continue
        yield line


def _parse(line: str):
    return json.loads(line, parse_constant=_no_constant)


def _no_constant(name: str):
    raise ValueError(f"{name} is not a number")


def read_journal(path: Path) -> Iterator[Prediction | Failure]:
    """Records of a journal, each validated; the binding line, lines that are not
    records and a last line cut short by an interruption are skipped."""
    with open(path, encoding="utf-8", errors="surrogateescape") as fh:
        for line in _lines(fh):
            try:
                yield from_journal(_parse(line))
            except (ValueError, RecursionError):
                continue


class Journal:
    """The Ray engine's journal: its binding on the first line, then one record per
    line, appended and flushed per batch. Every failure to write it is a
    :class:`JournalError` naming it (a full disk, a folder where it goes)."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self._fh = None

    def _error(self, exc: OSError, doing: str) -> JournalError:
        return JournalError(f"{self.path}: could not {doing} the Ray journal "
                            f"({exc.strerror or exc}); files finished before are kept in it")

    def _check_file(self) -> None:
        if self.path.exists() and not self.path.is_file():
            raise JournalError(f"{self.path}: the Ray journal's place is taken by something "
                               "that is not a file; move it away or choose another --out")

    def resume(self, binding: dict, files: Sequence[str | os.PathLike],
               truths: Sequence[str | None],
               ood_threshold: float | None = None) -> dict[str, Prediction | Failure]:
        """The finished records of the run this journal belongs to, keyed by path.

        Only files of ``files`` are taken (other lines are ignored), each field is
        validated (a bad line is skipped: its file is predicted again), and what the
        run decides is not read from the file: the label comes from the probability
        and the bound threshold, the truth from the input list, in_distribution from
        the OOD score and ``ood_threshold``.

        Raises:
            JournalError: no journal binding, or one for another model, threshold,
                --flagged-as or input list; an unreadable journal.
        """
        self._check_file()
        if not self.path.exists():
            return {}
        truth_of = {str(p): t for p, t in zip(files, truths)}
        thr = binding["threshold"]
        done: dict[str, Prediction | Failure] = {}
        try:
            with open(self.path, encoding="utf-8", errors="surrogateescape") as fh:
                lines = _lines(fh)
                try:
                    head = _parse(next(lines, "null"))
                except (ValueError, RecursionError):
                    head = None
                if not isinstance(head, dict) or \
                        head.get("pneumo_edge_journal") != JOURNAL_VERSION:
                    raise JournalError(
                        f"{self.path}: no run binding on its first line (not a journal of "
                        "this pneumo-edge version); rerun without --resume to start over")
                for key, what in _BOUND:
                    if head.get(key) != binding[key]:
                        raise JournalError(
                            f"{self.path}: the journal was written for another {what}; "
                            "--resume continues a run only with the same model, "
                            "--threshold, --flagged-as and inputs (rerun without --resume "
                            "to start over)")
                for line in lines:
                    try:
                        rec = from_journal(_parse(line))
                    except (ValueError, RecursionError):
                        continue
                    if rec.path not in truth_of:
                        continue  # not a file of this run
                    done[rec.path] = _bound(rec, thr, truth_of[rec.path], ood_threshold)
        except OSError as exc:
            raise self._error(exc, "read") from None
        return done

    def start(self, binding: dict, records=()) -> None:
        """Write the binding and ``records`` as the whole journal (atomically, replacing
        an earlier one), then open it for :meth:`append`."""
        self._check_file()
        try:
            # surrogateescape, as the journal is appended: names that are not UTF-8 come
            # back byte for byte on resume
            with atomic_path(self.path) as tmp, open(tmp, "w", encoding="utf-8",
                                                     errors="surrogateescape") as fh:
                fh.write(json.dumps(binding) + "\n")
                fh.writelines(_journal_line(rec) for rec in records)
            self._fh = open(self.path, "a", encoding="utf-8", errors="surrogateescape")
        except OSError as exc:
            raise self._error(exc, "write") from None

    def append(self, records) -> None:
        try:
            self._fh.writelines(_journal_line(rec) for rec in records)
            self._fh.flush()
        except OSError as exc:
            raise self._error(exc, "write") from None

    def close(self) -> None:
        if self._fh is not None:
            fh, self._fh = self._fh, None
            try:
                fh.close()
            except OSError:
                pass  # append has already reported what could not be written


def _bound(rec: Prediction | Failure, thr: float, truth: str | None,
           ood_thr: float | None) -> Prediction | Failure:
    """A journal record with what the run decides recomputed, not read."""
    if isinstance(rec, Failure):
        return rec
    ood = rec.ood_score if ood_thr is not None else None
    return dataclasses.replace(
        rec, label="PNEUMONIA" if rec.probability >= thr else "NORMAL", threshold=thr,
        truth=truth, ood_score=ood,
        in_distribution=None if ood_thr is None else (ood is not None and ood <= ood_thr))


# ------------------------------------------------------------------ the two stages

def _decode_batch(batch: dict, pre: PreprocessConfig) -> dict:
    """Ray task: decode a batch of paths with the local engine's decode_file."""
    n = len(batch["path"])
    images = np.zeros((n, pre.height, pre.width), np.uint8)
    errors, warns, dicom = [""] * n, [""] * n, [""] * n
    for i, path in enumerate(batch["path"]):
        result = decode_file(str(path), pre)
        if isinstance(result, ImageDecodeError):
            errors[i] = str(result) or "undecodable"
        else:
            images[i] = result[0]
            warns[i] = json.dumps(list(result[1]))
            dicom[i] = "" if result[2] is None else json.dumps(result[2])
    return {"idx": batch["idx"], "path": batch["path"], "truth": batch["truth"],
            "image": images, "error": np.array(errors, object),
            "warnings": np.array(warns, object), "dicom": np.array(dicom, object)}


class _ModelActor:
    """Ray actor: one onnxruntime session, batches of decoded images in, scores out."""

    def __init__(self, model_path: str, threads: int, fault: tuple[str, int] | None = None):
        from .runtime import load_model

        self.model = load_model(model_path, device="auto", threads=threads)
        self.cfg = self.model.preprocess
        self.calls = 0
        self.fault = fault

    def __call__(self, batch: dict) -> dict:
        from .preprocess import to_model_input

        self.calls += 1
        if self.fault and self.calls == self.fault[1] and not os.path.exists(self.fault[0]):
            Path(self.fault[0]).write_text(str(os.getpid()))
            os._exit(1)  # fault injection for the tests: the actor dies mid-run
        n = len(batch["path"])
        prob = np.full(n, np.nan)
        ood = np.full(n, np.nan)
        ms = np.zeros(n)
        ok = np.array([not e for e in batch["error"]], bool)
        if ok.any():
            x = np.stack([to_model_input(g, self.cfg) for g in batch["image"][ok]])
            t0 = time.perf_counter()
            out = self.model.run_all(x)
            ms[ok] = (time.perf_counter() - t0) * 1000.0 / len(x)
            prob[ok] = out["prob"]
            if out["ood"] is not None:
                ood[ok] = out["ood"]
        return {"idx": batch["idx"], "path": batch["path"], "truth": batch["truth"],
                "error": batch["error"], "warnings": batch["warnings"],
                "dicom": batch["dicom"], "prob": prob, "ood": ood, "ms": ms,
                "has_ood": np.full(n, self.model.ood_threshold is not None)}


class _DecodingModelActor(_ModelActor):
    """Ray actor that also decodes (``decode='actors'``): paths in, scores out.

    A thread pool decodes the batch's files while the session runs on the ones
    already decoded, as the local engine does; only paths and scores travel.
    """

    def __init__(self, model_path: str, threads: int, workers: int, batch_size: int,
                 fault: tuple[str, int] | None = None):
        from concurrent.futures import ThreadPoolExecutor

        super().__init__(model_path, threads, fault)
        self.pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="decode")
        self.batch_size = batch_size

    def __call__(self, batch: dict) -> dict:
        step = self.batch_size
        futures = [self.pool.submit(_decode_batch, {k: batch[k][i:i + step]
                                                    for k in ("idx", "path", "truth")},
                                    self.cfg)
                   for i in range(0, len(batch["path"]), step)]
        score = super().__call__
        parts = [score(f.result()) for f in futures]
        return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


# ------------------------------------------------------------------ the engine

def predict_ray(model_path: str | os.PathLike, files: Sequence[Path],
                truths: Sequence[str | None], out_dir: str | os.PathLike, *,
                actors: int = options.ACTORS.default, address: str | None = None,
                batch_size: int = options.BATCH_SIZE.default,
                threads: int | None = None, threshold: float | None = None,
                flagged_as: str = "warn", resume: bool = False,
                report_limit: int = REPORT_LIMIT, task_size: int = 64,
                decode: str = options.RayDecode.actors.value,
                progress: Callable[[int], None] | None = None,
                fault: tuple[str, int] | None = None) -> tuple[PredictionRun, Path]:
    """Predict ``files`` on Ray Data; returns the run and the journal's path.

    Records stream into ``out_dir/predictions.journal.jsonl``; the caller writes
    the report files (``report.write_report``, with :func:`journal_csv_writer` and
    :func:`write_parquet` for runs over ``report_limit``). ``fault`` = (marker file, n): the
    first actor to reach its n-th batch while the marker is absent writes it and
    dies (tests).

    Raises:
        RayUnavailable: no scale extra, or ``address`` cannot be reached.
        ModelError: the model is unusable (checked here before any worker starts).
    """
    if decode not in options.choices(options.RayDecode):
        raise ValueError(f"decode must be one of {', '.join(options.choices(options.RayDecode))}")
    if not ray_available():
        raise RayUnavailable("--engine ray needs the scale extra: "
                             "pip install 'pneumo-edge[scale]'")
    import ray
    import ray.data

    from .runtime import load_model

    local = load_model(model_path, device="cpu", threads=1)  # checks the model once, here
    thr = local.threshold if threshold is None else float(threshold)
    ood_thr = local.ood_threshold
    cfg = local.preprocess
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    journal = Journal(out / JOURNAL)
    binding = journal_binding(local.sha256, thr, flagged_as, files, truths)
    done = journal.resume(binding, files, truths, ood_thr) if resume else {}
    # the journal as this run knows it: its binding and the records it keeps (a torn
    # last line, bad lines and other files' lines dropped)
    journal.start(binding, done.values())
    todo = [(i, str(p), t or "") for i, (p, t) in enumerate(zip(files, truths))
            if str(p) not in done]

    collector = _Collector(report_limit, len(files))
    for rec in done.values():
        collector.add(rec)
    t_start = time.perf_counter()
    try:
        if todo:
            with _ray_stderr_silenced():
                started = _init_ray(ray, address)
                try:
                    t_start = time.perf_counter()  # end-to-end from here: the cluster is up
                    _execute(ray, todo, journal, collector, model_path=model_path, cfg=cfg,
                             actors=actors, threads=threads, batch_size=batch_size,
                             task_size=task_size, decode=decode, fault=fault, thr=thr,
                             ood_thr=ood_thr, flagged_as=flagged_as,
                             progress=None if progress is None else
                             (lambda n: progress(len(done) + n)))
                finally:
                    if started:
                        ray.shutdown()
    finally:
        journal.close()
    seconds = time.perf_counter() - t_start
    return collector.run(local, thr, batch_size, seconds, flagged_as), journal.path


def _execute(ray, todo, journal: Journal, collector: "_Collector", *, model_path, cfg,
             actors: int, threads: int | None, batch_size: int, task_size: int, decode: str,
             fault, thr: float, ood_thr, flagged_as: str, progress) -> None:
    """Build the Ray Data pipeline over ``todo`` and stream its records to the journal."""
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    threads = threads or max(1, (os.cpu_count() or 2) // max(1, actors))
    # a block per task keeps every actor busy on small runs; large runs get
    # bigger blocks (at most _MAX_BLOCKS of them) to keep scheduling cheap
    chunk = max(batch_size, task_size)
    blocks = max(1, min(math.ceil(len(todo) / chunk), _MAX_BLOCKS))
    ds = ray.data.from_items([{"idx": i, "path": p, "truth": t} for i, p, t in todo],
                             override_num_blocks=blocks)
    actor_kwargs = {"model_path": str(Path(model_path).resolve()), "threads": threads,
                    "fault": fault}
    # Ray Data restarts a dead actor and retries its batch (its defaults)
    pool = dict(compute=ray.data.ActorPoolStrategy(size=actors), batch_format="numpy",
                num_cpus=0.5)
    if decode == "tasks":
        decoded = ds.map_batches(_decode_batch, fn_kwargs={"pre": cfg},
                                 batch_size=chunk, batch_format="numpy", num_cpus=0.5)
        scored = decoded.map_batches(_ModelActor, fn_constructor_kwargs=actor_kwargs,
                                     batch_size=batch_size, **pool)
    else:
        actor_kwargs |= {"workers": threads, "batch_size": batch_size}
        scored = ds.map_batches(_DecodingModelActor, fn_constructor_kwargs=actor_kwargs,
                                batch_size=chunk, **pool)
    seen: set[int] = set()
    for b in scored.iter_batches(batch_size=None, batch_format="numpy", prefetch_batches=1):
        journal.append(_records(b, seen, thr, ood_thr, flagged_as, collector))
        if progress:
            progress(len(seen))
    if len(seen) != len(todo):  # never silently: Ray returned fewer rows than files
        raise RuntimeError(f"the Ray engine returned {len(seen)} of {len(todo)} files")


@contextlib.contextmanager
def _ray_stderr_silenced() -> Iterator[None]:
    """Ray's core (C++) writes its own lines to the process's stderr: a note that the
    log level was read from RAY_BACKEND_LOG_LEVEL, one warning per restartable actor.
    While Ray runs, file descriptor 2 goes to the null device and Python's
    ``sys.stderr`` (our progress bar, notes and errors) to a copy of the real one.

    Nothing is silenced when the user set RAY_BACKEND_LOG_LEVEL (they asked to see
    Ray's logs), or when stderr is not a file descriptor (captured, as in tests).
    """
    try:
        fd = sys.stderr.fileno()
    except (AttributeError, OSError, ValueError):
        fd = -1
    if fd != 2 or "RAY_BACKEND_LOG_LEVEL" in os.environ:  # Ray's core writes to fd 2
        os.environ.setdefault("RAY_BACKEND_LOG_LEVEL", "fatal")  # the actor warnings
        yield
        return
    python_stderr = sys.stderr
    python_stderr.flush()
    saved = os.dup(fd)
    null = os.open(os.devnull, os.O_WRONLY)
    os.dup2(null, fd)
    os.close(null)
    sys.stderr = open(saved, "w", buffering=1, closefd=False,
                      encoding=python_stderr.encoding or "utf-8", errors="backslashreplace")
    os.environ["RAY_BACKEND_LOG_LEVEL"] = "fatal"
    try:
        yield
    finally:
        sys.stderr.flush()
        sys.stderr = python_stderr
        os.dup2(saved, fd)
        os.close(saved)
        os.environ.pop("RAY_BACKEND_LOG_LEVEL", None)


def _init_ray(ray, address: str | None) -> bool:
    """Connect to ``address`` or start a local Ray; True when this call started it."""
    # Ray Data's progress and planning notes are for Ray users; ours is the bar
    for name in ("ray", "ray.data"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", module=r"ray(\.|$)")
    # the core worker logs one error-level line per restartable actor whose
    # constructor arguments Ray Data keeps in the object store (all of ours), and a
    # note when it reads RAY_BACKEND_LOG_LEVEL: _ray_stderr_silenced keeps them off
    # the terminal (set RAY_BACKEND_LOG_LEVEL yourself to see Ray's backend logs)
    if ray.is_initialized():
        return False
    kwargs = dict(include_dashboard=False, log_to_driver=False,
                  logging_level=logging.ERROR, configure_logging=True)
    try:
        if address:
            _check_reachable(address)
            ray.init(address=address, **kwargs)
        else:
            ray.init(num_cpus=os.cpu_count() or 2, **kwargs)
    except (ConnectionError, RuntimeError, ValueError) as exc:
        raise RayUnavailable(f"cannot start or reach Ray"
                             f"{' at ' + address if address else ''}: "
                             f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}"
                             ) from None
    return True


def _check_reachable(address: str, timeout: float = 5.0) -> None:
    """Fail fast on a host:port nobody listens on (ray.init would retry for minutes)."""
    import socket

    target = address.split("://", 1)[-1]
    if target in ("auto", "local") or ":" not in target:
        return
    host, _, port = target.rpartition(":")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout):
            pass
    except (OSError, ValueError) as exc:
        raise ConnectionError(f"nothing answers at {target} ({exc.strerror or exc})") from None


def _records(b: dict, seen: set[int], thr: float, ood_thr, flagged_as: str,
             collector: "_Collector") -> list[Prediction | Failure]:
    """One streamed batch -> records, each file index once."""
    recs: list[Prediction | Failure] = []
    items, probs, oods, times = [], [], [], []
    for j, idx in enumerate(b["idx"]):
        idx = int(idx)
        if idx in seen:
            continue  # a retried batch delivered twice: keep the first
        seen.add(idx)
        path, truth = str(b["path"][j]), str(b["truth"][j]) or None
        if b["error"][j]:
            recs.append(Failure(path, str(b["error"][j])))
            continue
        warns = tuple(json.loads(b["warnings"][j] or "[]"))
        dicom = json.loads(b["dicom"][j]) if b["dicom"][j] else None
        items.append((path, truth, warns, dicom))
        probs.append(float(b["prob"][j]))
        oods.append(float(b["ood"][j]))
        times.append(float(b["ms"][j]))
    if items:
        has_ood = bool(b["has_ood"][0])
        out = {"prob": np.array(probs), "ood": np.array(oods) if has_ood else None, "cam": None}
        recs += batch_records(items, out, thr, ood_thr, flagged_as)
        collector.times.extend(times)
    for rec in recs:
        collector.add(rec, session=True)
    return recs


class _Collector:
    """Bounded memory: full records up to ``limit`` files, compact arrays always."""

    def __init__(self, limit: int, n_files: int):
        self.keep = n_files <= limit
        self.predictions: list[Prediction] = []
        self.failures: list[Failure] = []
        self.omitted_predictions = self.omitted_failures = self.omitted_flagged = 0
        self.truth = array.array("b")
        self.prob = array.array("d")
        self.times = array.array("d")
        self.session_predicted = 0
        self.max_failures_listed = 1000

    def add(self, rec: Prediction | Failure, session: bool = False) -> None:
        if isinstance(rec, Failure):
            if self.keep or len(self.failures) < self.max_failures_listed:
                self.failures.append(rec)
            else:
                self.omitted_failures += 1
                self.omitted_flagged += rec.flagged
            return
        if session:
            self.session_predicted += 1
        if rec.truth is not None:
            self.truth.append(int(rec.truth == "PNEUMONIA"))
            self.prob.append(rec.probability)
        if self.keep:
            self.predictions.append(rec)
        else:
            self.omitted_predictions += 1
            self.omitted_flagged += rec.flagged

    def run(self, model, thr: float, batch_size: int, seconds: float,
            flagged_as: str) -> PredictionRun:
        metrics = None
        if len(self.truth):
            metrics = binary_metrics(np.frombuffer(self.truth, np.int8).astype(bool),
                                     np.frombuffer(self.prob, np.float64), thr)
        self.predictions.sort(key=lambda p: p.path)  # the local engine's order
        self.failures.sort(key=lambda f: f.path)
        return PredictionRun(
            model=model.summary() | {"threshold": thr}, predictions=self.predictions,
            failures=self.failures, batch_size=batch_size, seconds=seconds,
            model_ms_per_image=np.frombuffer(self.times, np.float64).tolist()
            if len(self.times) < 2_000_000 else np.frombuffer(self.times, np.float64),
            metrics=metrics, model_meta=model.meta, flagged_as=flagged_as,
            omitted_predictions=self.omitted_predictions,
            omitted_failures=self.omitted_failures, omitted_flagged=self.omitted_flagged,
            session_predicted=self.session_predicted, engine="ray")


# ------------------------------------------------------------------ outputs

def journal_csv_writer(journal: Path) -> Callable:
    """A streaming writer of predictions.csv from the journal (sorted by path when
    the records fit the report limit, else in completion order)."""
    import csv

    def write(text) -> None:
        w = csv.writer(text, lineterminator="\n")
        w.writerow(csv_header())
        for rec in read_journal(journal):
            w.writerow(csv_row(rec))
    return write


def write_parquet(journal: Path, target: Path) -> Path:
    """predictions.parquet from the journal, in chunks (bounded memory): the columns
    of predictions.csv, typed."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    kinds = {"str": pa.string(), "float": pa.float64(), "bool": pa.bool_(), "int": pa.int64()}
    schema = pa.schema([(c.name, kinds[c.kind]) for c in COLUMNS])
    columns: list[list] = [[] for _ in COLUMNS]

    def flush(writer) -> None:
        if columns[0]:
            writer.write_table(pa.Table.from_pydict(dict(zip(schema.names, columns)),
                                                   schema=schema))
            for v in columns:
                v.clear()

    with atomic_path(target) as tmp, pq.ParquetWriter(tmp, schema) as writer:
        for rec in read_journal(journal):
            for values, value in zip(columns, row(rec)):
                values.append(value)
            if len(columns[0]) >= _PARQUET_CHUNK:
                flush(writer)
        flush(writer)
    return target
