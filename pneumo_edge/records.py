"""One record per image, and every form it is written in.

A prediction run yields :class:`Prediction` and :class:`Failure` records. Their
serialised forms all come from this module, so a field added here reaches every
output and none drifts:

- :func:`to_dict`: the entries of report.json's ``predictions`` and ``failures``
  lists (rounded for reading), and the JSON an HTTP service answers with;
- :func:`to_journal` / :func:`from_journal`: the Ray engine's resume journal
  (lossless, one JSON object per line);
- :data:`COLUMNS` with :func:`row` and :func:`csv_row`: the flat table of
  predictions.csv and predictions.parquet, one row per file, failures included.

A leaf module: it imports nothing else of the package.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from typing import Any, Union

import numpy as np

__all__ = ["Prediction", "Failure", "Record", "FLAG_PREFIX", "DICOM_FACTS", "DISCLAIMER",
           "PREDICTION_KEYS", "FAILURE_KEYS", "Column", "COLUMNS", "to_dict", "to_http",
           "to_journal", "from_journal", "row", "csv_header", "csv_row", "csv_safe"]

#: Every output that carries predictions says this (report.json and .html, the terminal,
#: Structured Reports).
DISCLAIMER = ("pneumo-edge is a research and engineering tool, not a medical device. Its "
              "output is not a diagnosis and must not be used for clinical decisions.")
#: What a prediction reports about a DICOM file; nothing else is read out of it.
DICOM_FACTS = ("modality", "view_position", "photometric_interpretation", "bits_stored",
               "transfer_syntax")
#: A flagged image turned into a failure (``--flagged-as fail``) has this reason prefix.
FLAG_PREFIX = "flagged: "


@dataclass(frozen=True)
class Prediction:
    path: str
    probability: float
    label: str
    threshold: float
    truth: str | None
    ood_score: float | None = None
    in_distribution: bool | None = None
    warnings: tuple[str, ...] = ()
    #: for DICOM files, the non-identifying acquisition facts of
    #: :data:`DICOM_FACTS`; None for other formats
    dicom: dict | None = None
    #: class activation logits (h, w), float16, when the model has a ``cam`` output
    cam: np.ndarray | None = field(default=None, repr=False, compare=False)
    #: the lung box the classifier saw, (y0, x0, y1, x1) fractions of the image, for
    #: models with the lung-field stage (the heatmap covers this box)
    lung_box: tuple[float, float, float, float] | None = None

    @property
    def flagged(self) -> bool:
        return bool(self.warnings)


@dataclass(frozen=True)
class Failure:
    path: str
    error: str

    @property
    def flagged(self) -> bool:
        """A flagged image refused with ``--flagged-as fail`` (not a decoding failure)."""
        return self.error.startswith(FLAG_PREFIX)


Record = Union[Prediction, Failure]

#: The keys of a prediction and of a failure in report.json (fixed names: other
#: tools read them; keys may be added, never renamed).
PREDICTION_KEYS = ("path", "probability", "label", "truth", "ood_score", "in_distribution",
                   "warnings", "dicom")
FAILURE_KEYS = ("path", "error")


def _round(x: float | None, digits: int) -> float | None:
    return None if x is None else round(x, digits)


def to_dict(rec: Record) -> dict[str, Any]:
    """The record as report.json lists it (probability to 6 digits, OOD score to 4)."""
    if isinstance(rec, Failure):
        return {"path": rec.path, "error": rec.error}
    return {"path": rec.path, "probability": round(rec.probability, 6), "label": rec.label,
            "truth": rec.truth, "ood_score": _round(rec.ood_score, 4),
            "in_distribution": rec.in_distribution, "warnings": list(rec.warnings),
            "dicom": rec.dicom} | _lung(rec)


def _lung(pred: Prediction) -> dict[str, Any]:
    return {} if pred.lung_box is None else {"lung_box": list(pred.lung_box)}


def to_http(pred: Prediction) -> dict[str, Any]:
    """One prediction as a service answers (no path: an upload has none): report.json's
    per-image fields unrounded, with its threshold and whether it is flagged."""
    ood = pred.ood_score
    return {"probability": pred.probability, "label": pred.label, "threshold": pred.threshold,
            "ood_score": None if ood is None or ood != ood or abs(ood) == float("inf") else ood,
            "in_distribution": pred.in_distribution, "flagged": pred.flagged,
            "warnings": list(pred.warnings), "dicom": pred.dicom} | _lung(pred)


_JOURNAL_FIELDS = tuple(f.name for f in fields(Prediction) if f.name != "cam")


def to_journal(rec: Record) -> dict[str, Any]:
    """Every field of the record at full precision (the cam logits excepted)."""
    if isinstance(rec, Failure):
        return {"path": rec.path, "error": rec.error}
    return {k: getattr(rec, k) for k in _JOURNAL_FIELDS} | {
        "warnings": list(rec.warnings),
        "lung_box": None if rec.lung_box is None else list(rec.lung_box)}


def from_journal(d: Any) -> Record:
    """The record back from :func:`to_journal`'s object, every field checked.

    The journal is a file on disk: anything may be in it. A probability must be a
    finite number in [0, 1], an OOD score finite, texts strings, the DICOM facts only
    :data:`DICOM_FACTS`, the lung box four fractions. ``label``, ``threshold`` and
    ``truth`` are taken as they are here; the caller that knows the run (its model,
    threshold and inputs) replaces them.

    Raises:
        ValueError: the object is not a valid record.
    """
    if not isinstance(d, dict):
        raise ValueError(f"not a record: {type(d).__name__}")
    path = _text(d, "path")
    if "error" in d:
        return Failure(path, _text(d, "error"))
    prob = _finite(d.get("probability"), "probability")
    if not 0.0 <= prob <= 1.0:
        raise ValueError(f"probability {prob!r} is not in [0, 1]")
    ood = d.get("ood_score")
    inside = d.get("in_distribution")
    if inside is not None and not isinstance(inside, bool):
        raise ValueError("in_distribution is not a boolean")
    warnings = d.get("warnings") or []
    if not isinstance(warnings, list) or not all(isinstance(w, str) for w in warnings):
        raise ValueError("warnings is not a list of strings")
    dicom = d.get("dicom")
    if dicom is not None and not (isinstance(dicom, dict) and set(dicom) <= set(DICOM_FACTS)
                                  and all(v is None or (isinstance(v, (str, int))
                                                        and not isinstance(v, bool))
                                          for v in dicom.values())):
        raise ValueError("dicom is not the DICOM facts")
    box = d.get("lung_box")
    if box is not None:
        if not isinstance(box, list) or len(box) != 4:
            raise ValueError("lung_box is not four numbers")
        box = tuple(_finite(v, "lung_box") for v in box)
        if not all(0.0 <= v <= 1.0 for v in box):
            raise ValueError("lung_box is not fractions of the image")
    truth, label = d.get("truth"), d.get("label")
    return Prediction(path, prob, label if isinstance(label, str) else "",
                      _finite(d.get("threshold", 0.0), "threshold"),
                      truth if isinstance(truth, str) else None,
                      None if ood is None else _finite(ood, "ood_score"), inside,
                      tuple(warnings), dicom, None, box)


def _text(d: dict, key: str) -> str:
    value = d.get(key)
    if not isinstance(value, str):
        raise ValueError(f"{key} is not a string")
    return value


def _finite(value: Any, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) \
            or not math.isfinite(value):
        raise ValueError(f"{what} is not a finite number")
    return float(value)


# ---------------------------------------------------------------- the flat row

@dataclass(frozen=True)
class Column:
    """One column of the flat table: its name, its kind (``str``, ``float``, ``bool``
    or ``int``) and, for floats, the digits the CSV shows."""

    name: str
    kind: str = "str"
    digits: int | None = None


COLUMNS: tuple[Column, ...] = (
    Column("path"), Column("probability", "float", 6), Column("label"),
    Column("threshold", "float", 6), Column("truth"), Column("ood_score", "float", 4),
    Column("in_distribution", "bool"), Column("warnings"), Column("error"),
    *(Column(f"dicom_{k}", "int" if k == "bits_stored" else "str") for k in DICOM_FACTS),
)


def row(rec: Record) -> tuple:
    """The record's values in :data:`COLUMNS` order, typed (None where empty)."""
    if isinstance(rec, Failure):
        return (rec.path, *([None] * 7), rec.error, *([None] * len(DICOM_FACTS)))
    facts = rec.dicom or {}
    return (rec.path, rec.probability, rec.label, rec.threshold, rec.truth, rec.ood_score,
            rec.in_distribution, "; ".join(rec.warnings) or None, None,
            *(facts.get(k) for k in DICOM_FACTS))


def csv_header() -> list[str]:
    return [c.name for c in COLUMNS]


#: A CSV cell starting with one of these is read as a formula by spreadsheet programs;
#: such cells get a leading apostrophe (the usual neutralisation, shown by spreadsheets
#: as text and easy to strip).
_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


def csv_safe(value: str) -> str:
    return "'" + value if value.startswith(_FORMULA_START) else value


def _cell(column: Column, value) -> str:
    if value is None:
        return ""
    if column.kind == "float":
        return f"{value:.{column.digits}f}"
    if column.kind == "bool":
        return str(bool(value)).lower()
    return csv_safe(str(value))


def csv_row(rec: Record) -> list[str]:
    """One predictions.csv row: text cells, formulas neutralised."""
    return [_cell(c, v) for c, v in zip(COLUMNS, row(rec))]
