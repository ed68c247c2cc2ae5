"""Shared fixtures. The helpers they use live in ``helpers.py``: test files import
them from there (a conftest is pytest's, not a module to import from)."""

from __future__ import annotations

import os
from pathlib import Path

# wide rich output in CliRunner, so that asserted paths are not wrapped mid-name
os.environ["COLUMNS"] = "250"
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import pytest

from helpers import SHARED_TRAIN, make_tiny_onnx, write_gray_jpeg


@pytest.fixture
def tiny_model(tmp_path) -> Path:
    return make_tiny_onnx(tmp_path / "tiny.onnx")


@pytest.fixture
def labelled_folder(tmp_path) -> Path:
    """Four NORMAL (dark) and four PNEUMONIA (bright) images; model gets 3 + 3 right."""
    root = tmp_path / "xrays"
    for i, level in enumerate([30, 60, 90, 200]):      # the last NORMAL is bright: an FP
        write_gray_jpeg(root / "NORMAL" / f"n{i}.jpeg", level)
    for i, level in enumerate([160, 190, 220, 70]):     # the last PNEUMONIA is dark: an FN
        write_gray_jpeg(root / "PNEUMONIA" / f"p{i}.jpeg", level)
    return root


def pytest_collection_modifyitems(config, items):
    for item in items:
        if "slow" in item.keywords and not SHARED_TRAIN.is_dir():
            item.add_marker(pytest.mark.skip(reason=f"{SHARED_TRAIN} not present"))

