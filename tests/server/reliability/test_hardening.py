"""Issue 14's attacks against a real server, each with the safe outcome asserted: uploads gated,
hostile model files refused before they run, uploads of one name serialised, costs admitted
up front, NaN refused, idle streams ended, Health/Watch answering."""

from __future__ import annotations

import concurrent.futures
import io
import os
import re
import threading
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import onnx
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc
from onnx import TensorProto, helper

from interscope.codec import to_tensor
from interscope.v1 import analysis_pb2, analysis_pb2_grpc, models_pb2, models_pb2_grpc
from interscope_server.server import BackgroundServer
from tests.server.api.conftest import grid, server_settings, sine_onnx_model
from tests.server.reliability.conftest import Outcomes, copy_models, in_flight_total, wait_until

C = grpc.StatusCode
SINE_CONFIG = models_pb2.ModelConfig(
    format=models_pb2.MODEL_FORMAT_ONNX,
    input=models_pb2.TensorInfo(name="input", shape=[1, 2, 2]),
    classes=["a", "b", "c"],
)
TS_CONFIG = models_pb2.ModelConfig(
    format=models_pb2.MODEL_FORMAT_TORCHSCRIPT,
    input=models_pb2.TensorInfo(name="input", shape=[1, 2, 2]),
    classes=["a", "b", "c"],
)


def upload(
    name: str, data: bytes, config: models_pb2.ModelConfig, replace: bool = False
) -> models_pb2.LoadModelRequest:
    return models_pb2.LoadModelRequest(
        name=name, upload=models_pb2.UploadSource(model=data, config=config), replace=replace
    )


def call(run: Any, *args: Any, **kwargs: Any) -> tuple[grpc.StatusCode, str]:
    try:
        reply = run(*args, **kwargs)
        if hasattr(reply, "__next__"):
            list(reply)
        return C.OK, ""
    except grpc.RpcError as exc:
        return exc.code(), exc.details() or ""


def leftovers(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir() if p.name.startswith("."))


@pytest.fixture()
def repo(tmp_path: Path, demo_repository: Path) -> Path:
    return copy_models(demo_repository, tmp_path / "repo", ["digits-cnn"])


@pytest.fixture()
def open_server(repo: Path) -> Iterator[tuple[BackgroundServer, grpc.Channel]]:
    """Uploads on, no tokens: what an operator who enables uploads runs."""
    settings = server_settings(
        repo, metrics_port=None, allow_uploads=True, model_memory_budget_bytes=64 << 20
    )
    with BackgroundServer(settings) as srv, grpc.insecure_channel(srv.address) as channel:
        yield srv, channel


def _script_bytes(module: torch.nn.Module) -> bytes:
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # TorchScript is what users send
        torch.jit.save(torch.jit.script(module), buffer)
    return buffer.getvalue()


# -- uploads: off by default, admin-only with tokens -------------------------------------------


def test_uploads_are_off_by_default(repo: Path, outcomes: Outcomes) -> None:
    with (
        BackgroundServer(server_settings(repo, metrics_port=None)) as srv,
        grpc.insecure_channel(srv.address) as channel,
    ):
        models = models_pb2_grpc.ModelServiceStub(channel)
        code, details = call(models.LoadModel, upload("m", sine_onnx_model(), SINE_CONFIG))
        outcomes.record("hardening: upload, uploads off", code)
        assert code == C.PERMISSION_DENIED and "INTERSCOPE_ALLOW_UPLOADS" in details
        assert not (repo / "m").exists() and not leftovers(repo)
        # Loading from the repository still works.
        load = models_pb2.LoadModelRequest(
            name="digits-cnn", repository=models_pb2.RepositorySource(), replace=True
        )
        assert call(models.LoadModel, load)[0] == C.OK


def test_uploads_and_unloads_need_an_admin_token(repo: Path, outcomes: Outcomes) -> None:
    settings = server_settings(
        repo, metrics_port=None, allow_uploads=True, auth_tokens=["user"], admin_tokens=["root"]
    )
    with BackgroundServer(settings) as srv, grpc.insecure_channel(srv.address) as channel:
        models = models_pb2_grpc.ModelServiceStub(channel)
        user = [("authorization", "Bearer user")]
        root = [("authorization", "Bearer root")]
        request = upload("m", sine_onnx_model(), SINE_CONFIG)
        code, details = call(models.LoadModel, request, metadata=user)
        outcomes.record("hardening: upload, analysis token", code)
        assert code == C.PERMISSION_DENIED and "admin token" in details
        assert not (repo / "m").exists()
        code, _ = call(
            models.UnloadModel, models_pb2.UnloadModelRequest(name="digits-cnn"), metadata=user
        )
        outcomes.record("hardening: unload, analysis token", code)
        assert code == C.PERMISSION_DENIED
        assert call(models.ListModels, models_pb2.ListModelsRequest(), metadata=user)[0] == C.OK
        assert call(models.LoadModel, request, metadata=root)[0] == C.OK
        assert (repo / "m").is_dir()
        delete = models_pb2.UnloadModelRequest(name="m", delete=True)
        assert call(models.UnloadModel, delete, metadata=root)[0] == C.OK
        assert not (repo / "m").exists() and not leftovers(repo)
        # The operator's own folder is never deleted.
        code, details = call(
            models.UnloadModel,
            models_pb2.UnloadModelRequest(name="digits-cnn", delete=True),
            metadata=root,
        )
        assert code == C.FAILED_PRECONDITION and "not uploaded" in details
        assert (repo / "digits-cnn").is_dir()


# -- hostile model files ------------------------------------------------------------------------


class _ReadsAFile(torch.nn.Module):
    def __init__(self, secret: str) -> None:
        super().__init__()
        self.secret = secret

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        data = torch.from_file(self.secret, shared=False, size=3, dtype=torch.uint8)
        return x.flatten(1)[:, :3] * 0 + data.float()


def test_torchscript_reading_a_file_is_refused_before_it_runs(
    open_server: tuple[BackgroundServer, grpc.Channel],
    repo: Path,
    tmp_path: Path,
    outcomes: Outcomes,
) -> None:
    _, channel = open_server
    secret = tmp_path / "secret.bin"
    secret.write_bytes(b"KEY")
    # atime older than mtime: under relatime (and strictatime) any read moves it forward.
    stat = secret.stat()
    os.utime(secret, ns=(stat.st_mtime_ns - 10**12, stat.st_mtime_ns))
    untouched = secret.stat().st_atime_ns
    models = models_pb2_grpc.ModelServiceStub(channel)
    code, details = call(
        models.LoadModel, upload("evil", _script_bytes(_ReadsAFile(str(secret))), TS_CONFIG)
    )
    outcomes.record("hardening: TorchScript from_file", code)
    assert code == C.INVALID_ARGUMENT and "from_file" in details, details
    assert secret.stat().st_atime_ns == untouched, "the secret file was read"
    assert not (repo / "evil").exists() and not leftovers(repo)
    # The check of the check: reading the file does move its atime on this filesystem.
    secret.read_bytes()
    assert secret.stat().st_atime_ns != untouched


def _constant_bomb() -> bytes:
    """A few hundred bytes that onnxruntime folds into a 1.6 GB constant at load."""
    shape = helper.make_tensor("shape", TensorProto.INT64, [1], [400_000_000])
    graph = helper.make_graph(
        [
            helper.make_node("ConstantOfShape", ["shape"], ["big"]),
            helper.make_node("ReduceSum", ["big"], ["total"], keepdims=1),
            helper.make_node("Flatten", ["input"], ["flat"]),
            helper.make_node("Slice", ["flat", "zero", "three"], ["head"]),
            helper.make_node("Add", ["head", "total"], ["logits"]),
        ],
        "bomb",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 1, 2, 2])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 3])],
        initializer=[
            shape,
            helper.make_tensor("zero", TensorProto.INT64, [1], [0]),
            helper.make_tensor("three", TensorProto.INT64, [1], [3]),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model.SerializeToString()


def _rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def test_onnx_constant_bomb_is_refused_against_the_memory_budget(
    open_server: tuple[BackgroundServer, grpc.Channel], repo: Path, outcomes: Outcomes
) -> None:
    _, channel = open_server
    bomb = _constant_bomb()
    assert len(bomb) < 1024
    onnx.checker.check_model(onnx.load_from_string(bomb))
    models = models_pb2_grpc.ModelServiceStub(channel)
    before = _rss_bytes()
    for index in range(3):
        code, details = call(models.LoadModel, upload(f"bomb-{index}", bomb, SINE_CONFIG))
        outcomes.record("hardening: ONNX constant bomb", code)
        assert code == C.RESOURCE_EXHAUSTED, details
        assert re.search(r"need 16000000\d\d bytes", details) and "memory budget" in details
    # The server shares this process: it stayed flat (the bomb would add 1.6 GB each).
    assert _rss_bytes() - before < 100 << 20
    assert not leftovers(repo) and not any((repo / f"bomb-{i}").exists() for i in range(3))


# -- concurrent uploads of one name ------------------------------------------------------------


def _sine_variant(tag: int) -> bytes:
    model = onnx.load_from_string(sine_onnx_model())
    model.doc_string = f"variant {tag}"
    return model.SerializeToString()


def test_concurrent_uploads_of_one_name(
    open_server: tuple[BackgroundServer, grpc.Channel], repo: Path, outcomes: Outcomes
) -> None:
    _, channel = open_server
    models = models_pb2_grpc.ModelServiceStub(channel)
    variants = [_sine_variant(i) for i in range(6)]
    seen: list[grpc.StatusCode] = []
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        for _ in range(20):
            # Six non-replace uploads race: exactly one lands, the others are told the name is
            # taken, and the folder holds the winner's bytes.
            codes = list(
                pool.map(
                    lambda v: call(models.LoadModel, upload("race", v, SINE_CONFIG), timeout=60),
                    variants,
                )
            )
            seen += [c for c, _ in codes]
            winners = [i for i, (c, _) in enumerate(codes) if c == C.OK]
            assert len(winners) == 1, codes
            assert all(c == C.ALREADY_EXISTS for c, _ in codes if c != C.OK), codes
            assert (repo / "race" / "model.onnx").read_bytes() == variants[winners[0]]
            # Replacing uploads race with readers: every one lands; readers never miss it.
            stop = threading.Event()

            def read(stop: threading.Event) -> list[grpc.StatusCode]:
                got = []
                while not stop.is_set():
                    got.append(call(models.GetModel, models_pb2.GetModelRequest(name="race"))[0])
                return got

            reader = pool.submit(read, stop)
            replaced = list(
                pool.map(
                    lambda v: call(
                        models.LoadModel, upload("race", v, SINE_CONFIG, replace=True), timeout=60
                    )[0],
                    variants[:4],
                )
            )
            stop.set()
            reads = reader.result()
            seen += replaced + reads
            assert replaced == [C.OK] * 4
            assert set(reads) <= {C.OK}, reads
            assert (repo / "race" / "model.onnx").read_bytes() in variants[:4]
            delete = models_pb2.UnloadModelRequest(name="race", delete=True)
            assert call(models.UnloadModel, delete)[0] == C.OK
            assert not (repo / "race").exists() and not leftovers(repo)
    for code in seen:
        outcomes.record("hardening: concurrent uploads", code)
    assert not {C.INTERNAL, C.UNKNOWN, C.NOT_FOUND} & set(seen)


# -- numerics -----------------------------------------------------------------------------------


class _NaNForBrightInputs(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.flatten(1)
        logits = torch.stack([flat.sum(1), flat[:, 0] - flat[:, 1], flat[:, 2] * 2.0], dim=1)
        bright = (flat[:, 0] > 0.9).unsqueeze(1)
        return torch.where(bright, torch.full_like(logits, float("nan")), logits)


class _ShapeFollowsNothing(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten()[:3].unsqueeze(0) * torch.ones(1, 3)


def _inputs() -> np.ndarray:
    x = np.full((3, 1, 2, 2), 0.2, dtype=np.float32)
    x[1, 0, 0, 0] = 1.0  # input 1 makes the model return NaN
    x[:, 0, 1, 1] = [0.1, 0.5, 0.3]
    return x


def test_nan_outputs_fail_the_request_naming_the_input(
    open_server: tuple[BackgroundServer, grpc.Channel], outcomes: Outcomes
) -> None:
    _, channel = open_server
    models = models_pb2_grpc.ModelServiceStub(channel)
    assert (
        call(models.LoadModel, upload("nan", _script_bytes(_NaNForBrightInputs()), TS_CONFIG))[0]
        == C.OK
    )
    analysis = analysis_pb2_grpc.AnalysisServiceStub(channel)
    x = _inputs()
    profile = analysis_pb2.ProfileRequest(
        model="nan",
        inputs=to_tensor(x),
        labels=[0, 0, 0],
        class_choice=analysis_pb2.CLASS_CHOICE_LABEL,
        spec=grid(2, 2, estimator=analysis_pb2.ESTIMATOR_KIND_EXACT),
    )
    code, details = call(analysis.Profile, profile, timeout=30)
    outcomes.record("hardening: NaN model, Profile", code)
    assert code == C.FAILED_PRECONDITION and "'nan'" in details and "input 1" in details
    for kind in (analysis_pb2.ATTACK_KIND_PGD, analysis_pb2.ATTACK_KIND_SQUARE):
        attack = analysis_pb2.AttackRequest(
            model="nan",
            inputs=to_tensor(x),
            labels=[0, 0, 0],
            attack=analysis_pb2.AttackSpec(kind=kind, eps=0.05, steps=3, query_budget=20),
        )
        code, details = call(analysis.Attack, attack, timeout=30)
        outcomes.record("hardening: NaN model, Attack", code)
        assert code == C.FAILED_PRECONDITION and "input 1" in details, details


def test_output_shape_that_ignores_the_batch_is_a_clear_error(
    open_server: tuple[BackgroundServer, grpc.Channel], outcomes: Outcomes
) -> None:
    _, channel = open_server
    models = models_pb2_grpc.ModelServiceStub(channel)
    code, _ = call(
        models.LoadModel, upload("fixed", _script_bytes(_ShapeFollowsNothing()), TS_CONFIG)
    )
    assert code == C.OK  # a batch of 1 (the load probe) looks right
    analysis = analysis_pb2_grpc.AnalysisServiceStub(channel)
    attack = analysis_pb2.AttackRequest(
        model="fixed",
        inputs=to_tensor(_inputs()),
        labels=[0, 0, 0],
        attack=analysis_pb2.AttackSpec(kind=analysis_pb2.ATTACK_KIND_SQUARE, eps=0.05),
    )
    code, details = call(analysis.Attack, attack, timeout=30)
    outcomes.record("hardening: batch-blind output shape", code)
    assert code not in (C.INTERNAL, C.UNKNOWN, C.OK), details
    assert "shape" in details, details
    # Its backward pass fails the load-time gradient check: white-box kinds are refused.
    attack.attack.kind = analysis_pb2.ATTACK_KIND_PGD
    code, details = call(analysis.Attack, attack, timeout=30)
    assert code == C.FAILED_PRECONDITION and "square" in details, details


# -- admission -----------------------------------------------------------------------------------


def test_costs_over_the_limits_are_refused_before_work(
    repo: Path, demo_test_data: Any, outcomes: Outcomes
) -> None:
    settings = server_settings(
        repo,
        metrics_port=None,
        max_attack_forwards_per_request=10_000,
        max_attack_gradients_per_request=1_000,
        max_message_bytes=256 * 1024,
    )
    x, y = demo_test_data
    with BackgroundServer(settings) as srv, grpc.insecure_channel(srv.address) as channel:
        analysis = analysis_pb2_grpc.AnalysisServiceStub(channel)
        square = analysis_pb2.AttackRequest(
            model="digits-cnn",
            inputs=to_tensor(x[:4]),
            labels=[int(v) for v in y[:4]],
            attack=analysis_pb2.AttackSpec(
                kind=analysis_pb2.ATTACK_KIND_SQUARE, eps=0.1, query_budget=100_000
            ),
        )
        code, details = call(analysis.Attack, square, timeout=10)
        outcomes.record("hardening: attack over forward limit", code)
        assert code == C.RESOURCE_EXHAUSTED and "max_attack_forwards_per_request" in details
        assert "400000" in details
        pgd = analysis_pb2.AttackRequest(
            model="digits-cnn",
            inputs=to_tensor(x[:4]),
            labels=[int(v) for v in y[:4]],
            attack=analysis_pb2.AttackSpec(
                kind=analysis_pb2.ATTACK_KIND_PGD, eps=0.1, steps=500, restarts=2
            ),
        )
        code, details = call(analysis.Attack, pgd, timeout=10)
        outcomes.record("hardening: attack over gradient limit", code)
        assert code == C.RESOURCE_EXHAUSTED and "max_attack_gradients_per_request" in details
        # A result that cannot be sent is refused up front, not after the work.
        big = analysis_pb2.ProfileRequest(
            model="digits-cnn",
            inputs=to_tensor(x[:4]),
            labels=[int(v) for v in y[:4]],
            spec=grid(
                16,
                16,
                return_pairs=True,
                sampling=analysis_pb2.SamplingSpec(pair_mode=analysis_pb2.PAIR_MODE_ALL),
            ),
        )
        code, details = call(analysis.Profile, big, timeout=10)
        outcomes.record("hardening: result over max message", code)
        assert code == C.RESOURCE_EXHAUSTED and "max_message_bytes" in details, details
        assert srv.server is not None
        assert (
            srv.server.metrics.registry.get_sample_value(
                "interscope_batch_rows_count", {"model": "digits-cnn"}
            )
            or 0
        ) == 0, "a refused request ran forwards"


# -- liveness and the wire ---------------------------------------------------------------------


def test_idle_audit_streams_are_ended_and_free_their_slots(
    repo: Path, demo_test_data: Any, outcomes: Outcomes
) -> None:
    settings = server_settings(
        repo, metrics_port=None, max_concurrent_calls=4, audit_idle_seconds=0.5
    )
    x, y = demo_test_data
    with BackgroundServer(settings) as srv, grpc.insecure_channel(srv.address) as channel:
        analysis = analysis_pb2_grpc.AnalysisServiceStub(channel)
        never = threading.Event()

        def silent() -> Iterator[analysis_pb2.AuditRequest]:
            never.wait(30)  # sends nothing, never half-closes
            yield from ()

        streams = [analysis.Audit(silent(), timeout=30) for _ in range(4)]
        try:
            for stream in streams:
                with pytest.raises(grpc.RpcError) as caught:
                    list(stream)
                outcomes.record("hardening: idle Audit", caught.value.code())
                assert caught.value.code() == C.DEADLINE_EXCEEDED
                assert "audit_idle_seconds" in (caught.value.details() or "")
            request = analysis_pb2.ProfileRequest(
                model="digits-cnn",
                inputs=to_tensor(x[:1]),
                labels=[int(y[0])],
                spec=grid(2, 2, estimator=analysis_pb2.ESTIMATOR_KIND_EXACT),
            )
            assert call(analysis.Profile, request, timeout=30)[0] == C.OK
        finally:
            never.set()


def test_undecodable_request_bytes_get_invalid_argument_on_every_method(
    open_server: tuple[BackgroundServer, grpc.Channel], outcomes: Outcomes
) -> None:
    _, channel = open_server
    garbage = b"\xff\xff\xff\xff"
    unary = [
        "/interscope.v1.ModelService/ListModels",
        "/interscope.v1.ModelService/GetModel",
        "/interscope.v1.ModelService/LoadModel",
        "/interscope.v1.ModelService/UnloadModel",
        "/grpc.health.v1.Health/Check",
    ]
    server_streaming = [
        "/interscope.v1.AnalysisService/Profile",
        "/interscope.v1.AnalysisService/Attack",
        "/grpc.health.v1.Health/Watch",
    ]
    for method in unary:
        code, details = call(channel.unary_unary(method), garbage, timeout=10)
        outcomes.record(f"wire: undecodable {method.rsplit('/', 1)[-1]}", code)
        assert code == C.INVALID_ARGUMENT and "could not be decoded" in details, (method, code)
    for method in server_streaming:
        code, details = call(channel.unary_stream(method), garbage, timeout=10)
        outcomes.record(f"wire: undecodable {method.rsplit('/', 1)[-1]}", code)
        assert code == C.INVALID_ARGUMENT and "could not be decoded" in details, (method, code)
    audit = channel.stream_stream("/interscope.v1.AnalysisService/Audit")
    code, details = call(audit, iter([garbage]), timeout=10)
    outcomes.record("wire: undecodable Audit", code)
    assert code == C.INVALID_ARGUMENT and "could not be decoded" in details, code


def test_health_watch_streams_the_status(
    open_server: tuple[BackgroundServer, grpc.Channel], outcomes: Outcomes
) -> None:
    _, channel = open_server
    health = health_pb2_grpc.HealthStub(channel)
    for service in ("", "digits-cnn"):
        stream = health.Watch(health_pb2.HealthCheckRequest(service=service), timeout=10)
        first = next(stream)
        stream.cancel()
        outcomes.record("wire: Health/Watch", C.OK)
        assert first.status == health_pb2.HealthCheckResponse.SERVING


def test_control_rpcs_answer_while_attacks_hold_every_worker(
    demo_repository: Path, tmp_path: Path, demo_test_data: Any, outcomes: Outcomes
) -> None:
    repository = copy_models(demo_repository, tmp_path / "repo", ["digits-cnn", "digits-cnn-ts"])
    settings = server_settings(repository, metrics_port=None, worker_threads=2)
    x, y = demo_test_data
    with BackgroundServer(settings) as srv, grpc.insecure_channel(srv.address) as channel:
        analysis = analysis_pb2_grpc.AnalysisServiceStub(channel)
        long_attack = analysis_pb2.AttackRequest(
            model="digits-cnn",
            inputs=to_tensor(x[:8]),
            labels=[int(v) for v in y[:8]],
            attack=analysis_pb2.AttackSpec(
                kind=analysis_pb2.ATTACK_KIND_SQUARE, eps=0.01, query_budget=100_000
            ),
        )
        attacks = [analysis.Attack(long_attack, timeout=60) for _ in range(2)]
        try:
            # Both running: each holds one of the two worker threads for about a minute.
            assert wait_until(lambda: in_flight_total(srv) >= 2, timeout=10)
            models = models_pb2_grpc.ModelServiceStub(channel)
            code, details = call(
                models.UnloadModel, models_pb2.UnloadModelRequest(name="digits-cnn-ts"), timeout=5
            )
            outcomes.record("scheduling: UnloadModel behind attacks", code)
            assert code == C.OK, details
            code, _ = call(models.ListModels, models_pb2.ListModelsRequest(), timeout=5)
            assert code == C.OK
            check = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(), timeout=5
            )
            assert check.status == health_pb2.HealthCheckResponse.SERVING
        finally:
            for stream in attacks:
                stream.cancel()
