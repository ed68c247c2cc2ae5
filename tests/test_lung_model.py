"""A classifier behind the lung-field stage: train, export (FP32/FP16/INT8), predict.

The segmenter here is hand-made (lung where the pooled grey level is above 100), so
the box is known; the shipped segmenter is trained and measured elsewhere.
"""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest

tf = pytest.importorskip("tensorflow")

from pneumo_edge.lung import NO_LUNG_FIELD  # noqa: E402
from pneumo_edge.predict import predict_paths  # noqa: E402
from pneumo_edge.runtime import load_model, read_metadata  # noqa: E402
from training.export import export_run  # noqa: E402
from training.train import TrainConfig, train  # noqa: E402

from synthetic import make_dataset  # noqa: E402

pytestmark = pytest.mark.tf
FRAME = 64


def _segmenter(path: Path) -> Path:
    import keras

    inp = keras.Input((FRAME // 2, FRAME // 2, 1))
    x = keras.layers.Rescaling(0.5, offset=-50.0)(inp)
    keras.Model(inp, keras.layers.Activation("sigmoid")(x), name="threshold_seg").save(path)
    return path


def _chest(bright: int = 200, border: float = 0.0) -> np.ndarray:
    img = np.full((FRAME * 3, FRAME * 3), 30, np.uint8)
    for cx in (70, 122):
        cv2.ellipse(img, (cx, 96), (26, 56), 0, 0, 360, bright, -1)
    if border:
        pad = int(round(border * img.shape[0]))
        img = cv2.copyMakeBorder(img, pad, pad, pad, pad, cv2.BORDER_CONSTANT, value=0)
    return img


@pytest.fixture(scope="module")
def lung_export(tmp_path_factory):
    root = tmp_path_factory.mktemp("lung")
    seg = _segmenter(root / "seg.keras")
    data = make_dataset(root / "data", n_patients=12, size=FRAME)
    run = root / "run"
    train(TrainConfig(data=str(data), out=str(run), arch="resnet_tiny_lung", img_size=FRAME,
                      segmenter=str(seg), epochs=1, batch_size=8, val_fraction=0.25, seed=2,
                      select_rows=("clean",)))
    out = root / "onnx"
    result = export_run(run, out, fp16=True, int8=True, calib_method="minmax", calib_size=24,
                        robustness=False)
    return root, run, out, result


def test_lung_model_trains_at_frame_size_and_crops_inside(lung_export):
    _, run, _, _ = lung_export
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["arch"] == "resnet_tiny_lung" and cfg["img_size"] == FRAME
    import keras

    from training.models import LUNG_LAYER, register_custom_layers
    register_custom_layers()
    model = keras.models.load_model(run / "best.keras", compile=False)
    assert model.input_shape[1:] == (FRAME, FRAME, 3)
    assert model.get_layer(LUNG_LAYER).crop_size == 48  # 3/4 of the frame
    assert not model.get_layer(LUNG_LAYER).segmenter.trainable


def test_export_has_lung_outputs_and_float_stage_in_every_precision(lung_export, tmp_path):
    root, _, out, result = lung_export
    boxes = {}
    frames = []
    for border in (0.0, 0.05):
        img = cv2.resize(_chest(border=border), (FRAME, FRAME), interpolation=cv2.INTER_AREA)
        frames.append(np.repeat(img[:, :, None], 3, axis=2).astype(np.float32))
    x = np.stack(frames)
    for r in result.files:
        meta, _, outputs = read_metadata(r.path)
        assert [o["name"] for o in outputs][-2:] == ["lung_box", "lung_area"]
        lf = meta["lung_field"]
        assert lf["frame"] == FRAME and lf["crop"] == 48 and lf["flag"] == NO_LUNG_FIELD
        model = load_model(r.path, device="cpu")
        got = model.run_all(x)
        assert got["lung_box"].shape == (2, 4) and got["lung_area"].shape == (2,)
        boxes[r.precision] = got["lung_box"]
    # the lung stage stays float32: the same box in FP16 and INT8 as in FP32
    for p in ("fp16", "int8"):
        np.testing.assert_allclose(boxes[p], boxes["fp32"], atol=1e-5, err_msg=p)
    clean, bordered = boxes["fp32"]
    # the box follows the lungs into the border: the bordered one is shrunk towards the centre
    assert clean[0] < bordered[0] < bordered[2] < clean[2]
    assert clean[1] < bordered[1] < bordered[3] < clean[3]


def test_predict_flags_no_lung_field_and_maps_heatmaps_onto_the_box(lung_export, tmp_path):
    _, _, out, result = lung_export
    folder = tmp_path / "in"
    folder.mkdir()
    cv2.imwrite(str(folder / "chest.png"), _chest())
    cv2.imwrite(str(folder / "dark.png"), np.full((200, 200), 20, np.uint8))  # no lungs
    model = load_model(out / "resnet_tiny_lung_int8.onnx", device="cpu")
    run = predict_paths(model, sorted(folder.iterdir()), batch_size=2,
                        heatmap_dir=tmp_path / "heat")
    by = {Path(p.path).name: p for p in run.predictions}
    assert not any(w.startswith(NO_LUNG_FIELD) for w in by["chest.png"].warnings)
    assert any(w.startswith(NO_LUNG_FIELD + ": no lung field found")
               for w in by["dark.png"].warnings)
    assert by["dark.png"].lung_box == (0.0, 0.0, 1.0, 1.0)
    y0, x0, y1, x1 = by["chest.png"].lung_box
    assert 0.1 < y0 < y1 < 0.9 and 0.15 < x0 < x1 < 0.85
    assert len(run.heatmaps) == 2


def test_init_from_reads_the_classifier_behind_the_lung_stage(lung_export):
    """train --init-from a lung-field file: the ResNet's weights by structure (the lung
    stage is the model's own segmenter), parity with onnxruntime on real-looking frames."""
    from training.init_from import check_parity, file_config, load_onnx_weights
    from training.models import create_model
    from pneumo_edge.preprocess import to_model_input

    root, _, out, _ = lung_export
    fp32 = out / "resnet_tiny_lung_fp32.onnx"
    fc = file_config(fp32)
    assert fc["arch"] == "resnet_tiny_lung" and fc["img_size"] == FRAME
    assert fc["crop_size"] == read_metadata(fp32)[0]["lung_field"]["crop"]
    model = create_model("resnet_tiny_lung", input_shape=(FRAME, FRAME, 3),
                         segmenter=str(root / "seg.keras"), crop_size=fc["crop_size"])
    summary = load_onnx_weights(model, fp32)
    assert summary["convolutions"] == summary["batchnorm_resplit"] == 12  # the classifier's
    pre = load_model(fp32, device="cpu").preprocess
    x = np.stack([to_model_input(_chest(bright=b, border=f), pre)
                  for b in (150, 200, 250) for f in (0.0, 0.05)])
    assert check_parity(model, fp32, x) <= 1e-4
