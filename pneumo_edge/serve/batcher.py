"""Admission, decoding and micro-batched inference: the inside of the server.

Images enter through :meth:`MicroBatcher.submit` after a slot was granted by
:meth:`MicroBatcher.try_admit` (at most ``capacity`` images admitted and
unfinished; past that the doors answer 503 / DICOM "out of resources" at once
instead of queueing without end). A small thread pool decodes them with
``predict``'s own decoding step; one inference thread owns the onnxruntime
session and takes up to ``max_batch`` decoded images at a time, waiting at
most ``max_wait_ms`` after the first for the batch to fill, then builds the
records with ``predict``'s own :func:`~pneumo_edge.predict.batch_records`.
The probability of an image is therefore the one ``pneumo-edge predict``
gives for the same file.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from ..images import ImageDecodeError
from ..predict import batch_records, decode_file
from ..preprocess import to_model_input
from ..records import Failure, Prediction
from ..runtime import ModelError, PneumoModel

__all__ = ["Job", "MicroBatcher"]

log = logging.getLogger("pneumo_edge.serve")


@dataclass
class Job:
    """One image on its way through the server."""

    path: Path
    door: str  # "http" or "dicom"
    name: str  # what the record's ``path`` says: "upload" or the SOP Instance UID
    uid: str | None = None
    future: Future = field(default_factory=Future)
    t0: float = field(default_factory=time.perf_counter)


@dataclass
class _Decoded:
    job: Job
    x: np.ndarray | None = None
    warnings: tuple[str, ...] = ()
    dicom: dict | None = None
    error: str | None = None


_STOP = object()


class MicroBatcher:
    """A bounded admission count, a decoding pool and one inference thread."""

    def __init__(self, model: PneumoModel, *, max_batch: int = 8, max_wait_ms: float = 5.0,
                 capacity: int = 64, workers: int = 2,
                 on_batch: Callable[[list[tuple[Job, Prediction | Failure]]], None] | None = None,
                 metrics=None) -> None:
        self.model = model
        self.max_batch = max_batch
        self.max_wait = max_wait_ms / 1000.0
        self.capacity = capacity
        self.on_batch = on_batch
        self.metrics = metrics
        self._admitted = 0
        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)
        self._closed = False
        self._q: queue.Queue = queue.Queue()
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="serve-decode")
        self._thread = threading.Thread(target=self._loop, name="serve-infer", daemon=True)
        self.batches = 0
        self.batched_images = 0

    # ------------------------------------------------------------------ admission
    @property
    def depth(self) -> int:
        return self._admitted

    @property
    def full(self) -> bool:
        return self._admitted >= self.capacity

    @property
    def closed(self) -> bool:
        return self._closed

    def try_admit(self) -> bool:
        """Take a slot for one image; False (at once) when full or shutting down."""
        with self._lock:
            if self._closed or self._admitted >= self.capacity:
                return False
            self._admitted += 1
            self._gauge()
            return True

    def force_admit(self) -> None:
        """A slot beyond the capacity: instances recovered from the spool at start."""
        with self._lock:
            self._admitted += 1
            self._gauge()

    def release(self) -> None:
        """Give back a slot whose image was never submitted (a refused body)."""
        with self._lock:
            self._admitted -= 1
            self._gauge()
            if self._admitted == 0:
                self._idle.notify_all()

    def _gauge(self) -> None:
        if self.metrics is not None:
            self.metrics.queue_depth.set(self._admitted)

    # ------------------------------------------------------------------ running
    def start(self) -> "MicroBatcher":
        self._thread.start()
        return self

    def submit(self, job: Job) -> Future:
        """Decode and predict an admitted job; its future gets a Prediction or a Failure."""
        self._pool.submit(self._decode, job)
        return job.future

    def close(self) -> None:
        """Admit nothing more (graceful shutdown: what was admitted still finishes)."""
        with self._lock:
            self._closed = True

    def drain(self, timeout: float) -> bool:
        """Wait until every admitted image is finished; False on timeout."""
        deadline = time.monotonic() + timeout
        with self._lock:
            while self._admitted > 0:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._idle.wait(left)
        return True

    def stop(self, timeout: float = 30.0) -> None:
        self.close()
        if self._thread.ident is not None:  # started
            self.drain(timeout)
            self._q.put(_STOP)
            self._thread.join(timeout)
        self._pool.shutdown(wait=False, cancel_futures=True)

    def _decode(self, job: Job) -> None:
        cfg = self.model.preprocess
        try:
            result = decode_file(job.path, cfg)
            if isinstance(result, ImageDecodeError):
                item = _Decoded(job, error=str(result))
            else:
                item = _Decoded(job, to_model_input(result[0], cfg), result[1], result[2])
        except BaseException as exc:  # noqa: BLE001 - one image never stops the server
            item = _Decoded(job, error=f"internal error while decoding ({type(exc).__name__})")
        self._q.put(item)

    def _collect(self) -> list[_Decoded] | None:
        first = self._q.get()
        if first is _STOP:
            return None
        items = [first]
        n_images = int(first.x is not None)
        deadline = time.monotonic() + self.max_wait
        while n_images < self.max_batch:
            left = deadline - time.monotonic()
            try:
                item = self._q.get_nowait() if left <= 0 else self._q.get(timeout=left)
            except queue.Empty:
                break
            if item is _STOP:
                self._q.put(_STOP)  # finish this batch, stop at the next collect
                break
            items.append(item)
            n_images += item.x is not None
        return items

    def _loop(self) -> None:
        while True:
            items = self._collect()
            if items is None:
                return
            try:
                results = self._run(items)
            except BaseException as exc:  # noqa: BLE001 - never lose the thread
                log.error("inference failed: %s", type(exc).__name__)
                results = [(it.job, Failure(it.job.name, f"internal error ({type(exc).__name__})"))
                           for it in items]
            self._finish(results)

    def _run(self, items: list[_Decoded]) -> list[tuple[Job, Prediction | Failure]]:
        images = [it for it in items if it.x is not None]
        records: dict[int, Prediction | Failure] = {}
        if images:
            for group in self._model_runs(images):
                for it, rec in group:
                    records[id(it)] = rec
        return [(it.job, records.get(id(it)) or Failure(it.job.name, it.error or "not decoded"))
                for it in items]

    def _model_runs(self, images: list[_Decoded]):
        model = self.model
        try:
            yield self._predict(images)
        except ModelError:
            # one image can make a model emit NaN: run them one by one so that only
            # that image fails
            for it in images:
                try:
                    yield self._predict([it])
                except ModelError as exc:
                    yield [(it, Failure(it.job.name, str(exc).replace(str(model.path), "model")))]

    def _predict(self, images: list[_Decoded]):
        t0 = time.perf_counter()
        out = self.model.run_all(np.stack([it.x for it in images]))
        if self.metrics is not None:
            self.metrics.model_seconds.observe(time.perf_counter() - t0)
            self.metrics.batch_size.observe(len(images))
        self.batches += 1
        self.batched_images += len(images)
        recs = batch_records([(it.job.name, None, it.warnings, it.dicom) for it in images], out,
                             self.model.threshold, self.model.ood_threshold, "warn")
        return list(zip(images, recs))

    def _finish(self, results: list[tuple[Job, Prediction | Failure]]) -> None:
        if self.on_batch is not None:
            try:
                self.on_batch(results)
            except BaseException as exc:  # noqa: BLE001
                # the results could not be stored: tell the waiting requests; DICOM
                # instances stay in the spool and are retried at the next start
                log.error("storing results failed: %s: %s", type(exc).__name__, exc)
                results = [(job, Failure(job.name, "internal error: result not stored"))
                           for job, _ in results]
        now = time.perf_counter()
        for job, rec in results:
            if self.metrics is not None:
                self.metrics.latency.labels(job.door).observe(now - job.t0)
                self.metrics.results.labels(job.door, "done" if isinstance(rec, Prediction)
                                            else "failed").inc()
            if not job.future.done():
                job.future.set_result(rec)
            self.release()
