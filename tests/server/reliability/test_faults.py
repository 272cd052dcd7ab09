"""Faults: a backend that raises, a model unloaded mid-request, a client that vanishes, SIGTERM
while streams run, and requests sized to exhaust memory. Each fails alone, with a clear status."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from interscope.codec import to_tensor
from interscope.v1 import analysis_pb2, analysis_pb2_grpc, models_pb2, models_pb2_grpc, tensor_pb2
from interscope_server.server import BackgroundServer
from tests.server.api.conftest import grid, server_settings
from tests.server.reliability.conftest import (
    Outcomes,
    copy_models,
    gauge,
    in_flight_total,
    profile_numbers,
    reference_request,
    wait_until,
)

C = grpc.StatusCode
ROOT = Path(__file__).resolve().parents[3]


def exact_profile(
    x: np.ndarray, y: np.ndarray, rows: int, cols: int, model: str = "digits-cnn"
) -> analysis_pb2.ProfileRequest:
    """An exact profile of rows*cols players: 2^(rows*cols) forwards (2^18 take seconds)."""
    return analysis_pb2.ProfileRequest(
        model=model,
        inputs=to_tensor(x[:1]),
        labels=[int(y[0])],
        spec=grid(rows, cols, estimator=analysis_pb2.ESTIMATOR_KIND_EXACT),
    )


def outcome(run: Any) -> tuple[grpc.StatusCode, str, list[Any]]:
    try:
        return C.OK, "", list(run())
    except grpc.RpcError as exc:
        return exc.code(), exc.details() or "", []


@pytest.fixture(scope="module")
def faulty_server(demo_repository: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    repository = copy_models(
        demo_repository, tmp_path_factory.mktemp("faults-repo"), ["digits-cnn", "digits-cnn-ts"]
    )
    with BackgroundServer(server_settings(repository, metrics_port=None)) as srv:
        yield srv


@pytest.fixture(scope="module")
def channel(faulty_server: BackgroundServer) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(faulty_server.address) as ch:
        yield ch


@pytest.fixture(scope="module")
def reference(channel: grpc.Channel, demo_test_data: Any) -> np.ndarray:
    x, y = demo_test_data
    stub = analysis_pb2_grpc.AnalysisServiceStub(channel)
    return profile_numbers(list(stub.Profile(reference_request(x, y, "digits-cnn")))[-1].result)


def assert_correct(channel: grpc.Channel, reference: np.ndarray, data: Any) -> None:
    x, y = data
    stub = analysis_pb2_grpc.AnalysisServiceStub(channel)
    events = list(stub.Profile(reference_request(x, y, "digits-cnn"), timeout=30))
    np.testing.assert_allclose(profile_numbers(events[-1].result), reference, rtol=0, atol=1e-9)


class OneShotFault:
    """Wraps a backend's forward: the `nth` call raises, every other call runs normally."""

    def __init__(self, forward: Any, nth: int) -> None:
        self._forward = forward
        self._nth = nth
        self._calls = 0
        self._lock = threading.Lock()
        self.fired = threading.Event()

    def __call__(self, x: np.ndarray) -> np.ndarray:
        with self._lock:
            self._calls += 1
            fire = self._calls == self._nth
        if fire:
            self.fired.set()
            raise RuntimeError("CUDA error: an illegal memory access was encountered (injected)")
        return self._forward(x)


def test_backend_that_raises_fails_that_request_only(
    faulty_server: BackgroundServer,
    channel: grpc.Channel,
    reference: np.ndarray,
    demo_test_data: Any,
    outcomes: Outcomes,
) -> None:
    x, y = demo_test_data
    assert faulty_server.server is not None
    backend = faulty_server.server.registry.get("digits-cnn").backend
    fault = OneShotFault(backend._forward, nth=3)
    stub = analysis_pb2_grpc.AnalysisServiceStub(channel)
    other: dict[str, Any] = {}

    def other_model() -> None:  # runs while the faulty request does, on another model
        other["result"] = outcome(lambda: stub.Profile(exact_profile(x, y, 2, 5, "digits-cnn-ts")))

    backend._forward = fault  # type: ignore[method-assign,unused-ignore]
    try:
        worker = threading.Thread(target=other_model)
        worker.start()
        code, details, _ = outcome(lambda: stub.Profile(exact_profile(x, y, 3, 4), timeout=60))
        worker.join(60)
    finally:
        del backend._forward  # back to the class's method
    outcomes.record("fault: backend raises", code)
    assert fault.fired.is_set()
    assert code == C.UNAVAILABLE, details
    assert "digits-cnn" in details and "illegal memory access" in details
    other_code, other_details, events = other["result"]
    outcomes.record("fault: other model", other_code)
    assert other_code == C.OK, other_details
    assert events[-1].result.profiles[0].n_players == 10
    # The model keeps serving, and correctly.
    health = health_pb2_grpc.HealthStub(channel).Check(
        health_pb2.HealthCheckRequest(service="digits-cnn"), timeout=5
    )
    assert health.status == health_pb2.HealthCheckResponse.SERVING
    assert_correct(channel, reference, demo_test_data)


def test_model_unloaded_during_a_request(
    faulty_server: BackgroundServer,
    channel: grpc.Channel,
    reference: np.ndarray,
    demo_test_data: Any,
    outcomes: Outcomes,
) -> None:
    x, y = demo_test_data
    analysis = analysis_pb2_grpc.AnalysisServiceStub(channel)
    models = models_pb2_grpc.ModelServiceStub(channel)
    call = analysis.Profile(exact_profile(x, y, 3, 6, "digits-cnn-ts"), timeout=120)
    events = iter(call)
    for event in events:
        if event.WhichOneof("event") == "progress" and event.progress.done > 0:
            break
    models.UnloadModel(models_pb2.UnloadModelRequest(name="digits-cnn-ts"), timeout=60)
    code, details, _ = outcome(lambda: events)
    outcomes.record("fault: unloaded mid-request", code)
    assert code == C.UNAVAILABLE, details
    assert "unload" in details
    later = exact_profile(x, y, 2, 3, "digits-cnn-ts")
    code, details, _ = outcome(lambda: analysis.Profile(later, timeout=10))
    outcomes.record("fault: after unload", code)
    assert code == C.NOT_FOUND, details
    info = models.GetModel(models_pb2.GetModelRequest(name="digits-cnn-ts"), timeout=5)
    assert info.state == models_pb2.MODEL_STATE_UNLOADED
    # Loading it again brings it back; the other model never noticed.
    models.LoadModel(
        models_pb2.LoadModelRequest(name="digits-cnn-ts", repository=models_pb2.RepositorySource()),
        timeout=60,
    )
    assert outcome(lambda: analysis.Profile(later, timeout=10))[0] == C.OK
    assert_correct(channel, reference, demo_test_data)


CLIENT_SCRIPT = """
import sys, time
import grpc, numpy
from interscope.codec import to_tensor
from interscope.v1 import analysis_pb2, analysis_pb2_grpc
x = numpy.load(sys.argv[2])
players = analysis_pb2.PlayerSpec(grid=analysis_pb2.GridPlayers(rows=3, cols=6))
request = analysis_pb2.ProfileRequest(
    model="digits-cnn", inputs=to_tensor(x), class_choice=analysis_pb2.CLASS_CHOICE_PREDICTED,
    spec=analysis_pb2.InteractionSpec(players=players, estimator=analysis_pb2.ESTIMATOR_KIND_EXACT),
)
channel = grpc.insecure_channel(sys.argv[1])
for event in analysis_pb2_grpc.AnalysisServiceStub(channel).Profile(request):
    if event.WhichOneof("event") == "progress" and event.progress.done > 0:
        print("streaming", flush=True)
        time.sleep(600)  # killed here, mid-stream
"""


def test_client_that_disconnects_mid_stream_leaves_the_server_healthy(
    faulty_server: BackgroundServer,
    channel: grpc.Channel,
    reference: np.ndarray,
    demo_test_data: Any,
    tmp_path: Path,
    outcomes: Outcomes,
) -> None:
    x, y = demo_test_data
    np.save(tmp_path / "x.npy", x[:1])
    client = subprocess.Popen(
        [sys.executable, "-c", CLIENT_SCRIPT, faulty_server.address, str(tmp_path / "x.npy")],
        stdout=subprocess.PIPE,
        text=True,
        cwd=ROOT,
    )
    try:
        assert client.stdout is not None
        assert client.stdout.readline().strip() == "streaming"
        assert in_flight_total(faulty_server) >= 1
    finally:
        client.kill()  # no goodbye: the TCP connection just drops
        client.wait(10)
        if client.stdout is not None:
            client.stdout.close()
    assert wait_until(lambda: in_flight_total(faulty_server) == 0, timeout=10)
    # Its computation stopped too: the forward counter settles.
    labels = {"model": "digits-cnn"}
    name = "interscope_model_forward_passes_total"
    settled = gauge(faulty_server, name, labels)
    assert wait_until(lambda: gauge(faulty_server, name, labels) == settled, timeout=1)

    # A bidirectional Audit whose client goes away between samples.
    stop = threading.Event()

    def requests() -> Iterator[analysis_pb2.AuditRequest]:
        yield analysis_pb2.AuditRequest(
            config=analysis_pb2.AuditConfig(
                model="digits-cnn",
                attack=analysis_pb2.AttackSpec(kind=analysis_pb2.ATTACK_KIND_FGSM, eps=0.1),
                profile=grid(2, 2),
            )
        )
        yield analysis_pb2.AuditRequest(
            sample=analysis_pb2.AuditSample(id="a", input=to_tensor(x[0]), label=int(y[0]))
        )
        stop.wait(30)  # the client never half-closes

    audit_channel = grpc.insecure_channel(faulty_server.address)
    call = analysis_pb2_grpc.AnalysisServiceStub(audit_channel).Audit(requests())
    kinds = [next(call).WhichOneof("event"), next(call).WhichOneof("event")]
    assert kinds == ["accepted", "sample"]
    audit_channel.close()
    stop.set()
    assert wait_until(lambda: in_flight_total(faulty_server) == 0, timeout=10)
    outcomes.record("fault: client vanished", "server healthy")
    assert_correct(channel, reference, demo_test_data)


SERVE_SCRIPT = """
import sys
from interscope_server.config import Settings
from interscope_server.server import serve
serve(Settings(host="127.0.0.1", port=0, metrics_port=None, model_repository=sys.argv[1],
               load_models=["digits-cnn"], grace_seconds=float(sys.argv[2]), worker_threads=4))
"""


class ServerProcess:
    """`serve()` in a child process, as the container runs it; the address from its banner."""

    def __init__(self, repository: Path, grace: float) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-c", SERVE_SCRIPT, str(repository), str(grace)],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
            cwd=ROOT,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        assert self.process.stdout is not None
        for line in self.process.stdout:
            if line.startswith("interscope listening on "):
                self.address = line.split()[-1]
                break
        else:
            raise AssertionError(f"the server exited early with {self.process.wait()}")

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)
        if self.process.stdout is not None:
            self.process.stdout.close()


@pytest.mark.parametrize(
    ("grace", "rows", "expected"),
    # Long enough (2^18 forwards, seconds) that progress (after 0.2 s) comes before the profile.
    [(30.0, (3, 6), {C.OK}), (0.5, (4, 5), {C.UNAVAILABLE, C.CANCELLED})],
    ids=["stream-finishes-within-grace", "grace-runs-out"],
)
def test_sigterm_drains_in_flight_streams_and_exits_zero(
    demo_repository: Path,
    tmp_path: Path,
    demo_test_data: Any,
    outcomes: Outcomes,
    grace: float,
    rows: tuple[int, int],
    expected: set[grpc.StatusCode],
) -> None:
    x, y = demo_test_data
    repository = copy_models(demo_repository, tmp_path / "repo", ["digits-cnn"])
    server = ServerProcess(repository, grace)
    try:
        with grpc.insecure_channel(server.address) as ch:
            call = analysis_pb2_grpc.AnalysisServiceStub(ch).Profile(
                exact_profile(x, y, *rows), timeout=120
            )
            events = iter(call)
            first = next(events)
            assert first.WhichOneof("event") == "progress"
            server.process.send_signal(signal.SIGTERM)
            code, details, rest = outcome(lambda: events)
        outcomes.record(f"SIGTERM, grace {grace:g} s", code)
        assert code in expected, details
        if code == C.OK:
            assert rest[-1].WhichOneof("event") == "result"
            # A stream that ends OK ends complete: one profile per input, never a cut-off one.
            assert len(rest[-1].result.profiles) == 1, rest[-1].result
        # The process exits cleanly within the grace period (plus start-up of the shutdown).
        assert server.process.wait(timeout=grace + 15) == 0
    finally:
        server.close()


def test_requests_near_the_memory_limits_are_refused_up_front(
    demo_repository: Path, tmp_path: Path, demo_test_data: Any, outcomes: Outcomes
) -> None:
    x, y = demo_test_data
    repository = copy_models(demo_repository, tmp_path / "repo", ["digits-cnn"])
    settings = server_settings(
        repository,
        metrics_port=None,
        max_tensor_bytes=1 << 20,
        max_message_bytes=4 << 20,
        max_queue_rows=4096,
        max_forwards_per_request=1_000_000,
    )
    good = x[:1]
    many = np.repeat(good, 2000, axis=0)  # 2 MiB of real FP32 inputs
    cases: dict[str, tuple[analysis_pb2.ProfileRequest, str]] = {
        "tensor over max_tensor_bytes": (
            analysis_pb2.ProfileRequest(
                model="digits-cnn",
                inputs=to_tensor(many),
                class_choice=analysis_pb2.CLASS_CHOICE_PREDICTED,
                spec=grid(2, 2),
            ),
            "too large",
        ),
        "declared shape of 2^40 elements, few bytes": (
            analysis_pb2.ProfileRequest(
                model="digits-cnn",
                inputs=tensor_pb2.Tensor(
                    datatype="FP32", shape=[2**32, 1, 16, 16], raw_data=good.tobytes()
                ),
                spec=grid(2, 2),
            ),
            "too large",
        ),
        "player mask of 2^30 elements": (
            analysis_pb2.ProfileRequest(
                model="digits-cnn",
                inputs=to_tensor(good),
                labels=[int(y[0])],
                spec=analysis_pb2.InteractionSpec(
                    players=analysis_pb2.PlayerSpec(
                        mask=tensor_pb2.Tensor(datatype="INT32", shape=[2**15, 2**15])
                    )
                ),
            ),
            "too large",
        ),
        "exact profile of 2^26 coalitions": (
            analysis_pb2.ProfileRequest(
                model="digits-cnn",
                inputs=to_tensor(good),
                labels=[int(y[0])],
                spec=grid(2, 13, estimator=analysis_pb2.ESTIMATOR_KIND_EXACT),
            ),
            "exact",
        ),
        "sampled profile over max_forwards_per_request": (
            analysis_pb2.ProfileRequest(
                model="digits-cnn",
                inputs=to_tensor(good),
                labels=[int(y[0])],
                spec=grid(
                    16,
                    16,
                    estimator=analysis_pb2.ESTIMATOR_KIND_SAMPLED,
                    sampling=analysis_pb2.SamplingSpec(
                        pair_mode=analysis_pb2.PAIR_MODE_ALL, contexts_per_order=1000
                    ),
                ),
            ),
            "limit",
        ),
    }
    with BackgroundServer(settings) as srv, grpc.insecure_channel(srv.address) as ch:
        stub = analysis_pb2_grpc.AnalysisServiceStub(ch)
        for what, (request, phrase) in cases.items():
            code, details, _ = outcome(lambda r=request: stub.Profile(r, timeout=10))
            outcomes.record("limit: " + what[:16], code)
            assert code == C.RESOURCE_EXHAUSTED, f"{what}: {code.name} {details}"
            assert phrase in details.lower(), f"{what}: {details}"
        # Bigger than the largest gRPC message: gRPC itself refuses it, before any decoding.
        huge = np.repeat(good, 5000, axis=0)
        code, details, _ = outcome(
            lambda: stub.Profile(
                analysis_pb2.ProfileRequest(
                    model="digits-cnn", inputs=to_tensor(huge), spec=grid(2, 2)
                ),
                timeout=10,
            )
        )
        outcomes.record("limit: over max message", code)
        assert code == C.RESOURCE_EXHAUSTED, details
        # Alive and correct afterwards.
        events = list(stub.Profile(reference_request(x, y, "digits-cnn"), timeout=30))
        assert events[-1].result.profiles[1].n_players == 6
