"""Score a run folder's Keras model with the runtime's robustness suite."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from pneumo_edge.preprocess import PreprocessConfig

from .data import read_split


def run_predictor(run_dir: str | Path, batch_size: int = 64):
    """``(predict, preprocess, threshold, val_files, val_labels)`` for a run folder.

    ``predict`` maps a float32 (N, H, W, C) batch to P(PNEUMONIA) with the run's
    ``best.keras``; the files are the run's validation split.

    Raises:
        FileNotFoundError: the folder lacks best.keras, val_metrics.json or split.csv.
    """
    import keras

    run = Path(run_dir)
    for name in ("best.keras", "val_metrics.json", "split.csv"):
        if not (run / name).is_file():
            raise FileNotFoundError(f"{run}: no {name} (not a finished run folder)")
    from .models import register_custom_layers

    register_custom_layers()
    model = keras.models.load_model(run / "best.keras", compile=False)
    _, h, w, c = (int(d) if d is not None else 0 for d in model.inputs[0].shape)
    cfg = PreprocessConfig(h, w, c)
    threshold = float(json.loads((run / "val_metrics.json").read_text())["threshold"])
    _, val = read_split(run / "split.csv")

    def predict(x: np.ndarray) -> np.ndarray:
        return model.predict(x, batch_size=batch_size, verbose=0).reshape(-1)

    return predict, cfg, threshold, [s.path for s in val], [s.label for s in val]


def record_worst(run_dir: str | Path, result) -> None:
    """Store the suite's worst rows in the run's ``val_metrics.json``."""
    from .train import _write_json

    path = Path(run_dir) / "val_metrics.json"
    val = json.loads(path.read_text())
    val["robustness_worst"] = result.worst()
    _write_json(path, val)


def keras_predictor(source: Path):
    """The benchmark's Keras row: ``(name, size MB, threshold, preprocess, predict)``.

    ``source`` is a run folder (its threshold is used) or a .keras file (no
    threshold: no metrics). The model is the inference copy export converts.
    """
    from .export import inference_model

    keras_path = source / "best.keras" if source.is_dir() else source
    model, _ = inference_model(keras_path)
    threshold = None
    if source.is_dir() and (source / "val_metrics.json").exists():
        threshold = float(json.loads((source / "val_metrics.json").read_text())["threshold"])
    shape = model.inputs[0].shape
    cfg = PreprocessConfig(int(shape[1]), int(shape[2]), int(shape[3]))

    def predict(batch: np.ndarray) -> np.ndarray:
        out = model.predict_on_batch(batch)
        out = out[0] if isinstance(out, (list, tuple)) else out
        return np.asarray(out).reshape(-1)

    return keras_path.name, keras_path.stat().st_size / 1e6, threshold, cfg, predict
