"""The TensorFlow side of pneumo-edge: data, models, training and ONNX export.

Installed with the ``train`` extra. The edge runtime (``pneumo_edge``) never
imports this package at import time.
"""

__all__ = ["TrainConfig", "train", "create_model", "export_run"]


def __getattr__(name):  # keep `import training` cheap; TensorFlow loads on first use
    if name in ("TrainConfig", "train"):
        from . import train as _train
        return getattr(_train, name)
    if name == "create_model":
        from .models import create_model
        return create_model
    if name == "export_run":
        from .export import export_run
        return export_run
    raise AttributeError(name)


def environment() -> dict:
    """Versions of the stack and the source revision, recorded in run folders and models."""
    import importlib.metadata as md
    import platform
    import subprocess
    from pathlib import Path

    versions = {"python": platform.python_version()}
    for dist in ("tensorflow-cpu", "tensorflow", "keras", "tf2onnx", "onnx", "onnxruntime-gpu",
                 "onnxruntime", "onnxconverter-common", "numpy", "opencv-python-headless"):
        try:
            versions[dist] = md.version(dist)
        except md.PackageNotFoundError:
            continue
    root = Path(__file__).resolve().parents[1]
    try:
        rev = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True,
                             text=True, timeout=5).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--",
                                "pneumo_edge", "training"], capture_output=True, text=True,
                               timeout=5).stdout.strip()
        versions["source_revision"] = (rev + ("+local changes" if dirty else "")) or None
    except (OSError, subprocess.SubprocessError):
        versions["source_revision"] = None
    return versions
