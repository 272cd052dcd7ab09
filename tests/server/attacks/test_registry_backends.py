"""Attacks on the registry's own backends: their torch modules and their forward passes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from interscope_server.attacks import AttackSpec, run_attack
from interscope_server.models.backend import Backend
from interscope_server.models.onnx_backend import OnnxBackend
from interscope_server.models.repository import ModelRepository
from interscope_server.models.torchscript_backend import TorchScriptBackend


def _backend(root: Path, name: str) -> Backend:
    repository = ModelRepository(root)
    config = repository.read_config(name)
    path = repository.model_file(config)
    if config.format == "onnx":
        return OnnxBackend(config, path)
    return TorchScriptBackend(config, path)


@pytest.mark.parametrize("name", ["digits-cnn", "digits-cnn-ts"])
def test_pgd_and_square_run_on_registry_backends(
    name: str, demo_repository: Path, digits: tuple[np.ndarray, np.ndarray]
) -> None:
    backend = _backend(demo_repository, name)
    try:
        x, y = digits[0][:16], digits[1][:16]
        value_range = backend.config.value_range
        module = backend.torch_module()
        if module is not None:
            spec = AttackSpec("pgd", eps=0.1, steps=10, value_range=value_range)
            report = run_attack(spec, x, y, module, backend.forward, batch_size=8)
            assert report.summary.robust_accuracy < report.summary.clean_accuracy
        square = AttackSpec("square", eps=0.1, query_budget=50, value_range=value_range)
        report = run_attack(square, x, y, None, backend.forward, batch_size=8)
        assert report.summary.robust_accuracy < report.summary.clean_accuracy
    finally:
        backend.close()
