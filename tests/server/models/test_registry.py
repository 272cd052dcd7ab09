"""Repository and registry: bad models fail alone with clear errors; names and paths stay inside."""

from __future__ import annotations

import json
import os
import re
import shutil
import threading
import warnings
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import nn

from interscope_server.errors import (
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    Unavailable,
)
from interscope_server.models import (
    BackendOptions,
    ModelObserver,
    ModelRegistry,
    ModelRepository,
    ModelState,
    ModelStatus,
)
from interscope_server.models.config import CONFIG_FILE
from tests.server.models.torch_exports import trace


class _Recorder(ModelObserver):
    def __init__(self) -> None:
        self.loads: list[tuple[str, str]] = []
        self.rows = 0

    def on_load(self, model: str, outcome: str) -> None:
        self.loads.append((model, outcome))

    def on_batch(self, model: str, rows: int, seconds: float) -> None:
        self.rows += rows


def _registry(
    repository: ModelRepository, events: list[ModelStatus] | None = None
) -> tuple[ModelRegistry, _Recorder]:
    recorder = _Recorder()
    registry = ModelRegistry(
        repository,
        backend_options=BackendOptions(device="cpu"),
        observer=recorder,
        listener=events.append if events is not None else None,
    )
    return registry, recorder


def _add_model(root: Path, name: str, source: str, **config_changes: object) -> Path:
    """A copy of `source` under `name`, with config fields overridden."""
    folder = root / name
    folder.mkdir()
    config = json.loads((root / source / CONFIG_FILE).read_text())
    (folder / config["file"]).write_bytes((root / source / config["file"]).read_bytes())
    config.update(name=name, **config_changes)
    (folder / CONFIG_FILE).write_text(json.dumps(config))
    return folder


def _serves(registry: ModelRegistry, name: str, x: np.ndarray) -> None:
    out = registry.get(name).evaluate(x)
    assert out.shape == (len(x), 10) and np.isfinite(out).all()


def test_bad_models_fail_alone_with_clear_messages(
    repo_root: Path, repository: ModelRepository, demo_test_data: tuple[np.ndarray, np.ndarray]
) -> None:
    corrupt = _add_model(repo_root, "corrupt", "digits-cnn")
    (corrupt / "model.onnx").write_bytes(b"this is not protobuf" * 10)
    corrupt_ts = _add_model(repo_root, "corrupt-ts", "digits-cnn-ts")
    (corrupt_ts / "model.pt").write_bytes(b"PK\x03\x04 truncated zip")
    _add_model(repo_root, "wrong-shape", "digits-cnn", input={"name": "input", "shape": [3, 8]})
    _add_model(repo_root, "wrong-classes", "digits-cnn", classes=["a", "b"])
    _add_model(repo_root, "bad-field", "digits-cnn", max_batch_size=0)
    _add_model(repo_root, "missing-file", "digits-cnn", file="nope.onnx")
    events: list[ModelStatus] = []
    registry, recorder = _registry(repository, events)
    try:
        statuses = {s.name: s for s in registry.load_all()}
        assert statuses["digits-cnn"].state is ModelState.READY
        assert statuses["digits-cnn-ts"].state is ModelState.READY
        expected = {
            "corrupt": "not a readable ONNX file",
            "corrupt-ts": "not a loadable TorchScript archive",
            "wrong-shape": r"shape \[3, 8\] does not match",
            "wrong-classes": "config classes has 2 labels but the model outputs 10 scores",
            "bad-field": "max_batch_size: Input should be greater than or equal to 1",
            "missing-file": "model file 'nope.onnx' does not exist",
        }
        for name, pattern in expected.items():
            assert statuses[name].state is ModelState.FAILED, name
            assert re.search(pattern, statuses[name].message), (name, statuses[name].message)
            with pytest.raises(FailedPrecondition, match="failed to load"):
                registry.get(name)
        x, _ = demo_test_data
        _serves(registry, "digits-cnn", x[:5])
        _serves(registry, "digits-cnn-ts", x[:5])
        assert ("corrupt", "failure") in recorder.loads
        assert ("digits-cnn", "success") in recorder.loads
        assert recorder.rows >= 10
        states = [(e.name, e.state) for e in events if e.name == "digits-cnn"]
        assert states == [("digits-cnn", ModelState.LOADING), ("digits-cnn", ModelState.READY)]
    finally:
        registry.close()


def test_path_escapes_are_refused(
    repo_root: Path, repository: ModelRepository, tmp_path: Path
) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "model.onnx").write_bytes((repo_root / "digits-cnn" / "model.onnx").read_bytes())
    # A config whose file is a symlink to a file outside the repository.
    folder = _add_model(repo_root, "symlinked", "digits-cnn", file="link.onnx")
    os.symlink(outside / "model.onnx", folder / "link.onnx")
    # An ONNX model whose weights point at external data outside its folder.
    ext = _add_model(repo_root, "external", "digits-cnn")
    model = onnx.load(str(ext / "model.onnx"))
    tensor = model.graph.initializer[0]
    tensor.ClearField("raw_data")
    tensor.data_location = onnx.TensorProto.EXTERNAL
    entry = tensor.external_data.add()
    entry.key, entry.value = "location", "../../outside/weights.bin"
    onnx.save(model, str(ext / "model.onnx"))
    registry, _ = _registry(repository)
    try:
        with pytest.raises(InvalidArgument, match="resolves outside the model folder"):
            registry.load("symlinked")
        with pytest.raises(InvalidArgument, match=r"external data location .* outside"):
            registry.load("external")
        for bad in ("../digits-cnn", "a/b", "", ".hidden", "x" * 200):
            with pytest.raises(InvalidArgument, match="invalid model name"):
                registry.load(bad)
        with pytest.raises(NotFound, match="not in the repository"):
            registry.load("no-such-model")
        assert [s.name for s in registry.statuses()] == sorted(
            ["digits-cnn", "digits-cnn-ts", "symlinked", "external"]
        )
        registry.load("digits-cnn")
        assert registry.get("digits-cnn").config.name == "digits-cnn"
    finally:
        registry.close()


def test_upload_limits_atomicity_and_replace(
    repo_root: Path, repository: ModelRepository, demo_test_data: tuple[np.ndarray, np.ndarray]
) -> None:
    registry, _ = _registry(repository)
    source = repository.read_config("digits-cnn")
    model_bytes = (repo_root / "digits-cnn" / "model.onnx").read_bytes()
    config = source.model_copy(update={"name": "uploaded"})
    try:
        registry.load("digits-cnn")
        with pytest.raises(ResourceExhausted, match="exceeds the limit of 1000000 bytes"):
            registry.upload("uploaded", b"\0" * 1_000_001, config)
        assert not (repo_root / "uploaded").exists()
        assert not [p for p in repo_root.iterdir() if p.name.startswith(".")]  # no leftovers
        with pytest.raises(InvalidArgument, match="carries a config named 'uploaded'"):
            registry.upload("other", model_bytes, config)
        model = registry.upload("uploaded", model_bytes, config)
        x, _ = demo_test_data
        np.testing.assert_allclose(
            model.evaluate(x[:4]), registry.get("digits-cnn").evaluate(x[:4]), rtol=1e-6
        )
        with pytest.raises(AlreadyExists, match="already exists"):
            registry.upload("uploaded", model_bytes, config)
        # A corrupt replacement fails its load; the registry keeps serving the previous version.
        registry.upload("uploaded", b"garbage", config, replace=True)
    except InvalidArgument as exc:
        assert "not a readable ONNX file" in str(exc)
        assert registry.status("uploaded").state is ModelState.READY
        assert "reload failed" in registry.status("uploaded").message
        _serves(registry, "uploaded", demo_test_data[0][:3])
        # ... and the repository holds the previous version again, so a restart serves it too.
        assert (repo_root / "uploaded" / config.file).read_bytes() == model_bytes
        assert not [p for p in repo_root.iterdir() if p.name.startswith(".")]
    else:
        pytest.fail("the corrupt replacement should have failed to load")
    finally:
        registry.close()


def test_unload_and_lookup_errors(repository: ModelRepository) -> None:
    registry, _ = _registry(repository)
    try:
        registry.load("digits-cnn")
        model = registry.get("digits-cnn")
        registry.unload("digits-cnn")
        assert registry.status("digits-cnn").state is ModelState.UNLOADED
        with pytest.raises(NotFound, match="is not loaded"):
            registry.get("digits-cnn")
        with pytest.raises(NotFound, match="is not loaded"):
            registry.unload("digits-cnn")
        with pytest.raises(Unavailable):
            model.evaluate(np.zeros((1, 1, 16, 16), np.float32))
        with pytest.raises(NotFound, match="neither loaded nor in the repository"):
            registry.status("ghost")
    finally:
        registry.close()


def test_concurrent_loads_of_one_model_do_not_both_run(repository: ModelRepository) -> None:
    registry, _ = _registry(repository)
    barrier = threading.Barrier(4)
    errors: list[BaseException] = []

    def load() -> None:
        barrier.wait()
        try:
            registry.load("digits-cnn-ts")
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=load) for _ in range(4)]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        # Whichever lost the race was told to retry; the model ends up READY either way.
        assert all("already loading" in str(e) for e in errors)
        assert registry.status("digits-cnn-ts").state is ModelState.READY
    finally:
        registry.close()


class _Noisy(nn.Module):
    """A network fed its input plus fresh Gaussian noise: a randomised defence."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x + 0.5 * torch.randn_like(x))


def _noisy_onnx(path: Path) -> None:
    """A linear digits model behind RandomNormalLike: random ops in an ONNX graph."""
    weights = np.random.default_rng(0).standard_normal((256, 10)).astype(np.float32)
    nodes = [
        helper.make_node("RandomNormalLike", ["input"], ["noise"], scale=0.5),
        helper.make_node("Add", ["input", "noise"], ["noisy"]),
        helper.make_node("Flatten", ["noisy"], ["flat"]),
        helper.make_node("MatMul", ["flat", "w"], ["logits"]),
    ]
    graph = helper.make_graph(
        nodes,
        "noisy",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 1, 16, 16])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 10])],
        initializer=[numpy_helper.from_array(weights, "w")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))


def test_random_outputs_are_found_at_load_for_every_format(
    repo_root: Path, repository: ModelRepository, demo_repository: Path
) -> None:
    for name in ("digits-cnn-adv", "digits-cnn-adv-ts"):
        shutil.copytree(demo_repository / name, repo_root / name)
    noisy_ts = _add_model(repo_root, "noisy-ts", "digits-cnn-ts")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # the served format is TorchScript
        net = torch.jit.load(str(noisy_ts / "model.pt")).eval()
    trace(_Noisy(net).eval(), (1, 16, 16), noisy_ts / "model.pt")
    _noisy_onnx(_add_model(repo_root, "noisy-onnx", "digits-cnn") / "model.onnx")
    registry, _ = _registry(repository)
    try:
        statuses = {s.name: s.state for s in registry.load_all()}
        assert set(statuses.values()) == {ModelState.READY}, statuses
        stochastic = {name: registry.get(name).backend.stochastic for name in statuses}
        assert stochastic == {
            "digits-cnn": False,
            "digits-cnn-ts": False,
            "digits-cnn-adv": False,
            "digits-cnn-adv-ts": False,
            "noisy-ts": True,
            "noisy-onnx": True,
        }
        # The seeded gradient check lets the randomised TorchScript model keep its gradients.
        assert registry.get("noisy-ts").backend.gradients_available
    finally:
        registry.close()
