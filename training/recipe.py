"""``pneumo-edge train``'s options as the library defines them: meaning, defaults,
choices and checks, and the one call the command makes (:func:`train_job`).

Defaults live in :class:`~training.train.TrainConfig` and
:class:`~training.augment.AugmentConfig`; the CLI passes only the options that
were given and builds its help from :func:`option_help` (imported when the help
is shown, so ``pneumo-edge predict`` never loads this package).
"""

from __future__ import annotations

import os
from dataclasses import MISSING, fields
from typing import Any, Callable

from pneumo_edge.errors import Interrupted, UsageError

from .augment import AugmentConfig
from .train import PRECISIONS, SCHEDULES, SPLITS, STRATEGIES, THRESHOLD_RULES, TrainConfig

__all__ = ["HELP", "option_help", "train_config", "cluster_config", "train_job"]

#: What each option means; defaults and choices are appended from the dataclasses.
HELP = {
    "data": "Folder with NORMAL/ and PNEUMONIA/ (maybe one level down).",
    "out": "Run folder to write.",
    "epochs": "Total epochs (with --resume: the run's own unless given).",
    "batch_size": "Images per step.",
    "img_size": "Square input size in pixels.",
    "val_fraction": "Share of the patients held out for validation.",
    "lr": "Peak learning rate (AdamW).",
    "patience": "EarlyStopping patience on the robust validation AUC.",
    "seed": "Seed of the patient split.",
    "init_seed": "Seed of the weights and augmentation (default: --seed); seed-ensemble "
                 "members share --seed and differ here.",
    "target_sensitivity": "Pick the highest threshold with this validation sensitivity "
                          "(default: the threshold rule).",
    "arch": "Model architecture (*_lung: the lung-field crop inside; resnet_tiny*: tests).",
    "schedule": "Learning-rate schedule (cosine: warm-up + cosine).",
    "weight_decay": "Decoupled weight decay.",
    "dropout": "Dropout before the output layer.",
    "label_smoothing": "Label smoothing of the loss.",
    "augment": "All augmentation on/off (default on).",
    "flip": "Random horizontal flip.",
    "intensity": "Brightness/contrast/gamma/noise/resample jitter (default on).",
    "crop_area": "Random-resized crops keep at least this share of the area.",
    "zoom_out": "Zoom-out range: the image shrinks to 1/(1+Z) of its side in a black border.",
    "ema_decay": "Weight averaging (EMA) decay per step; 0 turns it off.",
    "threshold_rule": "Threshold rule (robust: the worst zoom row of validation).",
    "calibrate": "Fit a temperature and bias on validation and fold them into the model.",
    "class_balance": "Class weights from training frequencies.",
    "max_images": "Random subset, for quick trials.",
    "segmenter": "With a *_lung architecture: the lung segmenter (.keras) (default: the one "
                 "shipped in training/weights).",
    "crop_size": "With a *_lung architecture: side of the lung-field crop the classifier sees "
                 "(default: 3/4 of --img-size).",
    "split": "patient (random patients) or block (the earliest NORMAL patients of each name "
             "family held out as well: two validation views).",
    "precision": "Compute precision (auto: bf16 on CPUs with bf16 instructions, fp16 on GPUs); "
                 "export is float32.",
    "init_from": "Start from an exported FP32 file's weights (checked against onnxruntime "
                 "first); its input size and arch are used, and the defaults become those of "
                 "training.init_from.DEFAULTS (lighter learning, frozen early stages, fp32).",
    "freeze_until": "With --init-from: keep the stem and the stages up to this one fixed.",
    "pull": "With --init-from: after each step pull every weight towards its initial value by "
            "lr * PULL * (w - w_init).",
    "strategy": "Distribution strategy (auto: multiworker when TF_CONFIG names several "
                "workers).",
    "resume": "Continue the interrupted run in --out.",
    "cluster": "Multi-worker training: host:port of every worker, comma-separated, the chief "
               "first (sets TF_CONFIG); start the same command on each machine with its "
               "--task-index.",
    "task_index": "With --cluster: this machine's position in the list (0 = chief, writes "
                  "the run folder).",
}


def _choices() -> dict[str, tuple[str, ...]]:
    from .models import MODELS

    from .init_from import FREEZE_STAGES

    return {"arch": tuple(MODELS), "schedule": SCHEDULES, "strategy": STRATEGIES,
            "threshold_rule": THRESHOLD_RULES, "split": SPLITS, "precision": PRECISIONS,
            "freeze_until": FREEZE_STAGES}


def _defaults() -> dict[str, Any]:
    out = {}
    for cls in (TrainConfig, AugmentConfig):
        for f in fields(cls):
            if f.default is not MISSING and f.default is not None:
                out.setdefault(f.name, f.default)
    return out


def option_help() -> dict[str, str]:
    """Help text per option: its meaning, its choices and its default (plain text)."""
    from pneumo_edge.options import described

    return described(HELP, _defaults(), _choices())


def cluster_config(cluster: str | None, task_index: int | None) -> str | None:
    """TF_CONFIG for ``--cluster``/``--task-index`` (None without them).

    Raises:
        ValueError: one without the other, fewer than two host:port entries, an index
            out of range.
    """
    from .train import cluster_tf_config

    if (cluster is None) != (task_index is None):
        raise ValueError("--cluster and --task-index go together")
    if cluster is None:
        return None
    workers = [w.strip() for w in cluster.split(",") if w.strip()]
    if len(workers) < 2 or not all(w.rpartition(":")[2].isdigit() for w in workers):
        raise ValueError(f"--cluster must list at least two host:port entries, got {cluster!r}")
    return cluster_tf_config(workers, task_index)


def train_config(data: str, *, augment: bool | None = None, flip: bool | None = None,
                 intensity: bool | None = None, crop_area: float | None = None,
                 zoom_out: float | None = None, resume: bool = False,
                 **options: Any) -> TrainConfig:
    """The configuration the options describe; every option left out (None) takes the
    dataclasses' default.

    Raises:
        ValueError: the first bad option, named as its flag.
    """
    given = {k: v for k, v in options.items() if v is not None}
    aug = AugmentConfig(**{k: v for k, v in (("crop_area", crop_area), ("zoom_out", zoom_out))
                           if v is not None})
    if augment is False:
        aug = AugmentConfig.off()
    else:
        if flip is False:
            aug = AugmentConfig(**(aug.to_dict() | {"flip": False}))
        if intensity is False:
            aug = AugmentConfig(**(aug.to_dict() | {"brightness": 0, "contrast": 0,
                                                    "gamma": 0, "noise": 0, "lowres": 0}))
    if "epochs" not in given and resume:
        given["epochs"] = None  # the run's own total
    return TrainConfig(data=str(data), augment=aug, **(_init_from_defaults(given) | given))


def _init_from_defaults(given: dict) -> dict:
    """With ``init_from``: the file decides size and arch, and the lighter defaults apply.

    Raises:
        ValueError: the file is unusable, or --img-size/--arch contradict it.
    """
    if given.get("init_from") is None:
        return {}
    from .init_from import DEFAULTS, InitFromError, file_config

    try:
        fc = file_config(given["init_from"])
    except InitFromError as exc:
        raise ValueError(str(exc)) from None
    for name in ("img_size", "arch", "crop_size"):
        if given.get(name) is not None and name in fc and given[name] != fc[name]:
            raise ValueError(f"--{name.replace('_', '-')} {given[name]} differs from the "
                             f"--init-from file's {fc[name]}")
    return DEFAULTS | {"img_size": fc["img_size"], "arch": fc["arch"],
                       "channels": fc["channels"], "init_from": str(given["init_from"])} | (
        {"crop_size": fc["crop_size"]} if "crop_size" in fc else {})


def train_job(data: str, *, cluster: str | None = None, task_index: int | None = None,
              resume: bool = False, on_epoch: Callable[[int, dict], None] | None = None,
              on_start: Callable[[dict], None] | None = None, **options: Any):
    """Check every option, then train (``training.train.train``); returns its TrainResult.

    With ``cluster``, TF_CONFIG is set for this process and the strategy defaults to
    multiworker.

    Raises:
        UsageError: a bad option or data folder (nothing written).
        Interrupted: Ctrl-C (the run folder can be resumed).
    """
    from pathlib import Path

    from .data import DataError
    from .train import TrainInterrupted, train

    try:
        tf_config = cluster_config(cluster, task_index)
        if tf_config is not None:
            options["strategy"] = options.get("strategy") or "multiworker"
        cfg = train_config(data, resume=resume, **options)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    if not Path(data).is_dir():
        raise UsageError(f"{data}: data folder not found")
    if tf_config is not None:
        os.environ["TF_CONFIG"] = tf_config
    try:
        return train(cfg, resume=resume, on_epoch=on_epoch, on_start=on_start)
    except (DataError, FileNotFoundError, ValueError) as exc:
        raise UsageError(str(exc)) from None
    except TrainInterrupted as exc:
        raise Interrupted(str(exc)) from None
