"""A run folder, typed: what ``train`` writes and export, evaluate and ensemble read.

| file | what |
| --- | --- |
| ``config.json`` | the :class:`~training.train.TrainConfig` of the run plus provenance (versions, devices, split sizes; an ensemble's members) |
| ``split.csv`` | the patient-level split, one row per file |
| ``val_metrics.json`` | the validation record: threshold and its rule, metrics, zoom rows, calibration |
| ``best.keras`` | the selected checkpoint (calibration folded in) |
| ``history.csv``, ``curves.png``, ``val_probs.npy`` | the log, its plot, the clean validation probabilities |
| ``backup/`` | only while a run is unfinished (``--resume``) |

:meth:`RunFolder.load` reads and checks it once; nothing else parses these files.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pneumo_edge.io import write_json
from pneumo_edge.metadata import PreprocessConfig

from .data import Sample, read_split

__all__ = ["RunFolder", "RunFolderError", "ValRecord", "keras_preprocess", "CONFIG", "SPLIT",
           "VAL_METRICS", "BEST", "RECIPE_FIELDS"]

CONFIG, SPLIT, VAL_METRICS, BEST = "config.json", "split.csv", "val_metrics.json", "best.keras"
#: The configuration fields that describe how a model was trained (recorded in its metadata).
RECIPE_FIELDS = ("img_size", "epochs", "batch_size", "lr", "weight_decay", "dropout",
                 "label_smoothing", "schedule", "seed", "init_seed", "augment", "class_balance",
                 "init_from", "freeze_until", "pull")


class RunFolderError(FileNotFoundError):
    """Not a finished run folder; the message names the folder and the missing file."""


@dataclass(frozen=True)
class ValRecord:
    """``val_metrics.json``: the threshold chosen on validation and what it was measured on."""

    threshold: float
    threshold_rule: str
    record: dict[str, Any]

    @property
    def metrics(self) -> dict | None:
        return self.record.get("metrics")

    @property
    def calibration(self) -> dict | None:
        return self.record.get("calibration")

    @classmethod
    def read(cls, path: Path) -> "ValRecord":
        record = json.loads(path.read_text(encoding="utf-8"))
        return cls(float(record["threshold"]), str(record["threshold_rule"]), record)


@dataclass(frozen=True)
class RunFolder:
    """A finished run folder, read once.

    Attributes:
        config: ``config.json`` as written: the TrainConfig fields and provenance (an
            ensemble names its combined graph in ``arch`` and its members in
            ``ensemble``).
        val: the validation record.
        train, validation: the split's samples.
    """

    path: Path
    config: dict[str, Any]
    val: ValRecord
    train: list[Sample]
    validation: list[Sample]

    @classmethod
    def load(cls, path: str | Path) -> "RunFolder":
        """Read a finished run folder.

        Raises:
            RunFolderError: a file of a finished run is missing.
        """
        path = Path(path)
        if not path.is_dir():
            raise RunFolderError(f"{path}: not a run folder")
        for name in (BEST, VAL_METRICS, SPLIT, CONFIG):
            if not (path / name).is_file():
                raise RunFolderError(f"{path}: no {name} (not a finished run folder)")
        train, validation = read_split(path / SPLIT)
        config = json.loads((path / CONFIG).read_text(encoding="utf-8"))
        return cls(path, config, ValRecord.read(path / VAL_METRICS), train, validation)

    @property
    def keras_path(self) -> Path:
        return self.path / BEST

    @property
    def preprocess(self) -> PreprocessConfig:
        """The model input the run was trained at (square, grey repeated)."""
        size = int(self.config["img_size"])
        return PreprocessConfig(size, size, int(self.config.get("channels", 3)))

    @property
    def recipe(self) -> dict[str, Any]:
        """The :data:`RECIPE_FIELDS` of the configuration."""
        return {k: self.config[k] for k in RECIPE_FIELDS if k in self.config}

    @property
    def trained_on(self) -> str:
        """One line: the data, its size and the patient-level split."""
        n_tr, n_va = len(self.train), len(self.validation)
        return (f"{self.config.get('data', '?')}: {n_tr + n_va} images, patient-level split "
                f"(seed {self.config.get('seed', '?')}): {n_tr} train / {n_va} validation "
                f"({len({s.patient for s in self.validation})} validation patients)")

    def update_val(self, **entries: Any) -> None:
        """Add entries to ``val_metrics.json`` (e.g. the robustness suite's worst rows)."""
        write_json(self.path / VAL_METRICS, self.val.record | entries)


def keras_preprocess(model) -> PreprocessConfig:
    """The input a Keras model takes (a bare ``.keras`` file has no run folder to say it)."""
    _, h, w, c = (int(d) if d is not None else 0 for d in model.inputs[0].shape)
    return PreprocessConfig(h, w, c)
