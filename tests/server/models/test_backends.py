"""Backends on the demo models: formats agree, converted-ONNX gradients match TorchScript's."""

from __future__ import annotations

import hashlib
import io
import logging
import warnings
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from torch import nn

from interscope_server.errors import InvalidArgument
from interscope_server.models import (
    BackendOptions,
    ModelConfig,
    Normalization,
    OnnxBackend,
    OnnxModule,
    TensorSpec,
    TorchScriptBackend,
    UnsupportedOnnxGraph,
)
from interscope_server.models.config import CONFIG_FILE

CPU = BackendOptions(device="cpu")


def _config(root: Path, name: str) -> ModelConfig:
    return ModelConfig.model_validate_json((root / name / CONFIG_FILE).read_bytes())


@pytest.fixture(scope="module")
def backends(demo_repository: Path) -> tuple[OnnxBackend, TorchScriptBackend]:
    onnx_cfg = _config(demo_repository, "digits-cnn-adv")
    ts_cfg = _config(demo_repository, "digits-cnn-adv-ts")
    return (
        OnnxBackend(onnx_cfg, demo_repository / "digits-cnn-adv" / onnx_cfg.file, CPU),
        TorchScriptBackend(ts_cfg, demo_repository / "digits-cnn-adv-ts" / ts_cfg.file, CPU),
    )


def test_both_formats_give_the_same_logits(
    backends: tuple[OnnxBackend, TorchScriptBackend], demo_test_data: tuple[np.ndarray, np.ndarray]
) -> None:
    onnx_backend, ts_backend = backends
    x, y = demo_test_data
    a, b = onnx_backend.forward(x), ts_backend.forward(x)
    assert a.shape == b.shape == (len(x), 10) and a.dtype == b.dtype == np.float32
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)
    # Raw [0, 1] inputs go in; the backend normalises. Accuracy proves it did so correctly.
    assert (a.argmax(1) == y).mean() > 0.9


def test_metadata(backends: tuple[OnnxBackend, TorchScriptBackend], demo_repository: Path) -> None:
    onnx_backend, ts_backend = backends
    assert (onnx_backend.format, ts_backend.format) == ("onnx", "torchscript")
    assert onnx_backend.device == ts_backend.device == "cpu"
    assert onnx_backend.gradients_available and ts_backend.gradients_available

    expected = hashlib.sha256((demo_repository / "digits-cnn-adv/model.onnx").read_bytes())
    assert onnx_backend.content_hash == expected.hexdigest()
    assert onnx_backend.content_hash != ts_backend.content_hash


def test_converted_onnx_gradients_match_torchscript(
    backends: tuple[OnnxBackend, TorchScriptBackend], demo_test_data: tuple[np.ndarray, np.ndarray]
) -> None:
    x, y = demo_test_data
    grads = []
    for backend in backends:
        module = backend.torch_module()
        assert module is not None and not module.training
        inputs = torch.from_numpy(x[:32]).requires_grad_(True)
        loss = nn.functional.cross_entropy(module(inputs), torch.from_numpy(y[:32]))
        (grad,) = torch.autograd.grad(loss, inputs)
        grads.append(grad.numpy())
    assert np.abs(grads[1]).max() > 1e-4  # a real gradient, not zeros
    np.testing.assert_allclose(grads[0], grads[1], rtol=1e-3, atol=1e-6)


def test_wrong_input_shape_and_dtype_are_invalid_arguments(
    backends: tuple[OnnxBackend, TorchScriptBackend],
) -> None:
    onnx_backend, _ = backends
    with pytest.raises(InvalidArgument, match=r"shape \(batch, 1, 16, 16\)"):
        onnx_backend.forward(np.zeros((2, 1, 8, 8), np.float32))
    with pytest.raises(InvalidArgument, match="FP32"):
        onnx_backend.forward(np.zeros((2, 1, 16, 16), np.int32))


class _ManyOps(nn.Module):
    """Exercises BatchNorm, AvgPool, GlobalAveragePool, Shape/Gather/Reshape, MatMul, Softmax."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.pool = nn.AvgPool2d(2)
        self.w = nn.Parameter(torch.randn(8 * 4 * 4, 5) * 0.1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.pool(torch.relu(self.bn(self.conv(x))))
        g = nn.functional.adaptive_avg_pool2d(h, 1)
        flat = (h - g).reshape(x.size(0), -1)  # Shape -> Gather -> Concat -> Reshape in ONNX
        return (
            torch.cat([flat @ self.w, torch.softmax(flat[:, :3], dim=1)], dim=1).transpose(0, 1).t()
        )


def _export(module: nn.Module, example: torch.Tensor, *, fold: bool = True) -> onnx.ModelProto:
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(
            module.eval(),
            (example,),
            buffer,
            dynamo=False,
            input_names=["input"],
            output_names=["logits"],
            dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
            opset_version=17,
            do_constant_folding=fold,
        )
    return onnx.load_from_string(buffer.getvalue())


def test_converter_matches_onnxruntime_on_more_ops() -> None:
    torch.manual_seed(0)
    net = _ManyOps()
    net.bn.running_mean.uniform_(-0.5, 0.5)
    net.bn.running_var.uniform_(0.5, 2.0)
    # Without constant folding the exporter keeps BatchNormalization instead of fusing it.
    model = _export(net, torch.zeros(1, 3, 16, 16), fold=False)
    ops = {n.op_type for n in model.graph.node}
    assert {"BatchNormalization", "AveragePool", "GlobalAveragePool", "Shape", "Gather"} <= ops
    assert {"Reshape", "Slice", "Softmax", "MatMul", "Concat", "Unsqueeze", "Constant"} <= ops
    x = np.random.default_rng(1).uniform(0, 1, (5, 3, 16, 16)).astype(np.float32)
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    (expected,) = session.run(None, {"input": x})
    with torch.no_grad():
        got = OnnxModule(model)(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)


def test_unsupported_op_leaves_forward_working_without_gradients(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    class Atany(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.atan(x.reshape(x.size(0), -1)[:, :2])

    model = _export(Atany(), torch.zeros(1, 1, 4, 4))
    with pytest.raises(UnsupportedOnnxGraph, match="Atan"):
        OnnxModule(model)
    (tmp_path / "model.onnx").write_bytes(model.SerializeToString())
    config = ModelConfig(
        name="atany",
        format="onnx",
        file="model.onnx",
        input=TensorSpec(name="input", shape=[1, 4, 4]),
        classes=["a", "b"],
        normalization=Normalization(mean=[0.5], std=[0.25]),
    )
    with caplog.at_level(logging.INFO):
        backend = OnnxBackend(config, tmp_path / "model.onnx", CPU)
    assert not backend.gradients_available and backend.torch_module() is None
    assert "Atan" in backend.gradient_note and "Atan" in caplog.text
    x = np.full((3, 1, 4, 4), 0.75, np.float32)
    np.testing.assert_allclose(backend.forward(x), np.full((3, 2), np.float32(np.pi / 4)), 1e-5)


def test_graph_signature_mismatch_is_reported(demo_repository: Path) -> None:
    config = _config(demo_repository, "digits-cnn").model_copy(
        update={"input": TensorSpec(name="image", shape=[1, 16, 16])}
    )
    with pytest.raises(InvalidArgument, match=r"config input\.name 'image'"):
        OnnxBackend(config, demo_repository / "digits-cnn" / "model.onnx", CPU)
    config = _config(demo_repository, "digits-cnn").model_copy(
        update={"input": TensorSpec(name="input", shape=[1, 8, 8])}
    )
    with pytest.raises(InvalidArgument, match=r"shape \[1, 8, 8\] does not match"):
        OnnxBackend(config, demo_repository / "digits-cnn" / "model.onnx", CPU)


class _BatchSeen(nn.Module):
    """Logits whose first entry is the number of rows the model was given in that call."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = torch.full((x.shape[0], 1), float(x.shape[0]))
        return torch.cat([rows, x.reshape(x.shape[0], -1)[:, :1]], dim=1)


def test_a_declared_max_batch_caps_torchscript_calls_without_padding_them(tmp_path: Path) -> None:
    """max_batch_size is a maximum: a TorchScript model gets the rows there are (it used to be
    padded up to the maximum on every call, 1024 rows for the demo's few), in chunks of at
    most the maximum, in forwards and in the differentiable module attacks use."""
    path = tmp_path / "model.pt"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # TorchScript is in maintenance
        torch.jit.save(torch.jit.script(_BatchSeen()), str(path))
    config = ModelConfig(
        name="seen",
        format="torchscript",
        file="model.pt",
        input=TensorSpec(name="x", shape=[4]),
        output={"kind": "logits"},
        max_batch_size=8,
    )
    backend = TorchScriptBackend(config, path, CPU)
    x = np.random.default_rng(0).uniform(size=(11, 4)).astype(np.float32)
    # Canonical scores are logits as they are: the first column is the rows seen per call.
    assert backend.forward(x[:3])[:, 0].tolist() == [3.0] * 3
    assert backend.forward(x)[:, 0].tolist() == [8.0] * 8 + [3.0] * 3
    module = backend.torch_module()
    assert module is not None
    with torch.no_grad():
        seen = module(torch.from_numpy(x[:5]))[:, 0]
    assert seen.tolist() == [5.0] * 5
