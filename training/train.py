"""The training loop: ``pneumo-edge train`` calls :func:`train`.

A run folder holds everything needed to continue, audit and export a run:
``config.json``, ``split.csv``, ``history.csv``, ``best.keras``, ``curves.png``,
``val_metrics.json`` and, while unfinished, ``backup/`` (for ``--resume``).
"""

from __future__ import annotations

import csv
import io
import json
import os
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Callable

import numpy as np

from pneumo_edge.io import atomic_path, write_json, write_set
from pneumo_edge.metrics import (apply_temperature, binary_metrics, choose_threshold,
                                 choose_threshold_robust, expected_calibration_error,
                                 fit_platt)
from pneumo_edge.preprocess import PreprocessConfig, to_model_input

from .augment import AugmentConfig, make_augment
from .data import (CLASS_NAMES, block_split, class_weights, discover, load_arrays,
                   make_dataset, part_masks, patient_split, read_split, write_split)


SCHEDULES = ("cosine", "plateau")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
SPLITS = ("patient", "block")
STRATEGIES = ("auto", "mirrored", "default", "multiworker")
THRESHOLD_RULES = ("robust", "clean")


@dataclass
class TrainConfig:
    data: str
    out: str = "runs/latest"
    arch: str = "resnet18"
    img_size: int = 180
    channels: int = 3
    epochs: int | None = 30   # None only with resume: keep the run's own total
    batch_size: int = 32
    lr: float = 1e-3
    weight_decay: float = 1e-4   # decoupled (AdamW)
    dropout: float = 0.3
    label_smoothing: float = 0.05
    schedule: str = "cosine"     # "cosine" (warm-up + cosine) or "plateau"
    warmup_epochs: int = 1
    patience: int = 8            # EarlyStopping on val AUC
    val_fraction: float = 0.15
    seed: int = 42               # the patient split (and --max-images subset)
    # weights, dropout and the augmentation stream [default: seed]; members of a
    # seed ensemble share the split (seed) and differ here
    init_seed: int | None = None
    target_sensitivity: float | None = None
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    class_balance: bool = True
    max_images: int | None = None  # subsample (stratified) for quick experiments
    strategy: str = "auto"       # "auto", "mirrored", "default", "multiworker"
    # compute precision of training (weights stay float32): "auto" is bf16 on CPUs
    # with bf16 instructions, fp16 on GPUs, fp32 elsewhere; export is always float32
    precision: str = "auto"
    # the *_lung architectures: the lung segmenter (.keras; default: the shipped one,
    # training/weights/lung_unet96.keras) and the crop side (default: 3/4 of img_size)
    segmenter: str | None = None
    crop_size: int | None = None
    # "patient": a random patient-level split; "block": the earliest NORMAL patients
    # of each name family held out too (training.data.block_split), two views
    split: str = "patient"
    # exponential moving average of the weights (0: off); the averaged weights are
    # the ones evaluated, checkpointed and exported
    ema_decay: float = 0.998
    # the checkpoint is chosen on the worst validation AUC over these rows of the
    # robustness suite (pneumo_edge.robustness), not on clean validation alone
    select_rows: tuple[str, ...] = ("clean", "zoom_in_15", "zoom_out_15", "border_black_3")
    # "robust": the worst-row Youden plateau over clean + every zoom row;
    # "clean": the Youden plateau on clean validation (the 0.1 rule)
    threshold_rule: str = "robust"
    calibrate: bool = True       # fit a temperature on validation, folded into the model
    # start from an exported FP32 file's weights (training.init_from); then the stem
    # and stages up to freeze_until stay fixed and every trainable weight is pulled
    # towards its initial value after each step (lr * pull * (w - w_init))
    init_from: str | None = None
    freeze_until: str = "none"
    pull: float = 0.0

    def __post_init__(self) -> None:
        """Check the whole configuration before any work (a typo costs nothing)."""
        from pneumo_edge.robustness import PERTURBATIONS

        from .models import MODELS

        def one_of(name, value, choices):
            if value not in choices:
                raise ValueError(f"--{name.replace('_', '-')} must be one of "
                                 f"{', '.join(map(str, choices))}, got {value!r}")

        one_of("arch", self.arch, tuple(MODELS))
        one_of("schedule", self.schedule, SCHEDULES)
        one_of("strategy", self.strategy, STRATEGIES)
        one_of("precision", self.precision, PRECISIONS)
        one_of("split", self.split, SPLITS)
        one_of("threshold_rule", self.threshold_rule, THRESHOLD_RULES)
        from .init_from import FREEZE_STAGES
        one_of("freeze_until", self.freeze_until, FREEZE_STAGES)
        if not self.init_from and (self.freeze_until != "none" or self.pull):
            raise ValueError("--freeze-until and --pull go with --init-from")
        if self.init_from and self.precision != "fp32":
            raise ValueError("--init-from trains in --precision fp32 (the weights are checked "
                             "against onnxruntime to 1e-4 before training)")
        for row in self.select_rows:
            one_of("select_rows", row, PERTURBATIONS)
        checks = [("img_size", self.img_size >= 16, "at least 16"),
                  ("epochs", self.epochs is None or self.epochs >= 1, "at least 1"),
                  ("batch_size", self.batch_size >= 1, "at least 1"),
                  ("lr", self.lr > 0, "positive"),
                  ("val_fraction", 0.0 < self.val_fraction < 1.0, "between 0 and 1"),
                  ("dropout", 0.0 <= self.dropout < 1.0, "in [0, 1)"),
                  ("label_smoothing", 0.0 <= self.label_smoothing < 0.5, "in [0, 0.5)"),
                  ("ema_decay", 0.0 <= self.ema_decay < 1.0, "in [0, 1)"),
                  ("patience", self.patience >= 1, "at least 1"),
                  ("max_images", self.max_images is None or self.max_images >= 4,
                   "at least 4"),
                  ("crop_size", self.crop_size is None or 16 <= self.crop_size <= self.img_size,
                   "between 16 and --img-size"),
                  ("segmenter", self.segmenter is None or Path(self.segmenter).is_file(),
                   "an existing .keras file"),
                  ("pull", self.pull >= 0.0, "non-negative"),
                  ("target_sensitivity", self.target_sensitivity is None
                   or 0.0 < self.target_sensitivity <= 1.0, "in (0, 1]")]
        for name, ok, rule in checks:
            if not ok:
                raise ValueError(f"--{name.replace('_', '-')} must be {rule}, "
                                 f"got {getattr(self, name)!r}")
        if self.segmenter:  # export and resume read it from config.json, from anywhere
            self.segmenter = str(Path(self.segmenter).resolve())

    def to_dict(self) -> dict:
        d = asdict(self)
        d["augment"] = self.augment.to_dict()
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        known = {f.name for f in fields(cls)}
        legacy = {"on": "fp16", "off": "fp32", "auto": "auto"}  # mixed_precision (0.2)
        if "precision" not in d and d.get("mixed_precision") in legacy:
            d = d | {"precision": legacy[d["mixed_precision"]]}
        d = {k: v for k, v in d.items() if k in known}
        d["augment"] = AugmentConfig.from_dict(d.get("augment", {}))
        if "select_rows" in d:
            d["select_rows"] = tuple(d["select_rows"])
        return cls(**d)

    @property
    def weights_seed(self) -> int:
        return self.seed if self.init_seed is None else self.init_seed

    @property
    def model_kwargs(self) -> dict:
        """The builder's extra arguments: the lung stage's for the ``*_lung`` models."""
        from .models import LUNG_MODELS

        if self.arch not in LUNG_MODELS:
            return {}
        return {"segmenter": self.segmenter, "crop_size": self.crop_size,
                "seed": self.weights_seed}

    @property
    def preprocess(self) -> PreprocessConfig:
        return PreprocessConfig(self.img_size, self.img_size, self.channels)


@dataclass
class TrainResult:
    run_dir: Path
    best_epoch: int
    epochs_run: int
    val_metrics: dict
    threshold: float
    threshold_rule: str
    devices: list[str]
    seconds: float
    n_train: int
    n_val: int
    no_patient_files: int
    #: a worker that is not the chief of a multi-worker run: where the results are
    worker_note: str = ""
    split: str = "patient"   # TrainConfig.split


class TrainInterrupted(RuntimeError):
    """Training stopped by Ctrl-C; the run folder can be resumed."""


@dataclass(frozen=True)
class WorkerRole:
    """This process's place in a TF_CONFIG cluster (one worker when there is none)."""
    n_workers: int = 1
    index: int = 0
    chief: bool = True

    def folder(self, out: Path) -> Path:
        """Where this worker writes: the run folder for the chief, else <out>/worker-<i>."""
        return out if self.chief else out / f"worker-{self.index}"


def worker_role() -> WorkerRole:
    """Read ``TF_CONFIG``: the chief is task ``chief`` 0, else ``worker`` 0.

    Raises:
        ValueError: TF_CONFIG is not JSON or lacks ``cluster``/``task``.
    """
    raw = os.environ.get("TF_CONFIG", "").strip()
    if not raw:
        return WorkerRole()
    try:
        conf = json.loads(raw)
        cluster, task = conf["cluster"], conf["task"]
        kind, index = str(task["type"]), int(task["index"])
        n = sum(len(cluster.get(k, [])) for k in ("chief", "worker"))
    except (ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"TF_CONFIG is not a cluster description ({exc})") from None
    has_chief = bool(cluster.get("chief"))
    chief = kind == "chief" or (not has_chief and kind == "worker" and index == 0)
    return WorkerRole(n, index + (1 if has_chief and kind == "worker" else 0), chief)


def cluster_tf_config(workers: list[str], index: int) -> str:
    """TF_CONFIG for ``workers`` (host:port each, the first is the chief) as task ``index``."""
    if not 0 <= index < len(workers):
        raise ValueError(f"--task-index must be in 0..{len(workers) - 1}, got {index}")
    return json.dumps({"cluster": {"worker": workers}, "task": {"type": "worker",
                                                                "index": index}})


def _patch_keras_for_multiworker() -> None:
    """Keras 3 averages the train/test step logs of a multi-worker run with
    ``strategy.reduce("MEAN", v, axis=0)``, which fails on scalars ("Invalid
    reduction dimension 0 for input with 0 dimensions"); reduce scalars with
    ``axis=None``. Applied only under MultiWorkerMirroredStrategy; the two-worker
    test fails if a Keras upgrade changes this code path."""
    from keras.src import tree
    from keras.src.backend.tensorflow import trainer as tf_trainer

    if getattr(tf_trainer.reduce_per_replica, "_pneumo_edge", False):
        return
    original = tf_trainer.reduce_per_replica

    def reduce_per_replica(values, strategy, reduction):
        if reduction in ("auto", "mean") and \
                tf_trainer._collective_all_reduce_multi_worker(strategy):
            def mean(v):
                local = strategy.experimental_local_results(v)[0] \
                    if tf_trainer._is_per_replica_instance(v) else v
                rank = getattr(getattr(local, "shape", None), "rank", None)
                return strategy.reduce("MEAN", v, axis=None if not rank else 0)
            return tree.map_structure(mean, values)
        return original(values, strategy, reduction)

    reduce_per_replica._pneumo_edge = True
    tf_trainer.reduce_per_replica = reduce_per_replica


def select_strategy(kind: str = "auto"):
    """A distribution strategy and the device names it trains on.

    ``auto``: MultiWorkerMirroredStrategy when TF_CONFIG describes several
    workers; else MirroredStrategy over all visible GPUs when there are several,
    the default strategy on one GPU or on the CPU. ``mirrored``: MirroredStrategy
    over the GPUs, or over the logical CPUs when there is no GPU (used by the
    tests). ``multiworker``: MultiWorkerMirroredStrategy (each worker on its
    local GPUs, or its CPU), which must be created before any other TensorFlow
    work: call this first.
    """
    import tensorflow as tf

    if kind == "multiworker" or (kind == "auto" and worker_role().n_workers > 1):
        strategy = tf.distribute.MultiWorkerMirroredStrategy()
        _patch_keras_for_multiworker()
        gpus = [d.name for d in tf.config.list_logical_devices("GPU")]
        return strategy, gpus or [d.name for d in tf.config.list_logical_devices("CPU")][:1]
    gpus = [d.name for d in tf.config.list_logical_devices("GPU")]
    if kind == "mirrored" or (kind == "auto" and len(gpus) > 1):
        devices = gpus or [d.name for d in tf.config.list_logical_devices("CPU")]
        return tf.distribute.MirroredStrategy(devices=devices), devices
    devices = gpus[:1] or [d.name for d in tf.config.list_logical_devices("CPU")][:1]
    return tf.distribute.get_strategy(), devices


def cpu_has_bf16() -> bool:
    """Whether this CPU has bf16 instructions (AVX-512 BF16 or AMX), from /proc/cpuinfo."""
    try:
        flags = Path("/proc/cpuinfo").read_text(errors="replace")
    except OSError:
        return False
    return any(f in flags.split() for f in ("avx512_bf16", "amx_bf16"))


def precision_policy(precision: str, on_gpu: bool) -> str:
    """The Keras dtype policy for ``TrainConfig.precision`` on this machine."""
    if precision == "auto":
        precision = "fp16" if on_gpu else ("bf16" if cpu_has_bf16() else "fp32")
    return {"fp32": "float32", "bf16": "mixed_bfloat16", "fp16": "mixed_float16"}[precision]


def _subsample(samples, n, seed):
    rng = np.random.default_rng(seed)
    idx = rng.permutation(len(samples))[:n]
    return [samples[i] for i in sorted(idx)]


def plot_curves(history_csv: Path, out_png: Path) -> None:
    """Loss, AUC and learning rate per epoch from ``history.csv``."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = _read_history(history_csv)
    if not rows:
        return
    ep = [int(r["epoch"]) + 1 for r in rows]
    col = lambda k: [float(r[k]) if r.get(k) not in (None, "") else np.nan for r in rows]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    for key, ax, title in (("loss", axes[0], "loss"), ("auc", axes[1], "AUC")):
        ax.plot(ep, col(key), marker="o", label="train")
        if f"val_{key}" in rows[0]:
            ax.plot(ep, col(f"val_{key}"), marker="o", label="validation")
        ax.set_title(title); ax.set_xlabel("epoch"); ax.legend(); ax.grid(alpha=0.3)
    if "learning_rate" in rows[0]:
        axes[2].plot(ep, col("learning_rate"), marker="o")
    axes[2].set_title("learning rate"); axes[2].set_xlabel("epoch"); axes[2].grid(alpha=0.3)
    fig.tight_layout()
    with atomic_path(out_png) as tmp:
        fig.savefig(tmp, dpi=100, format="png")
    plt.close(fig)


def _lr_schedule(cfg: TrainConfig, steps_per_epoch: int):
    import keras

    if cfg.schedule == "plateau":
        return cfg.lr
    if cfg.schedule != "cosine":
        raise ValueError(f"unknown schedule {cfg.schedule!r} (cosine or plateau)")
    warm = cfg.warmup_epochs * steps_per_epoch
    total = max(cfg.epochs * steps_per_epoch - warm, 1)
    return keras.optimizers.schedules.CosineDecay(
        initial_learning_rate=cfg.lr * (0.1 if warm else 1.0), decay_steps=total, alpha=0.01,
        warmup_target=cfg.lr if warm else None, warmup_steps=warm)


def _read_history(history_csv: Path) -> list[dict]:
    if not history_csv.exists():
        return []
    with open(history_csv, newline="") as fh:
        return list(csv.DictReader(fh))


SELECT_KEY = "val_robust_auc"


def _best_val_auc(history_csv: Path) -> float | None:
    """Best selection score logged so far (a resumed run must beat it to checkpoint)."""
    vals = [float(r[SELECT_KEY]) for r in _read_history(history_csv) if r.get(SELECT_KEY)]
    return max(vals) if vals else None


def _make_select_callback(keras, run_dir: Path, select_sets: dict, decay: float,
                          best_so_far: float | None, batch_size: int, local_copy=None,
                          views: dict | None = None):
    """EMA of the weights, and checkpoint selection on the worst AUC over shifted validation.

    After every epoch the averaged weights (or the raw ones with ``decay`` 0)
    predict each validation set in ``select_sets`` (name -> (inputs, labels));
    their AUCs go into the logs as ``val_<name>_auc``, the smallest as
    ``val_robust_auc``, and ``best.keras`` is written with those weights when it
    improves. On resume the average restarts from the restored weights.

    ``local_copy``: a model of the same architecture outside any strategy. Under
    MultiWorkerMirroredStrategy the distributed ``predict`` would see only this
    worker's shard; each worker then predicts the whole set with the copy, so
    all of them take the same checkpoint and early-stopping decisions.

    ``views`` (name -> mask over the validation images, the block split's): each
    set's AUC is then taken within each view (``val_<name>_<view>_auc``), and
    the smallest over sets and views selects.
    """
    import tensorflow as tf

    from pneumo_edge.metrics import roc_auc

    class SelectCallback(keras.callbacks.Callback):
        def on_train_begin(self, logs=None):
            self.best = best_so_far
            self.steps = 0
            self.vars = [getattr(w, "value", w) for w in self.model.weights]
            self.ema = [tf.Variable(v.read_value(), trainable=False) for v in self.vars] \
                if decay else []

            @tf.function
            def update(d):
                for e, v in zip(self.ema, self.vars):
                    e.assign(d * e + (1.0 - d) * tf.cast(v, e.dtype))
            self._update = update

        def on_train_batch_end(self, batch, logs=None):
            if decay:
                self.steps += 1
                # short warm-up: the average does not remember the random init
                self._update(tf.constant(min(decay, (1.0 + self.steps) / (10.0 + self.steps)),
                                         tf.float32))

        def on_epoch_end(self, epoch, logs=None):
            raw = [v.read_value() for v in self.vars] if decay else []
            for e, v in zip(self.ema, self.vars):
                v.assign(tf.cast(e, v.dtype))
            try:
                aucs = {}
                judge = self.model
                if local_copy is not None:
                    local_copy.set_weights([v.numpy() for v in self.vars])
                    judge = local_copy
                for name, (x, y) in select_sets.items():
                    p = judge.predict(x, batch_size=batch_size, verbose=0).reshape(-1)
                    for view, mask in (views or {"": None}).items():
                        key = f"{name}_{view}" if view else name
                        aucs[key] = (roc_auc(y, p) if mask is None
                                     else roc_auc(y[mask], p[mask])) or 0.0
                        if logs is not None:
                            logs[f"val_{key}_auc"] = aucs[key]
                score = min(aucs.values())
                if logs is not None:
                    logs[SELECT_KEY] = score
                if self.best is None or score > self.best:
                    self.best = score
                    self.model.save(run_dir / "best.keras")
            finally:
                for r, v in zip(raw, self.vars):
                    v.assign(r)

    return SelectCallback()


def _fit(cfg: TrainConfig, run_dir: Path, strategy, train_s, val_ds, select_sets: dict,
         history_csv: Path, resume: bool, on_epoch, views: dict | None = None) -> float:
    """Build, compile and fit the model with its callbacks; returns the seconds spent."""
    import keras
    import tensorflow as tf

    pre = cfg.preprocess
    x_train, y_train = load_arrays(train_s, pre)
    global_batch = cfg.batch_size
    train_ds = make_dataset(x_train, y_train, pre, batch_size=global_batch, training=True,
                            seed=cfg.weights_seed, augment=make_augment(cfg.augment))
    steps = int(np.ceil(len(y_train) / global_batch))

    from .models import create_model
    with strategy.scope():
        model = create_model(cfg.arch, input_shape=(cfg.img_size, cfg.img_size, cfg.channels),
                             dropout=cfg.dropout, **cfg.model_kwargs)
        init_callbacks = []
        if cfg.init_from:  # weights from the file, checked against onnxruntime, then frozen
            from .init_from import prepare, pull_callback, record
            x_check = np.stack([to_model_input(img[:, :, 0], pre) for img in x_train[:16]])
            record(run_dir, prepare(model, cfg.init_from, x_check, cfg.freeze_until))
            if cfg.pull:
                init_callbacks.append(pull_callback(model, cfg.pull))
        model.compile(
            optimizer=keras.optimizers.AdamW(learning_rate=_lr_schedule(cfg, steps),
                                             weight_decay=cfg.weight_decay),
            loss=keras.losses.BinaryCrossentropy(label_smoothing=cfg.label_smoothing),
            metrics=[keras.metrics.AUC(name="auc"), keras.metrics.BinaryAccuracy(name="accuracy"),
                     keras.metrics.Precision(name="precision"),
                     keras.metrics.Recall(name="recall")])

    local_copy = None
    if isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy):
        # Keras 3 builds the model in fit() by all-reducing the first distributed
        # batch, which MultiWorkerMirroredStrategy cannot do eagerly
        # (keras-team/keras#20585); build it from a local batch instead (shapes only)
        local_batch = next(iter(train_ds))

        def _build(iterator=None, data_batch=None):
            with strategy.scope():
                model._symbolic_build(data_batch=local_batch)
        model._maybe_symbolic_build = _build
        local_copy = create_model(cfg.arch, input_shape=(cfg.img_size, cfg.img_size,
                                                         cfg.channels), dropout=cfg.dropout,
                                  **cfg.model_kwargs)
    best_so_far = _best_val_auc(history_csv) if resume else None
    if not resume and history_csv.exists():
        history_csv.unlink()

    class _LogEpoch(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            self._t0 = time.perf_counter()

        def on_epoch_end(self, epoch, logs=None):
            if logs is not None:  # in place, so that CSVLogger (next) records them
                logs["learning_rate"] = float(keras.ops.convert_to_numpy(
                    self.model.optimizer.learning_rate))
                logs["epoch_seconds"] = round(time.perf_counter() - self._t0, 2)

    class _Report(keras.callbacks.Callback):
        # last in the list: by the time it runs, the epoch is checkpointed and logged,
        # so an interrupt raised from here (or later) leaves a resumable run folder
        def on_epoch_end(self, epoch, logs=None):
            if on_epoch:
                on_epoch(epoch, dict(logs or {}))

    callbacks = [
        keras.callbacks.BackupAndRestore(str(run_dir / "backup")),
        _LogEpoch(),
        *init_callbacks,  # before the weight average, which then sees the pulled weights
        _make_select_callback(keras, run_dir, select_sets, cfg.ema_decay, best_so_far,
                              cfg.batch_size, local_copy, views),
        keras.callbacks.EarlyStopping(monitor=SELECT_KEY, mode="max", patience=cfg.patience,
                                      restore_best_weights=False),
        keras.callbacks.CSVLogger(str(history_csv), append=resume),
        _Report(),
    ]
    if cfg.schedule == "plateau":
        callbacks.insert(2, keras.callbacks.ReduceLROnPlateau(
            monitor="val_auc", mode="max", factor=0.3, patience=max(cfg.patience // 3, 1),
            min_lr=cfg.lr * 1e-3))

    t0 = time.perf_counter()
    try:
        model.fit(train_ds, validation_data=val_ds, epochs=cfg.epochs,
                  class_weight=class_weights(train_s) if cfg.class_balance else None,
                  callbacks=callbacks, verbose=0)
    except KeyboardInterrupt:
        raise TrainInterrupted(
            f"interrupted; resume with: pneumo-edge train --out {run_dir} --resume") from None
    return time.perf_counter() - t0



def _calibrate(model, run_dir: Path, cfg: TrainConfig, x_val, y_val) -> dict:
    """Fit a temperature and bias on clean validation and fold them into the output layer.

    sigmoid((w.x + b) / T + c) = sigmoid((w / T).x + b / T + c): the exported graph
    then carries calibrated probabilities and the runtime does not change. AUC
    and ranking are unchanged (the threshold is chosen afterwards, on the new
    probabilities). The bias c undoes the prior that class weights put into the
    logits. ``best.keras`` is rewritten; re-evaluating a finished run fits again
    on the folded model, finds T close to 1 and c close to 0, and leaves it.
    """
    from .models import OUTPUT_NAME

    p = model.predict(x_val, batch_size=cfg.batch_size, verbose=0).reshape(-1)
    t, c = fit_platt(y_val, p)
    if abs(np.log(t)) > 0.01 or abs(c) > 0.01:
        dense = model.get_layer(OUTPUT_NAME)
        kernel, bias = dense.get_weights()
        dense.set_weights([kernel / t, bias / t + c])
        model.save(run_dir / "best.keras")
    return {"temperature": round(t, 4), "bias": round(c, 4),
            "ece_before": round(expected_calibration_error(y_val, p), 4),
            "ece_after": round(expected_calibration_error(y_val, apply_temperature(p, t, c)), 4),
            "fitted_on": "clean validation (log-loss, Platt scaling)", "bins": 15}


def train(cfg: TrainConfig, *, resume: bool = False,
          on_epoch: Callable[[int, dict], None] | None = None,
          on_start: Callable[[dict], None] | None = None) -> TrainResult:
    """Train a model as ``cfg`` says and fill the run folder.

    Args:
        cfg: the configuration; with ``resume`` the run folder's saved
            ``config.json`` is used instead, except ``epochs`` (the new total)
            when it is set.
        resume: continue an interrupted run from its last completed epoch; on a
            finished run, only re-evaluate the best checkpoint on validation
            (threshold rule, ``val_metrics.json``).
        on_epoch: called after each epoch with (epoch index, logs) for progress.
        on_start: called once with the resolved configuration (devices, split sizes)
            before the first epoch.

    Raises:
        DataError: unusable data folder. TrainInterrupted: Ctrl-C (resumable).
    """
    import keras

    run_dir = Path(cfg.out)
    role = worker_role()
    if resume:
        saved = role.folder(run_dir) / "config.json"
        if not saved.exists():
            raise FileNotFoundError(f"{run_dir}: no config.json to resume from")
        epochs, target_sensitivity = cfg.epochs, cfg.target_sensitivity
        cfg = TrainConfig.from_dict(json.loads(saved.read_text()))
        if epochs:  # the new total; the cosine schedule is rebuilt for it
            cfg.epochs = epochs
        if target_sensitivity is not None:
            cfg.target_sensitivity = target_sensitivity
    # MultiWorkerMirroredStrategy must exist before any other TensorFlow work
    strategy, devices = select_strategy(cfg.strategy)
    keras.utils.set_random_seed(cfg.weights_seed)
    # the chief writes the run folder; another worker keeps its checkpoints,
    # history and backup (to resume) in <out>/worker-<i>, removed when it ends
    chief_dir, run_dir = run_dir, role.folder(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    on_gpu = any("GPU" in d for d in devices)
    policy = precision_policy(cfg.precision, on_gpu)
    keras.mixed_precision.set_global_policy(policy)

    pre = cfg.preprocess
    split_csv = run_dir / "split.csv"
    samples, no_patient = discover(cfg.data)
    if resume and split_csv.exists():
        train_s, val_s = read_split(split_csv)
    else:
        if cfg.max_images and cfg.max_images < len(samples):
            samples = _subsample(samples, cfg.max_images, cfg.seed)
        splitter = block_split if cfg.split == "block" else patient_split
        train_s, val_s = splitter(samples, cfg.val_fraction, cfg.seed)
        write_split(split_csv, train_s, val_s)
    from . import environment

    cfg_dict = cfg.to_dict() | {"versions": environment(), "devices": devices,
                                "precision_policy": policy,
                                "mixed_precision_used": policy != "float32",
                                "no_patient_files": no_patient,
                                "n_train": len(train_s), "n_val": len(val_s),
                                "class_names": list(CLASS_NAMES)}
    write_json(run_dir / "config.json", cfg_dict)
    if on_start:
        on_start(cfg_dict)

    x_val, y_val, val_inputs = validation_inputs(val_s, pre)
    val_ds = make_dataset(x_val, y_val, pre, batch_size=cfg.batch_size, training=False,
                          seed=cfg.seed)
    select_sets = {row: (val_inputs(row), y_val) for row in cfg.select_rows}
    views = part_masks(val_s)
    history_csv = run_dir / "history.csv"
    # resuming a finished run re-evaluates its best checkpoint (e.g. a new threshold rule)
    finished = (resume and (run_dir / "val_metrics.json").exists()
                and not (run_dir / "backup").exists())
    seconds = 0.0 if finished else _fit(cfg, run_dir, strategy, train_s, val_ds, select_sets,
                                        history_csv, resume, on_epoch, views)
    if not role.chief:  # the chief evaluates, calibrates and writes the results
        import shutil
        epochs_run = len(_read_history(history_csv))
        shutil.rmtree(run_dir, ignore_errors=True)
        return TrainResult(chief_dir, 0, epochs_run, {}, float("nan"), "", devices,
                           round(seconds, 1), len(train_s), len(val_s), no_patient,
                           worker_note=f"worker {role.index} of {role.n_workers}: the chief "
                                       f"writes {chief_dir}")

    previous = (json.loads((run_dir / "val_metrics.json").read_text())
                if resume and (run_dir / "val_metrics.json").exists() else {})
    rows = _read_history(history_csv)
    aucs = [float(r.get(SELECT_KEY) or r["val_auc"]) for r in rows]
    best_epoch = int(rows[int(np.argmax(aucs))]["epoch"]) + 1
    val = finish_run(run_dir, cfg, val_inputs, y_val, val_s, {
        "best_epoch": best_epoch, "epochs_run": len(rows),
        "train_seconds": round(previous.get("train_seconds", 0.0) + seconds, 1)})
    plot_curves(history_csv, run_dir / "curves.png")
    return TrainResult(run_dir, best_epoch, len(rows), val["metrics"], val["threshold"],
                       val["threshold_rule"], devices, val["train_seconds"], len(train_s),
                       len(val_s), no_patient, split=cfg.split)


def validation_inputs(val_s: list, pre: PreprocessConfig):
    """``(x_val, y_val, val_inputs)``: the decoded validation images, their labels, and
    ``val_inputs(row)``, the model inputs under a robustness-suite row ("clean",
    "zoom_in_5", ...)."""
    x_val, y_val = load_arrays(val_s, pre)

    def val_inputs(row: str) -> np.ndarray:
        x = x_val if row == "clean" else load_arrays(val_s, pre, row)[0]
        # the runtime's own conversion (no resize: the cache is at model size already)
        return np.stack([to_model_input(img[:, :, 0], pre) for img in x])

    return x_val, y_val, val_inputs


def finish_run(run_dir: Path, cfg: TrainConfig, val_inputs: Callable[[str], np.ndarray],
               y_val: np.ndarray, val_s: list, extra: dict) -> dict:
    """Calibrate ``run_dir/best.keras`` on validation, choose its threshold and write
    ``val_metrics.json`` (with ``extra``) and ``val_probs.npy``; returns the record.

    ``val_inputs`` is :func:`validation_inputs`'s.
    """
    import keras

    from .models import register_custom_layers

    register_custom_layers()
    best = keras.models.load_model(run_dir / "best.keras")
    rows = {"clean": val_inputs("clean")}
    calibration = _calibrate(best, run_dir, cfg, rows["clean"], y_val) if cfg.calibrate else {}
    if cfg.threshold_rule == "robust" and cfg.target_sensitivity is None:
        from pneumo_edge.robustness import FRAMING_ROWS
        rows |= {row: val_inputs(row) for row in FRAMING_ROWS}
    by_row = {row: best.predict(x, batch_size=cfg.batch_size, verbose=0).reshape(-1)
              for row, x in rows.items()}
    probs = by_row["clean"]
    views = part_masks(val_s)
    if len(by_row) > 1:
        threshold, rule = choose_threshold_robust(y_val, by_row, views or None)
    else:
        threshold, rule = choose_threshold(y_val, probs, cfg.target_sensitivity)

    def scored(mask=None) -> tuple[dict, dict]:
        y = y_val if mask is None else y_val[mask]
        pick = (lambda p: p) if mask is None else (lambda p: p[mask])
        return (binary_metrics(y, pick(probs), threshold).to_dict(),
                {row: binary_metrics(y, pick(p), threshold).to_dict()
                 for row, p in by_row.items() if row != "clean"})

    metrics, shifted = scored()
    val = {"threshold": threshold, "threshold_rule": rule, "metrics": metrics,
           "shifted_metrics": shifted, "calibration": calibration} | extra | {
           "n_val": len(val_s), "n_val_patients": len({s.patient for s in val_s})}
    if views:  # each view's own table: the block view is the honest imitation of a new site
        val["views"] = {}
        for view, mask in views.items():
            m, sh = scored(mask)
            val["views"][view] = {"n": int(mask.sum()), "metrics": m, "shifted_metrics": sh}
    buf = io.BytesIO()
    np.save(buf, probs.astype(np.float32))
    write_set({run_dir / "val_metrics.json": json.dumps(val, indent=2) + "\n",
               run_dir / "val_probs.npy": buf.getvalue()})
    return val
