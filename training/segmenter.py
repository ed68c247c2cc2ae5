"""The lung segmenter: a small U-Net trained from scratch on public lung masks.

Input ``(N, 96, 96, 1)`` grey values in [0, 255] (the 192 px frame pooled 2 x 2,
``pneumo_edge.lung.seg_input``), scaled inside the graph; output the lung
probability ``(N, 96, 96, 1)`` (sigmoid). It runs frozen inside
``training.lungcrop.LungCrop``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import cv2
import numpy as np

from pneumo_edge.io import write_json

SEG_SIZE = 96


def _block(x, filters: int, name: str):
    from keras import layers

    for k in (1, 2):
        x = layers.Conv2D(filters, 3, padding="same", use_bias=False,
                          kernel_initializer="he_normal", name=f"{name}_conv{k}")(x)
        x = layers.BatchNormalization(momentum=0.9, name=f"{name}_bn{k}")(x)
        x = layers.ReLU(name=f"{name}_relu{k}")(x)
    return x


def build_unet(size: int = SEG_SIZE, base: int = 8, depth: int = 4, max_filters: int = 48,
               name: str = "lung_unet"):
    """A plain U-Net: ``depth`` poolings, ``base * 2**level`` filters (at most
    ``max_filters``), skip concatenations, bilinear upsampling.

    ``size`` must be divisible by ``2**depth``. The defaults have about 0.2 M parameters.
    """
    import keras
    from keras import layers

    if size % (2 ** depth):
        raise ValueError(f"size {size} is not divisible by 2**{depth}")
    inputs = keras.Input((size, size, 1), name="image")
    x = layers.Rescaling(1.0 / 127.5, offset=-1.0, name="scale")(inputs)
    widths = [min(base * 2 ** level, max_filters) for level in range(depth + 1)]
    skips = []
    for level in range(depth):
        x = _block(x, widths[level], f"down{level}")
        skips.append(x)
        x = layers.MaxPooling2D(2, name=f"pool{level}")(x)
    x = _block(x, widths[depth], "bottom")
    for level in reversed(range(depth)):
        x = layers.UpSampling2D(2, interpolation="bilinear", name=f"up{level}")(x)
        x = layers.Concatenate(name=f"skip{level}")([x, skips[level]])
        x = _block(x, widths[level], f"dec{level}")
    outputs = layers.Conv2D(1, 1, activation="sigmoid", dtype="float32", name="lung")(x)
    return keras.Model(inputs, outputs, name=name)


# ------------------------------------------------------------------------- augmentation

TEXTS = ("L", "R", "PA", "AP", "PORTABLE", "SUPINE", "R  ERECT", "12/03", "ID 20391",
         "A", "9", "L  INSP")


def _affine(img: np.ndarray, mask: np.ndarray, mat: np.ndarray, fill: float
            ) -> tuple[np.ndarray, np.ndarray]:
    n = img.shape[0]
    img = cv2.warpAffine(img, mat, (n, n), flags=cv2.INTER_LINEAR,
                         borderMode=cv2.BORDER_CONSTANT, borderValue=fill)
    mask = cv2.warpAffine(mask, mat, (n, n), flags=cv2.INTER_LINEAR,
                          borderMode=cv2.BORDER_CONSTANT, borderValue=0.0)
    return img, (mask > 0.5).astype(np.float32)


def _shrink(img, mask, top, bottom, left, right, fill):
    """The picture squeezed inside bars of the given fractions (letterbox, padding)."""
    n = img.shape[0]
    t, b, l, r = (int(round(v * n)) for v in (top, bottom, left, right))
    h, w = n - t - b, n - l - r
    out_i = np.full_like(img, fill)
    out_m = np.zeros_like(mask)
    out_i[t:t + h, l:l + w] = cv2.resize(img, (w, h), interpolation=cv2.INTER_AREA)
    out_m[t:t + h, l:l + w] = cv2.resize(mask, (w, h), interpolation=cv2.INTER_AREA) > 0.5
    return out_i, out_m


def augment_pair(img: np.ndarray, mask: np.ndarray, rng: np.random.Generator
                 ) -> tuple[np.ndarray, np.ndarray]:
    """One random framing/exposure of a (96 px image, mask) pair, float32 in [0, 255] / {0, 1}.

    Framing changes move the mask with the picture (zoom out/in, shift, rotation,
    aspect, black or white borders, letterbox bars); overlays that hide pixels
    (a black corner rectangle, burned-in text and L/R markers) leave the mask
    alone, so the lung field, and the box taken from it, stays where it is.
    """
    n = img.shape[0]
    x = img.astype(np.float32)
    m = mask.astype(np.float32)
    if rng.random() < 0.8:
        scale = float(np.exp(rng.uniform(np.log(1 / 1.35), np.log(1.25))))
        aspect = float(np.exp(rng.uniform(-0.1, 0.1)))
        angle = float(rng.uniform(-12, 12))
        mat = cv2.getRotationMatrix2D(((n - 1) / 2, (n - 1) / 2), angle, 1.0)
        mat[:, :2] = mat[:, :2] * np.array([[scale * aspect], [scale / aspect]])
        mat[:, 2] = ((n - 1) / 2) - mat[:, :2] @ np.array([(n - 1) / 2, (n - 1) / 2])
        mat[:, 2] += rng.uniform(-0.08, 0.08, 2) * n
        if rng.random() < 0.5:
            mat[0] = -mat[0]
            mat[0, 2] += n - 1
        x, m = _affine(x, m, mat, 0.0)
    u = rng.random()
    if u < 0.30:    # black border on every side (padding, collimation)
        f = rng.uniform(0.02, 0.10)
        x, m = _shrink(x, m, *(f * rng.uniform(0.7, 1.3, 4)), fill=0.0)
    elif u < 0.40:  # letterbox bars
        f = rng.uniform(0.05, 0.15)
        bars = (f, f, 0, 0) if rng.random() < 0.5 else (0, 0, f, f)
        x, m = _shrink(x, m, *bars, fill=0.0)
    elif u < 0.48:  # white (saturated) border
        f = rng.uniform(0.02, 0.06)
        x, m = _shrink(x, m, f, f, f, f, fill=255.0)
    if rng.random() < 0.15:  # black rectangle over one corner (privacy blackout)
        h, w = (int(round(v * n)) for v in rng.uniform(0.08, 0.2, 2))
        r0 = 0 if rng.random() < 0.5 else n - h
        c0 = 0 if rng.random() < 0.5 else n - w
        x[r0:r0 + h, c0:c0 + w] = 0.0
    for _ in range(int(rng.random() < 0.35) + int(rng.random() < 0.15)):  # burned-in text
        text = TEXTS[rng.integers(len(TEXTS))]
        size = rng.uniform(0.25, 0.45)
        (tw, th), _ = cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, size, 1)
        px = int(rng.integers(0, max(1, n - tw)))
        py = int(rng.choice([rng.integers(th + 1, n // 5), rng.integers(4 * n // 5, n - 1)]))
        shade = 255.0 if rng.random() < 0.8 else 0.0
        ink = np.zeros((n, n), np.uint8)  # OpenCV draws text on 8-bit images only
        cv2.putText(ink, text, (px, py), cv2.FONT_HERSHEY_SIMPLEX, size, 255,
                    1 + int(rng.random() < 0.4), cv2.LINE_AA)
        a = ink.astype(np.float32) / 255.0
        x = x * (1.0 - a) + shade * a
    gamma = float(np.exp(rng.uniform(-np.log(1.6), np.log(1.6))))
    x = 255.0 * (np.clip(x, 0, 255) / 255.0) ** gamma
    x = (x - x.mean()) * rng.uniform(0.8, 1.2) + x.mean() + rng.uniform(-0.08, 0.08) * 255
    if rng.random() < 0.2:
        x = cv2.GaussianBlur(x, (0, 0), rng.uniform(0.3, 1.0))
    x = x + rng.normal(0, rng.uniform(0, 4), x.shape)
    return np.clip(x, 0, 255).astype(np.float32), m


# ------------------------------------------------------------------------- training

def dice_iou(prob: np.ndarray, truth: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-image Dice and IoU of ``prob > 0.5`` against a binary mask (1 when both empty)."""
    p = (prob.reshape(len(prob), -1) > 0.5)
    t = truth.reshape(len(truth), -1) > 0.5
    inter = (p & t).sum(1).astype(np.float64)
    union = (p | t).sum(1).astype(np.float64)
    total = p.sum(1) + t.sum(1)
    dice = np.where(total > 0, 2 * inter / np.maximum(total, 1), 1.0)
    iou = np.where(union > 0, inter / np.maximum(union, 1), 1.0)
    return dice, iou


def _loss():
    import keras
    from keras import ops

    bce = keras.losses.BinaryCrossentropy()

    def loss(y, p):
        inter = ops.sum(y * p, axis=(1, 2, 3))
        dice = 1.0 - (2.0 * inter + 1.0) / (ops.sum(y, axis=(1, 2, 3))
                                            + ops.sum(p, axis=(1, 2, 3)) + 1.0)
        return bce(y, p) + ops.mean(dice)

    return loss


def train(pairs: Path, out: Path, epochs: int = 20, batch: int = 32, lr: float = 2e-3,
          seed: int = 0, base: int = 8, depth: int = 4, max_filters: int = 48,
          say=print) -> dict:
    """Train the U-Net on the pairs' training part; evaluate per source on the held-out part.

    Writes ``out`` (.keras, weights only as needed for inference) and ``out`` with
    ``.json``: sources, commits, licences, metrics, command.
    """
    import keras

    data = np.load(pairs)
    meta = json.loads(pairs.with_suffix(".json").read_text())
    x, y, src, held = data["images"], data["masks"], data["source"], data["held_out"]
    names = [str(s) for s in data["source_names"]]
    tr = np.where(~held)[0]
    keras.utils.set_random_seed(seed)
    rng = np.random.default_rng(seed)
    model = build_unet(base=base, depth=depth, max_filters=max_filters)
    steps = epochs * int(np.ceil(len(tr) / batch))
    sched = keras.optimizers.schedules.CosineDecay(lr, steps, alpha=0.02)
    model.compile(optimizer=keras.optimizers.Adam(sched), loss=_loss())
    say(f"{model.count_params()} parameters; {len(tr)} training pairs, {int(held.sum())} held out")
    t0 = time.time()
    for epoch in range(epochs):
        order = rng.permutation(tr)
        xs, ys = zip(*(augment_pair(x[i], y[i], rng) for i in order))
        hist = model.fit(np.stack(xs)[..., None], np.stack(ys)[..., None], batch_size=batch,
                         epochs=1, shuffle=False, verbose=0)
        say(f"epoch {epoch + 1}/{epochs}: loss {hist.history['loss'][-1]:.4f} "
            f"({time.time() - t0:.0f} s)")
    seconds = time.time() - t0
    metrics = evaluate(model, x[held], y[held], src[held], names)
    say(json.dumps(metrics, indent=1))
    clean = build_unet(base=base, depth=depth, max_filters=max_filters)
    clean.set_weights(model.get_weights())
    out.parent.mkdir(parents=True, exist_ok=True)
    clean.save(out)
    record = {
        "file": out.name, "parameters": int(clean.count_params()),
        "architecture": {"builder": "training.segmenter.build_unet", "size": SEG_SIZE,
                         "base": base, "depth": depth, "max_filters": max_filters},
        "input": "(N, 96, 96, 1) grey 0..255: the 192 px frame pooled 2 x 2",
        "output": "(N, 96, 96, 1) lung probability (sigmoid); lung where > 0.5",
        "training": {"epochs": epochs, "batch": batch, "lr": lr, "schedule": "cosine",
                     "loss": "binary cross-entropy + soft Dice", "seed": seed,
                     "augmentation": "training.segmenter.augment_pair (new draw every epoch)",
                     "seconds": round(seconds), "pairs": int(len(tr))},
        "held_out_metrics": metrics,
        "data": {k: meta[k] for k in ("image_rule", "mask_rule", "split", "note")},
        "sources": [{k: s[k] for k in ("name", "repo", "commit", "images", "masks", "licence",
                                       "data", "pairs", "train", "held_out")}
                    for s in meta["sources"]],
        "command": "python -m training.segmenter " + " ".join(sys.argv[1:]),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "versions": {"tensorflow": _version("tensorflow"), "keras": keras.__version__},
    }
    write_json(out.with_suffix(".json"), record)
    return record


def _version(mod: str) -> str:
    try:
        return __import__(mod).__version__
    except Exception:  # noqa: BLE001 - a version string only
        return "?"


def evaluate(model, x: np.ndarray, y: np.ndarray, src: np.ndarray, names: list[str]) -> dict:
    """Dice / IoU per source (means over images) on clean inputs, and the box shift a 3 %
    black border causes (in frame fractions, after mapping the bordered box back)."""
    from pneumo_edge.lung import lung_box

    prob = model.predict(x[..., None].astype(np.float32), verbose=0, batch_size=64)[..., 0]
    dice, iou = dice_iou(prob, y)
    pad = 0.03
    border = np.stack([_shrink(im.astype(np.float32), np.zeros_like(im, np.float32),
                               pad, pad, pad, pad, 0.0)[0] for im in x])
    prob_b = model.predict(border[..., None], verbose=0, batch_size=64)[..., 0]
    f = round(pad * SEG_SIZE) / SEG_SIZE
    box, _ = lung_box(prob)
    box_b, _ = lung_box(prob_b)
    shift = np.abs((box_b - f) / (1 - 2 * f) - box).max(axis=1)
    box_t, _ = lung_box(y.astype(np.float32))
    box_err = np.abs(box - box_t).max(axis=1)
    out = {}
    for k, name in enumerate(names):
        sel = src == k
        if not sel.any():
            continue
        out[name] = {"n": int(sel.sum()), "dice": round(float(dice[sel].mean()), 4),
                     "iou": round(float(iou[sel].mean()), 4),
                     "iou_min": round(float(iou[sel].min()), 4),
                     "box_error_vs_truth_max_side_mean": round(float(box_err[sel].mean()), 4),
                     "box_shift_3pct_border_mean": round(float(shift[sel].mean()), 4)}
    out["all"] = {"n": int(len(x)), "dice": round(float(dice.mean()), 4),
                  "iou": round(float(iou.mean()), 4),
                  "box_error_vs_truth_max_side_mean": round(float(box_err.mean()), 4),
                  "box_shift_3pct_border_mean": round(float(shift.mean()), 4)}
    return out


# ------------------------------------------------------------------------- overlays

def overlay_montage(model, data: Path, out: Path, n_per_class: int = 15, seed: int = 0,
                    border: float = 0.03, tile: int = 192) -> list[str]:
    """A JPEG montage of training X-rays with the lung mask (red) and the box with margin
    (green): each image as it is and inside a ``border`` black border, side by side.

    The images are drawn at random (numpy ``seed``) from ``data``/NORMAL and
    ``data``/PNEUMONIA; returns their paths.
    """
    from pneumo_edge.lung import FRAME, lung_box, lung_field_issue, seg_input
    from pneumo_edge.preprocess import PreprocessConfig, load_gray

    rng = np.random.default_rng(seed)
    cfg = PreprocessConfig(FRAME, FRAME, channels=1)
    picked: list[str] = []
    for cls in ("NORMAL", "PNEUMONIA"):
        files = sorted(p for p in (data / cls).iterdir() if p.suffix.lower() in
                       (".jpeg", ".jpg", ".png"))
        picked += [str(files[i]) for i in sorted(rng.choice(len(files), n_per_class,
                                                            replace=False))]
    frames = []
    for path in picked:
        g = load_gray(path, cfg).astype(np.float32)
        pad = int(round(border * FRAME))
        gb = np.zeros_like(g)
        gb[pad:FRAME - pad, pad:FRAME - pad] = cv2.resize(g, (FRAME - 2 * pad, FRAME - 2 * pad),
                                                          interpolation=cv2.INTER_AREA)
        frames += [g, gb]
    frames = np.stack(frames)
    prob = model.predict(seg_input(frames)[..., None], verbose=0, batch_size=64)[..., 0]
    boxes, areas = lung_box(prob)
    tiles = []
    for k, (g, p, b, a) in enumerate(zip(frames, prob, boxes, areas)):
        t = cv2.cvtColor(np.clip(g, 0, 255).astype(np.uint8), cv2.COLOR_GRAY2BGR)
        m = cv2.resize((p > 0.5).astype(np.uint8), (FRAME, FRAME),
                       interpolation=cv2.INTER_NEAREST)
        red = t.copy()
        red[m > 0] = (0.5 * red[m > 0] + np.array([0, 0, 127])).astype(np.uint8)
        t = red
        y0, x0, y1, x1 = (int(round(v * FRAME)) for v in b)
        cv2.rectangle(t, (x0, y0), (max(x0, x1 - 1), max(y0, y1 - 1)), (0, 255, 0), 1)
        j = k // 2
        label = (f"N{j + 1}" if j < n_per_class else f"P{j - n_per_class + 1}") + \
            (f" +{border:.0%}" if k % 2 else "")
        flag = lung_field_issue(b, float(a))
        cv2.putText(t, label + (" FLAG" if flag else ""), (3, 12), cv2.FONT_HERSHEY_SIMPLEX,
                    0.4, (0, 255, 255), 1, cv2.LINE_AA)
        tiles.append(cv2.resize(t, (tile, tile), interpolation=cv2.INTER_AREA))
    cols = 10  # five images a row, each clean | bordered
    rows = [np.hstack(tiles[i:i + cols]) for i in range(0, len(tiles), cols)]
    out.parent.mkdir(parents=True, exist_ok=True)
    ok, buf = cv2.imencode(".jpg", np.vstack(rows), [cv2.IMWRITE_JPEG_QUALITY, 80])
    if not ok:
        raise OSError(f"{out}: JPEG encoding failed")
    out.write_bytes(buf.tobytes())
    return picked


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Train the lung segmenter, or draw its overlays.")
    sub = ap.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("train")
    t.add_argument("--pairs", type=Path, default=Path("runs/lungseg/pairs_96.npz"))
    t.add_argument("--out", type=Path, default=Path("training/weights/lung_unet96.keras"))
    t.add_argument("--epochs", type=int, default=20)
    t.add_argument("--batch", type=int, default=32)
    t.add_argument("--lr", type=float, default=2e-3)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--base", type=int, default=8)
    t.add_argument("--depth", type=int, default=4)
    t.add_argument("--max-filters", type=int, default=48)
    o = sub.add_parser("overlays")
    o.add_argument("--model", type=Path, default=Path("training/weights/lung_unet96.keras"))
    o.add_argument("--data", type=Path, default=Path("../shared/data/chest_xray/train"))
    o.add_argument("--out", type=Path, default=Path("docs/lung_field_overlays.jpg"))
    o.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    if args.cmd == "train":
        train(args.pairs, args.out, args.epochs, args.batch, args.lr, args.seed, args.base,
              args.depth, args.max_filters)
    else:
        import keras

        model = keras.models.load_model(args.model, compile=False)
        for p in overlay_montage(model, args.data, args.out, seed=args.seed):
            print(p)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
