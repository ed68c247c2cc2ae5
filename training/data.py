"""Labelled files, the patient-level split, and the tf.data pipeline."""

from __future__ import annotations

import csv
import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pneumo_edge.images import is_image_file, label_from_path
from pneumo_edge.io import atomic_write
from pneumo_edge.metadata import CLASS_NAMES
from pneumo_edge.robustness import SHARED_PART, VIEWS, in_view, view_masks
from pneumo_edge.patients import dicom_patient_key, patient_id  # noqa: F401 (re-exported)
from pneumo_edge.preprocess import PreprocessConfig, load_gray


class DataError(ValueError):
    """The data folder cannot be used for training (one-line message)."""


@dataclass(frozen=True)
class Sample:
    path: str
    label: int  # 1 = PNEUMONIA
    patient: str
    # which validation view holds it (the block split): "block", "patient" or
    # "both"; "" for training images and for the plain patient split
    part: str = ""


#: Validation views of ``split="block"``; a sample in part "both" is in each.
VAL_PARTS = VIEWS


def discover(data_dir: str | Path) -> tuple[list[Sample], int]:
    """Find labelled images under ``data_dir`` (NORMAL/ and PNEUMONIA/, at any depth).

    Returns the samples (sorted by path) and how many had no patient in their
    name (those are split per file).

    Raises:
        DataError: missing folder, no images, or one class absent.
    """
    root = Path(data_dir)
    if not root.is_dir():
        raise DataError(f"{root}: data folder not found")
    samples: list[Sample] = []
    no_patient = 0
    for path in sorted(p for p in root.rglob("*") if is_image_file(p)):
        truth = label_from_path(path.relative_to(root))
        if truth is None:
            continue
        pid = dicom_patient_key(path) or patient_id(path)  # the header outranks the name
        if pid is None:
            no_patient += 1
            pid = f"file:{path.relative_to(root).as_posix()}"
        samples.append(Sample(str(path), int(truth == "PNEUMONIA"), pid))
    counts = {c: sum(s.label == i for s in samples) for i, c in enumerate(CLASS_NAMES)}
    if not samples:
        raise DataError(f"{root}: no images inside NORMAL/ or PNEUMONIA/ folders")
    missing = [c for c, n in counts.items() if n == 0]
    if missing:
        raise DataError(f"{root}: no images for class {', '.join(missing)} "
                        "(need both NORMAL/ and PNEUMONIA/ folders)")
    return samples, no_patient


def _take(order: list[str], by_patient: dict[str, list], fraction: float,
          leave_one: bool = True) -> list[str]:
    """Patients from the front of ``order`` until they hold ``fraction`` of its images;
    with ``leave_one`` the last patient always stays behind (for training)."""
    want = fraction * sum(len(by_patient[p]) for p in order)
    taken, chosen = 0, []
    for p in order[:-1] if leave_one else order:
        if taken >= want:
            break
        chosen.append(p)
        taken += len(by_patient[p])
    return chosen


def patient_split(samples: list[Sample], val_fraction: float, seed: int
                  ) -> tuple[list[Sample], list[Sample]]:
    """Split by patient, stratified by class: no patient is on both sides.

    Patients are grouped by their (majority) label and shuffled with ``seed``;
    the first ``val_fraction`` of each group's images go to validation.

    Raises:
        DataError: too few patients for a split with both classes on each side.
    """
    if not 0.0 < val_fraction < 1.0:
        raise DataError("--val-fraction must be between 0 and 1")
    by_patient: dict[str, list[Sample]] = {}
    for s in samples:
        by_patient.setdefault(s.patient, []).append(s)
    rng = np.random.default_rng(seed)
    val_patients: set[str] = set()
    for label in (0, 1):
        group = sorted(p for p, ss in by_patient.items()
                       if round(np.mean([s.label for s in ss])) == label)
        if len(group) < 2:
            raise DataError(f"too few {CLASS_NAMES[label]} patients ({len(group)}) "
                            "for a train/validation split")
        rng.shuffle(group)
        val_patients.update(_take(group, by_patient, val_fraction))
    train = [s for s in samples if s.patient not in val_patients]
    val = [s for s in samples if s.patient in val_patients]
    for name, part in (("training", train), ("validation", val)):
        if len({s.label for s in part}) < 2:
            raise DataError(f"too few images for a split: the {name} set lacks a class")
    return train, val


def _patient_order(patient: str) -> tuple[str, int, str]:
    # (family, number, id): "NORMAL2-IM-0456" -> ("NORMAL2-IM", 456, ...); an id
    # without a trailing number (DICOM hash, file name) sorts by itself, number 0
    m = re.match(r"^(.*?)-?(\d+)$", patient)
    return (m.group(1), int(m.group(2)), patient) if m else (patient, 0, patient)


def block_split(samples: list[Sample], val_fraction: float, seed: int
                ) -> tuple[list[Sample], list[Sample]]:
    """A validation split that imitates a later acquisition: two views, no patient leaks.

    - ``block``: the earliest ``val_fraction`` of the NORMAL patients of each
      name family (``IM-``, ``NORMAL2-IM-``, ...; ordered by patient number),
      the way an earlier (or later) acquisition block differs from the rest;
    - ``patient``: a random set of the remaining NORMAL patients, half as many
      images (the plain patient-level view);
    - both views share one stratified random set of PNEUMONIA patients
      (``val_fraction`` of the PNEUMONIA images), tagged ``both``.

    Validation samples carry their view in ``Sample.part``.

    Raises:
        DataError: too few patients for both views.
    """
    if not 0.0 < val_fraction < 0.5:
        raise DataError("--val-fraction must be between 0 and 0.5 with --split block")
    by_patient: dict[str, list[Sample]] = {}
    for s in samples:
        by_patient.setdefault(s.patient, []).append(s)
    label_of = {p: int(round(np.mean([s.label for s in ss]))) for p, ss in by_patient.items()}
    normals = sorted((p for p, lab in label_of.items() if lab == 0), key=_patient_order)
    families: dict[str, list[str]] = {}
    for p in normals:
        families.setdefault(_patient_order(p)[0], []).append(p)
    part: dict[str, str] = {}
    for fam in families.values():  # every family gives its earliest patients
        part.update(dict.fromkeys(_take(fam, by_patient, val_fraction, leave_one=False),
                                  "block"))
    rng = np.random.default_rng(seed)
    for label, tag, fraction in ((0, "patient", val_fraction / 2),
                                 (1, SHARED_PART, val_fraction)):
        group = sorted(p for p, lab in label_of.items() if lab == label and p not in part)
        rng.shuffle(group)
        part.update(dict.fromkeys(_take(group, by_patient, fraction), tag))
    train = [s for s in samples if s.patient not in part]
    val = [Sample(s.path, s.label, s.patient, part[s.patient]) for s in samples
           if s.patient in part]
    for name in VAL_PARTS:
        if len({s.label for s in val if in_view(s.part, name)}) < 2:
            raise DataError(f"too few patients for the {name} validation view")
    if len({s.label for s in train}) < 2:
        raise DataError("too few images for a split: the training set lacks a class")
    return train, val


def part_masks(val: list[Sample]) -> dict[str, np.ndarray]:
    """Boolean masks over ``val`` for each validation view; empty for a plain split."""
    return view_masks([s.part for s in val])


def class_weights(samples: list[Sample]) -> dict[int, float]:
    """Balanced weights n / (2 n_c), so each class contributes equally to the loss."""
    labels = np.array([s.label for s in samples])
    n = labels.size
    return {c: float(n / (2.0 * max(int((labels == c).sum()), 1))) for c in (0, 1)}


def write_split(path: Path, train: list[Sample], val: list[Sample]) -> None:
    def write(fh) -> None:
        w = csv.writer(fh)
        w.writerow(["path", "patient", "label", "subset", "part"])
        for subset, group in (("train", train), ("val", val)):
            for s in group:
                w.writerow([s.path, s.patient, CLASS_NAMES[s.label], subset, s.part])
    atomic_write(path, write)


def read_split(path: Path) -> tuple[list[Sample], list[Sample]]:
    train: list[Sample] = []
    val: list[Sample] = []
    with open(path, newline="", encoding="utf-8") as fh:
        for row in csv.DictReader(fh):
            s = Sample(row["path"], int(row["label"] == "PNEUMONIA"), row["patient"],
                       row.get("part") or "")
            (val if row["subset"] == "val" else train).append(s)
    return train, val


def load_arrays(samples: list[Sample], cfg: PreprocessConfig, perturbation: str = "clean"
                ) -> tuple[np.ndarray, np.ndarray]:
    """Decode and resize every sample with the runtime's preprocessing (uint8 N,H,W,1).

    ``perturbation`` names a row of the robustness suite
    (:data:`pneumo_edge.robustness.PERTURBATIONS`), applied before the resize
    exactly as the suite applies it: the shifted validation sets that choose the
    checkpoint and the threshold.
    """
    from concurrent.futures import ThreadPoolExecutor

    from pneumo_edge.images import ImageDecodeError, decode_gray
    from pneumo_edge.preprocess import resize_gray
    from pneumo_edge.robustness import perturb

    images = np.empty((len(samples), cfg.height, cfg.width, 1), dtype=np.uint8)

    def fill(i: int) -> None:  # OpenCV releases the GIL: threads decode in parallel
        if perturbation == "clean":
            images[i, :, :, 0] = load_gray(samples[i].path, cfg)
        else:
            gray = decode_gray(samples[i].path, target=max(cfg.height, cfg.width))
            images[i, :, :, 0] = resize_gray(perturb(gray, perturbation), cfg)

    def fill_or_name(i: int) -> None:
        try:
            fill(i)
        except ImageDecodeError as exc:  # name the file: training cannot leave a hole
            raise DataError(f"{samples[i].path}: {exc} (remove it from the data folder)"
                            ) from None

    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 2)) as pool:
        list(pool.map(fill_or_name, range(len(samples))))
    return images, np.array([s.label for s in samples], dtype=np.float32)


def to_model_input_tf(images, cfg: PreprocessConfig):
    """TensorFlow twin of :func:`pneumo_edge.preprocess.to_model_input` (after resize).

    uint8 (..., H, W, 1) -> float32 (..., H, W, channels) in ``cfg.value_range``.
    """
    import tensorflow as tf

    lo, hi = cfg.value_range
    x = tf.cast(images, tf.float32)
    if (lo, hi) != (0.0, 255.0):
        x = x * ((hi - lo) / 255.0) + lo
    if cfg.channels != 1:
        x = tf.repeat(x, cfg.channels, axis=-1)
    return x


def make_dataset(images: np.ndarray, labels: np.ndarray, cfg: PreprocessConfig, *,
                 batch_size: int, training: bool, seed: int, augment=None):
    """A shuffled (training only), augmented, batched, prefetched tf.data pipeline.

    ``images`` are the cached uint8 arrays from :func:`load_arrays`, so decoding
    happens once per run and each epoch only augments. ``augment`` maps one
    uint8 (H, W, 1) image and a seed pair to float32 (H, W, 1) in 0..255.
    """
    import tensorflow as tf

    ds = tf.data.Dataset.from_tensor_slices((images, labels))
    if training:
        ds = ds.shuffle(len(labels), seed=seed, reshuffle_each_iteration=True)
    if training and augment is not None:
        # a repeatable stream of per-image seeds for the stateless augmentation
        seeds = tf.data.Dataset.random(seed=seed).batch(2, drop_remainder=True)
        ds = tf.data.Dataset.zip((ds, seeds)).map(
            lambda xy, s: (to_model_input_tf(augment(xy[0], s), cfg), xy[1]),
            num_parallel_calls=tf.data.AUTOTUNE)
    else:
        ds = ds.map(lambda x, y: (to_model_input_tf(x, cfg), y),
                    num_parallel_calls=tf.data.AUTOTUNE)
    return ds.batch(batch_size).prefetch(tf.data.AUTOTUNE)
