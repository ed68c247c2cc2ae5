"""The robustness suite: re-run labelled images under fixed, seeded perturbations.

Each perturbation is applied to the decoded greyscale image at its decoded
resolution (before the model's resize), the way a different X-ray machine,
collimation or JPEG pipeline would change it; then the model's own
preprocessing runs. Every row reports AUC, sensitivity and specificity at the
model's threshold, the mean |p - p_clean| and the share of labels that flip
against the clean row. numpy and OpenCV only, so it runs on any exported model
(FP32, FP16, INT8) on an edge box, and on a Keras run through a callable.

Zoom rows are the known failure of this dataset (framing): ``zoom_in_10``
crops the central 90 % of each side; ``zoom_out_10`` shrinks the image to
1/1.1 of each side inside a black border (the X-ray framed 10 % wider).

Border rows are everyday framing that a model must ignore: ``border_black_3``
pads every side with black 3 % of that side wide (letterboxed exports, DICOM
padding, collimation); ``letterbox_tb_10`` / ``letterbox_lr_10`` pad top and
bottom (left and right) with 10 % black bars; ``border_white_3`` pads with
saturated white; ``corner_black_15`` blacks out one corner rectangle, 15 % of
each side (privacy blackout; the corner follows the per-image seed);
``text_label`` burns a white text label into a top corner and ``marker_lr`` an
"L" or "R" marker, as modalities and PACS exports do.
"""

from __future__ import annotations

import os
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Sequence

import cv2
import numpy as np

from .images import decode_gray
from .metrics import binary_metrics
from .preprocess import PreprocessConfig, to_model_input

__all__ = ["BORDER_ROWS", "FRAMING_ROWS", "PERTURBATIONS", "RobustnessRow", "RobustnessResult",
           "VIEWS", "in_view", "perturb", "perturbed_input", "run_suite", "view_masks",
           "ZOOM_ROWS"]

#: Row names in report order; ``clean`` first. Parameters are fixed: results
#: are comparable between models and runs.
PERTURBATIONS: tuple[str, ...] = (
    "clean",
    "zoom_in_5", "zoom_in_10", "zoom_in_15",
    "zoom_out_5", "zoom_out_10", "zoom_out_15",
    "shift_8", "rotate_+10", "rotate_-10",
    "gamma_0.7", "gamma_1.4",
    "blur", "noise", "jpeg_30", "down_up_half",
    "border_black_2", "border_black_3", "border_black_5",
    "letterbox_tb_10", "letterbox_lr_10", "border_white_3",
    "corner_black_15", "text_label", "marker_lr",
)
ZOOM_ROWS = tuple(n for n in PERTURBATIONS if n.startswith("zoom"))
#: Rows that add borders, bars, blackouts or burned-in text to the frame.
BORDER_ROWS = tuple(n for n in PERTURBATIONS
                    if n.startswith(("border_", "letterbox_", "corner_")) or n in (
                        "text_label", "marker_lr"))
#: Every framing row: the ones the threshold rule and the release criteria hold on.
FRAMING_ROWS = ZOOM_ROWS + BORDER_ROWS

#: Validation views of a ``--split block`` run; a file's ``part`` names its view, and the
#: shared part (the PNEUMONIA patients) is in each.
VIEWS = ("block", "patient")
SHARED_PART = "both"


def in_view(part: str, view: str) -> bool:
    """Whether a validation file of ``part`` belongs to ``view``."""
    return part in (view, SHARED_PART)


def view_masks(parts) -> dict[str, np.ndarray]:
    """Boolean masks over the files for each view; empty when no file has a part (a
    plain patient split)."""
    parts = np.asarray(parts, dtype=str)
    if not (parts != "").any():
        return {}
    return {view: (parts == view) | (parts == SHARED_PART) for view in VIEWS}


def _affine(gray: np.ndarray, matrix: np.ndarray) -> np.ndarray:
    h, w = gray.shape
    return cv2.warpAffine(gray, matrix, (w, h), flags=cv2.INTER_LINEAR,
                          borderMode=cv2.BORDER_CONSTANT, borderValue=0)


def _pad(gray: np.ndarray, top: float, bottom: float, left: float, right: float,
         value: int = 0) -> np.ndarray:
    # each margin is a fraction of the side it extends (at least one pixel when > 0)
    h, w = gray.shape

    def px(f: float, side: int) -> int:
        return max(int(round(f * side)), 1) if f > 0 else 0

    return cv2.copyMakeBorder(gray, px(top, h), px(bottom, h), px(left, w), px(right, w),
                              cv2.BORDER_CONSTANT, value=value)


def _burn_text(gray: np.ndarray, text: str, corner: int) -> np.ndarray:
    # white text with a dark outline, about 5 % of the image height, in a top corner
    h, w = gray.shape
    out = gray.copy()
    scale = max(h, w) / 600.0
    thick = max(int(round(2 * scale)), 1)
    (tw, th), _ = cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, scale, thick)
    x = int(0.03 * w) if corner % 2 == 0 else max(w - tw - int(0.03 * w), 0)
    y = int(0.04 * h) + th
    cv2.putText(out, text, (x, y), cv2.FONT_HERSHEY_SIMPLEX, scale, 0, thick * 3, cv2.LINE_AA)
    cv2.putText(out, text, (x, y), cv2.FONT_HERSHEY_SIMPLEX, scale, 255, thick, cv2.LINE_AA)
    return out


def _seed_of(key: str) -> int:
    # a stable per-image seed (Python's hash() is salted per process)
    return zlib.crc32(key.encode("utf-8", "surrogateescape"))


def perturb(gray: np.ndarray, name: str, seed: int = 0) -> np.ndarray:
    """Apply the named perturbation to a 2-D uint8 image; returns 2-D uint8.

    Raises:
        ValueError: unknown name.
    """
    h, w = gray.shape
    if name == "clean":
        return gray
    if name.startswith("zoom_in_"):
        f = 1.0 - int(name.rsplit("_", 1)[1]) / 100.0
        ch, cw = max(int(round(h * f)), 1), max(int(round(w * f)), 1)
        y0, x0 = (h - ch) // 2, (w - cw) // 2
        return np.ascontiguousarray(gray[y0:y0 + ch, x0:x0 + cw])
    if name.startswith("zoom_out_"):
        f = 1.0 / (1.0 + int(name.rsplit("_", 1)[1]) / 100.0)
        return _affine(gray, cv2.getRotationMatrix2D(((w - 1) / 2, (h - 1) / 2), 0.0, f))
    if name == "shift_8":
        return _affine(gray, np.float32([[1, 0, 0.08 * w], [0, 1, 0.08 * h]]))
    if name.startswith("rotate_"):
        angle = float(name.split("_", 1)[1])
        return _affine(gray, cv2.getRotationMatrix2D(((w - 1) / 2, (h - 1) / 2), angle, 1.0))
    if name.startswith("gamma_"):
        g = float(name.split("_", 1)[1])
        lut = np.clip(255.0 * (np.arange(256) / 255.0) ** g + 0.5, 0, 255).astype(np.uint8)
        return cv2.LUT(gray, lut)
    if name == "blur":  # about 1 px of the model input: sigma relative to the image side
        sigma = max(h, w) / 224.0 * 1.2
        return cv2.GaussianBlur(gray, (0, 0), sigma)
    if name == "noise":
        rng = np.random.default_rng(seed)
        noisy = gray.astype(np.float32) + rng.normal(0.0, 8.0, gray.shape).astype(np.float32)
        return np.clip(noisy + 0.5, 0, 255).astype(np.uint8)
    if name == "jpeg_30":
        ok, buf = cv2.imencode(".jpg", gray, [cv2.IMWRITE_JPEG_QUALITY, 30])
        if not ok:
            raise ValueError("JPEG encoding failed")
        return cv2.imdecode(buf, cv2.IMREAD_GRAYSCALE)
    if name == "down_up_half":
        small = cv2.resize(gray, (max(w // 2, 1), max(h // 2, 1)), interpolation=cv2.INTER_AREA)
        return cv2.resize(small, (w, h), interpolation=cv2.INTER_LINEAR)
    if name.startswith("border_"):
        _, colour, pct = name.split("_")
        f = int(pct) / 100.0
        return _pad(gray, f, f, f, f, 0 if colour == "black" else 255)
    if name == "letterbox_tb_10":
        return _pad(gray, 0.10, 0.10, 0.0, 0.0)
    if name == "letterbox_lr_10":
        return _pad(gray, 0.0, 0.0, 0.10, 0.10)
    if name == "corner_black_15":
        corner = seed % 4
        ch, cw = max(int(round(0.15 * h)), 1), max(int(round(0.15 * w)), 1)
        out = gray.copy()
        ys = slice(0, ch) if corner < 2 else slice(h - ch, h)
        xs = slice(0, cw) if corner % 2 == 0 else slice(w - cw, w)
        out[ys, xs] = 0
        return out
    if name == "text_label":
        return _burn_text(gray, "PORTABLE AP 14:32", seed % 2)
    if name == "marker_lr":
        return _burn_text(gray, "R" if seed % 2 else "L", seed // 2 % 2)
    raise ValueError(f"unknown perturbation {name!r}; choose from {', '.join(PERTURBATIONS)}")


def perturbed_input(path: str | os.PathLike, cfg: PreprocessConfig, name: str,
                    seed: int = 0) -> np.ndarray:
    """Decode ``path``, apply one perturbation, and return the model input (float32 HWC)."""
    gray = decode_gray(path, target=max(cfg.height, cfg.width))
    return to_model_input(perturb(gray, name, seed), cfg)


@dataclass(frozen=True)
class RobustnessRow:
    perturbation: str
    auc: float | None
    sensitivity: float
    specificity: float
    accuracy: float
    mean_abs_dp: float
    flipped: float
    n: int

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class RobustnessResult:
    """Rows of one model on one labelled set, and the probabilities behind them."""

    model: str
    threshold: float
    n_images: int
    n_failed: int
    rows: list[RobustnessRow]
    probs: dict[str, np.ndarray]
    labels: np.ndarray
    #: positions in the scored files of the images behind ``labels`` (failed decodes left out)
    index: np.ndarray | None = None

    def row(self, name: str) -> RobustnessRow:
        return next(r for r in self.rows if r.perturbation == name)

    def worst(self) -> dict:
        """The worst value of each figure over the rows, and the row it came from."""
        out = {}
        for key, pick in (("auc", min), ("sensitivity", min), ("specificity", min),
                          ("mean_abs_dp", max), ("flipped", max)):
            rows = [r for r in self.rows if getattr(r, key) is not None]
            if rows:
                r = pick(rows, key=lambda r: getattr(r, key))
                out[key] = {"value": round(float(getattr(r, key)), 6), "row": r.perturbation}
        return out

    def agreement_with(self, reference: "RobustnessResult") -> dict[str, float]:
        """Per row: share of images whose label equals the reference model's label."""
        return {name: float(np.mean((self.probs[name] >= self.threshold)
                                    == (reference.probs[name] >= reference.threshold)))
                for name in self.probs if name in reference.probs}

    def subset(self, mask: np.ndarray) -> "RobustnessResult":
        """The same model's rows on the scored files where ``mask`` (one value per file
        given to :func:`run_suite`) is true: a validation view."""
        mask = np.asarray(mask, bool)
        if mask.ndim != 1 or mask.size != self.n_images:
            raise ValueError(f"mask of {mask.size} values for {self.n_images} files")
        index = self.index if self.index is not None else np.arange(self.labels.size)
        mask = mask[index]
        probs = {name: p[mask] for name, p in self.probs.items()}
        labels = self.labels[mask]
        return RobustnessResult(self.model, self.threshold, int(mask.sum()), 0,
                                _rows(probs, labels, self.threshold), probs, labels,
                                np.arange(int(mask.sum())))

    def to_dict(self) -> dict:
        return {"model": self.model, "threshold": self.threshold, "n_images": self.n_images,
                "n_failed": self.n_failed, "rows": [r.to_dict() for r in self.rows],
                "worst": self.worst()}


def _rows(probs: dict[str, np.ndarray], labels: np.ndarray, thr: float) -> list[RobustnessRow]:
    clean = probs["clean"]
    rows = []
    for name, p in probs.items():
        m = binary_metrics(labels, p, thr)
        rows.append(RobustnessRow(
            perturbation=name, auc=m.auc, sensitivity=m.recall, specificity=m.specificity,
            accuracy=m.accuracy, mean_abs_dp=float(np.mean(np.abs(p - clean))),
            flipped=float(np.mean((p >= thr) != (clean >= thr))), n=int(labels.size)))
    return rows


def run_suite(predict: Callable[[np.ndarray], np.ndarray], cfg: PreprocessConfig,
              files: Sequence[str | os.PathLike], labels: Sequence[int], threshold: float, *,
              perturbations: Sequence[str] = PERTURBATIONS, batch_size: int = 32,
              workers: int | None = None, model_name: str = "model",
              progress: Callable[[str], None] | None = None) -> RobustnessResult:
    """Score a model on every perturbation of the labelled ``files``.

    Args:
        predict: float32 (N, H, W, C) batch -> P(PNEUMONIA) (N,), e.g. ``PneumoModel.run``.
        cfg: the model's preprocessing.
        files, labels: the images and their truth (1 = PNEUMONIA).
        threshold: the model's decision threshold.

    Files that fail to decode are left out of every row (counted in ``n_failed``).
    Memory: one decoded image per worker and one batch of inputs at a time.
    """
    names = list(perturbations)
    if "clean" not in names:
        names.insert(0, "clean")
    for name in names:
        perturb(np.zeros((8, 8), np.uint8), name)  # unknown names fail before any work
    target = max(cfg.height, cfg.width)
    workers = workers or min(8, os.cpu_count() or 2)

    def inputs(path) -> np.ndarray | None:
        try:
            gray = decode_gray(path, target=target)
        except Exception:
            return None
        seed = _seed_of(str(path))
        return np.stack([to_model_input(perturb(gray, n, seed), cfg) for n in names])

    ok_labels: list[int] = []
    ok_index: list[int] = []
    out: list[np.ndarray] = []  # (n_ok, n_rows)
    failed = 0
    files = list(files)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        for start in range(0, len(files), batch_size):
            chunk = list(pool.map(inputs, files[start:start + batch_size]))
            good = [(x, int(y), start + i) for i, (x, y)
                    in enumerate(zip(chunk, labels[start:start + batch_size])) if x is not None]
            failed += len(chunk) - len(good)
            if not good:
                continue
            x = np.stack([g[0] for g in good])  # (B, rows, H, W, C)
            b, r = x.shape[:2]
            p = np.asarray(predict(x.reshape(b * r, *x.shape[2:])), np.float64).reshape(b, r)
            out.append(p)
            ok_labels.extend(g[1] for g in good)
            ok_index.extend(g[2] for g in good)
            if progress:
                progress(f"{min(start + batch_size, len(files))}/{len(files)} images")
    if not out:
        raise ValueError("no image of the robustness set could be decoded")
    allp = np.concatenate(out)
    y = np.asarray(ok_labels)
    probs = {n: allp[:, i] for i, n in enumerate(names)}
    return RobustnessResult(model=model_name, threshold=float(threshold),
                            n_images=len(files), n_failed=failed,
                            rows=_rows(probs, y, threshold), probs=probs, labels=y,
                            index=np.asarray(ok_index))


def read_split_csv(csv_path: str | os.PathLike, root: str | os.PathLike | None = None,
                   subset: str | None = "val", view: str | None = None
                   ) -> tuple[list[str], list[int]]:
    """Files and labels from a ``val_split.csv`` (export) or ``split.csv`` (a run).

    Relative paths are resolved against ``root`` (default: the CSV's folder).
    Rows with a ``subset`` column are kept only when it equals ``subset``; with ``view``
    (a ``--split block`` run's "block" or "patient"), only rows whose ``part`` is that
    view or "both".
    """
    import csv

    base = Path(root) if root is not None else Path(csv_path).parent
    files, labels = [], []
    with open(csv_path, newline="", encoding="utf-8") as fh:
        for row in csv.DictReader(fh):
            if subset and row.get("subset", subset) != subset:
                continue
            if view and not in_view(row.get("part") or "", view):
                continue
            p = Path(row["path"])
            files.append(str(p if p.is_absolute() else base / p))
            labels.append(int(row["label"].upper() == "PNEUMONIA"))
    return files, labels


def labelled_files(folder: str | os.PathLike) -> tuple[list[str], list[int]]:
    """Every image below ``folder`` that a NORMAL/PNEUMONIA folder at or below it labels."""
    from .images import collect_labelled

    items = [(str(p), int(t == "PNEUMONIA")) for p, t in collect_labelled([folder]) if t]
    return [f for f, _ in items], [y for _, y in items]
