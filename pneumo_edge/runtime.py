"""ONNX models with ``pneumo_edge`` metadata on onnxruntime: load, choose a provider, run."""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .metadata import (CAM_OUTPUT, LUNG_AREA_OUTPUT, LUNG_BOX_OUTPUT, METADATA_KEY, OOD_OUTPUT,
                       SCHEMA_VERSION, MetadataError, ModelMetadata, PreprocessConfig,
                       check_graph, parse)
from .options import Device, choices

__all__ = ["METADATA_KEY", "SCHEMA_VERSION", "ModelError", "PneumoModel", "load_model",
           "default_model_path", "read_metadata", "file_sha256"]

DEVICES = choices(Device)
#: How far a probability may stray outside [0, 1] by float rounding before the
#: model is refused (it is then clipped).
PROB_TOLERANCE = 1e-5
#: The shapes each output may have for a batch of N images (the model contract).
_ONE_PER_IMAGE = (("N",), ("N", 1))
_MAP_PER_IMAGE = (("N", None, None), ("N", None, None, 1))
_BOX_PER_IMAGE = (("N", 4),)


class ModelError(RuntimeError):
    """The model file cannot be used (missing, not ONNX, no or bad metadata, bad provider)."""


def file_sha256(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _ort():
    import onnxruntime as ort  # imported on first use: keeps `--help` fast
    return ort


def _open_session(path: str | os.PathLike, so, providers: list):
    """Create a session with onnxruntime's logger silenced.

    onnxruntime-gpu logs a multi-line error when the CUDA provider cannot load
    (no driver, no cuDNN); in ``auto`` mode that is expected, not an error.

    Raises:
        ModelError: the file is not a loadable ONNX model.
    """
    ort = _ort()
    ort.set_default_logger_severity(4)
    try:
        return ort.InferenceSession(str(path), sess_options=so, providers=providers)
    except Exception as exc:  # onnxruntime raises its own exception types
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelError(f"{path}: not a loadable ONNX model ({first})") from None
    finally:
        ort.set_default_logger_severity(3)


def _metadata(session, path) -> ModelMetadata:
    try:
        meta = parse(session.get_modelmeta().custom_metadata_map)
        check_graph(meta, session.get_inputs(), session.get_outputs())
    except MetadataError as exc:
        raise ModelError(f"{path}: {exc}") from None
    return meta


@dataclass
class PneumoModel:
    """A loaded model: its metadata, preprocessing, threshold and onnxruntime session."""

    path: Path
    metadata: ModelMetadata
    session: Any = field(repr=False)
    provider: str
    sha256: str

    def __post_init__(self) -> None:
        # read once per model, not per image; check_graph has matched both to the graph.
        # A model whose metadata does not list its outputs is described by its graph.
        self.input_name = self.metadata.input_name
        self.output_names = list(self.metadata.output_names) or [
            o.name for o in self.session.get_outputs()]
        # check_graph allows a batch dimension fixed at 1 (an export without a dynamic
        # axis): such a model is run one image at a time
        dim = self.session.get_inputs()[0].shape[0]
        self.max_batch: int | None = dim if isinstance(dim, int) and dim > 0 else None

    @property
    def meta(self) -> dict[str, Any]:
        """The metadata as stored (provenance included)."""
        return self.metadata.to_dict()

    @property
    def preprocess(self) -> PreprocessConfig:
        return self.metadata.preprocess

    @property
    def threshold(self) -> float:
        return self.metadata.threshold

    @property
    def precision(self) -> str:
        return self.metadata.precision

    @property
    def has_cam(self) -> bool:
        return CAM_OUTPUT in self.output_names[1:]

    @property
    def ood_threshold(self) -> float | None:
        """The OOD threshold when the model has an ``ood`` output and metadata for it."""
        return self.metadata.ood_threshold if OOD_OUTPUT in self.output_names[1:] else None

    def run_all(self, batch: np.ndarray) -> dict[str, np.ndarray | None]:
        """Every output for a float32 (N, H, W, C) batch.

        Returns ``prob`` (N,), ``cam`` (N, h, w) logits or None, ``ood`` (N,) or None,
        and for models with the lung-field stage ``lung_box`` (N, 4) and ``lung_area``
        (N,) (None otherwise). A model with a fixed batch of 1 is run image by image.

        Raises:
            ModelError: the model failed on the batch, an output does not have the
                contract's shape for N images (a probability per image, never another
                image's), or the probability is not a finite number in [0, 1] (a broken
                or foreign model: never a silent label).
        """
        step = self.max_batch or len(batch)
        if len(batch) <= step:
            return self._run_checked(batch)
        parts = [self._run_checked(batch[i:i + step]) for i in range(0, len(batch), step)]
        return {k: None if parts[0][k] is None else np.concatenate([p[k] for p in parts])
                for k in parts[0]}

    def _run_checked(self, batch: np.ndarray) -> dict[str, np.ndarray | None]:
        n = len(batch)
        try:
            out = self.session.run(None, {self.input_name: np.ascontiguousarray(batch,
                                                                               np.float32)})
        except Exception as exc:  # onnxruntime raises its own exception types
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise ModelError(f"{self.path}: the model failed on a batch of {n} images "
                             f"({first})") from None
        named = dict(zip(self.output_names, out))
        prob = self._shaped(self.output_names[0], out[0], n, _ONE_PER_IMAGE)
        prob = np.asarray(prob, dtype=np.float64).reshape(n)
        # float32 sigmoid kernels may return 1 + 1.2e-7: rounding, not a broken model
        ok = np.isfinite(prob) & (prob >= -PROB_TOLERANCE) & (prob <= 1.0 + PROB_TOLERANCE)
        if not np.all(ok):
            bad = float(prob[~ok][0])
            raise ModelError(f"{self.path}: the model's output {bad!r} is not a probability "
                             "in [0, 1]; refusing to label anything with it")
        prob = np.clip(prob, 0.0, 1.0)
        cam = named.get(CAM_OUTPUT) if self.has_cam else None
        ood = named.get(OOD_OUTPUT) if self.ood_threshold is not None else None
        box, area = named.get(LUNG_BOX_OUTPUT), named.get(LUNG_AREA_OUTPUT)
        has_lung = box is not None and area is not None
        if cam is not None:
            cam = self._shaped(CAM_OUTPUT, cam, n, _MAP_PER_IMAGE)
        return {"prob": prob,
                "cam": None if cam is None else np.asarray(cam, np.float32).reshape(
                    n, *np.shape(cam)[1:3]),
                "ood": None if ood is None else np.asarray(
                    self._shaped(OOD_OUTPUT, ood, n, _ONE_PER_IMAGE), np.float64).reshape(n),
                "lung_box": np.asarray(self._shaped(LUNG_BOX_OUTPUT, box, n, _BOX_PER_IMAGE),
                                       np.float64).reshape(n, 4) if has_lung else None,
                "lung_area": np.asarray(self._shaped(LUNG_AREA_OUTPUT, area, n,
                                                     _ONE_PER_IMAGE), np.float64).reshape(n)
                if has_lung else None}

    def _shaped(self, name: str, value, n: int, shapes: tuple[tuple, ...]) -> np.ndarray:
        """``value`` when its shape is one of ``shapes`` for ``n`` images ("N": the
        batch, None: any size >= 1, an int: exactly that), else ModelError naming the
        model and the output."""
        arr = np.asarray(value)
        for want in shapes:
            if len(want) == arr.ndim and all(
                    (w == "N" and d == n) or (w is None and d >= 1) or w == d
                    for w, d in zip(want, arr.shape)):
                return arr
        wanted = " or ".join("(" + ", ".join("h" if w is None else str(w) for w in s) + ")"
                             for s in shapes)
        raise ModelError(f"{self.path}: output {name!r} has shape {list(arr.shape)} for a "
                         f"batch of {n} images; the contract is {wanted} with N = {n}; "
                         "refusing to use the model")

    def run(self, batch: np.ndarray) -> np.ndarray:
        """P(PNEUMONIA) for a float32 (N, H, W, C) batch, shape (N,)."""
        return self.run_all(batch)["prob"]

    def summary(self) -> dict[str, Any]:
        """The report's ``model`` entry."""
        cfg = self.preprocess
        return {"path": str(self.path), "sha256": self.sha256, "precision": self.precision,
                "threshold": self.threshold, "provider": self.provider,
                "arch": self.metadata.provenance.get("arch"),
                "input_size": [cfg.height, cfg.width],
                "outputs": self.output_names, "ood_threshold": self.ood_threshold}


def _providers_for(device: str) -> list:
    ort = _ort()
    available = ort.get_available_providers()
    if device == "cpu":
        return ["CPUExecutionProvider"]
    if "CUDAExecutionProvider" not in available:
        if device == "cuda":
            raise ModelError("--device cuda: this onnxruntime build has no CUDA provider "
                             "(install onnxruntime-gpu on Linux x86-64 or Windows); "
                             "use --device auto or cpu")
        return ["CPUExecutionProvider"]
    return ["CUDAExecutionProvider", "CPUExecutionProvider"]


def physical_cores() -> int:
    """Physical cores (hyper-threads share the FPU, so more threads rarely help)."""
    try:
        cores = set()
        with open("/proc/cpuinfo") as fh:
            phys = core = None
            for line in fh:
                if line.startswith("physical id"):
                    phys = line.split(":")[1].strip()
                elif line.startswith("core id"):
                    core = line.split(":")[1].strip()
                    cores.add((phys, core))
        if cores:
            return min(len(cores), os.cpu_count() or len(cores))
    except OSError:
        pass
    return os.cpu_count() or 1


def load_model(path: str | os.PathLike, device: str = "auto", threads: int | None = None,
               warmup: int = 1, spin: bool = False) -> PneumoModel:
    """Open an exported model and its metadata on the chosen device.

    Args:
        path: an ONNX file carrying ``pneumo_edge`` metadata.
        device: ``auto`` (CUDA only if it really loads, else CPU), ``cpu`` or ``cuda``.
        threads: intra-op threads; default the machine's physical cores.
        warmup: dummy runs before returning, so the first real image is not slow.
        spin: let idle worker threads busy-wait (lower latency for back-to-back runs,
            but they compete with decoding threads).

    Raises:
        ModelError: missing file, not ONNX, no metadata, or ``cuda`` unavailable.
    """
    path = Path(path)
    if device not in DEVICES:
        raise ModelError(f"unknown device {device!r}; choose from {', '.join(DEVICES)}")
    if not path.is_file():
        raise ModelError(f"{path}: model file not found")
    ort = _ort()
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.intra_op_num_threads = threads or physical_cores()
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    # Idle onnxruntime threads spin by default, stealing the cores that decode the
    # next images; without spinning the predict pipeline ran ~5 % faster here.
    so.add_session_config_entry("session.intra_op.allow_spinning", "1" if spin else "0")
    providers = _providers_for(device)
    session = _open_session(path, so, providers)
    in_use = session.get_providers()[0]
    if device == "cuda" and in_use != "CUDAExecutionProvider":
        raise ModelError("--device cuda: the CUDA provider did not load (no GPU, driver, "
                         "CUDA or cuDNN); use --device auto or cpu")
    meta = _metadata(session, path)
    model = PneumoModel(path=path, metadata=meta, session=session,
                        provider=in_use.replace("ExecutionProvider", "").lower(),
                        sha256=file_sha256(path))
    cfg = model.preprocess
    dummy = np.zeros((1, cfg.height, cfg.width, cfg.channels), np.float32)
    for _ in range(max(warmup, 0)):
        model.run(dummy)
    if model.max_batch is None:
        # two images, once: a model whose outputs ignore the batch (or give two rows per
        # image) is refused here, before any file is decoded, whatever the engine
        model.run_all(np.zeros((2, *dummy.shape[1:]), np.float32))
    return model


def read_metadata(path: str | os.PathLike) -> tuple[dict[str, Any], list[dict], list[dict]]:
    """Metadata, inputs and outputs of a model file, without running it."""
    ort = _ort()
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = _open_session(path, so, ["CPUExecutionProvider"])
    meta = _metadata(session, path).to_dict()
    ios = lambda items: [{"name": i.name, "shape": list(i.shape), "type": i.type} for i in items]
    return meta, ios(session.get_inputs()), ios(session.get_outputs())


def _release_folder() -> Path | None:
    """The release models' folder: installed as ``pneumo_edge.release`` (the repository's
    ``exported/``), or ``exported/`` beside the package in a source checkout."""
    try:
        from importlib.resources import files

        folder = Path(str(files("pneumo_edge.release")))
        if (folder / "default.txt").is_file():
            return folder
    except (ImportError, ModuleNotFoundError, TypeError):
        pass
    folder = Path(__file__).resolve().parents[1] / "exported"
    return folder if (folder / "default.txt").is_file() else None


def default_model_path() -> Path | None:
    """The release model used when ``--model`` is not given.

    ``$PNEUMO_EDGE_MODEL`` if set; else the file named in the release folder's
    ``default.txt``, shipped inside the installed package. The current folder is
    never consulted: no folder can plant a model.
    """
    env = os.environ.get("PNEUMO_EDGE_MODEL")
    if env:
        return Path(env)
    folder = _release_folder()
    if folder is None:
        return None
    name = (folder / "default.txt").read_text(encoding="utf-8").strip()
    return folder / name if name and "/" not in name and "\\" not in name else None
