"""The Ray engine (scale extra) against the local engine, with faults and resume."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import cv2
import numpy as np
import pytest

ray = pytest.importorskip("ray", reason="the scale extra (ray[data]) is not installed")

from typer.testing import CliRunner  # noqa: E402

from pneumo_edge.cli import EXIT_OK, EXIT_SOME_FAILED, EXIT_USAGE, app  # noqa: E402
from pneumo_edge.images import collect_labelled  # noqa: E402
from pneumo_edge.predict import predict_paths  # noqa: E402
from pneumo_edge.report import REPORT_KEYS  # noqa: E402
from pneumo_edge.runtime import load_model  # noqa: E402
from pneumo_edge.scale import JOURNAL, predict_ray, read_journal, write_parquet  # noqa: E402

import dicom_factory as F  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
MODEL = ROOT / "exported" / "pneumo_resnet18_int8.onnx"
runner = CliRunner()


@pytest.fixture(scope="module")
def cluster():
    """One local Ray for the module (2 CPUs, no dashboard); each run reuses it."""
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             logging_level="ERROR")
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def archive(tmp_path_factory) -> Path:
    """52 files: X-rays (JPEG, PNG, DICOM) in nested labelled folders, and bad files."""
    root = tmp_path_factory.mktemp("archive") / "xrays"
    examples = sorted((ROOT / "examples" / "xrays").rglob("*.jpeg"))
    rng = np.random.default_rng(7)
    for k in range(3):
        for src in examples:
            label = src.parent.name
            folder = root / label / f"batch{k}" / ("deeper" if k == 2 else "")
            folder.mkdir(parents=True, exist_ok=True)
            gray = cv2.imdecode(np.fromfile(str(src), np.uint8), cv2.IMREAD_GRAYSCALE)
            if k == 0:
                (folder / src.name).write_bytes(src.read_bytes())
            elif k == 1:
                shifted = np.clip(gray.astype(int) + rng.integers(-6, 7), 0, 255).astype(np.uint8)
                cv2.imencode(".png", shifted)[1].tofile(str(folder / f"{src.stem}.png"))
            else:
                from pydicom.uid import ExplicitVRLittleEndian
                ds = F.base_dataset(ExplicitVRLittleEndian)
                F._pixels(ds, ((255 - gray.astype(np.int32)) * 16).astype(np.uint16),
                          "MONOCHROME1", 12)
                ds.save_as(folder / src.stem, enforce_file_format=True)
    bad = root / "NORMAL" / "bad"
    bad.mkdir(parents=True)
    (bad / "empty.jpeg").write_bytes(b"")
    (bad / "notes.png").write_text("not an image")
    data = examples[0].read_bytes()
    (bad / "cut.jpeg").write_bytes(data[: len(data) // 2])
    F.write_no_pixels(bad / "report.dcm")
    assert len(collect_labelled([root])) == 40
    for i in range(12):  # unlabelled, beside the labelled folders
        cv2.imencode(".jpg", rng.integers(0, 255, (64, 64), np.uint8))[1].tofile(
            str(root / f"noise{i}.jpg"))
    return root


def _files(root: Path):
    items = collect_labelled([root])
    return [p for p, _ in items], [t for _, t in items]


@pytest.fixture(scope="module")
def local_run(archive):
    files, truths = _files(archive)
    return predict_paths(load_model(MODEL), files, truths=truths, batch_size=4)


def _same(run, ref) -> None:
    assert run.n_predicted == ref.n_predicted and run.n_failed == ref.n_failed
    a = {p.path: p for p in run.predictions}
    for p in ref.predictions:
        q = a[p.path]
        assert abs(q.probability - p.probability) < 1e-6, p.path
        assert (q.label, q.truth, q.warnings, q.dicom) == (p.label, p.truth, p.warnings, p.dicom)
        assert (q.ood_score is None) == (p.ood_score is None)
        if p.ood_score is not None:
            assert abs(q.ood_score - p.ood_score) < 1e-4
    assert [(f.path, f.error) for f in run.failures] == [(f.path, f.error) for f in ref.failures]
    assert run.metrics.to_dict() == ref.metrics.to_dict()


@pytest.mark.parametrize("decode", ["actors", "tasks"])
def test_ray_engine_matches_local(cluster, archive, local_run, tmp_path, decode):
    files, truths = _files(archive)
    run, journal = predict_ray(MODEL, files, truths, tmp_path, actors=2, batch_size=4,
                               task_size=8, decode=decode)
    assert local_run.n_images == 52 and local_run.n_failed == 4
    _same(run, local_run)
    assert run.engine == "ray" and run.session_predicted == 48
    assert len(list(read_journal(journal))) == 52


def test_dead_actor_is_retried_and_every_file_counted_once(cluster, archive, local_run,
                                                           tmp_path):
    files, truths = _files(archive)
    marker = tmp_path / "killed"
    run, journal = predict_ray(MODEL, files, truths, tmp_path / "out", actors=2, batch_size=4,
                               task_size=4, fault=(str(marker), 2))
    assert marker.exists()  # an actor did die mid-run
    _same(run, local_run)
    paths = [r.path for r in read_journal(journal)]
    assert len(paths) == len(set(paths)) == 52


def test_resume_skips_finished_files(cluster, archive, local_run, tmp_path):
    files, truths = _files(archive)
    out = tmp_path / "out"
    out.mkdir()
    full, journal = predict_ray(MODEL, files, truths, out, actors=1, batch_size=4)
    lines = journal.read_text(encoding="utf-8").splitlines(keepends=True)
    assert json.loads(lines[0])["pneumo_edge_journal"] == 1  # the run binding comes first
    # an interrupted run: the binding and 30 records written, the 31st cut mid-line
    journal.write_text("".join(lines[:31]) + lines[31][:25], encoding="utf-8")
    run, _ = predict_ray(MODEL, files, truths, out, actors=1, batch_size=4, resume=True)
    done_before = {json.loads(x)["path"] for x in lines[1:31]}
    assert run.session_predicted == sum(
        1 for p in local_run.predictions if p.path not in done_before)
    _same(run, local_run)
    assert len(list(read_journal(journal))) == 52
    again, _ = predict_ray(MODEL, files, truths, out, actors=1, batch_size=4, resume=True)
    assert again.session_predicted == 0 and again.n_images == 52  # nothing left to do


def test_cli_ray_engine_writes_the_local_engines_files(cluster, archive, tmp_path):
    outs = {}
    for engine in ("local", "ray"):
        outs[engine] = tmp_path / engine
        result = runner.invoke(app, ["predict", str(archive), "--engine", engine, "--report",
                                     "--out", str(outs[engine]), "--batch-size", "4"])
        assert result.exit_code == EXIT_SOME_FAILED, result.output
    reports = {k: json.loads((v / "report.json").read_text()) for k, v in outs.items()}
    for key, fields in REPORT_KEYS.items():
        assert key in reports["ray"]
    assert reports["ray"]["metrics"] == reports["local"]["metrics"]
    assert reports["ray"]["engine"] == "ray" and reports["ray"]["predictions_omitted"] == 0
    assert [p["path"] for p in reports["ray"]["predictions"]] == \
        [p["path"] for p in reports["local"]["predictions"]]
    csv_rows = {k: list(csv.reader((v / "predictions.csv").open())) for k, v in outs.items()}
    assert csv_rows["ray"][0] == csv_rows["local"][0] and len(csv_rows["ray"]) == 53
    assert (outs["ray"] / "report.html").is_file()


def test_large_runs_keep_aggregates_and_every_record_in_files(cluster, archive, local_run,
                                                               tmp_path):
    out = tmp_path / "out"
    result = runner.invoke(app, ["predict", str(archive), "--engine", "ray", "--report",
                                 "--out", str(out), "--report-limit", "10", "-q"])
    assert result.exit_code == EXIT_SOME_FAILED, result.output
    report = json.loads((out / "report.json").read_text())
    assert report["predictions"] == [] and report["predictions_omitted"] == 52 - 4
    assert report["n_images"] == 52 and report["n_failed"] == 4 and len(report["failures"]) == 4
    assert report["metrics"] == local_run.metrics.to_dict()
    rows = list(csv.DictReader((out / "predictions.csv").open()))
    assert len(rows) == 52 and sum(bool(r["error"]) for r in rows) == 4
    import pyarrow.parquet as pq
    table = pq.read_table(out / "predictions.parquet")
    assert table.num_rows == 52
    probs = dict(zip(table.column("path").to_pylist(), table.column("probability").to_pylist()))
    for p in local_run.predictions:
        assert abs(probs[p.path] - p.probability) < 1e-6


def test_cli_ray_engine_options_are_checked(tmp_path, archive):
    result = runner.invoke(app, ["predict", str(archive), "--resume"])
    assert result.exit_code == EXIT_USAGE and "--engine ray only" in result.output
    result = runner.invoke(app, ["predict", str(archive), "--engine", "ray",
                                 "--heatmaps", str(tmp_path / "h")])
    assert result.exit_code == EXIT_USAGE and "--engine local only" in result.output
    was_running = ray.is_initialized()
    if was_running:
        ray.shutdown()  # the address is only used when this process has no Ray yet
    result = runner.invoke(app, ["predict", str(archive), "--engine", "ray", "--out",
                                 str(tmp_path / "o"), "--ray-address", "127.0.0.1:1"])
    assert result.exit_code == EXIT_USAGE and "cannot start or reach Ray at 127.0.0.1:1" in \
        result.output
    assert not ray.is_initialized()
    if was_running:
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
                 logging_level="ERROR")


def test_examples_with_ray_engine_exit_ok(cluster, tmp_path):
    out = tmp_path / "out"
    result = runner.invoke(app, ["predict", str(ROOT / "examples" / "xrays"), "--engine", "ray",
                                 "--report", "--out", str(out)])
    assert result.exit_code == EXIT_OK, result.output
    assert json.loads((out / "report.json").read_text())["metrics"]["n_labelled"] == 12
    assert (out / JOURNAL).is_file()
    write_parquet(out / JOURNAL, out / "p.parquet")
