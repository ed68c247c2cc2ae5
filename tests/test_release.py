"""The shipped release models in exported/: metadata, the README's main command, the card,
the robustness suite and the heads on real validation X-rays (slow tests need ../shared)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from pneumo_edge.cli import EXIT_OK, app
from pneumo_edge.metadata import CONTRACT_KEYS, PROVENANCE_KEYS
from pneumo_edge.predict import predict_paths
from pneumo_edge.robustness import FRAMING_ROWS, read_split_csv, run_suite, view_masks
from pneumo_edge.runtime import default_model_path, load_model, read_metadata

from helpers import SHARED_TRAIN

ROOT = Path(__file__).resolve().parents[1]
EXPORTED = ROOT / "exported"
MODELS = sorted(EXPORTED.glob("*.onnx"))
# the contract's own key lists, and the robustness record every release file carries
RELEASE_KEYS = {*CONTRACT_KEYS, *PROVENANCE_KEYS, "robustness"}

pytestmark = pytest.mark.skipif(not (EXPORTED / "default.txt").is_file(),
                                reason="no release model exported yet")


def _metas() -> dict[str, dict]:
    return {m["precision"]: m for m in (read_metadata(p)[0] for p in MODELS)}


def test_three_precisions_with_complete_metadata():
    by = {read_metadata(p)[0]["precision"]: p for p in MODELS}
    assert set(by) == {"fp32", "fp16", "int8"}
    thresholds = set()
    for precision, path in by.items():
        meta, _, outputs = read_metadata(path)
        assert RELEASE_KEYS <= set(meta)
        assert meta["class_names"] == ["NORMAL", "PNEUMONIA"]
        assert meta["arch"] == "resnet18_lung"  # v3: the lung-field stage inside the file
        assert [o["name"] for o in outputs] == ["pneumonia_prob", "cam", "ood", "lung_box",
                                                "lung_area"]
        assert meta["lung_field"]["crop"] == 144 and meta["lung_field"]["frame"] == 192
        assert set(meta["robustness"]["views"]) == {"block", "patient"}
        assert path.stat().st_size < 50e6
        thresholds.add(meta["threshold"])
        assert meta["parity"]["images"] == "validation" and meta["parity"]["n_images"] > 500
        assert meta["heads_parity"]["cam_mean_correlation_vs_fp32"] >= 0.95
        assert meta["ood"]["val_flag_rate"] <= 0.02
    assert len(thresholds) == 1  # one decision rule, whatever the precision
    assert read_metadata(by["fp32"])[0]["parity"]["max_abs_diff"] <= 1e-4
    assert read_metadata(by["fp32"])[0]["heads_parity"]["cam_max_abs_diff_vs_keras"] <= 1e-3
    assert read_metadata(by["fp16"])[0]["parity"]["max_abs_diff"] <= 1e-2
    assert read_metadata(by["int8"])[0]["parity"]["label_agreement"] >= 0.98


def test_default_follows_the_int8_rule(monkeypatch):
    monkeypatch.delenv("PNEUMO_EDGE_MODEL", raising=False)
    from training.export import PrecisionResult, choose_default  # export's own rule

    default = default_model_path()
    assert default is not None and default.is_file()
    results = [PrecisionResult(m["precision"], p, 0, None, None, m["val_metrics"],
                               {"robustness": m["robustness"]})
               for p, m in ((p, read_metadata(p)[0]) for p in MODELS)]
    assert default.name == choose_default(results).path.name


def test_readme_main_command_on_examples(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    monkeypatch.delenv("PNEUMO_EDGE_MODEL", raising=False)
    res = CliRunner().invoke(app, ["predict", "examples/xrays", "--report", "--out",
                                   str(tmp_path), "--heatmaps", str(tmp_path / "heatmaps")])
    assert res.exit_code == EXIT_OK, res.output
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["n_images"] == 12 and report["metrics"]["n_labelled"] == 12
    assert report["metrics"]["accuracy"] >= 0.75  # held-out images; a sanity floor, not a claim
    assert all(p["in_distribution"] for p in report["predictions"])
    assert len(list((tmp_path / "heatmaps").glob("*.png"))) == 12
    assert "ROC AUC" in res.output and "data:image/png" in (tmp_path / "report.html").read_text()


def _val():
    return read_split_csv(EXPORTED / "val_split.csv", SHARED_TRAIN)


@pytest.mark.slow
@pytest.mark.skipif(not SHARED_TRAIN.is_dir(), reason="../shared data absent")
@pytest.mark.parametrize("model_path", MODELS, ids=[p.stem for p in MODELS])
def test_card_numbers_reproduce_on_the_validation_split(model_path):
    files, labels = _val()
    model = load_model(model_path, device="cpu")
    run = predict_paths(model, [Path(f) for f in files], batch_size=32,
                        truths=["PNEUMONIA" if y else "NORMAL" for y in labels])
    assert not run.failures
    stored = model.meta["val_metrics"]
    m = run.metrics
    assert m.n_labelled == stored["n_labelled"] == len(files)
    assert m.auc == pytest.approx(stored["auc"], abs=1e-4)
    for key in ("tp", "fp", "tn", "fn"):
        assert abs(getattr(m, key) - stored[key]) <= 1  # a probability on the threshold may flip
    flagged = sum(p.in_distribution is False for p in run.predictions) / len(run.predictions)
    assert flagged <= 0.02
    card = (EXPORTED / "MODEL_CARD.md").read_text()
    line = next(l for l in card.splitlines() if l.startswith(f"| {model.precision} "))
    for value in (stored["accuracy"], stored["auc"], stored["recall"], stored["specificity"]):
        assert f"{value:.4f}" in line, (value, line)
    assert re.search(rf"\b{stored['tp']}\b.*\b{stored['fn']}\b", line)


def _views() -> dict[str, np.ndarray]:
    import csv
    with open(EXPORTED / "val_split.csv", newline="", encoding="utf-8") as fh:
        return view_masks([r["part"] for r in csv.DictReader(fh)])


@pytest.mark.slow
@pytest.mark.skipif(not SHARED_TRAIN.is_dir(), reason="../shared data absent")
def test_robustness_suite_on_the_release_models():
    """The suite reproduces the rows stored at export for FP32 and INT8, in each
    validation view; the release targets the model meets, and the ones it misses."""
    files, labels = _val()
    views = _views()
    results = {}
    for precision in ("fp32", "int8"):
        path = EXPORTED / f"pneumo_resnet18_{precision}.onnx"
        model = load_model(path, device="cpu")
        res = run_suite(model.run, model.preprocess, files, labels, model.threshold)
        assert res.n_failed == 0
        for view, mask in views.items():
            stored = {r["perturbation"]: r for r in model.meta["robustness"]["views"][view]["rows"]}
            sub = res.subset(mask)
            for row in sub.rows:
                assert row.auc == pytest.approx(stored[row.perturbation]["auc"], abs=1e-3)
                assert row.specificity == pytest.approx(stored[row.perturbation]["specificity"],
                                                        abs=2 / int((sub.labels == 0).sum()))
        results[precision] = res
    for view, mask in views.items():
        fp32, int8 = results["fp32"].subset(mask), results["int8"].subset(mask)
        agree = int8.agreement_with(fp32)
        assert set(agree) == {r.perturbation for r in fp32.rows}
        assert min(agree.values()) >= 0.99, view  # INT8 agreement target, every row
        for res in (fp32, int8):
            framing = [res.row(r) for r in ("clean", *FRAMING_ROWS)]
            drop = res.row("clean").specificity - res.row("border_black_3").specificity
            assert abs(drop) <= 0.03, view  # the 3 % border target
            assert min(r.specificity for r in framing) >= 0.94, view  # block target 0.90
            assert min(r.auc for r in res.rows) >= 0.98, view  # block target (every row)
            # missed, written in the model card: sensitivity >= 0.95 (0.940, the clean
            # row itself) and, on the patient view, AUC >= 0.99 (0.984 at gamma 1.4)
            assert min(r.sensitivity for r in framing) >= 0.93, view
