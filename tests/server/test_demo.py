"""The demo repository: files, configs, accuracies, cached rebuilds, and both formats agreeing."""

from __future__ import annotations

import json
import time
import warnings
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

from interscope_server.demo import (
    DEMO_MODEL_NAMES,
    DEMO_NORMALIZATION,
    STAMP_FILE,
    build_demo_repository,
    read_demo_metrics,
)
from interscope_server.models.config import CONFIG_FILE, ModelConfig


def test_every_model_has_a_valid_config_and_file(demo_repository: Path) -> None:
    for name in DEMO_MODEL_NAMES:
        config = ModelConfig.model_validate(
            json.loads((demo_repository / name / CONFIG_FILE).read_text())
        )
        assert config.name == name
        assert config.format == ("torchscript" if name.endswith("-ts") else "onnx")
        assert (demo_repository / name / config.file).is_file()
        assert config.input.name == "input" and config.input.shape == [1, 16, 16]
        assert config.classes == [str(d) for d in range(10)]


def test_test_data_shapes_and_range(demo_test_data: tuple[np.ndarray, np.ndarray]) -> None:
    x, y = demo_test_data
    assert x.dtype == np.float32 and x.ndim == 4 and x.shape[1:] == (1, 16, 16)
    assert y.dtype == np.int64 and y.shape == (x.shape[0],)
    assert x.min() >= 0.0 and x.max() <= 1.0
    assert set(np.unique(y).tolist()) == set(range(10))


def test_accuracies_meet_the_targets(demo_repository: Path) -> None:
    metrics = read_demo_metrics(demo_repository)
    assert metrics.standard.clean_accuracy >= 0.9
    assert metrics.adversarial.clean_accuracy >= 0.9
    # "Clearly more robust": a wide margin, not noise.
    assert metrics.adversarial.pgd_accuracy >= metrics.standard.pgd_accuracy + 0.15


def test_second_build_is_cached(demo_repository: Path) -> None:
    stamp_before = (demo_repository / STAMP_FILE).stat().st_mtime_ns
    started = time.perf_counter()
    build_demo_repository(demo_repository)
    assert time.perf_counter() - started < 1.0
    assert (demo_repository / STAMP_FILE).stat().st_mtime_ns == stamp_before


def test_onnx_and_torchscript_agree_and_match_stored_accuracy(
    demo_repository: Path, demo_test_data: tuple[np.ndarray, np.ndarray]
) -> None:
    x, y = demo_test_data
    normalised = (x - DEMO_NORMALIZATION.mean[0]) / DEMO_NORMALIZATION.std[0]
    session = ort.InferenceSession(
        str(demo_repository / "digits-cnn" / "model.onnx"), providers=["CPUExecutionProvider"]
    )
    (onnx_logits,) = session.run(["logits"], {"input": normalised})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # torch.jit.load is deprecated
        module = torch.jit.load(str(demo_repository / "digits-cnn-ts" / "model.pt"))
    with torch.inference_mode():
        ts_logits = module(torch.from_numpy(normalised)).numpy()
    np.testing.assert_allclose(onnx_logits, ts_logits, rtol=1e-4, atol=1e-4)
    accuracy = float((onnx_logits.argmax(1) == y).mean())
    assert abs(accuracy - read_demo_metrics(demo_repository).standard.clean_accuracy) < 1e-3
