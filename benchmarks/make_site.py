"""Build a simulated second hospital from the shipped model's validation patients.

No public adult chest X-ray set outside the held-out sites could be used, so
site adaptation is developed on a simulation: the validation patients of the
shipped model (``exported/val_split.csv``: the model never trained on them, so
they are patient-disjoint from its training images) re-processed the way
another hospital's chain might render them:

- resampling: the detector's lower resolution (down to 55 %, back up, cubic);
- a different tone curve: gamma 1.8 and the contrast squeezed into 35..215;
- blur (Gaussian, sigma 1.2 px at 224 px) and a little sensor noise;
- borders: a black collimator border (7 % left and right, 4 % top and bottom)
  and a burned-in white label block in the top-left corner;
- JPEG quality 55 for most files, and every third file as a MONOCHROME1 DICOM
  (inverted stored values with a Patient ID, which the decoder turns back).

The patients are split in two halves, patient-disjoint and balanced by class:
``adapt/`` (what the site adapts on) and ``test/`` (what it is scored on).

Usage: ``python benchmarks/make_site.py --out /tmp/site_b [--per-class 150]``
"""

from __future__ import annotations

import argparse
import csv
import hashlib
from pathlib import Path

import cv2
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "chest_xray" / "train"


def site_look(gray: np.ndarray, seed: int) -> np.ndarray:
    """One image as the simulated hospital renders it (uint8, same size)."""
    rng = np.random.default_rng(seed)
    h, w = gray.shape
    small = cv2.resize(gray, (int(w * 0.55), int(h * 0.55)), interpolation=cv2.INTER_AREA)
    x = cv2.resize(small, (w, h), interpolation=cv2.INTER_CUBIC).astype(np.float32) / 255.0
    x = np.clip(x, 0, 1) ** 1.8
    x = 35.0 + 180.0 * x
    x = cv2.GaussianBlur(x, (0, 0), 1.2 * w / 224.0)
    x = x + rng.normal(0, 2.0, x.shape)
    bx, by = int(0.07 * w), int(0.04 * h)
    x[:, :bx] = 0
    x[:, w - bx:] = 0
    x[:by, :] = 0
    x[h - by:, :] = 0
    x[by + 4:by + 4 + h // 12, bx + 4:bx + 4 + w // 5] = 245  # burned-in label
    return np.clip(x, 0, 255).astype(np.uint8)


def write_monochrome1(path: Path, gray: np.ndarray, patient: str) -> None:
    """An uncompressed MONOCHROME1 DICOM (0 = white) with a pseudonymous Patient ID."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1"  # CR
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.preamble = b"\x00" * 128
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.PatientID = "SITEB-" + hashlib.sha256(patient.encode()).hexdigest()[:10]
    ds.Modality = "CR"
    ds.ViewPosition = "PA"
    ds.Rows, ds.Columns = gray.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME1"
    ds.BitsAllocated = 8
    ds.BitsStored = 8
    ds.HighBit = 7
    ds.PixelRepresentation = 0
    ds.PixelData = np.ascontiguousarray(255 - gray).tobytes()
    ds.save_as(str(path), enforce_file_format=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--per-class", type=int, default=150,
                    help="images per class in adapt/ (test/ gets the other patients' images, "
                         "at most as many)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    rows = list(csv.DictReader(open(ROOT / "exported" / "val_split.csv")))
    rng = np.random.default_rng(args.seed)
    manifest = []
    for label in ("NORMAL", "PNEUMONIA"):
        patients = sorted({r["patient"] for r in rows if r["label"] == label})
        rng.shuffle(patients)
        by_patient = {p: [r for r in rows if r["patient"] == p] for p in patients}
        taken, half = 0, []
        for p in patients:  # adapt half: whole patients until per-class images
            if taken >= args.per_class:
                break
            half.append(p)
            taken += len(by_patient[p])
        rest = [p for p in patients if p not in half]
        for part, group in (("adapt", half), ("test", rest)):
            count = 0
            for p in group:
                for r in by_patient[p]:
                    if part == "test" and count >= args.per_class:
                        break
                    src = DATA / r["path"]
                    gray = cv2.imread(str(src), cv2.IMREAD_GRAYSCALE)
                    seed = int(hashlib.sha256(r["path"].encode()).hexdigest()[:8], 16)
                    img = site_look(gray, seed)
                    folder = args.out / part / label
                    folder.mkdir(parents=True, exist_ok=True)
                    stem = Path(r["path"]).stem
                    if seed % 3 == 0:
                        target = folder / f"{stem}.dcm"
                        write_monochrome1(target, img, p)
                    else:
                        target = folder / f"{stem}.jpeg"
                        cv2.imwrite(str(target), img, [cv2.IMWRITE_JPEG_QUALITY, 55])
                    manifest.append((part, label, p, r["path"], target.name))
                    count += 1
    with open(args.out / "manifest.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["part", "label", "patient", "source", "file"])
        w.writerows(manifest)
    for part in ("adapt", "test"):
        n = {lab: sum(1 for m in manifest if m[0] == part and m[1] == lab)
             for lab in ("NORMAL", "PNEUMONIA")}
        print(f"{part}: {n}")


if __name__ == "__main__":
    main()
