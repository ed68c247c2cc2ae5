"""The lung segmenter's data, augmentation, metrics and committed weights."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import cv2
import numpy as np
import pytest

from pneumo_edge import lung

from helpers import SHARED_TRAIN

WEIGHTS = Path(__file__).resolve().parents[1] / "training" / "weights" / "lung_unet96.keras"


def test_dice_iou_numbers():
    from training.segmenter import dice_iou

    t = np.zeros((2, 10, 10))
    t[0, :, :5] = 1
    p = np.zeros((2, 10, 10))
    p[0, :, :4] = 0.9        # 40 of the 50 true pixels, nothing extra
    dice, iou = dice_iou(p, t)
    assert dice[0] == pytest.approx(2 * 40 / 90) and iou[0] == pytest.approx(40 / 50)
    assert dice[1] == 1.0 and iou[1] == 1.0  # both empty


def test_shrink_moves_the_mask_with_the_picture():
    from training.segmenter import _shrink

    img = np.full((96, 96), 120.0, np.float32)
    mask = np.zeros((96, 96), np.float32)
    mask[20:80, 10:86] = 1
    x, m = _shrink(img, mask, 0.05, 0.05, 0.05, 0.05, fill=0.0)
    assert x[:4].max() == 0 and x[-4:].max() == 0 and x[48, 48] == pytest.approx(120.0)
    box, _ = lung.lung_box(mask, margin=0)
    box_m, _ = lung.lung_box(m, margin=0)
    f = 5 / 96
    np.testing.assert_allclose(box_m, f + (1 - 2 * f) * box, atol=1.0 / 96)


def test_augment_pair_is_seeded_and_keeps_the_mask_binary():
    from training.segmenter import augment_pair

    img = np.tile(np.linspace(30, 220, 96, dtype=np.float32), (96, 1)).astype(np.uint8)
    mask = np.zeros((96, 96), np.uint8)
    mask[20:80, 15:45] = mask[20:80, 51:81] = 1
    a = [augment_pair(img, mask, np.random.default_rng(5)) for _ in range(2)]
    np.testing.assert_array_equal(a[0][0], a[1][0])
    rng = np.random.default_rng(0)
    fractions = []
    for _ in range(60):
        x, m = augment_pair(img, mask, rng)
        assert x.shape == m.shape == (96, 96) and x.dtype == np.float32
        assert 0 <= x.min() and x.max() <= 255 and set(np.unique(m)) <= {0.0, 1.0}
        fractions.append(m.mean())
    # zoom in and out both happen: the lung share spreads around the original's
    assert min(fractions) < 0.8 * mask.mean() < 1.2 * mask.mean() < max(fractions)


def _git(cwd, *args):
    subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True)


def test_lung_data_reads_pairs_from_a_git_snapshot(tmp_path, monkeypatch):
    from training import lung_data

    work = tmp_path / "work"
    (work / "imgs").mkdir(parents=True)
    (work / "masks").mkdir()
    for i in range(6):
        img = np.full((120, 120), 40 + 20 * i, np.uint8)
        m = np.zeros((120, 120), np.uint8)
        m[30:90, 20 + i:100] = 200          # JSRT-style value: left lung
        m[100:110, 50:70] = 250             # heart value: not lung
        cv2.imwrite(str(work / "imgs" / f"P{i}.png"), img)
        cv2.imwrite(str(work / "masks" / f"P{i}.png"), m)
    cv2.imwrite(str(work / "imgs" / "unpaired.png"), np.zeros((8, 8), np.uint8))
    _git(work, "init", "-q")
    _git(work, "add", ".")
    _git(work, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "pairs")
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=work, check=True,
                            capture_output=True, text=True).stdout.strip()
    mirror = tmp_path / "mirror"
    (mirror / "own+pairs").mkdir(parents=True)
    (work / ".git").rename(mirror / "own+pairs" / "repo")
    src = lung_data.MaskSource("jsrt", "own/pairs", commit, "imgs", "masks", "", "150/200",
                               "test", "test")
    monkeypatch.setattr(lung_data, "SOURCES", (src,))
    meta = lung_data.build(mirror, tmp_path / "out" / "pairs.npz", held_out=0.34, seed=1)
    d = np.load(tmp_path / "out" / "pairs.npz")
    assert list(d["names"]) == [f"P{i}.png" for i in range(6)]
    assert d["images"].shape == (6, 96, 96) and d["held_out"].sum() == 2
    assert d["images"][3].mean() == pytest.approx(100, abs=1)
    # rows 30..90 of 120 -> 24..72 of 96; the heart label is not lung
    rows = np.where(d["masks"][0].any(axis=1))[0]
    assert rows.min() == 24 and rows.max() == 71
    rec = json.loads((tmp_path / "out" / "pairs.json").read_text())
    assert rec["sources"][0]["commit"] == commit and rec["sources"][0]["pairs"] == 6
    assert meta["sources"][0]["held_out"] == 2


def test_lung_data_refuses_a_missing_snapshot(tmp_path):
    from training import lung_data

    with pytest.raises(FileNotFoundError, match="no snapshot"):
        lung_data.read_source(lung_data.SOURCES[0], tmp_path)


def test_weights_provenance_is_complete():
    rec = json.loads(WEIGHTS.with_suffix(".json").read_text())
    assert {s["name"] for s in rec["sources"]} == {"montgomery", "shenzhen", "jsrt",
                                                  "pediatric_viral"}
    for s in rec["sources"]:
        assert len(s["commit"]) == 40 and s["licence"] and s["held_out"] > 0
        assert rec["held_out_metrics"][s["name"]]["n"] == s["held_out"]
    assert rec["held_out_metrics"]["all"]["iou"] >= 0.90
    assert rec["parameters"] < 500_000
    assert WEIGHTS.stat().st_size < 3_000_000


@pytest.mark.slow
@pytest.mark.skipif(not SHARED_TRAIN.is_dir(), reason="needs ../shared/data")
def test_trained_segmenter_on_training_xrays_and_a_border():
    """On real pediatric X-rays the box is plausible, and a 3 % black border moves it with
    the picture (box mapped back within 3 % of the frame)."""
    keras = pytest.importorskip("keras")
    from pneumo_edge.preprocess import PreprocessConfig, load_gray

    model = keras.models.load_model(WEIGHTS, compile=False)
    cfg = PreprocessConfig(lung.FRAME, lung.FRAME, channels=1)
    rng = np.random.default_rng(11)
    paths = []
    for cls in ("NORMAL", "PNEUMONIA"):
        files = sorted((SHARED_TRAIN / cls).iterdir())
        paths += [files[i] for i in rng.choice(len(files), 20, replace=False)]
    g = np.stack([load_gray(p, cfg).astype(np.float32) for p in paths])
    pad = round(0.03 * lung.FRAME)
    gb = np.zeros_like(g)
    for i, im in enumerate(g):
        gb[i, pad:-pad, pad:-pad] = cv2.resize(im, (lung.FRAME - 2 * pad,) * 2,
                                               interpolation=cv2.INTER_AREA)
    prob = model.predict(lung.seg_input(np.concatenate([g, gb]))[..., None], verbose=0)[..., 0]
    box, area = lung.lung_box(prob)
    flags = [lung.lung_field_issue(b, a) for b, a in zip(box, area)]
    assert sum(f is not None for f in flags) <= 1
    f = pad / lung.FRAME
    shift = np.abs((box[len(g):] - f) / (1 - 2 * f) - box[:len(g)]).max(axis=1)
    assert np.median(shift) < 0.015 and shift.max() < 0.05
