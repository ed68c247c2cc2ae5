"""Runtime side of the cam/ood outputs, input checks, heatmaps, gallery; output safety."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import cv2
import numpy as np
import pytest
from typer.testing import CliRunner

from pneumo_edge.cli import EXIT_OK, EXIT_SOME_FAILED, EXIT_USAGE, app
from pneumo_edge.heatmap import cam_mass_in_box, heatmap_name, overlay
from pneumo_edge.images import collect_labelled, decode_gray
from pneumo_edge.predict import predict_paths
from pneumo_edge.quality import input_warnings
from pneumo_edge.runtime import ModelError, load_model

from helpers import make_tiny_onnx, write_gray_jpeg

runner = CliRunner()


def chest_like(size=(300, 260), inverted=False) -> np.ndarray:
    """Dark lung fields either side of a bright mediastinum, on a mid-grey body."""
    h, w = size
    img = np.full((h, w), 120, np.uint8)
    img[int(0.25 * h):int(0.75 * h), int(0.12 * w):int(0.38 * w)] = 50
    img[int(0.25 * h):int(0.75 * h), int(0.62 * w):int(0.88 * w)] = 50
    img[:, int(0.42 * w):int(0.58 * w)] = 200
    noise = np.random.default_rng(0).normal(0, 6, img.shape)
    img = np.clip(img + noise, 0, 255).astype(np.uint8)
    return 255 - img if inverted else img


def _write(path: Path, img: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    ok, buf = cv2.imencode(path.suffix, img)
    assert ok
    buf.tofile(str(path))
    return path


def _warns(path: Path) -> list[str]:
    info: dict = {}
    return input_warnings(decode_gray(path, 256, info), info)


def test_input_checks_each_fire_on_their_image(tmp_path):
    assert _warns(_write(tmp_path / "chest.png", chest_like())) == []
    assert "nearly uniform" in _warns(_write(tmp_path / "flat.png", np.full((300, 300), 90, np.uint8)))[0]
    photo = np.zeros((300, 300, 3), np.uint8)
    photo[..., 0], photo[..., 1], photo[..., 2] = 30, 140, 220  # orange-ish, with texture
    photo[::7] = (200, 60, 20)
    assert any("colour image" in w for w in _warns(_write(tmp_path / "photo.jpg", photo)))
    grey_rgb = cv2.cvtColor(chest_like(), cv2.COLOR_GRAY2BGR)  # 3 channels, no chroma
    assert _warns(_write(tmp_path / "rgb_xray.jpg", grey_rgb)) == []
    assert any("very small" in w for w in _warns(_write(tmp_path / "tiny.png", chest_like((60, 50)))))
    assert any("aspect ratio" in w for w in _warns(_write(tmp_path / "wide.png", chest_like((200, 600)))))
    inv = _warns(_write(tmp_path / "inv.png", chest_like(inverted=True)))
    assert any("inverted polarity" in w for w in inv)


def _folder(tmp_path: Path) -> Path:
    root = tmp_path / "xr"
    write_gray_jpeg(root / "NORMAL" / "n_dark.jpeg", 100, size=(200, 200))       # ood 2.8
    write_gray_jpeg(root / "PNEUMONIA" / "p_bright.jpeg", 170, size=(200, 200))  # ood 4.2
    write_gray_jpeg(root / "PNEUMONIA" / "p_white.jpeg", 250, size=(200, 200))   # ood 12.2
    return root


def test_ood_and_cam_outputs_reach_the_predictions(tmp_path):
    model = load_model(make_tiny_onnx(tmp_path / "m.onnx", heads=True), device="cpu")
    assert model.has_cam and model.ood_threshold == 5.0
    root = _folder(tmp_path)
    items = collect_labelled([root])
    run = predict_paths(model, [i[0] for i in items], truths=[i[1] for i in items],
                        heatmap_dir=tmp_path / "heat")
    by = {Path(p.path).name: p for p in run.predictions}
    assert by["n_dark.jpeg"].ood_score == pytest.approx(2.8, abs=0.1)
    assert by["n_dark.jpeg"].in_distribution is True
    white = by["p_white.jpeg"]
    assert white.in_distribution is False and "out of distribution" in white.warnings[-1]
    # cam: one logit per quadrant, mean = the image's logit
    logit = np.log(white.probability / (1 - white.probability))
    assert white.cam.shape == (2, 2)
    assert float(white.cam.astype(np.float32).mean()) == pytest.approx(logit, abs=0.02)
    assert run.n_flagged >= 1  # the white image (and the uniform-image check)
    assert len(run.heatmaps) == 3
    for path in run.heatmaps.values():
        img = cv2.imread(path)
        assert img is not None and img.shape[:2] == (200, 200)


def test_flagged_as_fail_and_report_columns(tmp_path):
    model = make_tiny_onnx(tmp_path / "m.onnx", heads=True)
    root = tmp_path / "xr"
    _write(root / "NORMAL" / "chest.png", chest_like())  # mean ~115: in distribution, no warning
    write_gray_jpeg(root / "PNEUMONIA" / "white.jpeg", 250, size=(200, 200))
    out = tmp_path / "out"
    res = runner.invoke(app, ["predict", str(root), "--model", str(model), "--report",
                              "--out", str(out), "--heatmaps", str(tmp_path / "h")])
    assert res.exit_code == EXIT_OK, res.output
    rep = json.loads((out / "report.json").read_text())
    preds = {Path(p["path"]).name: p for p in rep["predictions"]}
    assert preds["chest.png"]["in_distribution"] is True and preds["chest.png"]["warnings"] == []
    assert preds["white.jpeg"]["in_distribution"] is False
    assert rep["n_flagged"] == 1 and rep["flagged_as"] == "warn"
    rows = list(csv.DictReader(open(out / "predictions.csv", encoding="utf-8")))
    assert {"ood_score", "in_distribution", "warnings"} <= set(rows[0])
    html = (out / "report.html").read_text()
    assert "<h2>Gallery</h2>" in html and "data:image/png;base64," in html
    assert "flagged (1)" in html and "<script" not in html
    res = runner.invoke(app, ["predict", str(root), "--model", str(model), "--flagged-as",
                              "fail", "--report", "--out", str(tmp_path / "out2")])
    assert res.exit_code == EXIT_SOME_FAILED
    rep = json.loads((tmp_path / "out2" / "report.json").read_text())
    assert rep["n_failed"] == 1 and rep["failures"][0]["error"].startswith("flagged: ")
    assert [Path(p["path"]).name for p in rep["predictions"]] == ["chest.png"]


def test_models_without_heads_still_run(tmp_path):
    model = load_model(make_tiny_onnx(tmp_path / "m.onnx"), device="cpu")
    assert not model.has_cam and model.ood_threshold is None
    root = _folder(tmp_path)
    run = predict_paths(model, [i[0] for i in collect_labelled([root])],
                        heatmap_dir=tmp_path / "h")
    assert all(p.ood_score is None and p.in_distribution is None and p.cam is None
               for p in run.predictions)
    assert run.heatmaps == {}


def test_float_rounding_above_one_is_clipped_not_refused(tmp_path):
    # a float32 sigmoid may return 1.0000001: rounding, not a broken model
    model = load_model(make_tiny_onnx(tmp_path / "m.onnx", slope=400.0, prob_scale=1.0000005),
                       device="cpu")
    p = model.run(np.full((2, 16, 16, 3), 250, np.float32))
    assert np.all(p == 1.0)


@pytest.mark.parametrize("scale, shown", [(float("nan"), "nan"), (3.0, "not a probability")])
def test_non_probability_output_is_refused(tmp_path, scale, shown):
    model = make_tiny_onnx(tmp_path / "bad.onnx", prob_scale=scale)
    write_gray_jpeg(tmp_path / "x" / "a.jpeg", 200)
    res = runner.invoke(app, ["predict", str(tmp_path / "x"), "--model", str(model),
                              "--report", "--out", str(tmp_path / "o")])
    assert res.exit_code == EXIT_USAGE
    assert "not a probability" in res.output and shown in res.output
    assert not (tmp_path / "o" / "report.json").exists()
    with pytest.raises(ModelError):
        load_model(model, device="cpu").run(np.full((1, 16, 16, 3), 200, np.float32))


def test_names_are_shown_literally(tmp_path, tiny_model):
    root = tmp_path / "in"
    for name in ("chest[pa].jpeg", "[/]bad.jpeg", "[link=file:x]y.jpeg", "esc\x1b[31mred.jpeg"):
        write_gray_jpeg(root / name, 100)
    out = tmp_path / "out"
    res = runner.invoke(app, ["predict", str(root), "--model", str(tiny_model), "--out",
                              str(out), "--report"])
    assert res.exit_code == EXIT_OK, res.output
    assert "chest[pa].jpeg" in res.output and "[/]bad.jpeg" in res.output
    assert "[link=file:x]y.jpeg" in res.output
    assert "\x1b[31m" not in res.output and "esc\\x1b[31mred.jpeg" in res.output
    json.loads((out / "report.json").read_text(), parse_constant=pytest.fail)


def test_csv_cells_that_would_be_formulas_are_neutralised(tmp_path, tiny_model, monkeypatch):
    from pneumo_edge.records import csv_safe  # the record schema owns the CSV cells

    monkeypatch.chdir(tmp_path)
    write_gray_jpeg(tmp_path / "=HYPERLINK(1).jpeg", 100)
    write_gray_jpeg(tmp_path / "+1.jpeg", 100)
    res = runner.invoke(app, ["predict", "=HYPERLINK(1).jpeg", "+1.jpeg", "--model",
                              str(tiny_model), "--out", "out"])
    assert res.exit_code == EXIT_OK, res.output
    rows = list(csv.reader(open(tmp_path / "out" / "predictions.csv", encoding="utf-8")))
    assert sorted(r[0] for r in rows[1:]) == ["'+1.jpeg", "'=HYPERLINK(1).jpeg"]
    assert csv_safe("-2") == "'-2" and csv_safe("@x") == "'@x"
    assert csv_safe("normal.jpeg") == "normal.jpeg"


def test_labels_only_from_folders_at_or_below_the_given_path(tmp_path):
    above = tmp_path / "pneumonia" / "batch"
    write_gray_jpeg(above / "a.jpeg", 100)
    write_gray_jpeg(above / "NORMAL" / "b.jpeg", 100)
    items = collect_labelled([above])  # sorted by path: NORMAL/ before a.jpeg
    assert [(p.name, t) for p, t in items] == [("b.jpeg", "NORMAL"), ("a.jpeg", None)]
    # the given folder's own name labels; the same file reached twice is kept once
    items = collect_labelled([above / "NORMAL", above / "NORMAL" / "b.jpeg", above])
    assert [(p.name, t) for p, t in items] == [("b.jpeg", "NORMAL"), ("a.jpeg", None)]
    assert collect_labelled([above / "a.jpeg"])[0][1] is None  # a file named directly


def test_out_is_checked_before_any_inference(tmp_path, tiny_model):
    write_gray_jpeg(tmp_path / "x" / "a.jpeg", 100)
    afile = tmp_path / "afile"
    afile.write_text("keep me")
    for out in (afile, afile / "below"):
        res = runner.invoke(app, ["predict", str(tmp_path / "x"), "--model", str(tiny_model),
                                  "--report", "--out", str(out)])
        assert res.exit_code == EXIT_USAGE and "is a file, not a folder" in res.output
    assert afile.read_text() == "keep me"


def test_non_utf8_file_name_does_not_lose_the_report(tmp_path, tiny_model):
    import os

    root = tmp_path / "in"
    root.mkdir()
    raw = os.fsencode(str(root)) + b"/bad\xff.jpeg"
    good = write_gray_jpeg(tmp_path / "g.jpeg", 120)
    with open(raw, "wb") as fh:
        fh.write(good.read_bytes())
    out = tmp_path / "out"
    res = runner.invoke(app, ["predict", str(root), "--model", str(tiny_model), "--report",
                              "--out", str(out)])
    assert res.exit_code == EXIT_OK, res.output
    rep = json.loads((out / "report.json").read_text(encoding="utf-8"))
    assert rep["n_images"] == 1 and "bad" in rep["predictions"][0]["path"]
    assert "\\udcff" in (out / "predictions.csv").read_text(encoding="utf-8")


def test_overlay_and_cam_mass():
    gray = chest_like()
    cam = np.array([[-3.0, 2.0], [-3.0, -3.0]])
    img = overlay(gray, cam, "P(PNEUMONIA) 0.9")
    assert img.shape == (300, 260, 3) and img.dtype == np.uint8
    # red (high) in the top-right quadrant, blue elsewhere
    assert img[100, 230, 2] > img[250, 30, 2]
    assert heatmap_name(7, "/a/b/chest [pa] é.jpeg") == "000007_chest_pa.png"
    centre = np.full((4, 4), -2.0)
    centre[1:3, 1:3] = 3.0
    corner = np.full((4, 4), -2.0)
    corner[0, 0] = 3.0
    assert cam_mass_in_box(centre) > 0.9 > 0.5 > cam_mass_in_box(corner)
    # a bias shared by every position (calibration) changes nothing
    assert cam_mass_in_box(centre + 7.6) == pytest.approx(cam_mass_in_box(centre), abs=1e-4)
    assert cam_mass_in_box(np.full((4, 4), -1.0)) == pytest.approx(0.56)  # flat: the area share
    biased = overlay(gray, cam + 7.6, None)
    diff = np.abs(biased.astype(int) - overlay(gray, cam, None).astype(int))
    assert diff.max() <= 3 and diff.mean() < 0.01  # the same picture, up to float rounding


def test_full_disk_keeps_the_previous_report_set(tmp_path, tiny_model, monkeypatch):
    import errno

    import pneumo_edge.io as report  # the one writer (was pneumo_edge.report's own)

    root = tmp_path / "in"
    write_gray_jpeg(root / "a.jpeg", 100)
    out = tmp_path / "out"
    assert runner.invoke(app, ["predict", str(root), "--model", str(tiny_model), "--report",
                               "--out", str(out)]).exit_code == EXIT_OK
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    write_gray_jpeg(root / "b.jpeg", 200)
    real = report._write_temp
    calls = []

    def full_disk(path, data):
        calls.append(path.name)
        if len(calls) == 3:  # the third file of the set does not fit
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(path, data)

    monkeypatch.setattr(report, "_write_temp", full_disk)
    res = runner.invoke(app, ["predict", str(root), "--model", str(tiny_model), "--report",
                              "--out", str(out)])
    assert res.exit_code == EXIT_USAGE
    assert "No space left on device" in res.output and "left as they were" in res.output
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # no temp files either


def test_least_certain_gallery_ranks_by_logit_distance_from_the_threshold():
    from pneumo_edge.predict import Prediction, PredictionRun
    from pneumo_edge.report import _gallery_groups

    def pred(name, p):
        return Prediction(name, p, "PNEUMONIA" if p >= 0.9812 else "NORMAL", 0.9812, None)

    probs = {"saturated": 1.0, "near_one": 0.9999, "at_threshold": 0.981, "half": 0.5,
             "low": 0.02, "zero": 0.0}
    run = PredictionRun(model={"threshold": 0.9812}, predictions=[pred(k, v) for k, v in
                                                                   probs.items()],
                        failures=[], batch_size=1, seconds=1.0, model_ms_per_image=[1.0],
                        metrics=None)
    order = [p.path for p in _gallery_groups(run)["least certain"]]
    # on the probability scale 1.0 (0.019 away) would come before 0.5 (0.48 away)
    assert order == ["at_threshold", "half", "near_one", "low", "saturated", "zero"]
