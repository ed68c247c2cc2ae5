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
