"""Score a run folder's Keras model with the runtime's robustness suite."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .runfolder import RunFolder, keras_preprocess


def run_predictor(run_dir: str | Path, batch_size: int = 64):
    """``(predict, preprocess, threshold, val_files, val_labels)`` for a run folder.

    ``predict`` maps a float32 (N, H, W, C) batch to P(PNEUMONIA) with the run's
    ``best.keras``; the files are the run's validation split.

    Raises:
        RunFolderError: the folder lacks best.keras, val_metrics.json, split.csv or
            config.json (a FileNotFoundError).
    """
    import keras

    from .models import register_custom_layers

    register_custom_layers()
    run = RunFolder.load(run_dir)
    model = keras.models.load_model(run.keras_path, compile=False)

    def predict(x: np.ndarray) -> np.ndarray:
        return model.predict(x, batch_size=batch_size, verbose=0).reshape(-1)

    return (predict, run.preprocess, run.val.threshold, [s.path for s in run.validation],
            [s.label for s in run.validation])


def record_worst(run_dir: str | Path, result) -> None:
    """Store the suite's worst rows in the run's ``val_metrics.json``."""
    RunFolder.load(run_dir).update_val(robustness_worst=result.worst())


def keras_predictor(source: Path):
    """The benchmark's Keras row: ``(name, size MB, threshold, preprocess, predict)``.

    ``source`` is a run folder (its threshold is used) or a .keras file (no
    threshold: no metrics). The model is the inference copy export converts.
    """
    from .export import inference_model

    run = RunFolder.load(source) if source.is_dir() else None
    keras_path = run.keras_path if run else source
    model, _ = inference_model(keras_path)
    threshold = run.val.threshold if run else None
    cfg = run.preprocess if run else keras_preprocess(model)

    def predict(batch: np.ndarray) -> np.ndarray:
        out = model.predict_on_batch(batch)
        out = out[0] if isinstance(out, (list, tuple)) else out
        return np.asarray(out).reshape(-1)

    return keras_path.name, keras_path.stat().st_size / 1e6, threshold, cfg, predict
