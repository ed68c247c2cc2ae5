"""Measure the edge targets on this machine and write benchmarks/results.{md,json}.

Usage (after `pip install -e ".[train,dev]"`, with ../shared/data present):

    python benchmarks/run_benchmarks.py [--models exported/*.onnx] [--keras runs/release]

Everything is measured in one run so that ratios compare like with like:
  * the format table (pneumo-edge benchmark) on real validation images;
  * end-to-end images/s of the predict pipeline vs the model-only rate, on
    224 px images and on full-resolution originals;
  * cold start of `pneumo-edge predict one.jpeg` vs `python -c "import tensorflow"`;
  * peak RSS of `predict` on 5,000 vs 50 images;
  * the model's FLOPs and this machine's measured fp32 GFLOP/s (numpy matmul);
  * with --compare-int8 A.onnx B.onnx ...: batch-1 latency of other INT8 models
    (the same model exported without its cam/ood outputs, the previous release)
    against the release INT8, in the same run.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
sys.path.insert(0, str(ROOT))

from pneumo_edge.benchmark import machine_info, markdown_table, run_benchmark, time_runs  # noqa: E402
from pneumo_edge.images import collect_images  # noqa: E402
from pneumo_edge.io import atomic_write  # noqa: E402
from pneumo_edge.predict import predict_paths  # noqa: E402
from pneumo_edge.preprocess import load_image  # noqa: E402
from pneumo_edge.runtime import load_model  # noqa: E402

EXE = str(Path(sys.executable).with_name("pneumo-edge"))


def model_flops(onnx_path: Path) -> float:
    """Multiply-adds x 2 of Conv and Gemm/MatMul nodes for one image."""
    import onnx
    from onnx import shape_inference

    m = onnx.load(str(onnx_path))
    for d in m.graph.input[0].type.tensor_type.shape.dim[:1]:
        d.dim_value = 1
    m = shape_inference.infer_shapes(m)
    shapes = {}
    for vi in list(m.graph.value_info) + list(m.graph.input) + list(m.graph.output):
        shapes[vi.name] = [d.dim_value for d in vi.type.tensor_type.shape.dim]
    inits = {i.name: list(i.dims) for i in m.graph.initializer}
    flops = 0.0
    for n in m.graph.node:
        if n.op_type == "Conv":
            w = inits.get(n.input[1])
            out = shapes.get(n.output[0])
            if w and out:
                flops += 2.0 * np.prod(out[1:]) * np.prod(w[1:])
        elif n.op_type in ("Gemm", "MatMul"):
            w = inits.get(n.input[1])
            if w:
                flops += 2.0 * np.prod(w)
    return flops


def matmul_gflops(n: int = 2048, reps: int = 5) -> float:
    a = np.random.default_rng(0).random((n, n), dtype=np.float32)
    b = np.random.default_rng(1).random((n, n), dtype=np.float32)
    a @ b
    best = min(_timed(lambda: a @ b) for _ in range(reps))
    return 2.0 * n ** 3 / best / 1e9


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def end_to_end(model_path: Path, files: list[Path], batch: int) -> dict:
    model = load_model(model_path, device="cpu")
    x = np.stack([load_image(f, model.preprocess) for f in files[:batch]])
    only = time_runs(lambda: model.run(x), batch, min_seconds=3.0)
    predict_paths(model, files[:batch * 4], batch_size=batch)  # warm the decode path
    run = predict_paths(model, files, batch_size=batch)
    assert not run.failures, run.failures[:3]
    e2e = run.images_per_second
    return {"model": model_path.name, "n_files": len(files), "batch_size": batch,
            "model_only_images_per_second": only["images_per_second"],
            "end_to_end_images_per_second": e2e,
            "ratio": e2e / only["images_per_second"]}


def cold_start(one_image: Path, model_path: Path, reps: int = 5) -> dict:
    cmd = [EXE, "predict", str(one_image), "--model", str(model_path), "-q"]
    subprocess.run(cmd, capture_output=True, check=True)  # page cache warm, like a second run
    ours = statistics.median(_timed(lambda: subprocess.run(cmd, capture_output=True, check=True))
                             for _ in range(reps))
    tf_cmd = [sys.executable, "-c", "import tensorflow"]
    try:
        subprocess.run(tf_cmd, capture_output=True, check=True)
        tf = statistics.median(_timed(lambda: subprocess.run(tf_cmd, capture_output=True, check=True))
                               for _ in range(3))
    except subprocess.CalledProcessError:
        tf = None
    return {"predict_one_seconds": ours, "import_tensorflow_seconds": tf,
            "ratio": None if tf is None else ours / tf}


def peak_rss_mb(files_dir: Path, model_path: Path) -> float:
    """Peak RSS of one `pneumo-edge predict` child process, in MB."""
    code = ("import resource, subprocess, sys; "
            "subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL); "
            "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)")
    out = subprocess.run([sys.executable, "-c", code, EXE, "predict", str(files_dir), "--model",
                          str(model_path), "-q", "--out", str(files_dir.parent / "rss_out")],
                         capture_output=True, text=True, check=True)
    return int(out.stdout.strip()) / 1024.0


def link_files(files: list[Path], dest: Path) -> Path:
    dest.mkdir(parents=True, exist_ok=True)
    for i, f in enumerate(files):
        os.symlink(f.resolve(), dest / f"{i:05d}_{f.name}")
    return dest


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", nargs="+", type=Path,
                    default=sorted((ROOT / "exported").glob("*.onnx")))
    ap.add_argument("--keras", type=Path, default=ROOT / "runs" / "v2")
    ap.add_argument("--compare-int8", nargs="*", type=Path, default=[],
                    help="other INT8 models to time at batch 1 against the release INT8")
    ap.add_argument("--val-split", type=Path, default=ROOT / "exported" / "val_split.csv")
    ap.add_argument("--n-val", type=int, default=400)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks")
    ap.add_argument("--render-only", action="store_true",
                    help="rewrite results.md from results.json without measuring")
    args = ap.parse_args()
    if args.render_only:
        from pneumo_edge.benchmark import BenchmarkResult, BenchmarkRow
        res = json.loads((args.out / "results.json").read_text())
        f = res["formats"]
        table = BenchmarkResult(f["machine"], f["n_images"], f["n_labelled"], f["batch_sizes"],
                                [BenchmarkRow(**r) for r in f["rows"]])
        atomic_write(args.out / "results.md", render(res, table))
        print((args.out / "results.md").read_text())
        return
    if not (SHARED / "chest_xray" / "train").is_dir():
        sys.exit(f"{SHARED} is needed for the real-image benchmarks")
    models = {p.stem.rsplit("_", 1)[-1]: p for p in args.models}
    tmp = Path(tempfile.mkdtemp(prefix="pneumo-bench-"))
    results: dict = {"machine": machine_info()}

    # 1. the format table on real validation images (labelled folders of links)
    import csv
    rows = list(csv.DictReader(open(args.val_split)))[: args.n_val]
    val_dir = tmp / "val"
    for r in rows:
        d = val_dir / r["label"]
        d.mkdir(parents=True, exist_ok=True)
        os.symlink((SHARED / "chest_xray" / "train" / r["path"]).resolve(),
                   d / Path(r["path"]).name)
    keras = args.keras if (args.keras / "best.keras").exists() else None
    from training.evaluate import keras_predictor
    table = run_benchmark(list(models.values()), data=val_dir, keras_source=keras,
                          keras_loader=keras_predictor,
                          batch_sizes=(1, 8, 32), min_seconds=3.0, progress=print)
    results["formats"] = table.to_dict()

    # 1b. other INT8 models against the release INT8, batch 1 and 8, same images
    results["int8_comparison"] = []
    if args.compare_int8 and "int8" in models:
        for path in [models["int8"], *args.compare_int8]:
            m = load_model(path, device="cpu")
            x = np.stack([load_image(f, m.preprocess) for f in list(val_dir.rglob("*.jpeg"))[:8]])
            lat = {str(b): time_runs(lambda: m.run_all(x[:b]), b, min_seconds=5.0)
                   for b in (1, 8)}
            results["int8_comparison"].append({
                "model": str(path.relative_to(ROOT) if path.is_relative_to(ROOT) else path),
                "outputs": m.output_names, "input_size": [m.preprocess.height, m.preprocess.width],
                "latency": lat})
            print(results["int8_comparison"][-1])

    # 2. end-to-end vs model-only
    train_files = collect_images([SHARED / "chest_xray" / "train"])
    rng = np.random.default_rng(0)
    some = [train_files[i] for i in sorted(rng.permutation(len(train_files))[:600])]
    originals = collect_images([SHARED / "originals"]) * 5  # 100 full-resolution files
    results["end_to_end"] = []
    for precision in ("int8", "fp32"):
        if precision in models:
            for name, files in (("224px", some), ("full_resolution_originals", originals)):
                r = end_to_end(models[precision], files, batch=8)
                r["images"] = name
                print(r)
                results["end_to_end"].append(r)

    # 3. cold start
    default = models.get("int8") or next(iter(models.values()))
    results["cold_start"] = cold_start(some[0], default)
    print(results["cold_start"])

    # 4. peak RSS on 50 vs 5000 images
    small = link_files(train_files[:50], tmp / "rss50")
    large = link_files(train_files[:5000], tmp / "rss5000")
    rss50, rss5000 = peak_rss_mb(small, default), peak_rss_mb(large, default)
    results["peak_rss_mb"] = {"50_images": rss50, "5000_images": rss5000, "ratio": rss5000 / rss50}
    print(results["peak_rss_mb"])

    # 5. the physical limit
    flops = model_flops(models.get("fp32") or default)
    gf = matmul_gflops()
    results["limit"] = {"model_gflops_per_image": flops / 1e9, "numpy_fp32_gflops": gf,
                        "fp32_ms_per_image_at_matmul_rate": flops / (gf * 1e9) * 1000}
    print(results["limit"])
    shutil.rmtree(tmp, ignore_errors=True)

    args.out.mkdir(parents=True, exist_ok=True)
    atomic_write(args.out / "results.json", json.dumps(results, indent=2) + "\n")
    atomic_write(args.out / "results.md", render(results, table))
    print((args.out / "results.md").read_text())


def targets(res: dict) -> list[tuple[str, float | None, float, str]]:
    """(name, measured ratio, limit, comparison) for each edge target of the project."""
    rows = {r["precision"] if r["fmt"] == "onnx" else "keras": r for r in res["formats"]["rows"]}
    p50 = lambda key, b: rows[key]["latency"][str(b)]["p50_ms"] if key in rows else None
    ratio = lambda a, b: None if a is None or b is None else a / b
    e2e = {(r["model"].rsplit("_", 1)[-1].split(".")[0], r["images"]): r["ratio"]
           for r in res["end_to_end"]}
    comp = res.get("int8_comparison") or []
    heads = None
    # only against the same model exported without its cam and ood outputs (not, say,
    # a previous release given to --compare-int8 for the record)
    bare = [c for c in comp[1:] if comp and c["input_size"] == comp[0]["input_size"]
            and set(c["outputs"]) == set(comp[0]["outputs"]) - {"cam", "ood"}]
    if bare:
        heads = comp[0]["latency"]["1"]["p50_ms"] / bare[0]["latency"]["1"]["p50_ms"]
    return [
        ("INT8 / FP32 p50 latency, batch 1", ratio(p50("int8", 1), p50("fp32", 1)), 0.5, "<="),
        ("INT8 with cam + ood / the same INT8 without, p50 batch 1", heads, 1.1, "<="),
        ("FP32 ONNX / Keras predict_on_batch p50, batch 1", ratio(p50("fp32", 1), p50("keras", 1)), 0.8, "<="),
        ("FP32 ONNX / Keras predict_on_batch p50, batch 32", ratio(p50("fp32", 32), p50("keras", 32)), 0.8, "<="),
        ("end-to-end / model-only img/s, INT8, 224 px", e2e.get(("int8", "224px")), 0.8, ">="),
        ("end-to-end / model-only img/s, INT8, full-resolution originals",
         e2e.get(("int8", "full_resolution_originals")), 0.5, ">="),
        ("cold predict one.jpeg / import tensorflow", res["cold_start"]["ratio"], 0.5, "<="),
        ("peak RSS 5,000 / 50 images", res["peak_rss_mb"]["ratio"], 1.2, "<="),
    ]


def render(res: dict, table) -> str:
    lines = ["# Benchmark results", "",
             f"Generated by `python benchmarks/run_benchmarks.py` on "
             f"{time.strftime('%Y-%m-%d')}; raw numbers in `results.json`. Ratios come from one "
             "run on one machine; absolute numbers move with the machine and its load.", "",
             "## Formats (validation images, p50/p95 model time per image)", "",
             markdown_table(table), "## End-to-end vs model-only (predict pipeline, batch 8)", "",
             "| model | images | files | model-only img/s | end-to-end img/s | ratio |",
             "|---|---|---|---|---|---|"]
    for r in res["end_to_end"]:
        lines.append(f"| {r['model']} | {r['images']} | {r['n_files']} | "
                     f"{r['model_only_images_per_second']:.1f} | "
                     f"{r['end_to_end_images_per_second']:.1f} | {r['ratio']:.2f} |")
    if res.get("int8_comparison"):
        base = res["int8_comparison"][0]["latency"]
        lines += ["", "## INT8 models compared (batch 1 and 8, same images, same run)", "",
                  "| model | outputs | input | p50 ms b1 | p50 ms b8 | b1 vs release INT8 |",
                  "|---|---|---|---|---|---|"]
        for c in res["int8_comparison"]:
            lat = c["latency"]
            lines.append(f"| `{c['model']}` | {', '.join(c['outputs'])} | "
                         f"{c['input_size'][0]} px | {lat['1']['p50_ms']:.2f} | "
                         f"{lat['8']['p50_ms']:.2f} | "
                         f"{lat['1']['p50_ms'] / base['1']['p50_ms']:.2f}x |")
    lines += ["", "## Targets", "", "| target | measured | met |", "|---|---|---|"]
    for name, value, limit, cmp in targets(res):
        if value is None:
            lines.append(f"| {name} {cmp} {limit} | not measured in this run | - |")
            continue
        ok = value <= limit if cmp == "<=" else value >= limit
        lines.append(f"| {name} {cmp} {limit} | {value:.2f} | {'yes' if ok else 'no'} |")
    cs, rss, lim = res["cold_start"], res["peak_rss_mb"], res["limit"]
    tf = cs["import_tensorflow_seconds"]
    tf_s = "n/a" if tf is None else f"{tf:.2f} s"
    ratio_s = "n/a" if cs["ratio"] is None else f"{cs['ratio']:.2f}"
    lines += ["", "## Cold start", "",
              f"`pneumo-edge predict one.jpeg`: {cs['predict_one_seconds']:.2f} s; "
              f"`python -c \"import tensorflow\"`: {tf_s}; ratio {ratio_s}.", "",
              "## Peak memory", "",
              f"Peak RSS of `predict`: {rss['50_images']:.0f} MB on 50 images, "
              f"{rss['5000_images']:.0f} MB on 5,000 images (ratio {rss['ratio']:.2f}).", "",
              "## Physical limit", "",
              f"The model needs {lim['model_gflops_per_image']:.2f} GFLOP per image; this machine's "
              f"numpy fp32 matmul reaches {lim['numpy_fp32_gflops']:.1f} GFLOP/s, so FP32 cannot beat "
              f"about {lim['fp32_ms_per_image_at_matmul_rate']:.1f} ms per image at that rate.",
              ""] + [
              f"- {r['name']}: {r['latency'][str(b)]['p50_ms']:.2f} ms per image at batch {b} = "
              f"{lim['fp32_ms_per_image_at_matmul_rate'] / r['latency'][str(b)]['p50_ms']:.0%} "
              "of the fp32 matmul rate" for r in res["formats"]["rows"]
              for b in res["formats"]["batch_sizes"][-1:]] + ["",
              "INT8 beats the fp32 limit because VNNI integer dot products do four int8 "
              "multiply-adds per 32-bit lane in one instruction; FP32 ONNX and Keras both sit near the fp32 limit at large "
              "batches, so the 0.8x target against Keras can only be met at small batches.", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
