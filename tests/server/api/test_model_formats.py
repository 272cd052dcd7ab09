"""torch.export uploads and gradient-checked TorchScript over gRPC, against a real server."""

from __future__ import annotations

from pathlib import Path

import grpc
import numpy as np
import torch
from grpc import StatusCode

from interscope.codec import to_tensor
from interscope.v1 import analysis_pb2, analysis_pb2_grpc, models_pb2, models_pb2_grpc
from interscope_server.server import BackgroundServer
from tests.server.api.conftest import server_settings
from tests.server.api.test_services import status_of
from tests.server.models.torch_exports import FAMILIES, AttentionViT, export_program, trace

IMAGE = list(FAMILIES["vit"].shape)


def _upload(models, name: str, data: bytes, model_format: int) -> models_pb2.ModelInfo:
    config = models_pb2.ModelConfig(
        format=model_format,  # type: ignore[arg-type]
        input=models_pb2.TensorInfo(name="input", shape=IMAGE),
        classes=["a", "b", "c", "d"],
    )
    request = models_pb2.LoadModelRequest(
        name=name, upload=models_pb2.UploadSource(model=data, config=config)
    )
    return models.LoadModel(request).model


def _pgd(name: str, x: np.ndarray) -> analysis_pb2.AttackRequest:
    return analysis_pb2.AttackRequest(
        model=name,
        inputs=to_tensor(x),
        labels=[0, 1, 2],
        attack=analysis_pb2.AttackSpec(kind=analysis_pb2.ATTACK_KIND_PGD, eps=0.2, steps=5),
    )


def test_uploaded_program_and_traced_attention_over_grpc(tmp_path: Path) -> None:
    vit = FAMILIES["vit"].build()
    program = export_program(vit, FAMILIES["vit"].shape, tmp_path / "vit.pt2").read_bytes()
    torch.manual_seed(0)
    traced = trace(AttentionViT().eval(), FAMILIES["vit"].shape, tmp_path / "a.pt", no_grad=True)
    x = np.random.default_rng(0).uniform(0, 1, (3, *IMAGE)).astype(np.float32)
    (tmp_path / "repo").mkdir()
    with (
        BackgroundServer(
            server_settings(tmp_path / "repo", metrics_port=None, allow_uploads=True)
        ) as srv,
        grpc.insecure_channel(srv.address) as channel,
    ):
        models = models_pb2_grpc.ModelServiceStub(channel)
        analysis = analysis_pb2_grpc.AnalysisServiceStub(channel)

        info = _upload(models, "vit-pt2", program, models_pb2.MODEL_FORMAT_TORCH_EXPORT)
        assert info.state == models_pb2.MODEL_STATE_READY
        assert info.format == models_pb2.MODEL_FORMAT_TORCH_EXPORT
        assert info.gradients_available and not info.gradients_message
        assert (tmp_path / "repo" / "vit-pt2" / "model.pt2").is_file()
        events = list(analysis.Attack(_pgd("vit-pt2", x)))
        examples = [e.example for e in events if e.HasField("example")]
        assert events[-1].summary.n == 3 and len(examples) == 3

        info = _upload(
            models, "attention-ts", traced.read_bytes(), models_pb2.MODEL_FORMAT_TORCHSCRIPT
        )
        assert info.state == models_pb2.MODEL_STATE_READY
        assert not info.gradients_available
        assert "_native_multi_head_attention" in info.gradients_message
        code, details = status_of(analysis.Attack(_pgd("attention-ts", x)))
        assert code == StatusCode.FAILED_PRECONDITION
        assert "_native_multi_head_attention" in details and "square" in details
        square = _pgd("attention-ts", x)
        square.attack.kind = analysis_pb2.ATTACK_KIND_SQUARE
        square.attack.query_budget = 20
        assert list(analysis.Attack(square))[-1].summary.n == 3
