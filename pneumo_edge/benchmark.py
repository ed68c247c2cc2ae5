"""Side-by-side benchmark of model formats: size, clinical metrics, ms per image.

One row per model (Keras first when given, then each ONNX file). Timings are
medians over repeated runs after warm-up; the header records the machine so
the numbers can be read in context. Compare ratios from one run, not absolute
numbers across machines.
"""

from __future__ import annotations

import os
import platform
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from . import __version__
from .images import collect_labelled
from .metrics import binary_metrics
from .options import BENCH_BATCH_SIZES, BENCH_SECONDS, Device
from .preprocess import PreprocessConfig, load_image
from .runtime import PneumoModel, load_model, physical_cores

__all__ = ["BenchmarkRow", "BenchmarkResult", "machine_info", "run_benchmark", "time_runs"]


@dataclass
class BenchmarkRow:
    name: str
    fmt: str                      # "keras" or "onnx"
    precision: str
    size_mb: float
    threshold: float | None
    metrics: dict | None          # accuracy, auc, recall, specificity... on --data
    latency: dict                 # batch size -> {"p50_ms", "p95_ms", "images_per_second", "runs"}
    speedup_vs_first: float | None = None
    provider: str | None = None


@dataclass
class BenchmarkResult:
    machine: dict
    n_images: int
    n_labelled: int
    batch_sizes: list[int]
    rows: list[BenchmarkRow] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"machine": self.machine, "n_images": self.n_images, "n_labelled": self.n_labelled,
                "batch_sizes": self.batch_sizes, "rows": [asdict(r) for r in self.rows]}


def machine_info(threads: int | None = None) -> dict:
    cpu, flags = platform.processor() or platform.machine(), ""
    try:
        info = Path("/proc/cpuinfo").read_text()
        cpu = info.split("model name", 1)[1].split(":", 1)[1].split("\n", 1)[0].strip()
        flags = info.split("flags", 1)[1].split("\n", 1)[0]
    except (OSError, IndexError):
        pass
    import onnxruntime as ort
    return {"cpu": cpu, "logical_cores": os.cpu_count(), "physical_cores": physical_cores(),
            "threads": threads or physical_cores(), "vnni": "avx512_vnni" in flags or "avx_vnni" in flags,
            "onnxruntime": ort.__version__, "python": platform.python_version(),
            "system": f"{platform.system()} {platform.machine()}", "pneumo_edge": __version__}


def time_runs(fn: Callable[[], object], batch: int, min_seconds: float = 1.0,
              min_runs: int = 10, max_runs: int = 500, warmup: int = 3) -> dict:
    """Median and p95 of per-image milliseconds of ``fn`` (one batch per call)."""
    for _ in range(warmup):
        fn()
    times = []
    start = time.perf_counter()
    while len(times) < max_runs and (len(times) < min_runs
                                     or time.perf_counter() - start < min_seconds):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1000.0)
    t = np.asarray(times) / batch
    p50 = float(np.percentile(t, 50))
    return {"p50_ms": p50, "p95_ms": float(np.percentile(t, 95)),
            "images_per_second": 1000.0 / p50 if p50 > 0 else None, "runs": len(times)}


def _load_inputs(items: Sequence[tuple[Path, str | None]], cfg: PreprocessConfig, cache: dict
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Decoded model inputs of the (file, truth) ``items`` with their labels (1 = PNEUMONIA)
    and a mask of the labelled ones; undecodable files are left out. Cached per
    preprocessing config."""
    if cfg not in cache:
        good, truths = [], []
        for f, truth in items:
            try:
                good.append(load_image(f, cfg))
            except ValueError:
                continue
            truths.append(truth)
        x = (np.stack(good) if good
             else np.zeros((0, cfg.height, cfg.width, cfg.channels), np.float32))
        cache[cfg] = (x, np.array([t == "PNEUMONIA" for t in truths], bool),
                      np.array([t is not None for t in truths], bool))
    return cache[cfg]


def _batch_of(x: np.ndarray, b: int, cfg: PreprocessConfig) -> np.ndarray:
    if len(x) == 0:
        return np.random.default_rng(0).uniform(0, 255, (b, cfg.height, cfg.width, cfg.channels)
                                                ).astype(np.float32)
    reps = int(np.ceil(b / len(x)))
    return np.ascontiguousarray(np.concatenate([x] * reps)[:b])


def _score(predict: Callable[[np.ndarray], np.ndarray], x: np.ndarray, labels: np.ndarray,
           mask: np.ndarray, threshold: float | None) -> dict | None:
    if not mask.any() or threshold is None:
        return None
    probs = np.concatenate([predict(x[i:i + 32]) for i in range(0, len(x), 32)])
    return binary_metrics(labels[mask], probs[mask], threshold).to_dict()


def run_benchmark(models: Sequence[str | os.PathLike], *, data: str | os.PathLike | None = None,
                  keras_source: str | os.PathLike | None = None,
                  keras_loader: Callable | None = None,
                  batch_sizes: Sequence[int] = BENCH_BATCH_SIZES, threads: int | None = None,
                  device: str = Device.cpu.value, min_seconds: float = BENCH_SECONDS.default,
                  progress: Callable[[str], None] | None = None) -> BenchmarkResult:
    """Benchmark ONNX models (and optionally the Keras source) on the same images.

    ``keras_loader(source)`` builds the Keras row's predictor on the training side
    (``training.evaluate.keras_predictor``): it returns (name, size in MB,
    threshold or None, PreprocessConfig, predict). The runtime never imports
    TensorFlow itself.

    Raises:
        ModelError: a model cannot be loaded. ValueError: ``keras_source`` without a loader.
    """
    say = progress or (lambda m: None)
    files = collect_labelled([data]) if data else []  # (path, truth)
    cache: dict = {}
    result = BenchmarkResult(machine_info(threads), 0, 0, list(batch_sizes))
    loaded: list[PneumoModel] = [load_model(m, device=device, threads=threads) for m in models]
    # the reference first: FP32, then FP16, then INT8 (a shell glob sorts fp16 before fp32)
    order = {"fp32": 0, "fp16": 1, "int8": 2}
    loaded.sort(key=lambda m: order.get(m.precision, 3))
    result.machine["provider"] = loaded[0].provider if loaded else None

    def finish(row: BenchmarkRow, predict, x, cfg):
        for b in batch_sizes:
            xb = _batch_of(x, b, cfg)
            row.latency[str(b)] = time_runs(lambda: predict(xb), b, min_seconds=min_seconds)
            say(f"  {row.name} batch {b}: p50 {row.latency[str(b)]['p50_ms']:.2f} ms/image")
        result.rows.append(row)

    if keras_source is not None:
        if keras_loader is None:
            raise ValueError("a Keras row needs keras_loader (training.evaluate.keras_predictor)")
        say(f"Keras: {keras_source}")
        name, size_mb, threshold, cfg, predict = keras_loader(Path(keras_source))
        x, labels, mask = _load_inputs(files, cfg, cache)
        row = BenchmarkRow(name, "keras", "fp32", size_mb, threshold,
                           _score(predict, x, labels, mask, threshold), {})
        finish(row, predict, x, cfg)
    for m in loaded:
        say(f"ONNX: {m.path}")
        cfg = m.preprocess
        x, labels, mask = _load_inputs(files, cfg, cache)
        row = BenchmarkRow(m.path.name, "onnx", m.precision, m.path.stat().st_size / 1e6,
                           m.threshold, _score(m.run, x, labels, mask, m.threshold), {},
                           provider=m.provider)
        finish(row, m.run, x, cfg)

    result.n_images = len(files)
    result.n_labelled = sum(truth is not None for _, truth in files)
    if result.rows:
        key = str(batch_sizes[0])
        first = result.rows[0].latency[key]["p50_ms"]
        for r in result.rows:
            r.speedup_vs_first = first / r.latency[key]["p50_ms"]
    return result


def markdown_table(result: BenchmarkResult) -> str:
    m = result.machine
    lines = [f"Machine: {m['cpu']}, {m['physical_cores']} physical / {m['logical_cores']} logical "
             f"cores, {m['threads']} threads, VNNI {'yes' if m['vnni'] else 'no'}, "
             f"onnxruntime {m['onnxruntime']} ({m.get('provider')}), Python {m['python']}.",
             f"Images: {result.n_images} ({result.n_labelled} labelled).", ""]
    bs = result.batch_sizes
    head = ["model", "format", "MB", "accuracy", "AUC", "sens", "spec"]
    head += [f"p50 ms b{b}" for b in bs] + [f"p95 ms b{b}" for b in bs]
    head += [f"img/s b{bs[-1]}", f"speedup b{bs[0]}"]
    lines.append("| " + " | ".join(head) + " |")
    lines.append("|" + "---|" * len(head))
    f = lambda v, s=".4f": "n/a" if v is None else format(v, s)
    for r in result.rows:
        mt = r.metrics or {}
        cells = [r.name, f"{r.fmt} {r.precision}", f"{r.size_mb:.1f}", f(mt.get("accuracy")),
                 f(mt.get("auc")), f(mt.get("recall")), f(mt.get("specificity"))]
        cells += [f(r.latency[str(b)]["p50_ms"], ".2f") for b in bs]
        cells += [f(r.latency[str(b)]["p95_ms"], ".2f") for b in bs]
        cells += [f(r.latency[str(bs[-1])]["images_per_second"], ".1f"),
                  f(r.speedup_vs_first, ".2f") + "x"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
