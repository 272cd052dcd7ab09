"""Model semantics at the backend edge: kinds to canonical scores, what is read from the file,
and every disagreement or ambiguity refused with the config field to set."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from interscope_server.attacks.base import AttackSpec
from interscope_server.attacks.runner import on_integer_grid
from interscope_server.errors import InvalidArgument
from interscope_server.models.backend import (
    PROBABILITY_FLOOR,
    BackendOptions,
    scores_from_output,
)
from interscope_server.models.config import ModelConfig
from interscope_server.models.onnx_backend import OnnxBackend
from interscope_server.models.torchscript_backend import TorchScriptBackend
from tests.zoo import ZooModel

CPU = BackendOptions(device="cpu")


def _open(model: ZooModel, tmp_path: Path, **config: Any) -> OnnxBackend | TorchScriptBackend:
    folder = model.write(tmp_path)
    data = {**model.config_json(), **config}
    parsed = ModelConfig.model_validate(data)
    cls = OnnxBackend if model.format == "onnx" else TorchScriptBackend
    return cls(parsed, folder / model.file, CPU)


def test_probabilities_become_log_p_with_a_documented_floor() -> None:
    p = np.array([[0.25, 0.75, 0.0]], np.float32)
    scores = scores_from_output(p, "probabilities")
    np.testing.assert_allclose(scores[0, :2], np.log([0.25, 0.75]), rtol=1e-6)
    assert scores[0, 2] == np.float32(np.log(PROBABILITY_FLOOR))
    np.testing.assert_allclose(torch.softmax(torch.from_numpy(scores), 1).numpy(), p, atol=1e-7)
    logits = np.array([[1.0, -2.0]], np.float32)
    np.testing.assert_array_equal(scores_from_output(logits, "logits"), logits)
    np.testing.assert_array_equal(scores_from_output(logits, "log_probabilities"), logits)


def test_everything_left_out_is_read_from_the_file(
    zoo: dict[str, ZooModel], tmp_path: Path
) -> None:
    backend = _open(zoo["sk-forest"], tmp_path)
    config = backend.config
    assert config.input.name == "X" and config.input.shape == [64]
    assert config.input.datatype == "FP32" and config.output.name == "output_probability"
    assert config.output.kind == "probabilities"
    assert config.classes == [str(c) for c in range(10)]
    uint8 = _open(zoo["uint8-cnn"], tmp_path)
    assert uint8.config.input.datatype == "UINT8" and uint8.config.value_range == (0.0, 255.0)
    assert uint8.integer_inputs
    fixed = _open(zoo["fixed-batch-1"], tmp_path)
    assert fixed.config.max_batch_size == 1
    model = zoo["fixed-batch-1"]
    expected = np.log(model.probabilities(model.x))
    got = fixed.forward(model.x)  # six rows through a batch-1 graph
    np.testing.assert_allclose(got - np.log(np.exp(got).sum(1, keepdims=True)), expected, atol=1e-4)
    module = fixed.torch_module()
    assert module is not None
    np.testing.assert_allclose(module(torch.from_numpy(model.x)).numpy(), got, atol=1e-4)


@pytest.mark.parametrize(
    ("name", "config", "message"),
    [
        ("two-output", {"output": {}}, "set output.name to the one holding the class scores"),
        ("two-output", {"output": {"name": "nope"}}, "output.name 'nope' is not among"),
        (
            "two-output",
            {"output": {"name": "logits", "kind": "probabilities"}},
            r"taken as probabilities but its rows do not lie in \[0, 1\]",
        ),
        ("fixed-batch-1", {"max_batch_size": 8}, "max_batch_size 8 but the model's batch"),
        (
            "uint8-cnn",
            {"input": {"datatype": "FP32"}},
            "input.datatype FP32 but the model takes UINT8",
        ),
        ("sk-forest", {"input": {"shape": [8, 8]}}, r"input.shape \[8, 8\] does not match"),
        ("sk-forest", {"classes": ["a", "b"]}, "classes has 2 labels but the model outputs 10"),
        ("ts-tuple", {"output": {}}, "returns a tuple of 2 .*set output.name"),
        ("ts-tuple", {"input": {}}, "set input.shape"),
        ("ts-dict", {"output": {"name": "scores"}}, "no output 'scores'"),
    ],
)
def test_disagreements_and_ambiguities_name_the_field(
    zoo: dict[str, ZooModel], tmp_path: Path, name: str, config: dict[str, Any], message: str
) -> None:
    with pytest.raises(InvalidArgument, match=message):
        _open(zoo[name], tmp_path, **config)


class _HandRolledSoftmax(torch.nn.Module):
    """Probabilities without a softmax node: the graph ends in a division."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        e = torch.exp(self.linear(x))
        return e / e.sum(dim=1, keepdim=True)


def test_probabilities_the_graph_does_not_show_are_not_taken_for_logits(
    zoo: dict[str, ZooModel], tmp_path: Path
) -> None:
    path = tmp_path / "hand.pt"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # TorchScript is what users have
        reference = _HandRolledSoftmax().eval()
        torch.jit.save(torch.jit.script(reference), str(path))
    base = {"name": "hand", "format": "torchscript", "file": "hand.pt", "input": {"shape": [4]}}
    with pytest.raises(InvalidArgument, match=r"set output\.kind to probabilities"):
        TorchScriptBackend(ModelConfig.model_validate(base), path, CPU)
    told = ModelConfig.model_validate({**base, "output": {"kind": "probabilities"}})
    backend = TorchScriptBackend(told, path, CPU)
    x = np.random.default_rng(0).uniform(0, 1, (3, 4)).astype(np.float32)
    with torch.no_grad():
        p = reference(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(backend.forward(x), np.log(p), atol=1e-6)
    # A softmax model declared as log-probabilities contradicts its own outputs.
    with pytest.raises(InvalidArgument, match="exp of its rows does not sum to 1"):
        _open(zoo["softmax-mlp-classic"], tmp_path, output={"kind": "log_probabilities"})


def test_legacy_output_name_is_still_read() -> None:
    config = ModelConfig.model_validate(
        {"name": "m", "format": "onnx", "file": "model.onnx", "output_name": "logits"}
    )
    assert config.output.name == "logits" and config.output.kind is None
    with pytest.raises(ValueError, match="disagree"):
        ModelConfig.model_validate(
            {
                "name": "m",
                "format": "onnx",
                "file": "m.onnx",
                "output_name": "a",
                "output": {"name": "b"},
            }
        )


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_adversarial_examples_move_onto_the_integer_grid_inside_the_ball(norm: str) -> None:
    rng = np.random.default_rng(0)
    x = torch.from_numpy(rng.integers(0, 256, (5, 12)).astype(np.float32))
    eps = 7.5 if norm == "linf" else 20.0
    delta = torch.from_numpy(rng.normal(0, 6, (5, 12)).astype(np.float32))
    if norm == "linf":
        delta = delta.clamp(-eps, eps)
    else:
        delta = delta * (eps / delta.norm(dim=1, keepdim=True)).clamp(max=1)
    x_adv = (x + delta).clamp(0, 255)
    spec = AttackSpec(name="pgd", norm=norm, eps=eps, value_range=(0.0, 255.0), integer_inputs=True)  # type: ignore[arg-type]
    grid = on_integer_grid(x, x_adv, spec)
    assert torch.equal(grid, torch.round(grid))
    assert float(grid.min()) >= 0 and float(grid.max()) <= 255
    moved = grid - x
    if norm == "linf":
        assert float(moved.abs().max()) <= eps
    else:
        assert bool((moved.norm(dim=1) <= eps + 1e-4).all())
