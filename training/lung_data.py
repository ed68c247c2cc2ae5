"""Build the lung segmenter's dataset from public repositories' image/mask pairs.

Reads the pairs straight out of git snapshots (``git cat-file``; no work tree,
no download at run time), brings every image to the segmenter's input the way
the runtime does (area resize to the 192 px frame, then 2 x 2 mean:
``pneumo_edge.lung.seg_input``) and every mask to a binary 96 px lung mask, and
splits each source by file into training and held-out pairs (seeded).

Writes ``OUT.npz`` (``images`` uint8 (N, 96, 96), ``masks`` uint8 (N, 96, 96) in
{0, 1}, ``source`` int (N), ``held_out`` bool (N), ``names`` str (N)) and
``OUT.json`` (sources with repository, commit, licence, mask rule and counts).

    python -m training.lung_data --mirror /work/.mirror --out runs/lungseg/pairs_96.npz

The pediatric viral-pneumonia pairs (ayazmhmd/Unet-Projects) are images of the
Guangzhou pediatric set; they may overlap the classifier dataset's official test
split, so they serve the segmenter only and never the classifier's training,
selection or calibration.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path

import cv2
import numpy as np

from pneumo_edge.io import write_json

from pneumo_edge.lung import FRAME, SEG, seg_input


@dataclass(frozen=True)
class MaskSource:
    name: str
    repo: str
    commit: str
    images: str       # folder inside the repository
    masks: str
    prefix: str       # file-name prefix that selects this source's pairs ("" = all)
    mask_rule: str    # how a mask file becomes lung / not lung
    licence: str
    data: str


SOURCES: tuple[MaskSource, ...] = (
    MaskSource(
        "montgomery", "rochadiego/MultiResUNet-lung-segmentation",
        "234c65ba9f3cd7e4c9f84b476745ff928694470f", "data/cxr", "data/masks", "MCUCXR",
        "grey > 127 (soft edges)",
        "images and masks: Montgomery County set, U.S. National Library of Medicine, public for "
        "research (Jaeger et al. 2014); repository code MIT",
        "Montgomery County (USA) adult chest X-rays with both-lung masks, 512 px"),
    MaskSource(
        "shenzhen", "rochadiego/MultiResUNet-lung-segmentation",
        "234c65ba9f3cd7e4c9f84b476745ff928694470f", "data/cxr", "data/masks", "CHNCXR",
        "grey > 127 (soft edges)",
        "images: Shenzhen set, U.S. National Library of Medicine, public for research (Jaeger et "
        "al. 2014); masks: Stirenko et al. 2018, CC BY-NC-SA 4.0; repository code MIT",
        "Shenzhen No. 3 Hospital (China) adult chest X-rays with lung masks, 512 px"),
    MaskSource(
        "jsrt", "moritzhauschulz/my_COMP70014",
        "a8a83e72271fdf974f1b7cacce25c623e2d72927", "data/JSRT/images", "data/JSRT/masks", "",
        "value 150 (right lung) or 200 (left lung); 250 (heart) is not lung",
        "images: JSRT database (Shiraishi et al. 2000), research use under the JSRT terms; "
        "lung labels in the style of SCR (van Ginneken et al. 2006), research use; no licence "
        "file in the repository",
        "JSRT adult chest X-rays (Japan), 224 px"),
    MaskSource(
        "pediatric_viral", "ayazmhmd/Unet-Projects",
        "e6118f12ecb713656ba500fb5c3f166dd5cbd609", "Viral Pneumonia/images",
        "Viral Pneumonia/masks", "",
        "any channel > 127",
        "images: Guangzhou pediatric set (Kermany et al. 2018, CC BY 4.0) as redistributed in "
        "the COVID-19 Radiography Database (Chowdhury et al. 2020; Rahman et al. 2021), masks "
        "from that database's release (its terms; possibly model-assisted); no licence file in "
        "the repository. May overlap the classifier data's official test split: segmenter only",
        "pediatric viral pneumonia X-rays, images 299 px, masks 256 px"),
)


def _git(git_dir: Path, *args: str, data: bytes | None = None) -> bytes:
    return subprocess.run(["git", f"--git-dir={git_dir}", *args], input=data, check=True,
                          capture_output=True).stdout


def _tree(git_dir: Path, commit: str, folder: str) -> dict[str, str]:
    """File name -> blob id of the files directly in ``folder`` at ``commit``."""
    out = {}
    for line in _git(git_dir, "ls-tree", "-z", f"{commit}:{folder}").split(b"\0"):
        if not line:
            continue
        meta, name = line.split(b"\t", 1)
        kind, blob = meta.split()[1:3]
        if kind == b"blob":
            out[name.decode()] = blob.decode()
    return out


def _blobs(git_dir: Path, ids: list[str]) -> list[bytes]:
    """Contents of blobs in one ``git cat-file --batch`` call."""
    raw = _git(git_dir, "cat-file", "--batch", data=("\n".join(ids) + "\n").encode())
    out, pos = [], 0
    for _ in ids:
        end = raw.index(b"\n", pos)
        header = raw[pos:end].split()
        if len(header) < 3:
            raise RuntimeError(f"{git_dir}: missing object {header[0].decode()}")
        size = int(header[2])
        out.append(raw[end + 1:end + 1 + size])
        pos = end + 1 + size + 1
    return out


def to_seg_image(gray: np.ndarray) -> np.ndarray:
    """A decoded grey X-ray -> the segmenter's 96 px input (uint8), as at inference."""
    frame = cv2.resize(gray, (FRAME, FRAME), interpolation=cv2.INTER_AREA)
    return np.clip(np.rint(seg_input(frame)), 0, 255).astype(np.uint8)


def to_seg_mask(lung: np.ndarray) -> np.ndarray:
    """A binary full-size lung mask -> 96 px {0, 1} (area share > 0.5)."""
    small = cv2.resize(lung.astype(np.float32), (SEG, SEG), interpolation=cv2.INTER_AREA)
    return (small > 0.5).astype(np.uint8)


def _lung(src: MaskSource, raw: np.ndarray) -> np.ndarray:
    if src.name == "jsrt":
        return (raw == 150) | (raw == 200)
    if raw.ndim == 3:
        return (raw > 127).any(axis=2)
    return raw > 127


def read_source(src: MaskSource, mirror: Path) -> tuple[list[str], np.ndarray, np.ndarray]:
    """(names, images (n, 96, 96), masks (n, 96, 96)) of one source, sorted by name."""
    owner, name = src.repo.split("/")
    git_dir = mirror / f"{owner}+{name}" / "repo"
    if not git_dir.is_dir():
        raise FileNotFoundError(f"{git_dir}: no snapshot of {src.repo} (fetch it first)")
    _git(git_dir, "cat-file", "-e", f"{src.commit}^{{commit}}")
    images = {k: v for k, v in _tree(git_dir, src.commit, src.images).items()
              if k.startswith(src.prefix)}
    masks = _tree(git_dir, src.commit, src.masks)
    names = sorted(set(images) & set(masks))
    if not names:
        raise RuntimeError(f"{src.repo}@{src.commit[:7]}: no image/mask pairs for {src.name}")
    img_raw = _blobs(git_dir, [images[n] for n in names])
    mask_raw = _blobs(git_dir, [masks[n] for n in names])
    xs, ys = [], []
    for n, ib, mb in zip(names, img_raw, mask_raw):
        gray = cv2.imdecode(np.frombuffer(ib, np.uint8), cv2.IMREAD_GRAYSCALE)
        raw = cv2.imdecode(np.frombuffer(mb, np.uint8), cv2.IMREAD_UNCHANGED)
        if gray is None or raw is None:
            raise RuntimeError(f"{src.repo}: {n} does not decode")
        xs.append(to_seg_image(gray))
        ys.append(to_seg_mask(_lung(src, raw)))
    return names, np.stack(xs), np.stack(ys)


def build(mirror: Path, out: Path, held_out: float = 0.15, seed: int = 0) -> dict:
    """Read every source, split each by file, write ``out`` (.npz) and its .json record."""
    rng = np.random.default_rng(seed)
    all_x, all_y, all_src, all_held, all_names, record = [], [], [], [], [], []
    for i, src in enumerate(SOURCES):
        names, x, y = read_source(src, mirror)
        n_held = int(round(held_out * len(names)))
        held = np.zeros(len(names), bool)
        held[rng.permutation(len(names))[:n_held]] = True
        empty = int((y.reshape(len(y), -1).sum(1) == 0).sum())
        all_x.append(x)
        all_y.append(y)
        all_names += names
        all_src.append(np.full(len(names), i))
        all_held.append(held)
        record.append({**asdict(src), "pairs": len(names), "train": int((~held).sum()),
                       "held_out": int(held.sum()), "empty_masks": empty,
                       "mean_lung_fraction": round(float(y.mean()), 4)})
        print(f"{src.name}: {len(names)} pairs ({int(held.sum())} held out, {empty} empty masks)",
              file=sys.stderr)
    out.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(out, images=np.concatenate(all_x), masks=np.concatenate(all_y),
                        source=np.concatenate(all_src), held_out=np.concatenate(all_held),
                        names=np.array(all_names), source_names=np.array([s.name for s in SOURCES]))
    meta = {"file": out.name, "size": SEG, "frame": FRAME,
            "image_rule": f"grey, area resize to {FRAME} px, then 2 x 2 mean (the runtime's path)",
            "mask_rule": f"lung share of each {SEG} px cell > 0.5",
            "split": f"per source, by file: {held_out:.0%} held out, numpy seed {seed}",
            "note": "pediatric_viral images may overlap the classifier data's official test "
                    "split: used for the segmenter only",
            "sources": record, "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "command": "python -m training.lung_data " + " ".join(sys.argv[1:])}
    write_json(out.with_suffix(".json"), meta)
    return meta


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mirror", type=Path, default=Path("/work/.mirror"),
                    help="folder of git snapshots named OWNER+NAME/repo")
    ap.add_argument("--out", type=Path, default=Path("runs/lungseg/pairs_96.npz"))
    ap.add_argument("--held-out", type=float, default=0.15)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    build(args.mirror, args.out, args.held_out, args.seed)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
