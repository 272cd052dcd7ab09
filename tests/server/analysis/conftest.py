"""Fixtures for the engine tests: the demo CNN as an evaluator, and held-out digits."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

Evaluate = Callable[[np.ndarray], np.ndarray]


def onnx_evaluator(model_dir: Path) -> Evaluate:
    """Raw [0, 1] inputs -> logits through onnxruntime, normalising as the model config says."""
    config = json.loads((model_dir / "config.json").read_text())
    mean = np.float32(config["normalization"]["mean"][0])
    std = np.float32(config["normalization"]["std"][0])
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1  # the test machine is shared; one thread is steadier
    session = ort.InferenceSession(
        str(model_dir / config["file"]), options, providers=["CPUExecutionProvider"]
    )

    def evaluate(x: np.ndarray) -> np.ndarray:
        return np.asarray(session.run(None, {"input": (x - mean) / std})[0])

    return evaluate


@pytest.fixture(scope="session")
def digits_evaluate(demo_repository: Path) -> Evaluate:
    return onnx_evaluator(demo_repository / "digits-cnn")


@pytest.fixture(scope="session")
def digit(demo_test_data: tuple[np.ndarray, np.ndarray]) -> tuple[np.ndarray, int]:
    """One held-out digit (1, 16, 16) and its label."""
    x, y = demo_test_data
    return x[3], int(y[3])
