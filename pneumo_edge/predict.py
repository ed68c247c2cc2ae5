"""The prediction pipeline: stream files through decoding threads into batched inference.

Decoding, resizing and the input checks (OpenCV releases the GIL) run in a
small thread pool while the main thread runs the model; at most a few batches
of decoded images exist at any time, so memory does not grow with the folder.
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

from .images import ImageDecodeError, decode_gray, label_from_path
from .lung import NO_LUNG_FIELD, lung_field_issue
from .metrics import BinaryMetrics, binary_metrics, latency_summary
from .options import BATCH_SIZE, WORKERS, FlaggedAs, choices
from .preprocess import PreprocessConfig, resize_gray, to_model_input
from .quality import input_warnings
from .records import FLAG_PREFIX, Failure, Prediction
from .runtime import PneumoModel

__all__ = ["Prediction", "Failure", "PredictionRun", "predict_paths", "decode_file",
           "batch_records", "FLAGGED_AS"]

FLAGGED_AS = choices(FlaggedAs)


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
    heatmaps: dict[str, str] = field(default_factory=dict, repr=False)
    #: why heatmaps stopped being written (a full or read-only folder); "" when none did
    heatmap_error: str = ""
    flagged_as: str = "warn"
    #: predictions / failures / flagged records not held in the lists above (large
    #: runs of the Ray engine keep them only in the files; counts stay exact)
    omitted_predictions: int = 0
    omitted_failures: int = 0
    omitted_flagged: int = 0
    #: images predicted by this process (a resumed run also reports earlier ones);
    #: the end-to-end throughput divides this by ``seconds``
    session_predicted: int | None = None
    engine: str = "local"

    @property
    def n_predicted(self) -> int:
        return len(self.predictions) + self.omitted_predictions

    @property
    def n_failed(self) -> int:
        return len(self.failures) + self.omitted_failures

    @property
    def n_images(self) -> int:
        return self.n_predicted + self.n_failed

    @property
    def n_flagged(self) -> int:
        return (sum(p.flagged for p in self.predictions)
                + sum(f.flagged for f in self.failures) + self.omitted_flagged)

    @property
    def latency_ms(self) -> dict:
        return latency_summary(self.model_ms_per_image)

    @property
    def images_per_second(self) -> float:
        done = len(self.predictions) if self.session_predicted is None else self.session_predicted
        return done / self.seconds if self.seconds > 0 else 0.0


def decode_file(path: str | os.PathLike, cfg: PreprocessConfig):
    """(resized uint8 image, input-check warnings, DICOM facts or None) or an
    ImageDecodeError: the one decoding step of every engine (never raises)."""
    try:
        info: dict = {}
        gray = decode_gray(path, target=max(cfg.height, cfg.width), info=info)
        return resize_gray(gray, cfg), tuple(input_warnings(gray, info)), info.get("dicom")
    except ImageDecodeError as exc:
        return exc
    except MemoryError:
        return ImageDecodeError("out of memory while decoding")
    except Exception as exc:  # one bad file must never end the batch
        return ImageDecodeError(f"{type(exc).__name__}: {exc}".splitlines()[0])


def _decode(path: Path, model: PneumoModel):
    """(model input, input-check warnings, DICOM facts or None) or an ImageDecodeError."""
    result = decode_file(path, model.preprocess)
    if isinstance(result, ImageDecodeError):
        return result
    return (to_model_input(result[0], model.preprocess),) + result[1:]


def batch_records(items, out: dict, thr: float, ood_thr: float | None,
                  flagged_as: str) -> list[Prediction | Failure]:
    """Turn one model run into records; ``items`` are (path, truth, warnings, dicom)
    in batch order and ``out`` is :meth:`PneumoModel.run_all`'s result."""
    records: list[Prediction | Failure] = []
    for i, ((p, truth, warns, dicom), prob) in enumerate(zip(items, out["prob"])):
        prob = float(prob)
        ood = None if out["ood"] is None else float(out["ood"][i])
        inside = None
        if ood is not None:
            inside = bool(np.isfinite(ood) and ood <= ood_thr)
            if not inside:
                warns = tuple(warns) + (f"out of distribution (OOD score {ood:.1f} > "
                                        f"{ood_thr:.1f})",)
            ood = ood if np.isfinite(ood) else None
        box = None
        if out.get("lung_box") is not None:
            box = tuple(round(float(v), 4) for v in out["lung_box"][i])
            issue = lung_field_issue(box, float(out["lung_area"][i]))
            if issue:
                warns = tuple(warns) + (f"{NO_LUNG_FIELD}: {issue}",)
        if warns and flagged_as == "fail":
            records.append(Failure(str(p), FLAG_PREFIX + "; ".join(warns)))
            continue
        cam = None if out.get("cam") is None else _half(out["cam"][i])
        records.append(Prediction(str(p), prob, "PNEUMONIA" if prob >= thr else "NORMAL", thr,
                                  truth, ood, inside, tuple(warns), dicom, cam, box))
    return records


_HALF_MAX = float(np.finfo(np.float16).max)


def _half(cam: np.ndarray) -> np.ndarray:
    """The cam logits as finite float16 (kept small per record): values beyond float16's
    range are clipped to it, not turned into inf (with numpy's overflow warning)."""
    return np.clip(np.nan_to_num(cam, nan=0.0), -_HALF_MAX, _HALF_MAX).astype(np.float16)


def predict_paths(model: PneumoModel, files: Sequence[Path], *,
                  batch_size: int = BATCH_SIZE.default,
                  workers: int | None = None, threshold: float | None = None,
                  truths: Sequence[str | None] | None = None, flagged_as: str = "warn",
                  heatmap_dir: str | os.PathLike | None = None,
                  progress: Callable[[int], None] | None = None) -> PredictionRun:
    """Predict every file; undecodable ones become :class:`Failure` records.

    Args:
        model: from :func:`pneumo_edge.runtime.load_model`.
        files: image files in the order to report them (see ``collect_labelled``).
        batch_size: images per model run.
        workers: decoding threads (default: CPU count, at most 8).
        threshold: override the model's threshold (default: the one in its metadata).
        truths: ground truth per file (None: unlabelled); default: from the file's
            folders (``label_from_path``).
        flagged_as: ``warn`` keeps flagged images (input-check warnings or an OOD
            score above the model's threshold) as predictions with their warnings;
            ``fail`` turns them into failures with those reasons.
        heatmap_dir: write an overlay PNG per prediction here (models with ``cam``).
        progress: called with the number of files finished after each batch.
    """
    if flagged_as not in FLAGGED_AS:
        raise ValueError(f"flagged_as must be one of {', '.join(FLAGGED_AS)}")
    BATCH_SIZE.check("batch_size", batch_size)
    WORKERS.check("workers", workers)
    thr = model.threshold if threshold is None else float(threshold)
    ood_thr = model.ood_threshold
    workers = workers or min(8, os.cpu_count() or 2)
    window = batch_size * 2 + workers  # decoded images alive at once stays bounded
    predictions: list[Prediction] = []
    failures: list[Failure] = []
    heatmaps: dict[str, str] = {}
    times: list[float] = []
    batch: list[np.ndarray] = []
    batch_items: list[tuple[Path, str | None, tuple[str, ...], dict | None]] = []
    heatmap_error = ""

    def no_heatmaps(exc: OSError) -> None:
        # a full or read-only heatmap folder costs the heatmaps, not the run: the
        # predictions and the report (often on another disk) still come
        nonlocal heatmap_dir, heatmap_error
        heatmap_error = (f"could not write heatmaps to {heatmap_dir} "
                         f"({exc.strerror or exc}); {len(heatmaps)} written before")
        heatmap_dir = None

    if heatmap_dir is not None:
        try:
            Path(heatmap_dir).mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            no_heatmaps(exc)

    def flush() -> None:
        if not batch:
            return
        t0 = time.perf_counter()
        out = model.run_all(np.stack(batch))
        per_image = (time.perf_counter() - t0) * 1000.0 / len(batch)
        times.extend([per_image] * len(batch))
        for rec in batch_records(batch_items, out, thr, ood_thr, flagged_as):
            if isinstance(rec, Failure):
                failures.append(rec)
                continue
            predictions.append(rec)
            if heatmap_dir is not None and rec.cam is not None:
                try:
                    written = _write_heatmap(Path(heatmap_dir), len(predictions) - 1, rec)
                except OSError as exc:
                    no_heatmaps(exc)
                else:
                    heatmaps[rec.path] = written
        batch.clear()
        batch_items.clear()

    labels = list(truths) if truths is not None else [label_from_path(f) for f in files]
    t_start = time.perf_counter()
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="decode") as pool:
        pending: deque[tuple[Path, str | None, Future]] = deque()
        it = iter(zip(files, labels))
        for path, truth in it:
            pending.append((path, truth, pool.submit(_decode, path, model)))
            if len(pending) >= window:
                break
        while pending:
            path, truth, fut = pending.popleft()
            nxt = next(it, None)
            if nxt is not None:
                pending.append((nxt[0], nxt[1], pool.submit(_decode, nxt[0], model)))
            result = fut.result()
            if isinstance(result, ImageDecodeError):
                failures.append(Failure(str(path), str(result)))
            else:
                batch.append(result[0])
                batch_items.append((path, truth, result[1], result[2]))
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
                         metrics=metrics, model_meta=model.meta, heatmaps=heatmaps,
                         heatmap_error=heatmap_error,
                         flagged_as=flagged_as)


def _write_heatmap(folder: Path, index: int, pred: Prediction) -> str:
    """Overlay PNG for one prediction; returns its path ('' if the image cannot be re-read)."""
    from .heatmap import heatmap_name, overlay, write_overlay

    try:
        gray = decode_gray(pred.path, target=512)
    except ImageDecodeError:
        return ""
    text = f"P(PNEUMONIA) {pred.probability:.3f}: {pred.label}"
    target = folder / heatmap_name(index, pred.path)
    write_overlay(target, overlay(gray, pred.cam.astype(np.float32), text, box=pred.lung_box))
    return str(target)
