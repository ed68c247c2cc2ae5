"""pneumo-edge: chest X-ray pneumonia screening on edge boxes with onnxruntime.

A research and engineering tool, not a medical device.
"""

__version__ = "0.3.0"

__all__ = [
    "__version__",
    "ModelError",
    "Prediction",
    "PredictionRun",
    "PneumoModel",
    "load_model",
    "predict_paths",
    "binary_metrics",
]


def __getattr__(name):  # lazy: `import pneumo_edge` stays cheap for the CLI
    if name in ("ModelError", "PneumoModel", "load_model"):
        from . import runtime
        return getattr(runtime, name)
    if name in ("Prediction", "PredictionRun", "predict_paths"):
        from . import predict
        return getattr(predict, name)
    if name == "binary_metrics":
        from .metrics import binary_metrics
        return binary_metrics
    raise AttributeError(f"module 'pneumo_edge' has no attribute {name!r}")
