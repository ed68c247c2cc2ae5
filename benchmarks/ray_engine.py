"""The Ray engine against the local engine on the same real X-rays, in one run.

    python benchmarks/ray_engine.py [--data ../shared/data/chest_xray/train] [--n 600]

Measures end-to-end images per second (decode + input checks + model + record
keeping, from the first file to the last record; Ray's own start-up is reported
apart) of the local engine and of the Ray engine at 1 and 2 actors, checks that
the probabilities agree, and writes benchmarks/ray_results.{md,json} with the
cost model for an archive. Ratios are what transfers between machines.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pneumo_edge.benchmark import machine_info  # noqa: E402
from pneumo_edge.io import atomic_write  # noqa: E402
from pneumo_edge.images import collect_labelled  # noqa: E402
from pneumo_edge.predict import predict_paths  # noqa: E402
from pneumo_edge.runtime import load_model  # noqa: E402
from pneumo_edge.scale import predict_ray  # noqa: E402


def pick(data: Path, n: int) -> list[tuple[Path, str]]:
    items = [(p, t) for p, t in collect_labelled([data]) if t]
    by = {c: [i for i in items if i[1] == c] for c in ("NORMAL", "PNEUMONIA")}
    half = n // 2
    step = {c: max(1, len(v) // half) for c, v in by.items()}
    chosen = [i for c, v in by.items() for i in v[::step[c]][:half]]
    return sorted(chosen, key=lambda i: str(i[0]))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "chest_xray" / "train"))
    ap.add_argument("--originals", default=str(ROOT.parent / "shared" / "data" / "originals"))
    ap.add_argument("--n", type=int, default=600)
    ap.add_argument("--model", default=str(ROOT / "exported" / "pneumo_resnet18_int8.onnx"))
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--out", default=str(ROOT / "benchmarks"))
    args = ap.parse_args()

    import ray

    results = {"machine": machine_info(), "python": platform.python_version(),
               "ray": ray.__version__, "model": Path(args.model).name, "n": args.n,
               "batch_size": args.batch_size, "sets": {}}
    t0 = time.perf_counter()
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False,
             logging_level="ERROR")
    results["ray_init_seconds"] = round(time.perf_counter() - t0, 2)
    all_items = [(p, t) for p, t in collect_labelled([Path(args.data)]) if t]
    sizes = {f"{args.n}": pick(Path(args.data), args.n), f"all ({len(all_items)})": all_items}
    for name, chosen in sizes.items():
        files, truths = [p for p, _ in chosen], [t for _, t in chosen]
        model = load_model(args.model)
        predict_paths(model, files[:32], truths=truths[:32], batch_size=args.batch_size)  # warm
        rows = {"n": len(files),
                "mean_file_kb": round(sum(p.stat().st_size for p in files) / len(files) / 1024, 1)}
        local = predict_paths(model, files, truths=truths, batch_size=args.batch_size)
        rows["local"] = {"images_per_second": round(local.images_per_second, 2),
                         "seconds": round(local.seconds, 2)}
        ref = {p.path: p.probability for p in local.predictions}
        for decode, actors in (("actors", 1), ("actors", 2), ("tasks", 1), ("tasks", 2)):
            with tempfile.TemporaryDirectory() as tmp:
                run, _ = predict_ray(args.model, files, truths, tmp, actors=actors,
                                     batch_size=args.batch_size, decode=decode)
            diff = max(abs(p.probability - ref[p.path]) for p in run.predictions)
            rows[f"ray_{decode}_{actors}"] = {
                "images_per_second": round(run.images_per_second, 2),
                "seconds": round(run.seconds, 3),
                "ratio_to_local": round(run.images_per_second / local.images_per_second, 3),
                "max_abs_dp_vs_local": diff, "n_predicted": run.n_predicted,
                "n_failed": run.n_failed}
        lat = local.latency_ms
        rows["model_ms_per_image_mean"] = round(lat["mean"], 3)
        rows["model_only_images_per_second"] = round(1000.0 / lat["mean"], 1)
        results["sets"][name] = rows
        print(name, json.dumps(rows, indent=1), flush=True)
    results["cost_model"] = cost_model(results)
    ray.shutdown()
    out = Path(args.out)
    atomic_write(out / "ray_results.json", json.dumps(results, indent=2) + "\n")
    atomic_write(out / "ray_results.md", render(results))
    print(render(results))


def cost_model(r: dict) -> dict:
    """Fixed start-up and steady rate of the default Ray engine (2 actors, decoding in
    the actors) from the two run sizes, and the projection for a 1,000,000-image archive."""
    (n1, a), (n2, b) = sorted((rows["n"], rows["ray_actors_2"]) for rows in r["sets"].values())
    rate = (n2 - n1) / max(b["seconds"] - a["seconds"], 1e-9)  # images/s once running
    fixed = max(a["seconds"] - n1 / rate, 0.0)
    big = max(r["sets"].values(), key=lambda rows: rows["n"])
    cores = r["machine"].get("logical_cores") or 2
    per_core = rate / cores
    model_share = big["local"]["images_per_second"] / big["model_only_images_per_second"]
    out = {"steady_images_per_second_per_node": round(rate, 1),
           "fixed_seconds": round(fixed, 2), "cores_here": cores,
           "steady_images_per_second_per_core": round(per_core, 1),
           "local_end_to_end_over_model_only": round(model_share, 3),
           "mean_file_kb": big["mean_file_kb"], "archive": {}}
    for nodes, node_cores in ((1, 2), (1, 16), (4, 16), (16, 16)):
        node_rate = per_core * node_cores
        seconds = fixed + 1_000_000 / (node_rate * nodes)
        out["archive"][f"{nodes} x {node_cores} cores"] = {
            "images_per_second": round(node_rate * nodes), "hours": round(seconds / 3600, 2),
            "read_mb_per_second": round(node_rate * nodes * big["mean_file_kb"] / 1024, 1)}
    return out


def render(r: dict) -> str:
    m = r["machine"]
    lines = [f"# Ray engine vs local engine (real training X-rays, 224 px JPEG: "
             f"{' and '.join(r['sets'])} files; batch {r['batch_size']})", "",
             f"Machine: {m.get('cpu', '?')}, {m.get('logical_cores', '?')} logical CPUs; "
             f"Python {r['python']}, Ray {r['ray']}; model {r['model']}. "
             f"Ray start-up (ray.init, local, not counted below): {r['ray_init_seconds']} s.", "",
             "| set | engine | images/s end-to-end | ratio to local | max abs dp vs local |",
             "| --- | --- | --- | --- | --- |"]
    for name, rows in r["sets"].items():
        lines.append(f"| {name} | local | {rows['local']['images_per_second']} | 1 | |")
        for k in ("ray_actors_1", "ray_actors_2", "ray_tasks_1", "ray_tasks_2"):
            row = rows[k]
            where = "in the actors" if "actors" in k else "in Ray tasks"
            lines.append(f"| {name} | Ray, {k[-1]} actor{'s' if k[-1] != '1' else ''}, decoding {where} | "
                         f"{row['images_per_second']} | {row['ratio_to_local']} | "
                         f"{row['max_abs_dp_vs_local']:.1e} |")
        lines.append(f"| {name} | (model alone, local) | {rows['model_only_images_per_second']} | | |")
    c = r["cost_model"]
    lines += ["", "## Cost model (the default: 2 actors, decoding in the actors)", "",
              f"From the two run sizes: a fixed {c['fixed_seconds']} s per run (actor start-up: "
              f"worker processes, imports, one model load each) and a steady "
              f"{c['steady_images_per_second_per_node']} images/s on this node "
              f"({c['cores_here']} cores, {c['steady_images_per_second_per_core']} images/s per "
              "core). Measured here: only this node. Projected (linear in cores, no shared "
              "storage limit): ", "",
              "| cluster | images/s | 1,000,000 X-rays | storage read |",
              "| --- | --- | --- | --- |"]
    for name, row in c["archive"].items():
        lines.append(f"| {name} | {row['images_per_second']:,} | {row['hours']} h | "
                     f"{row['read_mb_per_second']} MB/s at {c['mean_file_kb']} KB per file |")
    lines += ["", f"Bottleneck on these 224 px files: the model (local end-to-end is "
              f"{c['local_end_to_end_over_model_only']} of the model-alone rate). For "
              "full-resolution X-rays see the README: decoding, then storage.", "",
              "Regenerate: `python benchmarks/ray_engine.py` (needs the scale extra and "
              "../shared data)."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
