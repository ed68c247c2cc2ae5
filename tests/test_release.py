"""The shipped release models in exported/: metadata, the README's main command, the card."""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import pytest
from typer.testing import CliRunner

from pneumo_edge.cli import EXIT_OK, app
from pneumo_edge.predict import predict_paths
from pneumo_edge.runtime import default_model_path, load_model, read_metadata

from conftest import SHARED_TRAIN

ROOT = Path(__file__).resolve().parents[1]
EXPORTED = ROOT / "exported"
MODELS = sorted(EXPORTED.glob("*.onnx"))
DESIGN_KEYS = {"schema", "input_name", "input_size", "channels", "value_range", "class_names",
               "positive_class", "threshold", "threshold_rule", "precision", "arch", "trained_on",
               "val_metrics", "created", "pneumo_edge_version"}

pytestmark = pytest.mark.skipif(not (EXPORTED / "default.txt").is_file(),
                                reason="no release model exported yet")


def test_three_precisions_with_complete_metadata():
    by = {read_metadata(p)[0]["precision"]: p for p in MODELS}
    assert set(by) == {"fp32", "fp16", "int8"}
    thresholds = set()
    for precision, path in by.items():
        meta = read_metadata(path)[0]
        assert DESIGN_KEYS <= set(meta)
        assert meta["class_names"] == ["NORMAL", "PNEUMONIA"] and meta["arch"] == "resnet18"
        assert path.stat().st_size < 50e6
        thresholds.add(meta["threshold"])
        assert meta["parity"]["images"] == "validation" and meta["parity"]["n_images"] > 500
    assert len(thresholds) == 1  # one decision rule, whatever the precision
    assert read_metadata(by["fp32"])[0]["parity"]["max_abs_diff"] <= 1e-4
    assert read_metadata(by["fp16"])[0]["parity"]["max_abs_diff"] <= 1e-2
    assert read_metadata(by["int8"])[0]["parity"]["label_agreement"] >= 0.98


def test_default_follows_the_int8_rule(monkeypatch):
    monkeypatch.delenv("PNEUMO_EDGE_MODEL", raising=False)
    default = default_model_path()
    assert default is not None and default.is_file()
    metas = {m["precision"]: m for m in (read_metadata(p)[0] for p in MODELS)}
    int8_ok = metas["int8"]["val_metrics"]["auc"] >= metas["fp32"]["val_metrics"]["auc"] - 0.005
    assert read_metadata(default)[0]["precision"] == ("int8" if int8_ok else "fp32")


def test_readme_main_command_on_examples(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    monkeypatch.delenv("PNEUMO_EDGE_MODEL", raising=False)
    res = CliRunner().invoke(app, ["predict", "examples/xrays", "--report", "--out",
                                   str(tmp_path)])
    assert res.exit_code == EXIT_OK, res.output
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["n_images"] == 12 and report["metrics"]["n_labelled"] == 12
    assert report["metrics"]["accuracy"] >= 0.75  # held-out images; a sanity floor, not a claim
    assert "ROC AUC" in res.output


@pytest.mark.slow
@pytest.mark.skipif(not SHARED_TRAIN.is_dir(), reason="../shared data absent")
@pytest.mark.parametrize("model_path", MODELS, ids=[p.stem for p in MODELS])
def test_card_numbers_reproduce_on_the_validation_split(model_path):
    rows = list(csv.DictReader(open(EXPORTED / "val_split.csv")))
    files = [SHARED_TRAIN / r["path"] for r in rows]
    model = load_model(model_path, device="cpu")
    run = predict_paths(model, files, batch_size=32)
    assert not run.failures
    assert [p.truth for p in run.predictions] == [r["label"] for r in rows]
    stored = model.meta["val_metrics"]
    m = run.metrics
    assert m.n_labelled == stored["n_labelled"] == len(rows)
    assert m.auc == pytest.approx(stored["auc"], abs=1e-4)
    for key in ("tp", "fp", "tn", "fn"):
        assert abs(getattr(m, key) - stored[key]) <= 1  # a probability on the threshold may flip
    card = (EXPORTED / "MODEL_CARD.md").read_text()
    line = next(l for l in card.splitlines() if l.startswith(f"| {model.precision} "))
    for value in (stored["accuracy"], stored["auc"], stored["recall"], stored["specificity"]):
        assert f"{value:.4f}" in line, (value, line)
    assert re.search(rf"\b{stored['tp']}\b.*\b{stored['fn']}\b", line)
