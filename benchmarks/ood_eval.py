"""Evidence for the OOD score, the input checks and the heatmaps of a release model.

    pip install -e ".[bench]"   # scikit-image, for its bundled sample images
    python benchmarks/ood_eval.py [--model exported/pneumo_resnet18_int8.onnx]
                                  [--before runs/v1/pneumo_resnet18_fp32.onnx]

Runs the real ``predict`` pipeline (decoding, input checks, the model's ``ood``
output) on:
- the validation X-rays behind the release numbers (``exported/val_split.csv``,
  needs ``../shared/data``): how many are flagged (target: at most 2 %);
- non-radiographs: scikit-image's bundled sample images (photographs, scans,
  microscopy, text), synthetic noise, gradients, blank frames, rendered text
  pages and checkerboards; and X-rays made wrong: inverted, rotated 90 degrees
  (target: at least 95 % flagged);
then the share of heatmap evidence inside the chest box on validation PNEUMONIA
images, for this model and, with ``--before``, for an older model without a
``cam`` output (its map is computed from its last feature map and dense layer
by adding that feature map as a graph output).

Writes ``benchmarks/ood_results.json`` and ``benchmarks/ood_results.md``.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
SHARED = ROOT.parent / "shared" / "data" / "chest_xray" / "train"

from pneumo_edge.heatmap import cam_mass_in_box  # noqa: E402
from pneumo_edge.lung import heatmap_to_frame  # noqa: E402
from pneumo_edge.io import atomic_write  # noqa: E402
from pneumo_edge.images import decode_gray  # noqa: E402
from pneumo_edge.predict import predict_paths  # noqa: E402
from pneumo_edge.runtime import default_model_path, load_model  # noqa: E402


def _save(path: Path, img: np.ndarray) -> Path:
    if img.dtype != np.uint8:
        img = (255 * (img - img.min()) / max(float(np.ptp(img)), 1e-9)).astype(np.uint8)
    if img.ndim == 3 and img.shape[2] == 4:
        img = img[..., :3]
    if img.ndim == 3:
        img = cv2.cvtColor(img, cv2.COLOR_RGB2BGR)
    ok, buf = cv2.imencode(path.suffix, img)
    assert ok
    buf.tofile(str(path))
    return path


def sample_images(folder: Path) -> list[Path]:
    import skimage.data as d

    names = ["astronaut", "camera", "coffee", "chelsea", "rocket", "coins", "moon", "page",
             "text", "horse", "hubble_deep_field", "immunohistochemistry", "retina", "clock",
             "grass", "gravel", "brick", "checkerboard", "logo", "cat", "colorwheel",
             "microaneurysms", "shepp_logan_phantom", "cell"]
    out = []
    for n in names:
        try:
            img = np.asarray(getattr(d, n)())
        except Exception:  # noqa: BLE001 - an image that needs a download is skipped
            continue
        if img.dtype == bool:
            img = img.astype(np.uint8) * 255
        out.append(_save(folder / f"skimage_{n}.{'jpg' if img.ndim == 3 else 'png'}", img))
    return out


def synthetic_images(folder: Path) -> list[Path]:
    rng = np.random.default_rng(0)
    out = []
    for i in range(5):
        out.append(_save(folder / f"noise_uniform_{i}.png",
                         rng.integers(0, 256, (512, 512), dtype=np.uint8)))
        g = np.clip(rng.normal(110 + 10 * i, 40, (480, 400)), 0, 255).astype(np.uint8)
        out.append(_save(folder / f"noise_gauss_{i}.png", g))
    yy, xx = np.mgrid[:400, :400] / 399.0
    for name, g in (("h", xx), ("v", yy), ("diag", (xx + yy) / 2), ("radial", np.hypot(xx - .5, yy - .5)),
                    ("h_inv", 1 - xx), ("v_inv", 1 - yy)):
        out.append(_save(folder / f"gradient_{name}.png", (g * 255).astype(np.uint8)))
    for level in (0, 128, 255):
        out.append(_save(folder / f"blank_{level}.png", np.full((400, 400), level, np.uint8)))
    for i in range(5):
        page = np.full((1100, 850), 245, np.uint8)
        for line in range(40):
            words = " ".join("".join(chr(97 + rng.integers(26)) for _ in range(rng.integers(2, 9)))
                             for _ in range(9))
            cv2.putText(page, words, (60, 60 + line * 25), cv2.FONT_HERSHEY_SIMPLEX, 0.6,
                        int(rng.integers(0, 60)), 1, cv2.LINE_AA)
        out.append(_save(folder / f"text_page_{i}.png", page))
    for k in (8, 16, 32):
        board = ((np.add.outer(np.arange(400) // k, np.arange(400) // k) % 2) * 255).astype(np.uint8)
        out.append(_save(folder / f"checkerboard_{k}.png", board))
    return out


def transformed_xrays(folder: Path, files: list[str], kind: str) -> list[Path]:
    out = []
    for i, f in enumerate(files):
        g = decode_gray(f)
        g = 255 - g if kind == "inverted" else cv2.rotate(g, cv2.ROTATE_90_CLOCKWISE)
        out.append(_save(folder / f"{kind}_{i:03d}.png", g))
    return out


def flag_stats(model, files: list[Path]) -> dict:
    run = predict_paths(model, files, truths=[None] * len(files), batch_size=16)
    preds = run.predictions
    ood = [p for p in preds if p.in_distribution is False]
    checks = [p for p in preds if any(not w.startswith("out of distribution") for w in p.warnings)]
    either = [p for p in preds if p.warnings]
    n = len(preds) + len(run.failures)
    return {"n": n, "failed_to_decode": len(run.failures),
            "flagged_by_ood": len(ood), "flagged_by_input_checks": len(checks),
            "flagged_any": len(either) + len(run.failures),
            "flag_rate": (len(either) + len(run.failures)) / n if n else None,
            "ood_rate": len(ood) / n if n else None,
            "median_ood_score": float(np.median([p.ood_score for p in preds
                                                 if p.ood_score is not None] or [np.nan])),
            "not_flagged": [Path(p.path).name for p in preds if not p.warnings][:20]}


def cam_of_old_model(path: Path):
    """A predictor (N,H,W,C) -> (N, h, w) CAM logits for a model without a cam output."""
    import onnx
    import onnxruntime as ort
    from onnx import numpy_helper

    m = onnx.load(str(path))
    nodes = list(m.graph.node)
    gap = next(n for n in reversed(nodes) if n.op_type in ("GlobalAveragePool", "ReduceMean"))
    consumers = {i: n for n in nodes for i in n.input}
    node = consumers[gap.output[0]]
    while node.op_type != "MatMul":
        node = consumers[node.output[0]]
    inits = {t.name: numpy_helper.to_array(t) for t in m.graph.initializer}
    w = inits[node.input[1]].reshape(-1)
    b = float(inits[consumers[node.output[0]].input[1]].reshape(-1)[0])
    fmap_name = gap.input[0]
    m.graph.output.append(onnx.helper.make_tensor_value_info(fmap_name, onnx.TensorProto.FLOAT,
                                                             None))
    sess = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    nchw = gap.op_type == "GlobalAveragePool"

    def cams(x):
        fmap = sess.run([fmap_name], {name: x})[0]
        return (np.einsum("nchw,c->nhw", fmap, w) if nchw
                else np.einsum("nhwc,c->nhw", fmap, w)) + b

    return cams


def cam_mass(model_path: Path, files: list[str], old: bool) -> dict:
    from pneumo_edge.preprocess import load_image

    model = load_model(model_path, device="cpu")
    cfg = model.preprocess
    def current(x):
        out = model.run_all(x)
        if out.get("lung_box") is None:
            return list(out["cam"])
        # a lung-field model's map covers its crop: draw it back onto the frame first,
        # as predict does for its heatmaps
        return [heatmap_to_frame(c, box, (100, 100))
                for c, box in zip(out["cam"], out["lung_box"])]

    predict = cam_of_old_model(model_path) if old else current
    shares = []
    for i in range(0, len(files), 32):
        x = np.stack([load_image(f, cfg) for f in files[i:i + 32]])
        shares += [cam_mass_in_box(c) for c in predict(x)]
    shares = np.asarray(shares)
    return {"model": str(model_path.relative_to(ROOT) if model_path.is_relative_to(ROOT)
                         else model_path),
            "n": int(shares.size), "mean_share_in_chest_box": float(shares.mean()),
            "median": float(np.median(shares)),
            "share_of_images_above_0.8": float(np.mean(shares > 0.8))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", type=Path, default=default_model_path())
    ap.add_argument("--before", type=Path, default=None)
    ap.add_argument("--val-split", type=Path, default=ROOT / "exported" / "val_split.csv")
    ap.add_argument("--n-transformed", type=int, default=100)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks")
    args = ap.parse_args()
    model = load_model(args.model, device="cpu")
    if model.ood_threshold is None:
        sys.exit(f"{args.model} has no ood output")
    rows = list(csv.DictReader(open(args.val_split)))
    val = [str(SHARED / r["path"]) for r in rows]
    pneu = [str(SHARED / r["path"]) for r in rows if r["label"] == "PNEUMONIA"]
    res: dict = {"model": str(args.model.relative_to(ROOT) if args.model.is_relative_to(ROOT)
                              else args.model),
                 "ood_threshold": model.ood_threshold, "date": time.strftime("%Y-%m-%d")}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for d in ("skimage", "synthetic", "inverted", "rotated"):
            (tmp / d).mkdir()
        rng = np.random.default_rng(0)
        some = [val[i] for i in sorted(rng.permutation(len(val))[:args.n_transformed])]
        groups = {
            "validation X-rays": [Path(v) for v in val],
            "scikit-image sample images": sample_images(tmp / "skimage"),
            "synthetic (noise, gradients, blank, text pages, checkerboards)":
                synthetic_images(tmp / "synthetic"),
            "inverted X-rays": transformed_xrays(tmp / "inverted", some, "inverted"),
            "X-rays rotated 90 degrees": transformed_xrays(tmp / "rotated", some, "rotated"),
        }
        res["groups"] = {name: flag_stats(model, files) for name, files in groups.items()}
    non = [g for n, g in res["groups"].items() if n != "validation X-rays"]
    res["non_radiographs"] = {
        "n": sum(g["n"] for g in non), "flagged_any": sum(g["flagged_any"] for g in non),
        "flag_rate": sum(g["flagged_any"] for g in non) / sum(g["n"] for g in non),
        "ood_rate": sum(g["flagged_by_ood"] for g in non) / sum(g["n"] for g in non)}
    res["cam_mass"] = [cam_mass(args.model, pneu, old=False)]
    if args.before:
        res["cam_mass"].insert(0, cam_mass(args.before, pneu, old=True))
    args.out.mkdir(parents=True, exist_ok=True)
    atomic_write(args.out / "ood_results.json", json.dumps(res, indent=2) + "\n")
    atomic_write(args.out / "ood_results.md", render(res))
    print(render(res))


def render(res: dict) -> str:
    lines = ["# OOD score, input checks and heatmaps", "",
             f"Generated by `python benchmarks/ood_eval.py` on {res['date']} for "
             f"`{res['model']}` (OOD threshold {res['ood_threshold']:.2f}); raw numbers in "
             "`ood_results.json`.", "",
             "| images | n | flagged (any) | by OOD score | by input checks | median OOD score |",
             "|---|---|---|---|---|---|"]
    for name, g in res["groups"].items():
        lines.append(f"| {name} | {g['n']} | {g['flagged_any']} ({100 * g['flag_rate']:.1f} %) | "
                     f"{g['flagged_by_ood']} | {g['flagged_by_input_checks']} | "
                     f"{g['median_ood_score']:.1f} |")
    nr = res["non_radiographs"]
    lines += ["", f"Non-radiographs and wrong X-rays together: {nr['flagged_any']} of {nr['n']} "
                  f"flagged ({100 * nr['flag_rate']:.1f} %; {100 * nr['ood_rate']:.1f} % by the "
                  "OOD score alone).", "",
              "## Heatmap evidence inside the chest box (validation PNEUMONIA images)", "",
              "Share of the map's evidence (the CAM above its own minimum, so that the bias "
              "shared by every position does not count) inside the box x 15-85 %, y 10-90 % of "
              "the image (56 % of its area: a flat map scores 0.56); the rest lies on borders "
              "and corners.", "",
              "| model | images | mean share | median | images above 0.8 |", "|---|---|---|---|---|"]
    for c in res["cam_mass"]:
        lines.append(f"| `{c['model']}` | {c['n']} | {c['mean_share_in_chest_box']:.3f} | "
                     f"{c['median']:.3f} | {100 * c['share_of_images_above_0.8']:.1f} % |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
