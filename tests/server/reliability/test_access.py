"""Access through LoadModel: uploads size-limited, names and paths confined to the repository,
ONNX external data confined, TorchScript never unpickled (tokens and TLS: test_operations)."""

from __future__ import annotations

import builtins
import io
import json
import pickle
import subprocess
import sys
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import onnx
import pytest
from onnx import TensorProto

from interscope.v1 import models_pb2, models_pb2_grpc
from interscope_server.server import BackgroundServer
from tests.server.api.conftest import server_settings, sine_onnx_model
from tests.server.reliability.conftest import Outcomes, copy_models

C = grpc.StatusCode
UPLOAD_LIMIT = 4096
SINE_CONFIG = models_pb2.ModelConfig(
    format=models_pb2.MODEL_FORMAT_ONNX,
    input=models_pb2.TensorInfo(name="input", shape=[1, 2, 2]),
    classes=["a", "b", "c"],
)
TORCHSCRIPT_CONFIG = models_pb2.ModelConfig(
    format=models_pb2.MODEL_FORMAT_TORCHSCRIPT,
    input=models_pb2.TensorInfo(name="input", shape=[1, 2, 2]),
    classes=["a", "b", "c"],
)


@pytest.fixture()
def sandbox(tmp_path: Path, demo_repository: Path) -> Path:
    """A folder holding the repository, so that anything escaping it would land beside it."""
    copy_models(demo_repository, tmp_path / "repo", ["digits-cnn"])
    return tmp_path


@pytest.fixture()
def models(sandbox: Path) -> Iterator[models_pb2_grpc.ModelServiceStub]:
    settings = server_settings(
        sandbox / "repo", metrics_port=None, max_upload_bytes=UPLOAD_LIMIT, allow_uploads=True
    )
    with BackgroundServer(settings) as srv, grpc.insecure_channel(srv.address) as channel:
        yield models_pb2_grpc.ModelServiceStub(channel)


def load(
    models: models_pb2_grpc.ModelServiceStub, request: models_pb2.LoadModelRequest
) -> tuple[grpc.StatusCode, str]:
    try:
        models.LoadModel(request, timeout=30)
        return C.OK, ""
    except grpc.RpcError as exc:
        return exc.code(), exc.details() or ""


def upload(name: str, data: bytes, config: models_pb2.ModelConfig) -> models_pb2.LoadModelRequest:
    return models_pb2.LoadModelRequest(
        name=name, upload=models_pb2.UploadSource(model=data, config=config)
    )


def tree(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*")}


def test_uploads_are_size_limited(models: Any, sandbox: Path, outcomes: Outcomes) -> None:
    sine = sine_onnx_model()
    assert len(sine) < UPLOAD_LIMIT
    before = tree(sandbox)
    padded = sine + b"\0" * (UPLOAD_LIMIT + 1 - len(sine))
    code, details = load(models, upload("big", padded, SINE_CONFIG))
    outcomes.record("access: upload too big", code)
    assert code == C.RESOURCE_EXHAUSTED and str(UPLOAD_LIMIT) in details
    assert tree(sandbox) == before, "a refused upload left files behind"
    assert load(models, upload("small", sine, SINE_CONFIG))[0] == C.OK


BAD_NAMES = ["../x", "..", ".", "a/b", "/etc/passwd", "..\\x", ".hidden", "x\0y", "-x", "a" * 129]


@pytest.mark.parametrize("source", ["repository", "upload"])
def test_model_names_are_confined(
    models: Any, sandbox: Path, source: str, outcomes: Outcomes
) -> None:
    before = tree(sandbox)
    for name in BAD_NAMES:
        if source == "upload":
            request = upload(name, sine_onnx_model(), SINE_CONFIG)
        else:
            request = models_pb2.LoadModelRequest(
                name=name, repository=models_pb2.RepositorySource()
            )
        code, details = load(models, request)
        outcomes.record(f"access: bad name ({source})", code)
        assert code == C.INVALID_ARGUMENT, f"{name!r}: {code.name} {details}"
        with pytest.raises(grpc.RpcError) as info:
            models.UnloadModel(models_pb2.UnloadModelRequest(name=name), timeout=5)
        assert info.value.code() in (C.INVALID_ARGUMENT, C.NOT_FOUND)
    assert tree(sandbox) == before


def test_model_files_are_confined_to_their_folder(
    models: Any, sandbox: Path, outcomes: Outcomes
) -> None:
    """A repository folder whose config or file points outside (a `..` path, a symlink)."""
    outside = sandbox / "outside.onnx"
    outside.write_bytes(sine_onnx_model())
    config = json.loads((sandbox / "repo" / "digits-cnn" / "config.json").read_text())
    config.update(input={"name": "input", "shape": [1, 2, 2]}, classes=["a", "b", "c"])
    for name, file in (("dotdot", "../../outside.onnx"), ("symlink", "model.onnx")):
        folder = sandbox / "repo" / name
        folder.mkdir()
        (folder / "config.json").write_text(json.dumps({**config, "name": name, "file": file}))
    (sandbox / "repo" / "symlink" / "model.onnx").symlink_to(outside)
    for name in ("dotdot", "symlink"):
        request = models_pb2.LoadModelRequest(name=name, repository=models_pb2.RepositorySource())
        code, details = load(models, request)
        outcomes.record("access: file outside folder", code)
        assert code == C.INVALID_ARGUMENT, f"{name}: {code.name} {details}"
        assert "outside" in details or "inside" in details, details


def external_data_model(location: str) -> bytes:
    """The sine model with its weights declared as external data at `location`."""
    model = onnx.load_from_string(sine_onnx_model())
    weights = model.graph.initializer[0]
    weights.ClearField("float_data")
    weights.data_location = TensorProto.EXTERNAL
    for key, value in (("location", location), ("offset", "0"), ("length", "48")):
        entry = weights.external_data.add()
        entry.key, entry.value = key, value
    return model.SerializeToString()


@pytest.mark.parametrize(
    "location", ["../../etc/passwd", "/etc/passwd", "../digits-cnn/model.onnx"]
)
def test_onnx_external_data_is_confined(models: Any, location: str, outcomes: Outcomes) -> None:
    code, details = load(models, upload("external", external_data_model(location), SINE_CONFIG))
    outcomes.record("access: ONNX external data", code)
    assert code == C.INVALID_ARGUMENT, details
    assert "external data" in details


class _Payload:
    """Unpickling this calls open(marker, "w"): the file appears if any pickle is executed."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, tuple[str, str]]:
        return builtins.open, (str(self.marker), "w")


def pickle_payloads(marker: Path) -> dict[str, bytes]:
    raw = pickle.dumps(_Payload(marker))
    # torch.save's layout: a zip archive whose data.pkl holds the pickle.
    archive = io.BytesIO()
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("archive/data.pkl", raw)
        zf.writestr("archive/version", "3\n")
    return {"plain pickle": raw, "torch.save-style zip": archive.getvalue()}


def test_torchscript_is_loaded_without_unpickling(
    models: Any, tmp_path: Path, outcomes: Outcomes
) -> None:
    # The payload is live: unpickling it in another process does create its marker.
    control = tmp_path / "control-marker"
    script = "import pickle, sys; pickle.loads(sys.stdin.buffer.read())"
    live = pickle_payloads(control)["plain pickle"]
    subprocess.run([sys.executable, "-c", script], input=live, check=False, timeout=30)
    assert control.exists(), "the test payload does not work; the check below would mean nothing"
    marker = tmp_path / "pwned-marker"
    for index, (what, data) in enumerate(pickle_payloads(marker).items()):
        code, details = load(models, upload(f"evil-{index}", data, TORCHSCRIPT_CONFIG))
        outcomes.record("access: pickle as TorchScript", code)
        assert code == C.INVALID_ARGUMENT, f"{what}: {code.name} {details}"
        assert "TorchScript" in details
        assert not marker.exists(), f"{what}: loading ran the pickle's code"
