"""train --init-from MODEL.onnx: weights read back from an export by graph structure."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

tf = pytest.importorskip("tensorflow")

from typer.testing import CliRunner  # noqa: E402

from pneumo_edge.cli import EXIT_OK, EXIT_USAGE, app  # noqa: E402
from pneumo_edge.runtime import load_model  # noqa: E402
from training.export import export_run  # noqa: E402
from training.init_from import (InitFromError, check_parity, freeze,  # noqa: E402
                                load_onnx_weights, onnx_probabilities)
from training.models import create_model  # noqa: E402
from training.train import TrainConfig, train  # noqa: E402

from synthetic import make_dataset  # noqa: E402

pytestmark = pytest.mark.tf
runner = CliRunner()


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> dict:
    """A one-epoch tiny run exported to FP32 and INT8 (with the cam and ood heads)."""
    root = tmp_path_factory.mktemp("init")
    data = make_dataset(root / "data", n_patients=12)
    run = root / "run"
    train(TrainConfig(data=str(data), out=str(run), arch="resnet_tiny", img_size=32, epochs=1,
                      batch_size=8, val_fraction=0.25, seed=2, precision="fp32"))
    out = root / "onnx"
    export_run(run, out, int8=True, calib_method="minmax", calib_size=16, robustness=False,
               ood_size=40)
    return {"root": root, "data": data, "fp32": out / "resnet_tiny_fp32.onnx",
            "int8": out / "resnet_tiny_int8.onnx"}


def test_weights_load_by_structure_with_parity(base):
    model = create_model("resnet_tiny", input_shape=(32, 32, 3))
    summary = load_onnx_weights(model, base["fp32"])
    # stem + 4 blocks x 2 + 3 projections (stages 2-4 widen)
    assert summary["convolutions"] == summary["batchnorm_resplit"] == 12
    rng = np.random.default_rng(0)
    x = rng.uniform(0, 255, (24, 32, 32, 3)).astype(np.float32)
    assert check_parity(model, base["fp32"], x) <= 1e-4
    # the re-split BatchNorm is x + folded bias: gamma 1, mean 0, variance 1 - eps, frozen
    bn = model.get_layer("stem_bn")
    gamma, beta, mean, var = bn.get_weights()
    assert np.all(gamma == 1) and np.all(mean == 0) and np.allclose(var, 1 - bn.epsilon)
    assert not bn.trainable and np.any(beta != 0)
    # a model that starts from random weights is refused by the same check
    with pytest.raises(InitFromError, match="differs from onnxruntime"):
        check_parity(create_model("resnet_tiny", input_shape=(32, 32, 3)), base["fp32"], x)


def test_freeze_until_stage(base):
    model = create_model("resnet_tiny", input_shape=(32, 32, 3))
    frozen = freeze(model, "stage2")
    assert any(n.startswith("stem") for n in frozen) and any(n.startswith("stage2") for n in frozen)
    assert not any(n.startswith(("stage3", "stage4", "pneumonia")) for n in frozen)
    assert model.get_layer("stage3_block1_1_conv").trainable
    with pytest.raises(InitFromError, match="--freeze-until"):
        freeze(model, "stage9")


def test_one_epoch_fine_tune_exports(base, tmp_path):
    run = tmp_path / "ft"
    res = runner.invoke(app, ["train", "--data", str(base["data"]), "--out", str(run),
                              "--init-from", str(base["fp32"]), "--epochs", "1",
                              "--batch-size", "8", "--val-fraction", "0.25", "--seed", "3"])
    assert res.exit_code == EXIT_OK, res.output
    record = json.loads((run / "init_from.json").read_text())
    assert record["parity_max_abs_diff"] <= 1e-4 and record["freeze_until"] == "stage2"
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["img_size"] == 32 and cfg["arch"] == "resnet_tiny" and cfg["lr"] == 1e-4
    assert cfg["pull"] == 1.0 and cfg["weight_decay"] == 0.0
    out = tmp_path / "onnx"
    res = runner.invoke(app, ["export", str(run), "--out", str(out), "--no-robustness"])
    assert res.exit_code == EXIT_OK, res.output
    model = load_model(out / "resnet_tiny_fp32.onnx", warmup=0)
    assert model.meta["training"]["init_from"] == str(base["fp32"])
    x = np.random.default_rng(1).uniform(0, 255, (4, 32, 32, 3)).astype(np.float32)
    p = model.run(x)
    assert p.shape == (4,) and np.all((p >= 0) & (p <= 1))
    # the frozen stem kept the file's weights (up to the weight average's float rounding);
    # an unfrozen stage moved
    before = create_model("resnet_tiny", input_shape=(32, 32, 3))
    load_onnx_weights(before, base["fp32"])
    import keras
    after = keras.models.load_model(run / "best.keras")
    np.testing.assert_allclose(after.get_layer("stem_conv").get_weights()[0],
                               before.get_layer("stem_conv").get_weights()[0], atol=1e-6)
    assert not np.array_equal(after.get_layer("stage4_block1_2_conv").get_weights()[0],
                              before.get_layer("stage4_block1_2_conv").get_weights()[0])


def test_init_from_refusals(base, tmp_path):
    def refused(extra, fragment):
        res = runner.invoke(app, ["train", "--data", str(base["data"]), "--out",
                                  str(tmp_path / "r"), "--epochs", "1", *extra])
        assert res.exit_code == EXIT_USAGE, res.output
        assert fragment in res.output and "Traceback" not in res.output
        assert not (tmp_path / "r").exists()

    refused(["--init-from", str(base["int8"])], "a int8 file")
    refused(["--init-from", str(tmp_path / "none.onnx")], "model file not found")
    refused(["--init-from", str(base["fp32"]), "--img-size", "48"], "differs from the")
    refused(["--init-from", str(base["fp32"]), "--freeze-until", "stage7"],
            "--freeze-until must be one of")
    refused(["--freeze-until", "stage1"], "go with --init-from")
    refused(["--init-from", str(base["fp32"]), "--precision", "bf16"], "--precision fp32")


def test_onnx_probabilities_match_the_runtime(base):
    x = np.random.default_rng(2).uniform(0, 255, (3, 32, 32, 3)).astype(np.float32)
    np.testing.assert_allclose(onnx_probabilities(base["fp32"], x),
                               load_model(base["fp32"], warmup=0).run(x), atol=1e-6)
