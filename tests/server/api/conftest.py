"""Fixtures for the gRPC API tests: real servers on port 0 over the demo repository."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from interscope.v1 import analysis_pb2, analysis_pb2_grpc, models_pb2_grpc
from interscope_server.config import Settings
from interscope_server.server import BackgroundServer


def server_settings(repository: Path | None, **overrides: object) -> Settings:
    """Loopback, free ports, demo repository; overrides for the test at hand."""
    values: dict[str, object] = {
        "host": "127.0.0.1",
        "port": 0,
        "metrics_port": 0,
        "metrics_host": "127.0.0.1",
        "model_repository": repository,
        "worker_threads": 8,
    }
    values.update(overrides)
    return Settings(**values)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def server(demo_repository: Path) -> Iterator[BackgroundServer]:
    with BackgroundServer(server_settings(demo_repository)) as srv:
        yield srv


@pytest.fixture()
def channel(server: BackgroundServer) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(server.address) as ch:
        yield ch


@pytest.fixture()
def analysis(channel: grpc.Channel) -> analysis_pb2_grpc.AnalysisServiceStub:
    return analysis_pb2_grpc.AnalysisServiceStub(channel)


@pytest.fixture()
def models(channel: grpc.Channel) -> models_pb2_grpc.ModelServiceStub:
    return models_pb2_grpc.ModelServiceStub(channel)


def grid(rows: int, cols: int, **fields: object) -> analysis_pb2.InteractionSpec:
    return analysis_pb2.InteractionSpec(
        players=analysis_pb2.PlayerSpec(grid=analysis_pb2.GridPlayers(rows=rows, cols=cols)),
        **fields,  # type: ignore[arg-type]
    )


def sine_onnx_model() -> bytes:
    """A 1x2x2-image, 3-class ONNX model; its Sin operator has no torch conversion: no gradients."""
    weights = helper.make_tensor(
        "w", TensorProto.FLOAT, [4, 3], np.linspace(-1, 1, 12, dtype=np.float32).tolist()
    )
    graph = helper.make_graph(
        [
            helper.make_node("Flatten", ["input"], ["flat"]),
            helper.make_node("MatMul", ["flat", "w"], ["h"]),
            helper.make_node("Sin", ["h"], ["logits"]),
        ],
        "sine",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 1, 2, 2])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 3])],
        initializer=[weights],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model.SerializeToString()
