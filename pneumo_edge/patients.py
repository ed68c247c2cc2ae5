"""Which patient a labelled file belongs to, so that splits and folds never share one.

Training's patient-level split and ``calibrate``'s patient-grouped folds both
use :func:`patient_key`: the DICOM header's Patient ID (hashed) outranks the
file name's Kermany/Kaggle pattern; a file with neither is its own group.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

__all__ = ["patient_id", "dicom_patient_key", "patient_key"]

# a few files carry an extra counter (person447_virus_921_1): same patient
_PNEUMONIA_PATIENT = re.compile(r"^(person\d+)_(?:bacteria|virus)(?:_\d+)+$", re.IGNORECASE)
_NORMAL_PATIENT = re.compile(r"^((?:NORMAL2-)?IM-\d+)(?:-\d+)+$", re.IGNORECASE)


def patient_id(path: str | Path) -> str | None:
    """Patient from the Kermany/Kaggle file naming, or None if the name carries none.

    ``person12_bacteria_45.jpeg`` -> ``person12``;
    ``NORMAL2-IM-0456-0001-0002.jpeg`` -> ``NORMAL2-IM-0456`` (patient is the
    part before the image counters).
    """
    stem = Path(path).stem
    m = _PNEUMONIA_PATIENT.match(stem)
    if m:
        return m.group(1).lower()
    m = _NORMAL_PATIENT.match(stem)
    if m:
        return m.group(1).upper()
    return None


def dicom_patient_key(path: str | Path) -> str | None:
    """For a DICOM file with a Patient ID: ``dicom:`` + 16 hex digits of its SHA-256.

    DICOM file names rarely carry the patient, but the header does; the split
    groups by this key so that no patient is on both sides, and split.csv holds
    the hash, never the ID itself (a pseudonym: short numeric IDs can be guessed
    back from it, so treat run folders as internal data).
    """
    from .images import IMAGE_EXTENSIONS

    if Path(path).suffix.lower() in IMAGE_EXTENSIONS:
        return None
    try:  # refuses a file without the DICM preamble (InvalidDicomError)
        import pydicom

        ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["PatientID"])
        pid = str(ds.get("PatientID", "") or "").strip()
    except Exception:
        return None
    return "dicom:" + hashlib.sha256(pid.encode()).hexdigest()[:16] if pid else None


def patient_key(path: str | Path) -> str | None:
    """The header's patient, else the name's, else None (the caller groups per file)."""
    return dicom_patient_key(path) or patient_id(path)
