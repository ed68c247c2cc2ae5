"""Site adaptation without TensorFlow: ``pneumo-edge calibrate``.

A hospital with a few hundred labelled X-rays adapts an exported model to its
own images, on the edge box, with numpy, onnx and onnxruntime only:

1. The model runs once over the site's labelled folders, from an in-memory copy
   of the same file with two extra graph outputs: the pooled features and the
   logit (an INT8 file's features differ from the FP32 file's, so the file being
   edited is the one that is read).
2. Either Platt scaling of the logit (two numbers; it cannot change the
   ranking), or with ``refit_head`` an L2-regularised logistic regression on the
   pooled features, shrunk towards the shipped head, its strength chosen by
   patient-grouped cross-validation. The result is written into the classifier
   tail's own weight and bias (found by graph structure); the ``cam`` head
   reads the same weights, so the mean of the map stays the logit.
3. The threshold is chosen on out-of-fold predictions; with ``refit_ood`` the
   OOD mean and whitening (Ledoit-Wolf) are refitted on the site's images and
   the OOD threshold is set on cross-fitted distances.
4. Before and after: AUC, sensitivity, specificity, calibration error and OOD
   flag rate with patient-grouped bootstrap 95 % intervals.
5. A new file (never an overwrite) with a ``site_adaptation`` metadata block
   (lineage, data manifest, fitted parameters, intervals), checked against the
   metadata contract and for parity before it is written.

Every refusal is a :class:`CalibrateError` with a one-line message.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from . import __version__
from .images import ImageDecodeError, collect_labelled
from .metrics import choose_threshold, expected_calibration_error, roc_auc
from .ood import fit_ood

__all__ = ["CalibrateError", "Tail", "OodHead", "SiteData", "CalibrationResult", "find_tail",
           "find_ood_head", "read_site", "grouped_folds", "fit_logistic", "fit_platt_logit",
           "bootstrap_intervals", "fit_head", "fit_site_ood", "calibrate", "RULES",
           "MIN_PER_CLASS", "WARN_PER_CLASS"]

RULES = ("youden", "sensitivity")
MIN_PER_CLASS = 20
#: below this many images per class the intervals are wide (Collins 2016; Snell 2021)
WARN_PER_CLASS = 100
FOLDS = 5
BOOTSTRAP = 1000
OOD_PERCENTILE = 99.0
#: L2 strengths tried for the head refit (on standardised features, mean log-loss)
LAMBDA_GRID = tuple(float(v) for v in np.logspace(-3, 1, 9))
#: probability parity of the written file against the numpy head
PARITY_TOLERANCE = 1e-4
PARITY_IMAGES = 32
#: keys of the parent's metadata whose numbers describe the parent's head and threshold,
#: not the adapted file's; they move under site_adaptation.parent_provenance
PARENT_ONLY_KEYS = ("val_metrics", "val_metrics_keras", "robustness", "heads_parity", "parity")

_SHAPE_OPS = ("Reshape", "Identity", "Flatten", "Squeeze", "Unsqueeze")
_POOL_OPS = ("GlobalAveragePool", "ReduceMean")
_QDQ_OPS = ("QuantizeLinear", "DequantizeLinear")


class CalibrateError(ValueError):
    """calibrate refused (bad model, data, option or output path); one line, exit 2."""


def _onnx():
    try:
        import onnx
        from onnx import numpy_helper
    except ImportError as exc:  # a base install brings it; a hand-trimmed one may not
        raise CalibrateError(f"calibrate needs the onnx package (pip install onnx): {exc}"
                             ) from None
    return onnx, numpy_helper


# ---------------------------------------------------------------- the graph

@dataclass(frozen=True)
class Tail:
    """The classifier tail: pooled features -> one dense unit -> sigmoid -> probability."""

    features: str          # (N, d) pooled features, the dense unit's data input
    logit: str             # the sigmoid's input
    weight: str            # float initializer, (d, 1) or with trans_b (1, d)
    bias: str              # float initializer, one value
    trans_b: bool
    dim: int


@dataclass(frozen=True)
class OodHead:
    """``ood`` = || features @ whiten + shift ||: the two initializers to rewrite."""

    whiten: str            # (d, d)
    shift: str             # (d,): -mean @ whiten


def _maps(proto):
    producer = {o: n for n in proto.graph.node for o in n.output}
    return producer, {i.name: i for i in proto.graph.initializer}


def _attr(node, name: str, default):
    for a in node.attribute:
        if a.name == name:
            return a.f if a.type == a.FLOAT else a.i
    return default


def _float_init(name: str, inits: dict, producer: dict, what: str, model: str):
    """The float32 initializer ``name``, or a refusal saying why it is not one."""
    if name in inits:
        if inits[name].data_type != 1:  # TensorProto.FLOAT
            raise CalibrateError(f"{model}: the {what} is not float32 (an FP16 file?); "
                                 "calibrate the FP32 or INT8 file")
        return inits[name]
    node = producer.get(name)
    if node is not None and node.op_type == "DequantizeLinear":
        raise CalibrateError(f"{model}: the classifier tail is quantised (its {what} comes "
                             "from DequantizeLinear); calibrate writes float weights: use a "
                             "file whose tail is float (pneumo-edge export keeps it so) or "
                             "the FP32 file")
    raise CalibrateError(f"{model}: the {what} of the classifier tail is not a constant")


def find_tail(proto, model: str = "model") -> Tail:
    """Locate the classifier tail by structure, not by initializer names.

    From the first graph output, shape-only nodes lead back to a Sigmoid; its
    input is the logit, made by ``Gemm(features, W, b)`` or
    ``Add(MatMul(features, W), b)``; the features come (through shape-only
    nodes) from a global average pooling.

    Raises:
        CalibrateError: no such tail, or its weights are quantised or not float32.
    """
    producer, inits = _maps(proto)
    node = producer.get(proto.graph.output[0].name)
    while node is not None and node.op_type in _SHAPE_OPS + _QDQ_OPS:
        node = producer.get(node.input[0])
    missing = (f"{model}: no classifier tail found (global average pooling -> one dense unit "
               "-> sigmoid -> the probability output); calibrate needs the pooled features "
               "and the logit")
    if node is None or node.op_type != "Sigmoid":
        raise CalibrateError(missing)
    logit = node.input[0]
    dense = producer.get(logit)
    if dense is None:
        raise CalibrateError(missing)
    if dense.op_type == "DequantizeLinear":
        raise CalibrateError(f"{model}: the classifier tail is quantised (its logit passes "
                             "through QuantizeLinear/DequantizeLinear); calibrate writes float "
                             "weights: use a file whose tail is float (pneumo-edge export keeps "
                             "it so) or the FP32 file")
    trans_b = False
    if dense.op_type == "Gemm":
        if (_attr(dense, "alpha", 1.0) != 1.0 or _attr(dense, "beta", 1.0) != 1.0
                or _attr(dense, "transA", 0) or len(dense.input) < 3):
            raise CalibrateError(missing)
        features, weight, bias = dense.input[0], dense.input[1], dense.input[2]
        trans_b = bool(_attr(dense, "transB", 0))
    elif dense.op_type == "Add":
        mm = [producer.get(i) for i in dense.input]
        idx = next((k for k, n in enumerate(mm) if n is not None and n.op_type == "MatMul"), None)
        if idx is None:
            raise CalibrateError(missing)
        bias = dense.input[1 - idx]
        features, weight = mm[idx].input[0], mm[idx].input[1]
    else:
        raise CalibrateError(missing)
    probe = producer.get(features)
    # an INT8 file may quantise the pooled features themselves: still the pooling's output
    while probe is not None and probe.op_type in _SHAPE_OPS + _QDQ_OPS:
        probe = producer.get(probe.input[0])
    if probe is None or probe.op_type not in _POOL_OPS:
        raise CalibrateError(missing)
    _, numpy_helper = _onnx()
    w = numpy_helper.to_array(_float_init(weight, inits, producer, "weight", model))
    b = numpy_helper.to_array(_float_init(bias, inits, producer, "bias", model))
    if w.ndim != 2 or (w.shape[0] if trans_b else w.shape[1]) != 1 or b.size != 1:
        raise CalibrateError(f"{model}: the classifier tail is not one dense unit "
                             f"(weight {list(w.shape)}, bias {list(b.shape)})")
    return Tail(features, logit, weight, bias, trans_b, int(w.size))


def find_ood_head(proto, tail: Tail, model: str = "model") -> OodHead:
    """The ``ood`` output's whitening: Sqrt(ReduceSum(z * z)) with z = features @ W + s.

    Raises:
        CalibrateError: no ``ood`` output, or not of this form.
    """
    producer, inits = _maps(proto)
    if "ood" not in [o.name for o in proto.graph.output]:
        raise CalibrateError(f"{model}: no 'ood' output to refit (--refit-ood needs a model "
                             "exported with the OOD head)")
    bad = CalibrateError(f"{model}: the 'ood' output is not a whitened distance of the pooled "
                         "features; --refit-ood cannot rewrite it")
    node = producer.get("ood")
    while node is not None and node.op_type in _SHAPE_OPS + ("Sqrt", "ReduceSum", "Mul", "Pow"):
        if node.op_type in ("Mul", "Pow") and node.input[0] in producer:
            z_node = producer[node.input[0]]
            if z_node.op_type in ("Gemm", "Add"):
                node = z_node
                break
        node = producer.get(node.input[0])
    if node is None:
        raise bad
    if node.op_type == "Gemm" and node.input[0] == tail.features and len(node.input) == 3 \
            and not _attr(node, "transB", 0):
        whiten, shift = node.input[1], node.input[2]
    elif node.op_type == "Add":
        mm = [producer.get(i) for i in node.input]
        idx = next((k for k, n in enumerate(mm) if n is not None and n.op_type == "MatMul"
                    and n.input[0] == tail.features), None)
        if idx is None:
            raise bad
        whiten, shift = mm[idx].input[1], node.input[1 - idx]
    else:
        raise bad
    if whiten not in inits or shift not in inits:
        raise bad
    _float_init(whiten, inits, producer, "OOD whitening", model)
    _float_init(shift, inits, producer, "OOD shift", model)
    return OodHead(whiten, shift)


def _with_outputs(proto, names: Sequence[str]) -> bytes:
    """A serialised copy of ``proto`` that also outputs the tensors ``names`` (float)."""
    onnx, _ = _onnx()
    from onnx import TensorProto, helper

    copy = onnx.ModelProto()
    copy.CopyFrom(proto)
    have = {o.name for o in copy.graph.output}
    for name in names:
        if name not in have:
            copy.graph.output.append(helper.make_tensor_value_info(name, TensorProto.FLOAT,
                                                                   None))
    return copy.SerializeToString()


def _session(payload: bytes, threads: int | None = None):
    import onnxruntime as ort

    from .runtime import physical_cores

    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.intra_op_num_threads = threads or physical_cores()
    so.inter_op_num_threads = 1
    return ort.InferenceSession(payload, sess_options=so, providers=["CPUExecutionProvider"])


def weights_sha256(proto) -> str:
    """Hash of every initializer (name, type, shape, bytes), in graph order."""
    h = hashlib.sha256()
    for init in proto.graph.initializer:
        h.update(init.name.encode())
        h.update(str((init.data_type, tuple(init.dims))).encode())
        h.update(init.SerializeToString())
    return h.hexdigest()


# ---------------------------------------------------------------- the site's data

@dataclass
class SiteData:
    """The model's view of the site: one row per decoded labelled image."""

    paths: list[str]
    labels: np.ndarray          # 1 = PNEUMONIA
    patients: list[str]
    features: np.ndarray        # (n, d) float64
    logits: np.ndarray          # (n,)
    probs: np.ndarray           # (n,) the file's own probability output
    ood: np.ndarray | None      # (n,) the file's ood output
    failures: list[tuple[str, str]]
    no_patient: int
    manifest_sha256: str
    parity_inputs: np.ndarray = field(repr=False)

    @property
    def n_per_class(self) -> dict[str, int]:
        return {"NORMAL": int((self.labels == 0).sum()), "PNEUMONIA": int((self.labels == 1).sum())}

    @property
    def patients_per_class(self) -> dict[str, int]:
        out = {}
        for c, name in enumerate(("NORMAL", "PNEUMONIA")):
            out[name] = len({p for p, y in zip(self.patients, self.labels) if y == c})
        return out


def labelled_site_files(data: str | os.PathLike) -> tuple[list[Path], list[int], int]:
    """(files, labels, unlabelled count) under ``data`` by predict's label rule."""
    root = Path(data)
    if not root.is_dir():
        raise CalibrateError(f"--data {data}: no such folder")
    try:
        found = collect_labelled([root])
    except (FileNotFoundError, OSError) as exc:
        raise CalibrateError(f"--data {data}: {exc}") from None
    files = [p for p, truth in found if truth is not None]
    labels = [int(truth == "PNEUMONIA") for _, truth in found if truth is not None]
    return files, labels, len(found) - len(files)


def check_counts(labels: Sequence[int], data, min_per_class: int) -> list[str]:
    """Refuse too few images per class; warnings for fewer than :data:`WARN_PER_CLASS`."""
    y = np.asarray(labels, int)
    counts = {"NORMAL": int((y == 0).sum()), "PNEUMONIA": int((y == 1).sum())}
    if not y.size:
        raise CalibrateError(f"--data {data}: no labelled images (put them in NORMAL/ and "
                             "PNEUMONIA/ folders)")
    absent = [c for c, n in counts.items() if n == 0]
    if absent:
        raise CalibrateError(f"--data {data}: only one class ({absent[0]} has no images); "
                             "calibration needs both NORMAL and PNEUMONIA")
    few = [f"{c} {n}" for c, n in counts.items() if n < min_per_class]
    if few:
        raise CalibrateError(f"--data {data}: too few labelled images ({', '.join(few)}; "
                             f"--min-per-class is {min_per_class})")
    return [f"only {n} {c} images: intervals will be wide (at least {WARN_PER_CLASS} per "
            "class is advised)" for c, n in counts.items() if n < WARN_PER_CLASS]


def _manifest(root: Path, files: Sequence[str], labels: Sequence[int]) -> str:
    """SHA-256 over (relative path, label, file SHA-256) of every image used, sorted."""
    from .runtime import file_sha256

    lines = sorted(f"{Path(os.path.relpath(f, root)).as_posix()}\t{y}\t{file_sha256(f)}"
                   for f, y in zip(files, labels))
    return hashlib.sha256("\n".join(lines).encode()).hexdigest()


def read_site(model_path: str | os.PathLike, proto, tail: Tail, data: str | os.PathLike,
              files: Sequence[Path], labels: Sequence[int], *, batch_size: int = 16,
              threads: int | None = None, progress: Callable[[int], None] | None = None
              ) -> SiteData:
    """Run the model over the site's files once, exposing features and logit.

    Undecodable files are skipped and listed in ``failures``. The probability
    the file itself outputs is checked against sigmoid(logit): a tail that does
    not reproduce it is refused.
    """
    from .metadata import parse
    from .patients import patient_key
    from .predict import decode_file
    from .preprocess import PreprocessConfig, to_model_input

    meta = parse({p.key: p.value for p in proto.metadata_props})
    cfg: PreprocessConfig = meta.preprocess
    outputs = [proto.graph.output[0].name, tail.features, tail.logit]
    has_ood = "ood" in [o.name for o in proto.graph.output] and meta.ood_threshold is not None
    if has_ood:
        outputs.append("ood")
    sess = _session(_with_outputs(proto, outputs), threads)
    input_name = sess.get_inputs()[0].name
    paths: list[str] = []
    ys: list[int] = []
    chunks: dict[str, list] = {k: [] for k in ("prob", "feat", "logit", "ood")}
    failures: list[tuple[str, str]] = []
    parity: list[np.ndarray] = []
    root = Path(data)

    def decode(path: Path):
        result = decode_file(path, cfg)
        if isinstance(result, ImageDecodeError):
            return result
        return to_model_input(result[0], cfg)

    done = 0
    workers = min(8, os.cpu_count() or 2)
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="calib-decode") as pool:
        for start in range(0, len(files), batch_size):
            part = list(zip(files[start:start + batch_size], labels[start:start + batch_size]))
            batch, kept = [], []
            for (path, y), result in zip(part, pool.map(decode, [p for p, _ in part])):
                if isinstance(result, ImageDecodeError):
                    failures.append((str(path), str(result)))
                    continue
                batch.append(result)
                kept.append((str(path), y))
            done += len(part)
            if batch:
                x = np.stack(batch).astype(np.float32)
                out = sess.run(outputs, {input_name: x})
                n = len(batch)
                chunks["prob"].append(np.asarray(out[0], np.float64).reshape(n, -1)[:, -1])
                chunks["feat"].append(np.asarray(out[1], np.float64).reshape(n, -1))
                chunks["logit"].append(np.asarray(out[2], np.float64).reshape(n))
                if has_ood:
                    chunks["ood"].append(np.asarray(out[3], np.float64).reshape(n))
                paths += [p for p, _ in kept]
                ys += [y for _, y in kept]
                if sum(len(a) for a in parity) < PARITY_IMAGES:
                    parity.append(x[:PARITY_IMAGES])
            if progress:
                progress(done)
    if not paths:
        raise CalibrateError(f"--data {data}: none of the {len(files)} labelled images could "
                             f"be decoded (first: {failures[0][0]}: {failures[0][1]})")
    probs = np.concatenate(chunks["prob"])
    logits = np.concatenate(chunks["logit"])
    feats = np.concatenate(chunks["feat"])
    if feats.shape[1] != tail.dim:
        raise CalibrateError(f"{model_path}: the pooled features have {feats.shape[1]} values "
                             f"but the dense unit has {tail.dim} weights")
    gap = float(np.max(np.abs(1.0 / (1.0 + np.exp(-logits)) - probs)))
    if gap > 1e-4:
        raise CalibrateError(f"{model_path}: the probability output is not sigmoid(logit) of "
                             f"the tail found (max difference {gap:.2e}); calibrate cannot "
                             "edit this graph")
    keys = [patient_key(p) for p in paths]
    no_patient = sum(k is None for k in keys)
    patients = [k or f"file:{Path(os.path.relpath(p, root)).as_posix()}"
                for k, p in zip(keys, paths)]
    return SiteData(paths, np.asarray(ys, int), patients, feats, logits, probs,
                    np.concatenate(chunks["ood"]) if has_ood else None, failures, no_patient,
                    _manifest(root, paths, ys), np.concatenate(parity)[:PARITY_IMAGES])


# ---------------------------------------------------------------- fitting

def grouped_folds(patients: Sequence[str], labels: Sequence[int], k: int = FOLDS,
                  seed: int = 0) -> np.ndarray:
    """Fold index per image: patients dealt to ``k`` folds, class by class, so that no
    patient spans two folds and each fold holds both classes where possible."""
    y = np.asarray(labels, int)
    by_patient: dict[str, list[int]] = {}
    for i, p in enumerate(patients):
        by_patient.setdefault(p, []).append(i)
    rng = np.random.default_rng(seed)
    fold = np.zeros(len(y), int)
    for label in (0, 1):
        group = sorted(p for p, idx in by_patient.items() if round(y[idx].mean()) == label)
        rng.shuffle(group)
        sizes = np.zeros(k)
        for p in sorted(group, key=lambda q: -len(by_patient[q])):  # big patients first
            f = int(np.argmin(sizes + rng.uniform(0, 1e-3, k)))
            fold[by_patient[p]] = f
            sizes[f] += len(by_patient[p])
    return fold


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-np.clip(z, -500, 500)))


def _newton(r: np.ndarray, y: np.ndarray, offset: np.ndarray, lam: float,
            iterations: int = 50, start: np.ndarray | None = None) -> np.ndarray:
    """Minimise mean log-loss of sigmoid(offset + r @ u + b) + lam/2 ||u||^2 (b free);
    returns theta = (u, b), starting from ``start`` (a warm start) or zero."""
    n, k = r.shape
    x = np.hstack([r, np.ones((n, 1))])
    theta = np.zeros(k + 1) if start is None else np.array(start, np.float64)
    pen = np.r_[np.full(k, lam), 0.0]

    def objective(t):
        z = offset + x @ t
        return float(np.mean(np.logaddexp(0.0, z) - y * z) + 0.5 * np.sum(pen * t * t))

    f = objective(theta)
    for _ in range(iterations):
        q = _sigmoid(offset + x @ theta)
        grad = x.T @ (q - y) / n + pen * theta
        hess = (x * (q * (1 - q))[:, None]).T @ x / n + np.diag(pen) + 1e-10 * np.eye(k + 1)
        step = np.linalg.solve(hess, grad)
        t = 1.0
        while t > 1e-6:  # backtracking: saturated logits make full steps overshoot
            cand = theta - t * step
            fc = objective(cand)
            if fc <= f + 1e-12:
                break
            t *= 0.5
        else:
            break
        theta, f_old, f = cand, f, fc
        if f_old - f < 1e-12 or np.max(np.abs(t * step)) < 1e-9:
            break
    return theta


@dataclass
class _Standardised:
    mu: np.ndarray
    sd: np.ndarray

    @classmethod
    def of(cls, x: np.ndarray) -> "_Standardised":
        sd = x.std(axis=0)
        return cls(x.mean(axis=0), np.where(sd > 1e-8 * max(sd.max(), 1e-30), sd, 1.0))

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return (x - self.mu) / self.sd


class _HeadDesign:
    """One training set's standardised features and their row space, reused for every
    L2 strength (the decomposition is the expensive part)."""

    def __init__(self, x: np.ndarray, w0: np.ndarray, b0: float):
        x = np.asarray(x, np.float64)
        self.st = _Standardised.of(x)
        z = self.st(x)
        self.v0 = np.asarray(w0, np.float64) * self.st.sd
        # x @ w + b = z @ (w * sd) + (b + mu @ w): start at the shipped head, move by
        # basis @ u (penalised) and an intercept change c (free)
        self.start = float(b0 + self.st.mu @ w0)
        self.offset = z @ self.v0 + self.start
        _, s, vt = np.linalg.svd(z, full_matrices=False)
        keep = s > s.max() * 1e-10 if s.size else s.astype(bool)
        self.basis = vt[keep].T                          # (d, k), k <= min(n, d)
        self.r = z @ self.basis

    def solve(self, y: np.ndarray, lam: float, warm: np.ndarray | None = None
              ) -> tuple[np.ndarray, float, np.ndarray]:
        """(w, b) in raw features, and theta for a warm start of the next strength."""
        theta = _newton(self.r, np.asarray(y, np.float64), self.offset, lam, start=warm)
        w = (self.v0 + self.basis @ theta[:-1]) / self.st.sd
        return w, float(self.start + theta[-1] - self.st.mu @ w), theta


def fit_logistic(x: np.ndarray, y: np.ndarray, w0: np.ndarray, b0: float, lam: float
                 ) -> tuple[np.ndarray, float]:
    """L2-regularised logistic regression shrunk towards (w0, b0): (w, b) in raw features.

    The penalty lam/2 ||(w - w0) * sd||^2 is taken on standardised features
    (scale-free), and the mean log-loss is minimised; the bias is not penalised.
    The solution lies in the row space of the standardised features, so the
    problem is solved in at most min(n, d) dimensions (an SVD), which keeps 512
    features and a few hundred images fast.
    """
    w, b, _ = _HeadDesign(x, w0, b0).solve(y, lam)
    return w, b


def fit_platt_logit(logit: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """(a, c) of sigmoid(a * logit + c), maximum likelihood with a whisper of shrinkage
    towards (1, 0) so separable data stays finite."""
    z = np.asarray(logit, np.float64)[:, None]
    sd = float(z.std()) or 1.0
    u, c = _newton(z / sd, np.asarray(y, np.float64), z[:, 0], 1e-4)
    return float(1.0 + u / sd), float(c)


def _per_fold_thresholds(y: np.ndarray, p: np.ndarray, fold: np.ndarray,
                         target: float | None) -> np.ndarray:
    """For each image, the threshold the rule picks on the other folds' predictions."""
    thr = np.zeros(len(y))
    for f in np.unique(fold):
        other = fold != f
        try:
            t, _ = choose_threshold(y[other], p[other], target)
        except ValueError:  # the other folds lack a class: use every prediction
            t, _ = choose_threshold(y, p, target)
        thr[fold == f] = t
    return thr


@dataclass
class HeadFit:
    kind: str                   # "platt" or "head"
    weight: np.ndarray          # (d,) new dense weights
    bias: float
    oof: np.ndarray             # out-of-fold probabilities
    params: dict


def fit_head(site: SiteData, w0: np.ndarray, b0: float, fold: np.ndarray, refit: bool,
             grid: Sequence[float] = LAMBDA_GRID) -> HeadFit:
    """Platt scaling (``refit`` False) or the shrunk head refit, with out-of-fold
    probabilities from the patient-grouped folds."""
    y = site.labels.astype(np.float64)
    if not refit:
        oof = np.zeros(len(y))
        for f in np.unique(fold):
            tr = fold != f
            a, c = fit_platt_logit(site.logits[tr], y[tr])
            oof[~tr] = _sigmoid(a * site.logits[~tr] + c)
        a, c = fit_platt_logit(site.logits, y)
        if not a > 0:
            raise CalibrateError(
                f"Platt scaling would invert the model's ranking on this site (slope {a:.3g}): "
                "its logit carries no usable ranking here; try --refit-head")
        return HeadFit("platt", w0 * a, float(a * b0 + c), oof,
                       {"method": "platt", "a": a, "c": c,
                        "formula": "p = sigmoid(a * logit + c), folded into the dense unit"})
    x = site.features
    # strongest penalty first: each fit warm-starts the next, weaker one
    order = sorted(grid, reverse=True)
    oofs = {lam: np.zeros(len(y)) for lam in order}
    for f in np.unique(fold):
        tr = fold != f
        design, warm = _HeadDesign(x[tr], w0, b0), None
        for lam in order:
            w, b, warm = design.solve(y[tr], lam, warm)
            oofs[lam][~tr] = _sigmoid(x[~tr] @ w + b)
    table = []
    for lam in sorted(grid):
        q = np.clip(oofs[lam], 1e-12, 1 - 1e-12)
        loss = float(-np.mean(y * np.log(q) + (1 - y) * np.log(1 - q)))
        table.append({"lambda": lam, "cv_log_loss": loss, "cv_auc": roc_auc(y, oofs[lam])})
    lam = min(table, key=lambda row: row["cv_log_loss"])["lambda"]
    oof = oofs[lam]
    w, b = fit_logistic(x, y, w0, b0, lam)
    sd = x.std(axis=0)
    return HeadFit("head", w, b, oof, {
        "method": "head_refit", "lambda": lam, "lambda_grid": table,
        "penalty": "lambda/2 * ||(w - w_shipped) * feature_sd||^2 + mean log-loss",
        "lambda_chosen_by": f"lowest out-of-fold log-loss, {len(np.unique(fold))} "
                            "patient-grouped folds",
        "relative_change": float(np.linalg.norm((w - w0) * sd)
                                 / max(np.linalg.norm(w0 * sd), 1e-12)),
        "bias_before": float(b0), "bias_after": float(b)})


@dataclass
class OodRefit:
    mean: np.ndarray
    whiten: np.ndarray
    threshold: float
    shrinkage: float
    oof_distance: np.ndarray
    flags: np.ndarray           # per image, at a threshold set without its fold


def fit_site_ood(features: np.ndarray, fold: np.ndarray, percentile: float = OOD_PERCENTILE
              ) -> OodRefit:
    """Mean and Ledoit-Wolf whitening on the site's features; the threshold from
    cross-fitted distances (each fold's distances to statistics fitted on the others),
    so it is set on images the statistics did not see."""
    dist = np.zeros(len(features))
    for f in np.unique(fold):
        tr = fold != f
        dist[~tr] = fit_ood(features[tr]).distance(features[~tr])
    flags = np.zeros(len(features), bool)
    for f in np.unique(fold):
        other = fold != f
        flags[~other] = dist[~other] > np.percentile(dist[other], percentile)
    fit = fit_ood(features)
    return OodRefit(fit.mean, fit.whiten, float(np.percentile(dist, percentile)),
                    fit.shrinkage, dist, flags)


# ---------------------------------------------------------------- intervals

def _metric_values(y, p, pred, flags) -> dict[str, float | None]:
    pos, neg = y == 1, y == 0
    return {"auc": roc_auc(y, p),
            "sensitivity": float(pred[pos].mean()) if pos.any() else None,
            "specificity": float((~pred[neg]).mean()) if neg.any() else None,
            "ece": expected_calibration_error(y, p),
            "ood_flag_rate": None if flags is None else float(flags.mean())}


def bootstrap_intervals(y: np.ndarray, p: np.ndarray, pred: np.ndarray,
                        flags: np.ndarray | None, groups: Sequence[str], n: int = BOOTSTRAP,
                        seed: int = 0) -> dict[str, dict]:
    """Point value and patient-grouped bootstrap 95 % interval of each metric.

    Patients (not images) are resampled with replacement, so images of one
    patient move together. Resamples that lack a class give no AUC,
    sensitivity or specificity and are skipped for those.
    """
    y = np.asarray(y, int)
    p = np.asarray(p, np.float64)
    pred = np.asarray(pred, bool)
    point = _metric_values(y, p, pred, flags)
    keys = {g: i for i, g in enumerate(dict.fromkeys(groups))}
    gid = np.array([keys[g] for g in groups])
    members = [np.flatnonzero(gid == i) for i in range(len(keys))]
    rng = np.random.default_rng(seed)
    draws: dict[str, list[float]] = {k: [] for k in point}
    for _ in range(n):
        idx = np.concatenate([members[i] for i in rng.integers(0, len(members), len(members))])
        vals = _metric_values(y[idx], p[idx], pred[idx], None if flags is None else flags[idx])
        for k, v in vals.items():
            if v is not None:
                draws[k].append(v)
    out = {}
    for k, v in point.items():
        if v is None:
            out[k] = None
            continue
        lo, hi = np.percentile(draws[k], [2.5, 97.5]) if draws[k] else (np.nan, np.nan)
        out[k] = {"value": round(float(v), 4), "ci95": [round(float(lo), 4), round(float(hi), 4)]}
    return out


# ---------------------------------------------------------------- the command

@dataclass
class CalibrationResult:
    out: Path
    report_path: Path
    method: str
    threshold: float
    threshold_rule: str
    before: dict
    after: dict
    counts: dict
    patients: dict
    params: dict
    ood: dict | None
    warnings: list[str]
    failures: list[tuple[str, str]]
    parity: dict
    seconds: float
    block: dict = field(repr=False, default_factory=dict)


def report_path_for(out: Path) -> Path:
    return out.with_name(out.stem + ".site_adaptation.json")


def check_options(model: Path, out: Path, rule: str, target_sensitivity: float | None,
                  min_per_class: int) -> None:
    """Every refusal that needs no model run (exit 2 before any work)."""
    if rule not in RULES:
        raise CalibrateError(f"--rule must be one of {', '.join(RULES)}, got {rule!r}")
    if rule == "sensitivity" and target_sensitivity is None:
        raise CalibrateError("--rule sensitivity needs --target-sensitivity S (e.g. 0.95)")
    if rule == "youden" and target_sensitivity is not None:
        raise CalibrateError("--target-sensitivity goes with --rule sensitivity")
    if target_sensitivity is not None and not 0.0 < target_sensitivity <= 1.0:
        raise CalibrateError(f"--target-sensitivity must be in (0, 1], got {target_sensitivity!r}")
    if min_per_class < 2:
        raise CalibrateError(f"--min-per-class must be at least 2, got {min_per_class}")
    if not model.is_file():
        raise CalibrateError(f"{model}: model file not found")
    if out.suffix.lower() != ".onnx":
        raise CalibrateError(f"--out {out}: the new model's name must end in .onnx")
    if out.exists() or out.is_symlink():
        raise CalibrateError(f"--out {out}: already exists; calibrate never overwrites a "
                             "model (choose a new name)")
    if report_path_for(out).exists():
        raise CalibrateError(f"--out {out}: {report_path_for(out)} already exists")
    if not out.parent.is_dir():
        raise CalibrateError(f"--out {out}: folder {out.parent} does not exist")
    if not os.access(out.parent, os.W_OK | os.X_OK):
        raise CalibrateError(f"--out {out}: folder {out.parent} is not writable")


def _load_proto(model: Path):
    onnx, _ = _onnx()
    from .metadata import MetadataError, parse

    try:
        proto = onnx.load(str(model))
    except Exception as exc:  # protobuf's DecodeError and friends
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise CalibrateError(f"{model}: not a loadable ONNX model ({first})") from None
    try:
        meta = parse({p.key: p.value for p in proto.metadata_props})
    except MetadataError as exc:
        raise CalibrateError(f"{model}: {exc}") from None
    if meta.precision == "fp16":
        raise CalibrateError(f"{model}: an FP16 file; calibrate the FP32 or INT8 file "
                             "(FP16 weights cannot hold the 1e-4 parity check)")
    return proto, meta


def _set_init(proto, name: str, value: np.ndarray) -> None:
    _, numpy_helper = _onnx()
    for init in proto.graph.initializer:
        if init.name == name:
            new = numpy_helper.from_array(np.asarray(value, np.float32).reshape(
                tuple(init.dims)), name)
            init.CopyFrom(new)
            return
    raise KeyError(name)


def _parity(payload: bytes, site: SiteData, fit: HeadFit, ood: OodRefit | None) -> dict:
    """The written bytes in onnxruntime against numpy on the parity images: probability
    (and, where the outputs exist, the cam mean and the OOD distance)."""
    sess = _session(payload)
    names = [o.name for o in sess.get_outputs()]
    x = site.parity_inputs
    out = dict(zip(names, sess.run(None, {sess.get_inputs()[0].name: x})))
    n = len(x)
    feats = site.features[:n]
    expect = _sigmoid(feats @ fit.weight + fit.bias)
    got = np.asarray(out[names[0]], np.float64).reshape(n, -1)[:, -1]
    result = {"n_images": int(n), "max_abs_diff_prob": float(np.max(np.abs(got - expect)))}
    if result["max_abs_diff_prob"] > PARITY_TOLERANCE:
        raise CalibrateError(f"parity failed: the new file's probabilities differ from the "
                             f"fitted head by {result['max_abs_diff_prob']:.2e} > "
                             f"{PARITY_TOLERANCE:g}; nothing written")
    if "cam" in out:
        cam_mean = np.asarray(out["cam"], np.float64).reshape(n, -1).mean(axis=1)
        logit = feats @ fit.weight + fit.bias
        result["max_abs_diff_cam_mean_vs_logit"] = float(np.max(np.abs(cam_mean - logit)))
        if result["max_abs_diff_cam_mean_vs_logit"] > 1e-3 * max(1.0, np.abs(logit).max()):
            raise CalibrateError("parity failed: the cam map's mean is no longer the logit "
                                 "(the cam head does not share the tail's weights); "
                                 "nothing written")
    if ood is not None and "ood" in out:
        want = np.sqrt(np.sum(((feats - ood.mean) @ ood.whiten) ** 2, axis=1))
        d = np.asarray(out["ood"], np.float64).reshape(-1)
        result["max_rel_diff_ood"] = float(np.max(np.abs(d - want) / np.maximum(want, 1e-6)))
        if result["max_rel_diff_ood"] > 1e-3:
            raise CalibrateError(f"parity failed: OOD distance off by "
                                 f"{result['max_rel_diff_ood']:.2e} (relative); nothing written")
    return result


def _versions() -> dict:
    import importlib.metadata as md

    versions = {"python": platform.python_version(), "pneumo-edge": __version__}
    for dist in ("numpy", "onnx", "onnxruntime", "onnxruntime-gpu"):
        try:
            versions[dist] = md.version(dist)
        except md.PackageNotFoundError:
            continue
    return versions


def calibrate(model: str | os.PathLike, data: str | os.PathLike, out: str | os.PathLike, *,
              refit_head: bool = False, refit_ood: bool = False, rule: str = "youden",
              target_sensitivity: float | None = None, min_per_class: int = MIN_PER_CLASS,
              folds: int = FOLDS, seed: int = 0, bootstrap: int = BOOTSTRAP,
              threads: int | None = None, progress: Callable[[str], None] | None = None
              ) -> CalibrationResult:
    """Adapt ``model`` to the labelled site images in ``data``; write ``out`` and its
    ``.site_adaptation.json`` report.

    Args:
        model: an exported FP32 or INT8 file with ``pneumo_edge`` metadata.
        data: folders NORMAL/ and PNEUMONIA/ (predict's label rule; DICOM included).
        out: the new model file; it must not exist.
        refit_head: refit the dense unit on the pooled features (else Platt scaling).
        refit_ood: refit the OOD statistics and threshold on the site's images.
        rule: ``youden`` (the plateau centre of Youden's J) or ``sensitivity``.
        target_sensitivity: with ``rule="sensitivity"``.
        min_per_class: refuse fewer labelled images in either class.
        folds: patient-grouped cross-validation folds.

    Raises:
        CalibrateError: every refusal, one line; nothing is written.
    """
    say = progress or (lambda msg: None)
    t0 = time.perf_counter()
    model, out = Path(model), Path(out)
    check_options(model, out, rule, target_sensitivity, min_per_class)
    if model.resolve() == out.resolve():
        raise CalibrateError(f"--out {out}: is the model itself; calibrate never overwrites")
    proto, meta = _load_proto(model)
    tail = find_tail(proto, str(model))
    ood_head = find_ood_head(proto, tail, str(model)) if refit_ood else None
    if refit_ood and meta.ood_threshold is None:
        raise CalibrateError(f"{model}: its metadata has no 'ood' threshold; --refit-ood "
                             "needs a model exported with the OOD head")
    files, labels, unlabelled = labelled_site_files(data)
    warnings = check_counts(labels, data, min_per_class)
    if unlabelled:
        warnings.append(f"{unlabelled} images outside NORMAL/ and PNEUMONIA/ folders ignored")
    say(f"running {model.name} over {len(files)} labelled images")
    marks = iter(range(1, 5))
    mark = [next(marks)]

    def images_done(n: int) -> None:  # a line at each quarter
        while mark[0] and n >= mark[0] * len(files) / 4:
            say(f"  {n} / {len(files)} images")
            mark[0] = next(marks, 0)

    site = read_site(model, proto, tail, data, files, labels, threads=threads,
                     progress=images_done)
    if site.failures:
        warnings.append(f"{len(site.failures)} images could not be decoded and were left out "
                        f"(first: {site.failures[0][0]}: {site.failures[0][1]})")
        check_counts(site.labels, data, min_per_class)  # the decoded ones must still do
    if site.no_patient:
        warnings.append(f"{site.no_patient} images carry no patient (no DICOM Patient ID, no "
                        "known file naming): each is its own group in the folds")
    y = site.labels
    n_patients = len(set(site.patients))
    k = max(2, min(folds, n_patients))
    fold = grouped_folds(site.patients, y, k, seed)
    target = target_sensitivity if rule == "sensitivity" else None

    _, numpy_helper = _onnx()
    inits = {i.name: i for i in proto.graph.initializer}
    w0 = numpy_helper.to_array(inits[tail.weight]).astype(np.float64).reshape(-1)
    b0 = float(numpy_helper.to_array(inits[tail.bias]).reshape(-1)[0])
    say("fitting " + ("the head (L2 towards the shipped head, lambda by patient-grouped CV)"
                      if refit_head else "Platt scaling of the logit")
        + f" on {len(y)} images, {n_patients} patients, {k} folds")
    fit = fit_head(site, w0, b0, fold, refit_head)
    threshold, rule_name = choose_threshold(y, fit.oof, target)
    rule_text = (f"site_{rule_name} on out-of-fold probabilities ({k} patient-grouped folds, "
                 f"{len(y)} images)")

    ood_fit = None
    ood_flags_before = None if site.ood is None else site.ood > meta.ood_threshold
    ood_flags_after = ood_flags_before
    if refit_ood:
        ood_fit = fit_site_ood(site.features, fold)
        ood_flags_after = ood_fit.flags

    before_pred = site.probs >= meta.threshold
    after_pred = fit.oof >= _per_fold_thresholds(y, fit.oof, fold, target)
    say(f"bootstrap intervals ({bootstrap} patient resamples)")
    before = bootstrap_intervals(y, site.probs, before_pred, ood_flags_before, site.patients,
                                 bootstrap, seed)
    after = bootstrap_intervals(y, fit.oof, after_pred, ood_flags_after, site.patients,
                                bootstrap, seed)

    new = _edit_graph(proto, tail, ood_head, fit, ood_fit)
    raw, block = _adapted_metadata(model, proto, new, meta, site, fit, ood_fit, k, seed,
                                   threshold, rule, rule_text, target, before, after, bootstrap)
    payload = _finalise(new, raw)
    parity = _parity(payload, site, fit, ood_fit)
    # the parity result goes into the file: finalise once more (weights unchanged)
    block["parity"] = parity
    raw["parity"] = {"reference": "numpy head on the site's pooled features",
                     **parity}
    payload = _finalise(new, raw)
    _check_contract(payload, out)
    report = {"model": str(out), "parent": str(model), **block,
              "warnings": warnings,
              "failures": [{"path": p, "error": e} for p, e in site.failures]}
    from .io import write_set

    rpath = report_path_for(out)
    write_set({out: payload, rpath: json.dumps(_finite(report), indent=2) + "\n"})
    return CalibrationResult(out, rpath, block["method"], threshold, rule_text, before, after,
                             site.n_per_class, site.patients_per_class, fit.params,
                             raw.get("ood") if ood_fit is not None else None, warnings,
                             site.failures, parity, time.perf_counter() - t0, block)


def _edit_graph(proto, tail: Tail, ood_head: OodHead | None, fit: HeadFit,
                ood_fit: OodRefit | None):
    """A copy of ``proto`` with the tail's weight and bias (which the cam head shares)
    and, with an OOD refit, the whitening constants replaced."""
    onnx, _ = _onnx()
    new = onnx.ModelProto()
    new.CopyFrom(proto)
    _set_init(new, tail.weight, fit.weight.reshape(-1, 1) if not tail.trans_b
              else fit.weight.reshape(1, -1))
    _set_init(new, tail.bias, np.array([fit.bias]))
    if ood_fit is not None:
        _set_init(new, ood_head.whiten, ood_fit.whiten)
        _set_init(new, ood_head.shift, -ood_fit.mean @ ood_fit.whiten)
    return new


def _adapted_metadata(model: Path, proto, new, meta, site: SiteData, fit: HeadFit,
                      ood_fit: OodRefit | None, k: int, seed: int, threshold: float, rule: str,
                      rule_text: str, target: float | None, before: dict, after: dict,
                      bootstrap: int) -> tuple[dict, dict]:
    """The new file's metadata (the parent's, with the new threshold, OOD block and a
    ``site_adaptation`` block) and that block."""
    y = site.labels
    raw = meta.to_dict()
    if ood_fit is not None:
        raw["ood"] = {
            "kind": "mahalanobis", "output": "ood", "threshold": round(ood_fit.threshold, 4),
            "threshold_rule": f"{OOD_PERCENTILE:g}th percentile of {len(y)} cross-fitted site "
                              f"distances ({k} patient-grouped folds)",
            "fitted_on": f"{len(y)} site images (calibrate --refit-ood)",
            "covariance": "Ledoit-Wolf shrinkage", "shrinkage": round(ood_fit.shrinkage, 4),
            "feature_dim": int(ood_fit.mean.size), "parent": raw.get("ood")}
    parent_sha = _file_sha(model)
    lineage = list((raw.get("site_adaptation") or {}).get("lineage") or [])
    lineage.append({"sha256": parent_sha, "file": model.name,
                    "created": raw.get("created"),
                    "method": (raw.get("site_adaptation") or {}).get("method", "export")})
    moved = {key: raw.pop(key) for key in PARENT_ONLY_KEYS if key in raw}
    created = datetime.now(timezone.utc).isoformat(timespec="seconds")
    block = {
        "method": fit.kind if ood_fit is None else f"{fit.kind}+ood",
        "parent": {"file": model.name, "sha256": parent_sha,
                   "weights_sha256": weights_sha256(proto),
                   "threshold": meta.threshold, "threshold_rule": meta.threshold_rule},
        "lineage": lineage,
        "weights_sha256": weights_sha256(new),
        "data": {"manifest_sha256": site.manifest_sha256,
                 "manifest": "sha256 over sorted (relative path, label, file sha256)",
                 "n_images": int(len(y)), "per_class": site.n_per_class,
                 "patients": len(set(site.patients)),
                 "patients_per_class": site.patients_per_class,
                 "no_patient_key": site.no_patient, "n_failed": len(site.failures)},
        "fit": fit.params,
        "threshold": {"value": threshold, "rule": rule, "chosen": rule_text,
                      "target_sensitivity": target},
        "cv": {"folds": k, "grouping": "patient", "seed": seed},
        "before": before, "after": after,
        "metrics_note": ("before: the parent file on every site image at its own threshold; "
                         "after: out-of-fold probabilities, each fold scored at a threshold "
                         "chosen on the other folds; 95 % intervals from "
                         f"{bootstrap} patient-grouped bootstrap resamples"),
        "ood_refit": ood_fit is not None,
        "parent_provenance": moved,
        "versions": _versions(),
        "created": created,
    }
    raw.update({"threshold": threshold, "threshold_rule": rule_text, "created": created,
                "pneumo_edge_version": __version__, "site_adaptation": block})
    if "trained_on" in raw:
        raw["trained_on"] = f"{raw['trained_on']}; adapted to a site ({len(y)} images)"
    return raw, block


def _file_sha(path: Path) -> str:
    from .runtime import file_sha256

    return file_sha256(path)


def _finite(obj):
    from .metadata import finite_json

    return finite_json(obj)


def _finalise(proto, meta: dict) -> bytes:
    """Metadata validated by the contract, checked by onnx.checker, serialised."""
    onnx, _ = _onnx()
    from onnx import helper

    from .metadata import METADATA_KEY, MetadataError, validate

    meta = _finite(meta)
    try:
        validate(meta)
    except MetadataError as exc:
        raise CalibrateError(f"refusing to write metadata that breaks the contract: {exc}"
                             ) from None
    del proto.metadata_props[:]
    helper.set_model_props(proto, {METADATA_KEY: json.dumps(meta, allow_nan=False)})
    proto.producer_name = "pneumo-edge calibrate"
    proto.producer_version = __version__
    try:
        onnx.checker.check_model(proto)
    except Exception as exc:  # onnx.checker.ValidationError
        raise CalibrateError(f"the edited graph fails onnx.checker ({str(exc).splitlines()[0]})"
                             ) from None
    return proto.SerializeToString()


def _check_contract(payload: bytes, out: Path) -> None:
    """The bytes as the runtime will read them: metadata parsed, graph checked."""
    from .metadata import MetadataError, check_graph, parse

    sess = _session(payload, 1)
    try:
        meta = parse(sess.get_modelmeta().custom_metadata_map)
        check_graph(meta, sess.get_inputs(), sess.get_outputs())
    except MetadataError as exc:
        raise CalibrateError(f"{out}: the new file breaks the contract ({exc}); nothing "
                             "written") from None
