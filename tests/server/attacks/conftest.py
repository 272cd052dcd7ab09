"""Attack test fixtures: demo digits CNNs as white-box torch modules and an ONNX evaluator."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch


class RawInput(torch.nn.Module):
    """Maps raw [0, 1] images to the demo network's normalised inputs, as the registry does."""

    def __init__(self, inner: torch.nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.inner((x - 0.5) / 0.5)
        return out


class CountingEvaluator:
    """An onnxruntime forward pass on raw inputs that counts the rows it was asked for."""

    def __init__(self, path: Path) -> None:
        options = ort.SessionOptions()
        options.intra_op_num_threads = 1
        self.session = ort.InferenceSession(
            str(path), sess_options=options, providers=["CPUExecutionProvider"]
        )
        self.rows = 0
        self.calls = 0

    def __call__(self, x: np.ndarray) -> np.ndarray:
        assert x.dtype == np.float32
        self.rows += x.shape[0]
        self.calls += 1
        out = self.session.run(None, {"input": (x - 0.5) / 0.5})[0]
        return np.asarray(out, dtype=np.float32)


def _load_torchscript(path: Path) -> torch.nn.Module:
    with warnings.catch_warnings():
        # jit.load is deprecated in recent torch; TorchScript archives are what the demo ships.
        warnings.simplefilter("ignore", DeprecationWarning)
        inner = torch.jit.load(str(path), map_location="cpu")
    module = RawInput(inner.eval()).eval()
    module.requires_grad_(False)
    return module


@pytest.fixture(scope="session")
def standard_model(demo_repository: Path) -> torch.nn.Module:
    return _load_torchscript(demo_repository / "digits-cnn-ts" / "model.pt")


@pytest.fixture(scope="session")
def adversarial_model(demo_repository: Path) -> torch.nn.Module:
    return _load_torchscript(demo_repository / "digits-cnn-adv-ts" / "model.pt")


@pytest.fixture
def standard_onnx(demo_repository: Path) -> CountingEvaluator:
    return CountingEvaluator(demo_repository / "digits-cnn" / "model.onnx")


@pytest.fixture(scope="session")
def digits(demo_test_data: tuple[np.ndarray, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """The first 48 held-out digits: small enough to keep every attack test quick."""
    x, y = demo_test_data
    return x[:48], y[:48]


@pytest.fixture(scope="session")
def tiny_model() -> torch.nn.Module:
    """A seeded, untrained CNN on (1, 8, 8) inputs with 3 classes, for geometry-only tests."""
    gen = torch.Generator().manual_seed(1)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(1, 4, 3, padding=1),
        torch.nn.ReLU(),
        torch.nn.Flatten(),
        torch.nn.Linear(4 * 8 * 8, 3),
    )
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
    model.eval().requires_grad_(False)
    return model
