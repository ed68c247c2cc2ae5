"""Lung-field framing: the numpy recipe (pneumo_edge.lung), its Keras twin and its ONNX form."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from pneumo_edge import lung

F, S, C = lung.FRAME, lung.SEG, lung.CROP
# float32 positions of the sample points are exact to ~1 ulp at 192 (1.5e-5 px); across a
# 0 -> 255 step that is ~4e-3 grey levels, so parity is 1e-4 of the value range
CROP_TOL = 1e-4 * 255.0


def rect_mask(r0, r1, c0, c1, n=S):
    m = np.zeros((n, n), np.float32)
    m[r0:r1, c0:c1] = 1.0
    return m


def chest(size=F, seed=0):
    """A smooth synthetic 'chest': dark background, two bright lung ellipses, some texture."""
    rng = np.random.default_rng(seed)
    img = np.full((size, size), 40.0, np.float32)
    s = size / 192.0
    for cx in (70, 122):
        cv2.ellipse(img, (int(cx * s), int(92 * s)), (int(28 * s), int(58 * s)), 0, 0, 360, 200.0, -1)
    img += rng.normal(0, 8, img.shape).astype(np.float32)
    return np.clip(cv2.GaussianBlur(img, (0, 0), 2.0 * s), 0, 255).astype(np.float32)


def bordered(img, frac):
    """The image shrunk into a black border of ``frac`` of the side on every side."""
    n = img.shape[0]
    pad = int(round(n * frac))
    inner = cv2.resize(img, (n - 2 * pad, n - 2 * pad), interpolation=cv2.INTER_AREA)
    out = np.zeros_like(img)
    out[pad:n - pad, pad:n - pad] = inner
    return out, pad / n


def threshold_mask(frame):
    """The hand-made 'segmenter' of the Keras tests, in numpy: lung where the pooled grey > 100."""
    small = lung.seg_input(frame)
    return 1.0 / (1.0 + np.exp(-0.5 * (small.astype(np.float64) - 100.0)))


def frames(*grey):
    return np.stack([np.repeat(g[:, :, None], 3, axis=2) for g in grey]).astype(np.float32)


# ------------------------------------------------------------------------- numpy

def test_box_is_first_to_last_row_and_column_plus_margin():
    box, area = lung.lung_box(rect_mask(20, 60, 10, 80))
    y0, y1, x0, x1 = 20 / S, 60 / S, 10 / S, 80 / S
    m = lung.MARGIN
    want = [y0 - m * (y1 - y0), x0 - m * (x1 - x0), y1 + m * (y1 - y0), x1 + m * (x1 - x0)]
    np.testing.assert_allclose(box, want, atol=1e-6)
    assert area == pytest.approx(40 * 70 / S**2)


def test_margin_is_clipped_to_the_frame():
    box, _ = lung.lung_box(rect_mask(0, S, 2, S))
    np.testing.assert_allclose(box, [0.0, 0.0, 1.0, 1.0], atol=1e-7)


def test_specks_do_not_stretch_the_box():
    m = rect_mask(20, 60, 10, 80)
    clean, _ = lung.lung_box(m)
    m[90, 2] = m[90, 3] = 1.0      # two pixels: 2 / 96 < MIN_FRACTION of a row
    m[2:4, 93] = 1.0               # and of a column
    assert lung.MIN_FRACTION * S > 2
    np.testing.assert_array_equal(lung.lung_box(m)[0], clean)
    m[85:95, 85:95] = 1.0          # a real blob does count
    assert lung.lung_box(m)[0][2] > clean[2]


def test_batch_matches_single():
    masks = np.stack([rect_mask(20, 60, 10, 80), np.zeros((S, S)), rect_mask(5, 90, 30, 40)])
    boxes, areas = lung.lung_box(masks[..., None])
    for i, m in enumerate(masks):
        b, a = lung.lung_box(m)
        np.testing.assert_array_equal(boxes[i], b)
        assert areas[i] == a


def test_no_lung_gives_the_full_frame_and_the_flag():
    box, area = lung.lung_box(np.full((S, S), 0.4))  # nothing above 0.5
    np.testing.assert_array_equal(box, lung.FULL_BOX)
    assert area == 0.0
    assert "no lung" in lung.lung_field_issue(box, area)


@pytest.mark.parametrize("mask, flagged", [
    (rect_mask(15, 80, 12, 84), False),   # a chest: centred, ~60 % of the frame
    (rect_mask(40, 60, 40, 60), True),    # tiny: < 15 % of the frame
    (rect_mask(10, 90, 0, 30), True),     # one side only: centre at x ~0.16
    (rect_mask(70, 96, 10, 86), True),    # bottom strip: small and low
])
def test_plausibility(mask, flagged):
    box, area = lung.lung_box(mask)
    assert (lung.lung_field_issue(box, area) is not None) is flagged


def test_full_box_at_full_size_is_the_identity():
    img = np.random.default_rng(1).uniform(0, 255, (F, F)).astype(np.float32)
    np.testing.assert_allclose(lung.crop(img, lung.FULL_BOX, size=F), img, atol=1e-3)


def test_crop_matrices_are_bilinear_and_normalised():
    wy, wx = lung.crop_matrices([0.1, 0.2, 0.7, 0.9], F, C)
    assert wy.shape == (C, F) and wx.shape == (C, F)
    np.testing.assert_allclose(wy.sum(1), 1.0, atol=1e-6)
    assert (np.count_nonzero(wy, axis=1) <= 2).all()
    # bilinear interpolation reproduces a linear ramp exactly: value = column index
    ramp = np.tile(np.arange(F, dtype=np.float32), (F, 1))
    out = lung.crop(ramp, [0.1, 0.2, 0.7, 0.9], C)
    s = 0.2 * F + (np.arange(C) + 0.5) * 0.7 * F / C - 0.5
    np.testing.assert_allclose(out, np.tile(s, (C, 1)), atol=1e-3)


def test_crop_of_three_channels_and_batches():
    g = chest()
    box = np.array([0.1, 0.15, 0.8, 0.85], np.float32)
    one = lung.crop(g, box)
    three = lung.crop(np.repeat(g[:, :, None], 3, 2), box)
    assert three.shape == (C, C, 3)
    np.testing.assert_allclose(three, np.repeat(one[:, :, None], 3, 2), atol=1e-4)
    batch = lung.crop(frames(g, g[::-1]), np.stack([box, box]))
    np.testing.assert_allclose(batch[0], three, atol=1e-4)
    np.testing.assert_allclose(batch[1][..., 0], lung.crop(g[::-1], box), atol=1e-4)


def test_heatmap_goes_back_inside_the_box():
    g = chest(seed=3)
    box = (0.15, 0.2, 0.8, 0.9)
    back = lung.heatmap_to_frame(lung.crop(g, box), box, g.shape)
    rows = slice(int(0.15 * F) + 2, int(0.8 * F) - 2)
    cols = slice(int(0.2 * F) + 2, int(0.9 * F) - 2)
    # cropping then drawing back reproduces the frame inside the box (a smooth image)
    assert np.abs(back[rows, cols] - g[rows, cols]).mean() < 2.0
    assert back[:int(0.15 * F) - 1].max() == pytest.approx(lung.crop(g, box).min())
    # a coarse map (a 5 x 5 cam) lands where its peak is: lower-right cell of the crop
    cam = np.zeros((5, 5), np.float32)
    cam[4, 4] = 1.0
    big = lung.heatmap_to_frame(cam, box, (400, 300), fill=-1.0)
    r, c = np.unravel_index(np.argmax(big), big.shape)
    assert 0.72 * 400 < r < 0.8 * 400 and 0.8 * 300 < c < 0.9 * 300
    assert big[0, 0] == -1.0 and big[399, 299] == -1.0


def test_a_black_border_moves_the_box_with_the_image():
    g = chest()
    box, _ = lung.lung_box(threshold_mask(g))
    assert lung.lung_field_issue(box, 0.3) is None
    for frac in (0.02, 0.03, 0.05, 0.10):
        gb, f = bordered(g, frac)
        box_b, _ = lung.lung_box(threshold_mask(gb))
        # the same lungs, shrunk into the border: box_b = f + (1 - 2 f) box, to a mask pixel
        exact = f + (1 - 2 * f) * box
        np.testing.assert_allclose(box_b, exact, atol=1.0 / S)
        ref = lung.crop(g, box)
        # the exactly mapped box gives the same crop up to resampling (grey levels, mean)
        assert np.abs(lung.crop(gb, exact) - ref).mean() < 0.5
        # the found box is a mask pixel off at most: a small shift, far below what the
        # border does to the uncropped frame
        same = np.abs(lung.crop(gb, box_b) - ref).mean()
        full = np.abs(cv2.resize(gb, (C, C), interpolation=cv2.INTER_AREA)
                      - cv2.resize(g, (C, C), interpolation=cv2.INTER_AREA)).mean()
        assert same < 5.0 and same < 0.7 * full, (frac, same, full)


# ------------------------------------------------------------------------- Keras / ONNX

@pytest.fixture(scope="module")
def keras_bits():
    pytest.importorskip("tensorflow")
    import keras

    from training.lungcrop import LungCrop, lung_crop_model

    def threshold_segmenter():
        inp = keras.Input((S, S, 1))
        x = keras.layers.Rescaling(0.5, offset=-50.0)(inp)
        return keras.Model(inp, keras.layers.Activation("sigmoid")(x))

    return keras, LungCrop, lung_crop_model, threshold_segmenter


def _twin(x):
    box, area = lung.lung_box(threshold_mask(x))
    return lung.crop(x, box), box, area


def _test_frames():
    g = chest()
    blank = np.full((F, F), 30.0, np.float32)
    return frames(g, bordered(g, 0.05)[0], chest(seed=7)[:, ::-1].copy(), blank)


@pytest.mark.tf
def test_keras_crop_matches_numpy(keras_bits):
    import tensorflow as tf

    _, _, build, seg = keras_bits
    model = build(seg())
    x = _test_frames()
    want_crop, want_box, want_area = _twin(x)
    eager = [np.asarray(t) for t in model(x, training=False)]
    graph = [np.asarray(t) for t in tf.function(lambda v: model(v, training=False))(x)]
    for crop_, box, area in (eager, graph, model.predict(x, verbose=0)):
        assert crop_.shape == (4, C, C, 3) and box.shape == (4, 4) and area.shape == (4, 1)
        np.testing.assert_allclose(box, want_box, atol=1e-6)
        np.testing.assert_allclose(area[:, 0], want_area, atol=1e-7)
        np.testing.assert_allclose(crop_, want_crop, atol=CROP_TOL)
    # the blank frame: no lung, the crop is the whole frame resized
    np.testing.assert_array_equal(eager[1][3], lung.FULL_BOX)
    assert eager[2][3, 0] == 0.0
    np.testing.assert_allclose(eager[0][3], 30.0, atol=1e-3)


@pytest.mark.tf
def test_onnx_conversion_matches_numpy(keras_bits):
    import onnxruntime as ort
    import tensorflow as tf
    import tf2onnx

    _, _, build, seg = keras_bits
    model = build(seg())
    spec = [tf.TensorSpec([None, F, F, 3], tf.float32, name="image")]
    proto, _ = tf2onnx.convert.from_keras(model, input_signature=spec, opset=17)
    assert [o.name for o in proto.graph.output] == ["crop", "box", "area"]
    sess = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    x = _test_frames()
    crop_, box, area = sess.run(None, {"image": x})
    want_crop, want_box, want_area = _twin(x)
    np.testing.assert_allclose(box, want_box, atol=1e-6)
    np.testing.assert_allclose(area[:, 0], want_area, atol=1e-7)
    np.testing.assert_allclose(crop_, want_crop, atol=CROP_TOL)


@pytest.mark.tf
def test_jitter_only_in_training_seeded_and_bounded(keras_bits):
    keras, LungCrop, _, seg = keras_bits
    x = _test_frames()[:3]
    _, want_box, _ = _twin(x)

    def boxes(seed, training):
        layer = LungCrop(seg(), jitter=lung.JITTER, seed=seed)
        return np.asarray(layer(x, training=training)[1])

    np.testing.assert_allclose(boxes(1, False), want_box, atol=1e-6)
    a, b, c = boxes(1, True), boxes(1, True), boxes(2, True)
    np.testing.assert_array_equal(a, b)
    assert np.abs(a - c).max() > 1e-3 and np.abs(a - want_box).max() > 1e-3
    # unclipped boxes: each side moved by at most JITTER of the (margined) box size
    size = np.concatenate([want_box[:, 2:] - want_box[:, :2]] * 2, axis=1)
    inner = (want_box > 0.05) & (want_box < 0.95)
    assert (np.abs(a - want_box)[inner] <= lung.JITTER * size[inner] + 1e-6).all()


@pytest.mark.tf
def test_segmenter_is_frozen_and_the_layer_round_trips(keras_bits, tmp_path):
    keras, LungCrop, build, seg = keras_bits
    from training.segmenter import build_unet

    unet = build_unet(base=4, depth=2)
    model = build(unet)
    assert not model.trainable_weights and unet.weights
    x = _test_frames()[:2]
    before = [np.asarray(t) for t in model(x, training=False)]
    path = tmp_path / "lungcrop.keras"
    model.save(path)
    again = keras.models.load_model(path, compile=False)
    after = [np.asarray(t) for t in again(x, training=False)]
    for u, v in zip(before, after):
        np.testing.assert_allclose(u, v, atol=1e-5)


@pytest.mark.tf
def test_unet_converts_to_onnx_with_parity(keras_bits):
    import onnxruntime as ort
    import tensorflow as tf
    import tf2onnx

    from training.segmenter import build_unet

    unet = build_unet(base=4, depth=3)
    x = np.random.default_rng(0).uniform(0, 255, (3, S, S, 1)).astype(np.float32)
    spec = [tf.TensorSpec([None, S, S, 1], tf.float32, name="image")]
    proto, _ = tf2onnx.convert.from_keras(unet, input_signature=spec, opset=17)
    sess = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    got = sess.run(None, {"image": x})[0]
    assert got.shape == (3, S, S, 1)
    np.testing.assert_allclose(got, np.asarray(unet(x, training=False)), atol=1e-4)


@pytest.mark.tf
def test_stage_nodes_are_the_lung_stage_only(keras_bits):
    import tensorflow as tf
    import tf2onnx

    keras, LungCrop, _, seg = keras_bits
    from training.heads import lung_stage_nodes as stage_nodes
    from training.segmenter import build_unet

    inp = keras.Input((F, F, 3), name="image")
    crop_, box, area = LungCrop(build_unet(base=4, depth=2), name="lung_crop")(inp)
    x = keras.layers.Conv2D(4, 3, name="cls_conv")(crop_)
    x = keras.layers.GlobalAveragePooling2D(name="gap")(x)
    out = keras.layers.Dense(1, activation="sigmoid", name="pneumonia_prob")(x)
    model = keras.Model(inp, [out, keras.layers.Identity(name="lung_box")(box),
                              keras.layers.Identity(name="lung_area")(area)])
    spec = [tf.TensorSpec([None, F, F, 3], tf.float32, name="image")]
    proto, _ = tf2onnx.convert.from_keras(model, input_signature=spec, opset=17)
    stage = set(stage_nodes(proto))
    rest = [n.name for n in proto.graph.node if n.name not in stage]
    assert any("Conv" in n.op_type for n in proto.graph.node if n.name in stage)  # segmenter
    assert rest and all(any(k in r for k in ("cls_conv", "gap", "pneumonia_prob"))
                        for r in rest), rest
    # everything producing box and area is inside the stage
    producer = {o: n.name for n in proto.graph.node for o in n.output}
    for out_ in proto.graph.output[1:]:
        assert producer[out_.name] in stage
