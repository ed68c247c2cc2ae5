"""The robustness suite and the shift-aware threshold and calibration helpers."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
from typer.testing import CliRunner

from pneumo_edge.cli import EXIT_USAGE, app
from pneumo_edge.metrics import (apply_temperature, choose_threshold_robust,
                                 expected_calibration_error, fit_platt, fit_temperature)
from pneumo_edge.robustness import PERTURBATIONS, perturb, read_split_csv, run_suite

from helpers import make_tiny_onnx


def _gradient(h=60, w=80):
    return np.tile(np.linspace(0, 255, w, dtype=np.float32), (h, 1)).astype(np.uint8)


def test_every_perturbation_keeps_a_2d_uint8_image():
    img = _gradient()
    for name in PERTURBATIONS:
        out = perturb(img, name, seed=3)
        assert out.dtype == np.uint8 and out.ndim == 2, name
    assert np.array_equal(perturb(img, "clean"), img)
    with pytest.raises(ValueError, match="unknown perturbation"):
        perturb(img, "zoom_sideways")


def test_zoom_rows_crop_and_add_black_border():
    img = np.full((100, 100), 180, np.uint8)
    zin = perturb(img, "zoom_in_10")
    assert zin.shape == (90, 90) and zin.min() == 180
    zout = perturb(img, "zoom_out_10")
    assert zout.shape == (100, 100)
    assert zout[0, 0] == 0 and zout[50, 50] == 180
    # the content shrinks to 1/1.1 of the side: about 91 of 100 rows stay bright
    assert abs(int((zout[:, 50] > 90).sum()) - 91) <= 2
    g = perturb(img, "gamma_1.4")
    assert g.mean() < img.mean()  # gamma > 1 darkens mid-greys


def test_border_rows_pad_the_frame_and_keep_the_content():
    img = np.full((100, 200), 180, np.uint8)
    b3 = perturb(img, "border_black_3")
    assert b3.shape == (106, 212)  # 3 % of each side on every side
    assert b3[:3].max() == 0 and b3[:, :6].max() == 0 and b3[-3:].max() == 0
    assert np.array_equal(b3[3:103, 6:206], img)  # the X-ray itself is untouched
    assert perturb(img, "border_black_2").shape == (104, 208)
    assert perturb(img, "border_black_5").shape == (110, 220)
    white = perturb(img, "border_white_3")
    assert white[0, 0] == 255 and white[50, 100] == 180
    tb = perturb(img, "letterbox_tb_10")
    assert tb.shape == (120, 200) and tb[:10].max() == 0 and tb[-10:].max() == 0
    lr = perturb(img, "letterbox_lr_10")
    assert lr.shape == (100, 240) and lr[:, :20].max() == 0 and lr[:, -20:].max() == 0


def test_corner_blackout_follows_the_seed():
    img = np.full((100, 100), 200, np.uint8)
    corners = set()
    for seed in range(4):
        out = perturb(img, "corner_black_15", seed)
        assert out.shape == img.shape
        assert int((out == 0).sum()) == 15 * 15  # one 15 % x 15 % rectangle
        ys, xs = np.nonzero(out == 0)
        corners.add((int(ys.min()), int(xs.min())))
    assert corners == {(0, 0), (0, 85), (85, 0), (85, 85)}


def test_burned_in_text_changes_only_a_top_corner():
    img = np.full((400, 400), 100, np.uint8)
    for name in ("text_label", "marker_lr"):
        for seed in (0, 1, 2, 3):
            out = perturb(img, name, seed)
            changed = np.argwhere(out != img)
            assert changed.size, name
            assert changed[:, 0].max() < 0.2 * 400, name  # in the top fifth
            assert (out == 255).any() and (out < 100).any(), name  # white glyphs, dark outline


def test_noise_is_seeded():
    img = np.full((40, 40), 100, np.uint8)
    assert np.array_equal(perturb(img, "noise", 5), perturb(img, "noise", 5))
    assert not np.array_equal(perturb(img, "noise", 5), perturb(img, "noise", 6))


def _labelled(tmp_path, n=6):
    files, labels = [], []
    for i in range(n):
        for label, level in ((0, 40 + 10 * i), (1, 170 + 10 * i)):
            p = tmp_path / f"{label}_{i}.png"
            img = np.full((50, 40), level, np.uint8)
            img[:, :5] = 0  # a dark margin, as X-rays have
            cv2.imencode(".png", img)[1].tofile(str(p))
            files.append(str(p))
            labels.append(label)
    return files, labels


def test_suite_rows_on_a_tiny_model(tmp_path):
    from pneumo_edge.runtime import load_model

    model = load_model(make_tiny_onnx(tmp_path / "tiny.onnx"), device="cpu")
    files, labels = _labelled(tmp_path)
    files.append(str(tmp_path / "missing.png"))
    labels.append(0)
    res = run_suite(model.run, model.preprocess, files, labels, model.threshold,
                    perturbations=["clean", "zoom_out_15", "gamma_1.4"], batch_size=4)
    assert res.n_failed == 1 and res.n_images == 13 and len(res.labels) == 12
    assert [r.perturbation for r in res.rows] == ["clean", "zoom_out_15", "gamma_1.4"]
    clean = res.row("clean")
    assert clean.auc == 1.0 and clean.mean_abs_dp == 0.0 and clean.flipped == 0.0
    # mean brightness model: a black border darkens every image, so p drops
    zout = res.row("zoom_out_15")
    assert zout.mean_abs_dp > 0.01
    assert np.all(res.probs["zoom_out_15"] < res.probs["clean"])
    worst = res.worst()
    assert worst["mean_abs_dp"]["row"] in ("zoom_out_15", "gamma_1.4")
    assert res.agreement_with(res) == {n: 1.0 for n in res.probs}
    d = res.to_dict()
    assert json.loads(json.dumps(d))["rows"][0]["perturbation"] == "clean"


def test_subset_scores_a_view_like_a_suite_run_on_its_files(tmp_path):
    from pneumo_edge.runtime import load_model

    model = load_model(make_tiny_onnx(tmp_path / "tiny.onnx"), device="cpu")
    files, labels = _labelled(tmp_path)
    files.insert(3, str(tmp_path / "missing.png"))  # a failed decode shifts the positions
    labels.insert(3, 1)
    rows = ["clean", "zoom_out_15", "border_black_3"]
    res = run_suite(model.run, model.preprocess, files, labels, model.threshold,
                    perturbations=rows, batch_size=4)
    mask = np.zeros(len(files), bool)
    mask[[0, 1, 3, 5, 6, 10, 11, 12]] = True  # one of them the missing file
    view = res.subset(mask)
    alone = run_suite(model.run, model.preprocess, [f for f, m in zip(files, mask) if m],
                      [y for y, m in zip(labels, mask) if m], model.threshold,
                      perturbations=rows, batch_size=4)
    assert view.n_images == len(view.labels) == 7
    assert np.array_equal(view.labels, alone.labels)
    for name in rows:
        assert np.allclose(view.probs[name], alone.probs[name])
        assert view.row(name).to_dict() == pytest.approx(alone.row(name).to_dict())
    assert view.subset(np.ones(7, bool)).row("clean").to_dict() == view.row("clean").to_dict()
    with pytest.raises(ValueError, match="mask of 12 values for 13 files"):
        res.subset(mask[:-1])


def test_read_split_csv_keeps_a_view_and_the_shared_rows(tmp_path):
    csv_path = tmp_path / "val_split.csv"
    csv_path.write_text("path,patient,label,part\n"
                        "NORMAL/IM-0001-0001.jpeg,IM-0001,NORMAL,block\n"
                        "NORMAL/IM-0500-0001.jpeg,IM-0500,NORMAL,patient\n"
                        "PNEUMONIA/person1_virus_1.jpeg,person1,PNEUMONIA,both\n")
    every = read_split_csv(csv_path, root="/d")
    assert every == (["/d/NORMAL/IM-0001-0001.jpeg", "/d/NORMAL/IM-0500-0001.jpeg",
                      "/d/PNEUMONIA/person1_virus_1.jpeg"], [0, 0, 1])
    assert read_split_csv(csv_path, root="/d", view="block") == (
        ["/d/NORMAL/IM-0001-0001.jpeg", "/d/PNEUMONIA/person1_virus_1.jpeg"], [0, 1])
    assert read_split_csv(csv_path, root="/d", view="patient")[1] == [0, 1]


def test_robustness_cli_on_onnx(tmp_path):
    root = tmp_path / "val"
    for label, levels in (("NORMAL", (40, 60, 80)), ("PNEUMONIA", (170, 190, 210))):
        (root / label).mkdir(parents=True)
        for lv in levels:
            cv2.imencode(".png", np.full((30, 30), lv, np.uint8))[1].tofile(
                str(root / label / f"{lv}.png"))
    model = make_tiny_onnx(tmp_path / "tiny.onnx")
    runner = CliRunner()
    res = runner.invoke(app, ["robustness", str(model), "--data", str(root), "--rows",
                              "clean,zoom_in_10,noise", "--reference", str(model),
                              "--out", str(tmp_path / "o"), "--device", "cpu"])
    assert res.exit_code == 0, res.output
    assert "zoom_in_10" in res.output and "agree vs ref" in res.output
    report = json.loads((tmp_path / "o" / "robustness.json").read_text())
    assert [r["perturbation"] for r in report["rows"]] == ["clean", "zoom_in_10", "noise"]
    assert report["rows"][0]["auc"] == 1.0 and report["agreement"]["noise"] == 1.0
    bad = runner.invoke(app, ["robustness", str(model), "--data", str(root), "--rows", "tilt"])
    assert bad.exit_code == EXIT_USAGE and "unknown perturbation 'tilt'" in bad.output
    none = runner.invoke(app, ["robustness", str(model)])
    assert none.exit_code == EXIT_USAGE and "no labelled images" in none.output


def test_robust_threshold_takes_the_worst_row():
    y = np.array([0] * 10 + [1] * 10)
    clean = np.r_[np.linspace(0.0, 0.3, 10), np.linspace(0.7, 1.0, 10)]
    # zoomed in, normals score higher: only thresholds above 0.6 keep every normal
    shifted = np.r_[np.linspace(0.3, 0.6, 10), np.linspace(0.8, 1.0, 10)]
    t, rule = choose_threshold_robust(y, {"clean": clean, "zoom_in": shifted})
    assert 0.6 < t < 0.7 and rule == "worst_row_youden_plateau(2 rows)"
    t_clean, _ = choose_threshold_robust(y, {"clean": clean})
    assert 0.3 < t_clean < 0.7 and t_clean < t


def test_temperature_fixes_overconfidence():
    rng = np.random.default_rng(0)
    z = rng.normal(0, 1.5, 4000)
    y = (rng.random(4000) < 1 / (1 + np.exp(-z))).astype(int)  # calibrated at T = 1
    over = 1 / (1 + np.exp(-3 * z))                              # logits tripled
    t = fit_temperature(y, over)
    assert t == pytest.approx(3.0, rel=0.1)
    fixed = apply_temperature(over, t)
    assert expected_calibration_error(y, fixed) < 0.5 * expected_calibration_error(y, over)
    assert np.all(np.argsort(fixed) == np.argsort(over))  # ranking (AUC) unchanged


def test_platt_removes_a_prior_shift():
    rng = np.random.default_rng(1)
    z = rng.normal(0, 2, 5000)
    y = (rng.random(5000) < 1 / (1 + np.exp(-z))).astype(int)
    shifted = 1 / (1 + np.exp(-(z / 2.0 - 1.0)))  # too soft and biased towards NORMAL
    t, b = fit_platt(y, shifted)
    assert t == pytest.approx(0.5, rel=0.1) and b == pytest.approx(2.0, rel=0.15)
    fixed = apply_temperature(shifted, t, b)
    assert expected_calibration_error(y, fixed) < 0.03 < expected_calibration_error(y, shifted)


def test_labelled_files_follow_the_at_or_below_rule(tmp_path):
    from pneumo_edge.robustness import labelled_files

    above = tmp_path / "PNEUMONIA" / "batch"  # a folder above the given path never labels
    for name, level in (("a.png", 40), ("b.png", 200)):
        (above / "NORMAL").mkdir(parents=True, exist_ok=True)
        cv2.imencode(".png", np.full((20, 20), level, np.uint8))[1].tofile(
            str(above / ("NORMAL" if name == "a.png" else "") / name))
    files, labels = labelled_files(above)
    assert [Path(f).name for f in files] == ["a.png"] and labels == [0]
    files, labels = labelled_files(above / "NORMAL")  # the given folder's own name labels
    assert [Path(f).name for f in files] == ["a.png"] and labels == [0]
