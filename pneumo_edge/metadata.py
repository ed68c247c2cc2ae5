"""The model contract: the ``pneumo_edge`` metadata every exported ONNX file carries.

``export`` writes it (``ModelMetadata.to_dict`` through :func:`validate`), the
runtime parses and checks it once when a model is loaded (:func:`parse`), and
the tests use the same definitions. It lives in the ONNX ``metadata_props``
under the key :data:`METADATA_KEY` as one JSON object.

Required keys and their rules:

| key | type and rule |
| --- | --- |
| ``schema`` | integer, 1 .. :data:`SCHEMA_VERSION` |
| ``input_name`` | string: the graph's one input |
| ``input_size`` | [height, width], integers in 8 .. 4096 |
| ``channels`` | 1 or 3 (the grey level repeated) |
| ``class_names`` | exactly ["NORMAL", "PNEUMONIA"] |
| ``positive_class`` | "PNEUMONIA" |
| ``threshold`` | a finite number in [0, 1] (not a boolean) on P(PNEUMONIA) |
| ``precision`` | "fp32", "fp16" or "int8" |

Optional keys with rules: ``value_range`` ([lo, hi], finite, lo < hi; default
[0, 255]), ``resize`` (area, linear, cubic, nearest; default area),
``threshold_rule`` (string), ``outputs`` (list of {name, shape, description};
the first is the probability, then optionally ``cam`` (N, h, w) class
activation logits and ``ood`` (N, 1) distance), ``ood`` ({threshold: positive
finite number, threshold_rule, ...}; needed for the ``ood`` output to be used).
Everything else (``arch``, ``trained_on``, ``val_metrics``, ``robustness``,
``calibration``, ``parity``, ``created``, ``pneumo_edge_version``,
``versions``...) is provenance: kept, shown by ``info`` and the reports, never
used to compute a prediction.

The graph is checked against it too: one float32 NHWC input named
``input_name`` with a dynamic batch dimension, its height, width and channels
equal to the metadata's when they are static; a first output of one
probability per image; the outputs named as ``outputs`` lists them, when it does.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any, Mapping

__all__ = ["METADATA_KEY", "SCHEMA_VERSION", "ModelMetadata", "OutputSpec", "PreprocessConfig",
           "MetadataError", "parse", "validate", "finite_json", "CLASS_NAMES", "POSITIVE_CLASS",
           "PROB_OUTPUT", "CAM_OUTPUT", "OOD_OUTPUT", "LUNG_BOX_OUTPUT", "LUNG_AREA_OUTPUT",
           "PRECISIONS", "RESIZE_RULES"]

METADATA_KEY = "pneumo_edge"
SCHEMA_VERSION = 1
#: The two classes, in the order of the labels 0 and 1 everywhere (folders, splits, models).
CLASS_NAMES = ("NORMAL", "PNEUMONIA")
POSITIVE_CLASS = "PNEUMONIA"
#: The graph's outputs: the probability first, then the optional heads (and, for models
#: with the lung-field stage, the box it cropped and the lung share of the frame).
PROB_OUTPUT, CAM_OUTPUT, OOD_OUTPUT = "pneumonia_prob", "cam", "ood"
LUNG_BOX_OUTPUT, LUNG_AREA_OUTPUT = "lung_box", "lung_area"
PRECISIONS = ("fp32", "fp16", "int8")
RESIZE_RULES = ("area", "linear", "cubic", "nearest")
MIN_SIDE, MAX_SIDE = 8, 4096


class MetadataError(ValueError):
    """One violated rule of the contract; the message names the key."""


def _number(meta: Mapping, key: str, default=None) -> float:
    v = meta.get(key, default)
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise MetadataError(f"'{key}' must be a finite number, got {v!r}")
    return float(v)


def _int(v, key: str, lo: int, hi: int) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
        raise MetadataError(f"'{key}' must be an integer in {lo}..{hi}, got {v!r}")
    return v


@dataclass(frozen=True)
class PreprocessConfig:
    """How a decoded image becomes the model's input tensor (one image, HWC).

    Attributes:
        height, width: the model's input size in pixels.
        channels: 1, or 3 for the grey level repeated (the X-ray is greyscale).
        value_range: the input values that pixel 0 and pixel 255 map to.
        resize: OpenCV interpolation name used to reach ``height`` x ``width``.
    """

    height: int
    width: int
    channels: int = 3
    value_range: tuple[float, float] = (0.0, 255.0)
    resize: str = "area"

    def to_metadata(self) -> dict[str, Any]:
        return {"input_size": [self.height, self.width], "channels": self.channels,
                "value_range": list(self.value_range), "resize": self.resize}


@dataclass(frozen=True)
class OutputSpec:
    """One graph output as the metadata describes it."""

    name: str
    shape: tuple | None = None
    description: str | None = None

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"name": self.name}
        if self.shape is not None:
            d["shape"] = list(self.shape)
        if self.description is not None:
            d["description"] = self.description
        return d


#: The keys :class:`ModelMetadata` owns as typed fields; every other key is provenance.
CONTRACT_KEYS = ("schema", "input_name", "input_size", "channels", "value_range", "resize",
                 "class_names", "positive_class", "threshold", "threshold_rule", "precision",
                 "outputs", "ood")
#: Provenance every exported model carries (never read to compute a prediction).
PROVENANCE_KEYS = ("arch", "trained_on", "val_metrics", "calibration", "versions", "created",
                   "pneumo_edge_version")


@dataclass(frozen=True)
class ModelMetadata:
    """The contract of one model, typed; :func:`validate` builds it from the JSON object
    and :meth:`to_dict` writes that object back (``validate(m.to_dict()) == m``).

    Attributes:
        outputs: the graph's outputs as the metadata lists them (empty: the model
            does not list them; its graph is then the description).
        ood: the OOD head's record ({threshold, threshold_rule, ...}) or None.
        provenance: every other key (arch, trained_on, val_metrics, robustness,
            created, versions...): kept and shown, never used to compute a prediction.
    """

    schema: int
    input_name: str
    preprocess: PreprocessConfig
    threshold: float
    precision: str
    threshold_rule: str | None = None
    outputs: tuple[OutputSpec, ...] = ()
    ood: Mapping[str, Any] | None = None
    provenance: Mapping[str, Any] = field(default_factory=dict, repr=False)

    @property
    def class_names(self) -> tuple[str, str]:
        return CLASS_NAMES

    @property
    def output_names(self) -> tuple[str, ...]:
        return tuple(o.name for o in self.outputs)

    @property
    def ood_threshold(self) -> float | None:
        return None if self.ood is None else float(self.ood["threshold"])

    def to_dict(self) -> dict[str, Any]:
        """The JSON object stored in the model (contract keys first, then provenance)."""
        d: dict[str, Any] = {"schema": self.schema, "input_name": self.input_name,
                             **self.preprocess.to_metadata(),
                             "class_names": list(CLASS_NAMES), "positive_class": POSITIVE_CLASS,
                             "threshold": self.threshold}
        if self.threshold_rule is not None:
            d["threshold_rule"] = self.threshold_rule
        d["precision"] = self.precision
        d.update({k: v for k, v in self.provenance.items() if k not in CONTRACT_KEYS})
        if self.ood is not None:
            d["ood"] = dict(self.ood)
        if self.outputs:
            d["outputs"] = [o.to_dict() for o in self.outputs]
        return d


REQUIRED = ("schema", "input_name", "input_size", "channels", "class_names", "positive_class",
            "threshold", "precision")


def validate(meta: Mapping[str, Any]) -> ModelMetadata:
    """Check every rule of the contract on a metadata object.

    Raises:
        MetadataError: the first violated rule, naming the key.
    """
    if not isinstance(meta, Mapping):
        raise MetadataError("the metadata is not a JSON object")
    missing = [k for k in REQUIRED if k not in meta]
    if missing:
        raise MetadataError(f"metadata lacks {', '.join(missing)}")
    schema = meta["schema"]
    if isinstance(schema, bool) or not isinstance(schema, int) or schema < 1:
        raise MetadataError(f"'schema' must be a positive integer, got {schema!r}")
    if schema > SCHEMA_VERSION:
        raise MetadataError(f"metadata schema {schema} is newer than this pneumo-edge "
                            f"understands ({SCHEMA_VERSION}); upgrade pneumo-edge")
    name = meta["input_name"]
    if not isinstance(name, str) or not name:
        raise MetadataError(f"'input_name' must be a non-empty string, got {name!r}")
    size = meta["input_size"]
    if not isinstance(size, (list, tuple)) or len(size) != 2:
        raise MetadataError(f"'input_size' must be [height, width], got {size!r}")
    height, width = (_int(v, "input_size", MIN_SIDE, MAX_SIDE) for v in size)
    channels = meta["channels"]
    if isinstance(channels, bool) or channels not in (1, 3):
        raise MetadataError(f"'channels' must be 1 or 3, got {channels!r}")
    names = meta["class_names"]
    if not isinstance(names, (list, tuple)) or list(names) != list(CLASS_NAMES):
        raise MetadataError(f"'class_names' must be {list(CLASS_NAMES)}, "
                            f"got {meta['class_names']!r}")
    if meta["positive_class"] != POSITIVE_CLASS:
        raise MetadataError(f"'positive_class' must be {POSITIVE_CLASS!r}, "
                            f"got {meta['positive_class']!r}")
    threshold = _number(meta, "threshold")
    if not 0.0 <= threshold <= 1.0:
        raise MetadataError(f"'threshold' {threshold!r} is not a probability")
    precision = meta["precision"]
    if precision not in PRECISIONS:
        raise MetadataError(f"'precision' must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    vr = meta.get("value_range", [0.0, 255.0])
    if not isinstance(vr, (list, tuple)) or len(vr) != 2:
        raise MetadataError(f"'value_range' must be [lo, hi], got {vr!r}")
    lo, hi = (_number({"value_range": v}, "value_range") for v in vr)
    if not lo < hi:
        raise MetadataError(f"'value_range' must have lo < hi, got {list(vr)!r}")
    resize = meta.get("resize", "area")
    if resize not in RESIZE_RULES:
        raise MetadataError(f"'resize' must be one of {', '.join(RESIZE_RULES)}, got {resize!r}")
    outputs = meta.get("outputs", [])
    if not isinstance(outputs, list) or not all(isinstance(o, Mapping) and isinstance(
            o.get("name"), str) for o in outputs):
        raise MetadataError("'outputs' must be a list of objects with a 'name'")
    ood = meta.get("ood")
    if ood is not None:
        if not isinstance(ood, Mapping):
            raise MetadataError(f"'ood' must be an object, got {ood!r}")
        ood_thr = _number(ood, "threshold")
        if ood_thr <= 0:
            raise MetadataError(f"'ood.threshold' must be positive, got {ood_thr!r}")
    rule = meta.get("threshold_rule")
    return ModelMetadata(
        schema=schema, input_name=name,
        preprocess=PreprocessConfig(height, width, channels, (lo, hi), resize),
        threshold=threshold, precision=precision,
        threshold_rule=None if rule is None else str(rule),
        outputs=tuple(OutputSpec(o["name"],
                                 None if o.get("shape") is None else tuple(o["shape"]),
                                 o.get("description")) for o in outputs),
        ood=None if ood is None else dict(ood),
        provenance={k: v for k, v in meta.items() if k not in CONTRACT_KEYS})


def parse(custom_metadata: Mapping[str, str]) -> ModelMetadata:
    """Parse and validate the ``pneumo_edge`` entry of an ONNX file's metadata_props.

    Raises:
        MetadataError: missing, not JSON, not an object, or a violated rule.
    """
    raw = custom_metadata.get(METADATA_KEY)
    if raw is None:
        raise MetadataError(
            f"no '{METADATA_KEY}' metadata in this ONNX file; pneumo-edge does not guess "
            "preprocessing or threshold. Export models with `pneumo-edge export`.")
    too_deep = MetadataError(f"'{METADATA_KEY}' metadata is nested more than {MAX_DEPTH} "
                             "levels deep; refusing it")
    try:
        meta = json.loads(raw, parse_constant=_reject_constant)
    except RecursionError:
        raise too_deep from None
    except (json.JSONDecodeError, ValueError) as exc:
        raise MetadataError(f"'{METADATA_KEY}' metadata is not valid JSON ({exc})") from None
    if _depth(meta) > MAX_DEPTH:
        # every report writes the metadata back, recursively: refuse it here, once
        raise too_deep
    return validate(meta)


#: Nesting allowed in the metadata JSON (the release files use 5 levels).
MAX_DEPTH = 32


def _depth(obj) -> int:
    """How deeply ``obj`` nests lists and objects, counted without recursion."""
    deepest, stack = 0, [(obj, 1)]
    while stack:
        item, level = stack.pop()
        if isinstance(item, (dict, list)):
            deepest = max(deepest, level)
            if level <= MAX_DEPTH:
                stack.extend((v, level + 1) for v in
                             (item.values() if isinstance(item, dict) else item))
    return deepest


def finite_json(obj):
    """``obj`` with every non-finite float replaced by None, at any depth (strict JSON)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, Mapping):
        return {k: finite_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite_json(v) for v in obj]
    if hasattr(obj, "item") and callable(obj.item):  # numpy scalars
        return finite_json(obj.item())
    return obj


def _reject_constant(name: str):
    raise ValueError(f"{name} is not JSON")


def check_graph(meta: ModelMetadata, inputs: list, outputs: list) -> None:
    """The graph's input and outputs against the metadata (onnxruntime NodeArgs).

    Raises:
        MetadataError: the first mismatch.
    """
    if len(inputs) != 1:
        raise MetadataError(f"expected one image input, got {[i.name for i in inputs]}")
    node = inputs[0]
    if node.name != meta.input_name:
        raise MetadataError(f"input is named {node.name!r} but metadata says {meta.input_name!r}")
    if node.type != "tensor(float)":
        raise MetadataError(f"input {node.name!r} is {node.type}, expected tensor(float)")
    shape = list(node.shape)
    if len(shape) != 4:
        raise MetadataError(f"expected an NHWC input, got shape {shape}")
    if isinstance(shape[0], int) and shape[0] != 1 and shape[0] > 0:
        raise MetadataError(f"input batch dimension is fixed at {shape[0]}; expected dynamic")
    cfg = meta.preprocess
    for got, want, what in ((shape[1], cfg.height, "height"), (shape[2], cfg.width, "width"),
                            (shape[3], cfg.channels, "channels")):
        if isinstance(got, int) and got > 0 and got != want:
            raise MetadataError(f"input {what} is {got} but metadata says {want}")
    if not outputs:
        raise MetadataError("the graph has no output")
    names = [o.name for o in outputs]
    if meta.outputs and list(meta.output_names) != names:
        raise MetadataError(f"'outputs' lists {list(meta.output_names)} but the graph's outputs "
                            f"are {names}")
    first = outputs[0]
    if first.type not in ("tensor(float)", "tensor(double)"):
        raise MetadataError(f"first output {first.name!r} is {first.type}, expected floats")
    tail = [d for d in list(first.shape)[1:] if not (isinstance(d, int) and d == 1)]
    if any(isinstance(d, int) for d in tail):
        raise MetadataError(f"first output {first.name!r} has shape {list(first.shape)}; "
                            "expected one probability per image")
