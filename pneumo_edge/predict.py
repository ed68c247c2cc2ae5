"""The prediction pipeline: stream files through decoding threads into batched inference.

Decoding and resizing (OpenCV releases the GIL) run in a small thread pool
while the main thread runs the model; at most a few batches of decoded images
exist at any time, so memory does not grow with the folder.
"""

from __future__ import annotations

import os
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from .images import ImageDecodeError, label_from_path
from .metrics import BinaryMetrics, binary_metrics, latency_summary
from .preprocess import load_image
from .runtime import PneumoModel

__all__ = ["Prediction", "Failure", "PredictionRun", "predict_paths"]


@dataclass(frozen=True)
class Prediction:
    path: str
    probability: float
    label: str
    threshold: float
    truth: str | None


@dataclass(frozen=True)
class Failure:
    path: str
    error: str


@dataclass
class PredictionRun:
    """Everything one ``predict`` run produced; the CLI and the reports render it."""

    model: dict
    predictions: list[Prediction]
    failures: list[Failure]
    batch_size: int
    seconds: float
    model_ms_per_image: list[float] = field(repr=False)
    metrics: BinaryMetrics | None
    model_meta: dict = field(default_factory=dict, repr=False)

    @property
    def n_images(self) -> int:
        return len(self.predictions) + len(self.failures)

    @property
    def latency_ms(self) -> dict:
        return latency_summary(self.model_ms_per_image)

    @property
    def images_per_second(self) -> float:
        return len(self.predictions) / self.seconds if self.seconds > 0 else 0.0


def _decode(path: Path, model: PneumoModel):
    try:
        return load_image(path, model.preprocess)
    except ImageDecodeError as exc:
        return exc
    except MemoryError:
        return ImageDecodeError("out of memory while decoding")
    except Exception as exc:  # one bad file must never end the batch
        return ImageDecodeError(f"{type(exc).__name__}: {exc}".splitlines()[0])


def predict_paths(model: PneumoModel, files: Sequence[Path], *, batch_size: int = 8,
                  workers: int | None = None, threshold: float | None = None,
                  progress: Callable[[int], None] | None = None) -> PredictionRun:
    """Predict every file; undecodable ones become :class:`Failure` records.

    Args:
        model: from :func:`pneumo_edge.runtime.load_model`.
        files: image files in the order to report them (see ``collect_images``).
        batch_size: images per model run.
        workers: decoding threads (default: CPU count, at most 8).
        threshold: override the model's threshold (default: the one in its metadata).
        progress: called with the number of files finished after each batch.
    """
    thr = model.threshold if threshold is None else float(threshold)
    workers = workers or min(8, os.cpu_count() or 2)
    window = batch_size * 2 + workers  # decoded images alive at once stays bounded
    predictions: list[Prediction] = []
    failures: list[Failure] = []
    times: list[float] = []
    batch: list[np.ndarray] = []
    batch_paths: list[Path] = []

    def flush() -> None:
        if not batch:
            return
        t0 = time.perf_counter()
        probs = model.run(np.stack(batch))
        per_image = (time.perf_counter() - t0) * 1000.0 / len(batch)
        times.extend([per_image] * len(batch))
        for p, prob in zip(batch_paths, probs):
            prob = float(prob)
            predictions.append(Prediction(str(p), prob,
                                          "PNEUMONIA" if prob >= thr else "NORMAL", thr,
                                          label_from_path(p)))
        batch.clear()
        batch_paths.clear()

    t_start = time.perf_counter()
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="decode") as pool:
        pending: deque[tuple[Path, Future]] = deque()
        it = iter(files)
        for path in it:
            pending.append((path, pool.submit(_decode, path, model)))
            if len(pending) >= window:
                break
        while pending:
            path, fut = pending.popleft()
            nxt = next(it, None)
            if nxt is not None:
                pending.append((nxt, pool.submit(_decode, nxt, model)))
            result = fut.result()
            if isinstance(result, ImageDecodeError):
                failures.append(Failure(str(path), str(result)))
            else:
                batch.append(result)
                batch_paths.append(path)
                if len(batch) >= batch_size:
                    flush()
                    if progress:
                        progress(len(predictions) + len(failures))
        flush()
        if progress:
            progress(len(predictions) + len(failures))
    seconds = time.perf_counter() - t_start

    labelled = [p for p in predictions if p.truth is not None]
    metrics = None
    if labelled:
        metrics = binary_metrics([p.truth == "PNEUMONIA" for p in labelled],
                                 [p.probability for p in labelled], thr)
    summary = model.summary() | {"threshold": thr}
    return PredictionRun(model=summary, predictions=predictions, failures=failures,
                         batch_size=batch_size, seconds=seconds, model_ms_per_image=times,
                         metrics=metrics, model_meta=model.meta)
