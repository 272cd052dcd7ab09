"""Format oip against a real Open Inference Protocol server (MLServer in its own venv): the same
model loaded locally and through the remote gives the same profiles and Square attacks."""

from __future__ import annotations

import json
import shutil
import threading
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from oip_mlserver import RemoteModel, mlserver
from pydantic import ValidationError

import interscope
from interscope.v1 import models_pb2
from interscope_server.config import Settings
from interscope_server.errors import FailedPrecondition, InvalidArgument, Unavailable
from interscope_server.models import ModelConfig, ModelRegistry, ModelRepository, ModelState
from interscope_server.models.oip_backend import OipBackend
from interscope_server.models.onnx_backend import OnnxBackend
from interscope_server.server import BackgroundServer

# The first run builds MLServer's venv (a minute or two); later runs only start the server.
pytestmark = pytest.mark.timeout(900)

LOCAL = "digits-cnn"
REMOTE = "digits-remote"


def remote_config(remote: RemoteModel, name: str = REMOTE, **oip: Any) -> dict[str, Any]:
    """The demo digits-cnn config, pointed at the remote copy; input from ModelMetadata."""
    return {
        "name": name,
        "format": "oip",
        "oip": {"url": remote.url, "model": remote.name, "version": remote.version, **oip},
        "output_name": "logits",
        "classes": [str(d) for d in range(10)],
        "normalization": {"mean": [0.5], "std": [0.5]},
        "max_batch_size": 64,
    }


def write_config(root: Path, config: dict[str, Any]) -> None:
    folder = root / config["name"]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config))


@pytest.fixture(scope="module")
def remote(demo_repository: Path) -> Iterator[RemoteModel]:
    with mlserver(demo_repository / LOCAL / "model.onnx") as served:
        yield served


@pytest.fixture(scope="module")
def repo(
    demo_repository: Path, remote: RemoteModel, tmp_path_factory: pytest.TempPathFactory
) -> Path:
    root = tmp_path_factory.mktemp("oip-repo")
    shutil.copytree(demo_repository / LOCAL, root / LOCAL)
    # A small remote batch limit, so one batcher batch becomes several concurrent ModelInfers.
    write_config(root, remote_config(remote, max_batch_size=16, max_concurrency=3))
    return root


@pytest.fixture(scope="module")
def server(repo: Path) -> Iterator[BackgroundServer]:
    settings = Settings(
        host="127.0.0.1",
        port=0,
        metrics_port=0,
        metrics_host="127.0.0.1",
        model_repository=repo,
        # Uploads on, so the OIP upload test meets the format refusal, not the uploads switch.
        allow_uploads=True,
    )
    with BackgroundServer(settings) as srv:
        yield srv


@pytest.fixture(scope="module")
def client(server: BackgroundServer) -> Iterator[interscope.Client]:
    with interscope.Client(server.address) as c:
        yield c


def test_remote_model_metadata_comes_from_the_remote(client: interscope.Client) -> None:
    info = client.get_model(REMOTE)
    assert info.state == "ready" and info.format == "oip"
    assert info.input.name == "input" and list(info.input.shape) == [1, 16, 16]
    assert not info.gradients_available and "Open Inference Protocol" in info.gradients_message
    assert info.device.startswith("remote:127.0.0.1:")
    assert info.content_hash.startswith("sha256:") and len(info.content_hash) == 7 + 64
    assert client.health(REMOTE) == "SERVING"


def test_profiles_equal_local_ones(
    client: interscope.Client, demo_test_data: tuple[np.ndarray, np.ndarray]
) -> None:
    x, y = demo_test_data
    spec = {"grid": (3, 3), "estimator": "exact", "baseline": "mean"}
    local = client.profile(model=LOCAL, x=x[:3], label=y[:3], **spec)
    remote = client.profile(model=REMOTE, x=x[:3], label=y[:3], **spec)
    assert local.n_players == remote.n_players == 9
    for a, b in zip(local.profiles, remote.profiles, strict=True):
        np.testing.assert_array_equal(a.orders, b.orders)
        np.testing.assert_allclose(b.mean, a.mean, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(b.mean_abs, a.mean_abs, rtol=1e-4, atol=1e-5)
    # The profile is not trivially zero: equal values mean something.
    assert float(np.abs(local.mean_abs).max()) > 1e-3


def test_square_attacks_equal_local_ones(
    client: interscope.Client, demo_test_data: tuple[np.ndarray, np.ndarray]
) -> None:
    x, y = demo_test_data
    options = {"attack": "square", "eps": 0.3, "query_budget": 150, "seed": 3}
    local = client.attack(model=LOCAL, x=x[:6], y=y[:6], **options)
    remote = client.attack(model=REMOTE, x=x[:6], y=y[:6], **options)
    assert any(e.success for e in local.examples), "the attack should break some digits"
    for a, b in zip(local.examples, remote.examples, strict=True):
        assert (a.success, a.adversarial_prediction, a.queries) == (
            b.success,
            b.adversarial_prediction,
            b.queries,
        )
        assert b.adversarial_margin == pytest.approx(a.adversarial_margin, rel=1e-4, abs=1e-5)
        assert a.adversarial is not None and b.adversarial is not None
        np.testing.assert_allclose(b.adversarial, a.adversarial, atol=1e-6)


def test_white_box_attacks_are_refused_naming_black_box_ones(
    client: interscope.Client, demo_test_data: tuple[np.ndarray, np.ndarray]
) -> None:
    x, y = demo_test_data
    with pytest.raises(interscope.FailedPreconditionError, match="square"):
        client.attack(model=REMOTE, x=x[:2], y=y[:2], attack="pgd", eps=0.1)


def test_remote_calls_and_latency_are_in_the_metrics(
    client: interscope.Client,
    server: BackgroundServer,
    demo_test_data: tuple[np.ndarray, np.ndarray],
) -> None:
    x, y = demo_test_data
    client.profile(model=REMOTE, x=x[:1], label=y[:1], grid=(2, 3), estimator="exact")
    with urllib.request.urlopen(f"http://127.0.0.1:{server.metrics_port}/metrics") as page:
        text = page.read().decode()

    def value(prefix: str) -> float:
        lines = [line for line in text.splitlines() if line.startswith(prefix)]
        assert lines, f"{prefix} missing from /metrics"
        return float(lines[0].rsplit(" ", 1)[1])

    calls = value(f'interscope_remote_infer_calls_total{{model="{REMOTE}",outcome="ok"}}')
    forwards = value(f'interscope_model_forward_passes_total{{model="{REMOTE}"}}')
    assert value(f'interscope_remote_infer_seconds_count{{model="{REMOTE}"}}') == calls
    assert value(f'interscope_remote_infer_seconds_sum{{model="{REMOTE}"}}') > 0
    # 64 exact contexts of 6 players plus the clean input, at most 16 rows per ModelInfer.
    assert forwards >= 65 and calls >= forwards / 16


def test_forward_splits_into_remote_batches_and_matches_onnxruntime(
    remote: RemoteModel, demo_repository: Path, tmp_path: Path
) -> None:
    write_config(tmp_path, remote_config(remote, name="split", max_batch_size=7))
    config = ModelRepository(tmp_path).read_config("split")
    calls: list[str] = []
    backend = OipBackend(config, tmp_path / "split", on_remote_call=lambda m, s, o: calls.append(o))
    local_folder = demo_repository / LOCAL
    local_config = ModelConfig.model_validate_json((local_folder / "config.json").read_bytes())
    local = OnnxBackend(local_config, local_folder / "model.onnx")
    try:
        x = np.random.default_rng(0).uniform(0, 1, size=(30, 1, 16, 16)).astype(np.float32)
        np.testing.assert_allclose(backend.forward(x), local.forward(x), rtol=1e-5, atol=1e-5)
        assert calls == ["ok"] * 5  # ceil(30 / 7) ModelInfer calls
    finally:
        backend.close()
        local.close()


def test_config_mismatches_with_the_remote_fail_at_load(
    remote: RemoteModel, tmp_path: Path
) -> None:
    bad_input = remote_config(remote, name="bad-input")
    bad_input["input"] = {"name": "pixels", "shape": [1, 16, 16]}
    bad_shape = remote_config(remote, name="bad-shape")
    bad_shape["input"] = {"name": "input", "shape": [1, 8, 32]}
    five = remote_config(remote, name="five-classes")
    five["classes"] = ["a", "b", "c", "d", "e"]
    missing = remote_config(remote, name="missing")
    missing["oip"]["model"] = "no-such-model"
    for config in (bad_input, bad_shape, five, missing):
        write_config(tmp_path, config)
    registry = ModelRegistry(ModelRepository(tmp_path))
    try:
        with pytest.raises(InvalidArgument, match=r"no input 'pixels'.*\['input'\]"):
            registry.load("bad-input")
        with pytest.raises(InvalidArgument, match=r"\[1, 8, 32\]"):
            registry.load("bad-shape")
        with pytest.raises(FailedPrecondition, match=r"shape \[1, 10\].*5 classes"):
            registry.load("five-classes")
        with pytest.raises(FailedPrecondition, match="no-such-model"):
            registry.load("missing")
        assert registry.status("five-classes").state is ModelState.FAILED
    finally:
        registry.close()


def test_unreachable_remote_fails_the_load_with_unavailable(tmp_path: Path) -> None:
    dead = RemoteModel(url="127.0.0.1:1", name="digits", version="")
    write_config(tmp_path, remote_config(dead, name="dead", retries=1, timeout_s=2))
    registry = ModelRegistry(ModelRepository(tmp_path))
    try:
        with pytest.raises(Unavailable, match="after 2 tries"):
            registry.load("dead")
    finally:
        registry.close()


def test_health_follows_the_remote_going_away(demo_repository: Path, tmp_path: Path) -> None:
    changes: list[tuple[str, bool]] = []
    not_serving = threading.Event()

    def listen(status: Any) -> None:
        changes.append((status.state.value, status.serving))
        if status.state is ModelState.READY and not status.serving:
            not_serving.set()

    with mlserver(demo_repository / LOCAL / "model.onnx") as served:
        write_config(tmp_path, remote_config(served, name="fleeting", health_interval_s=0.2))
        registry = ModelRegistry(ModelRepository(tmp_path), listener=listen)
        model = registry.load("fleeting")
        x = np.zeros((2, 1, 16, 16), dtype=np.float32)
        assert model.evaluate(x).shape == (2, 10)
    try:
        # The server is gone: the next ModelReady polls fail and the status says so.
        assert not_serving.wait(30), changes
        status = registry.status("fleeting")
        assert status.state is ModelState.READY and not status.serving
        assert "not ready" in status.message or "UNAVAILABLE" in status.message
        with pytest.raises(Unavailable):
            model.evaluate(x)
    finally:
        registry.close()
    assert changes[:2] == [("LOADING", True), ("READY", True)]


def test_oip_config_validation() -> None:
    base = {
        "name": "m",
        "classes": ["a", "b"],
        "input": {"name": "x", "shape": [3]},
    }
    oip = {"url": "triton:8001", "model": "m"}
    ModelConfig.model_validate({**base, "format": "oip", "oip": oip})
    ModelConfig.model_validate({**base, "format": "oip", "oip": oip, "input": {}})
    problems = [
        ({**base, "format": "oip"}, "needs an oip section"),
        ({**base, "format": "oip", "oip": oip, "file": "m.onnx"}, "takes no file"),
        ({**base, "format": "onnx", "file": "m.onnx", "oip": oip}, "only goes with format oip"),
        ({**base, "format": "onnx"}, "needs the model file"),
        ({**base, "format": "oip", "oip": {**oip, "url": "http://t:1"}}, "url"),
        ({**base, "format": "oip", "oip": {**oip, "cert_file": "c.pem"}}, "go together"),
        ({**base, "format": "oip", "oip": oip, "input": {"name": "x"}}, "both input.name"),
    ]
    for config, message in problems:
        with pytest.raises(ValidationError, match=message):
            ModelConfig.model_validate(config)


def test_an_oip_model_cannot_be_uploaded(client: interscope.Client) -> None:
    """A remote model comes only from the operator's repository, never over the wire."""
    config = models_pb2.ModelConfig(
        format=models_pb2.MODEL_FORMAT_OIP,
        input=models_pb2.TensorInfo(name="input", shape=[1, 16, 16]),
        classes=[str(d) for d in range(10)],
        value_range_high=1.0,
    )
    with pytest.raises(interscope.InvalidArgumentError, match="MODEL_FORMAT_ONNX"):
        client.load_model("uploaded-remote", model_bytes=b"\x00" * 16, config=config)
