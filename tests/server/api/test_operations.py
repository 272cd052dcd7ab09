"""Production behaviour over real channels: cancellation, deadlines, limits, auth, TLS, metrics."""

from __future__ import annotations

import datetime
import ipaddress
import subprocess
import sys
import textwrap
import threading
import time
import urllib.request
from pathlib import Path

import grpc
import numpy as np
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

from interscope.codec import to_tensor
from interscope.v1 import analysis_pb2, analysis_pb2_grpc, models_pb2, models_pb2_grpc
from interscope_server.server import BackgroundServer
from tests.server.api.conftest import grid, server_settings

ROOT = Path(__file__).resolve().parents[3]


def long_profile(x: np.ndarray, y: np.ndarray) -> analysis_pb2.ProfileRequest:
    """An exact 20-player profile: 2^20 forwards, tens of seconds on a CPU."""
    return analysis_pb2.ProfileRequest(
        model="digits-cnn",
        inputs=to_tensor(x[:1]),
        labels=[int(y[0])],
        spec=grid(4, 5, estimator=analysis_pb2.ESTIMATOR_KIND_EXACT),
    )


def forwards(srv: BackgroundServer) -> float:
    assert srv.server is not None
    value = srv.server.metrics.registry.get_sample_value(
        "interscope_model_forward_passes_total", {"model": "digits-cnn"}
    )
    return value or 0.0


def in_flight(srv: BackgroundServer, method: str) -> float:
    assert srv.server is not None
    value = srv.server.metrics.registry.get_sample_value(
        "interscope_rpc_in_flight", {"method": method}
    )
    return value or 0.0


def wait_until(condition, timeout: float) -> bool:
    """Poll `condition` until it holds or `timeout` seconds pass; True if it held."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.02)
    return bool(condition())


def test_cancelled_stream_stops_its_computation_within_a_second(
    server: BackgroundServer, analysis, demo_test_data
) -> None:
    x, y = demo_test_data
    call = analysis.Profile(long_profile(x, y))
    for event in call:
        if event.WhichOneof("event") == "progress" and event.progress.done > 0:
            break
    started = forwards(server)
    call.cancel()
    cancelled_at = time.monotonic()
    assert wait_until(lambda: in_flight(server, "AnalysisService/Profile") == 0, timeout=1.0)
    # A batch already inside the backend may still finish; a second after the cancel, all is quiet.
    time.sleep(max(0.0, 1.0 - (time.monotonic() - cancelled_at)))
    settled = forwards(server)
    time.sleep(0.5)  # a window in which a computation still running would show
    assert forwards(server) == settled
    assert settled - started < 2**20 / 2, "the computation ran on after the cancel"


def test_deadline_stops_the_call_with_deadline_exceeded(
    server: BackgroundServer, analysis, demo_test_data
) -> None:
    x, y = demo_test_data
    with pytest.raises(grpc.RpcError) as info:
        list(analysis.Profile(long_profile(x, y), timeout=0.5))
    assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert wait_until(lambda: in_flight(server, "AnalysisService/Profile") == 0, timeout=2.0)


def test_concurrent_call_limit_gives_resource_exhausted(demo_repository, demo_test_data) -> None:
    x, y = demo_test_data
    settings = server_settings(demo_repository, metrics_port=None, max_concurrent_calls=1)
    with BackgroundServer(settings) as srv, grpc.insecure_channel(srv.address) as channel:
        stub = analysis_pb2_grpc.AnalysisServiceStub(channel)
        first = stub.Profile(long_profile(x, y))
        next(iter(first))  # the first call is admitted and running
        with pytest.raises(grpc.RpcError) as info:
            list(stub.Profile(long_profile(x, y)))
        first.cancel()
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "1" in info.value.details()


def test_graceful_shutdown_lets_in_flight_calls_finish(demo_repository, demo_test_data) -> None:
    x, y = demo_test_data
    request = analysis_pb2.ProfileRequest(
        model="digits-cnn",
        inputs=to_tensor(x[:1]),
        labels=[int(y[0])],
        spec=grid(3, 4, estimator=analysis_pb2.ESTIMATOR_KIND_EXACT),
    )
    srv = BackgroundServer(server_settings(demo_repository, metrics_port=None)).start()
    channel = grpc.insecure_channel(srv.address)
    call = analysis_pb2_grpc.AnalysisServiceStub(channel).Profile(request)
    next(iter(call))
    stopper = threading.Thread(target=srv.stop, kwargs={"grace": 30.0})
    stopper.start()
    events = list(call)  # drains: the call in flight completes
    stopper.join(timeout=60)
    channel.close()
    assert events[-1].WhichOneof("event") == "result"
    with grpc.insecure_channel(srv.address) as again, pytest.raises(grpc.RpcError) as info:
        models_pb2_grpc.ModelServiceStub(again).ListModels(
            models_pb2.ListModelsRequest(), timeout=2
        )
    assert info.value.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)


def test_shutdown_ends_calls_still_running_after_the_grace_with_unavailable(
    demo_repository, demo_test_data
) -> None:
    x, y = demo_test_data
    srv = BackgroundServer(server_settings(demo_repository, metrics_port=None)).start()
    channel = grpc.insecure_channel(srv.address)
    call = analysis_pb2_grpc.AnalysisServiceStub(channel).Profile(long_profile(x, y))
    next(iter(call))
    started = time.monotonic()
    srv.stop(grace=0.5)
    with pytest.raises(grpc.RpcError) as info:
        list(call)
    channel.close()
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE, info.value.details()
    assert "retry on another replica" in info.value.details()
    assert time.monotonic() - started < 5.0


def test_bearer_tokens_guard_every_rpc_but_health(demo_repository) -> None:
    settings = server_settings(demo_repository, metrics_port=None, auth_tokens=["s3cret", "other"])
    with BackgroundServer(settings) as srv, grpc.insecure_channel(srv.address) as channel:
        models = models_pb2_grpc.ModelServiceStub(channel)
        analysis = analysis_pb2_grpc.AnalysisServiceStub(channel)
        for metadata in (None, [("authorization", "Bearer wrong")], [("authorization", "s3cret")]):
            with pytest.raises(grpc.RpcError) as info:
                models.ListModels(models_pb2.ListModelsRequest(), metadata=metadata)
            assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
            assert "Bearer" in info.value.details()
        with pytest.raises(grpc.RpcError) as info:
            list(analysis.Profile(analysis_pb2.ProfileRequest(model="digits-cnn")))
        assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
        good = [("authorization", "Bearer other")]
        assert len(models.ListModels(models_pb2.ListModelsRequest(), metadata=good).models) == 4
        health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest())
        assert health.status == health_pb2.HealthCheckResponse.SERVING


def _certificate(
    subject: str, key: ec.EllipticCurvePrivateKey, issuer: tuple[x509.Certificate, object] | None
) -> x509.Certificate:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
    now = datetime.datetime.now(datetime.timezone.utc)
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(issuer[0].subject if issuer else name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
    )
    if issuer is None:
        builder = builder.add_extension(x509.BasicConstraints(ca=True, path_length=None), True)
    else:
        builder = builder.add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
    signer = issuer[1] if issuer else key
    return builder.sign(signer, hashes.SHA256())  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A throwaway CA, a server certificate for localhost and a client certificate."""
    folder = tmp_path_factory.mktemp("pki")
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = _certificate("interscope-test-ca", ca_key, None)
    files: dict[str, Path] = {}
    for role in ("server", "client"):
        key = ec.generate_private_key(ec.SECP256R1())
        cert = _certificate(f"interscope-{role}", key, (ca, ca_key))
        files[f"{role}_key"] = folder / f"{role}.key"
        files[f"{role}_cert"] = folder / f"{role}.crt"
        files[f"{role}_key"].write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
        files[f"{role}_cert"].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    files["ca"] = folder / "ca.crt"
    files["ca"].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    return files


def _list_models(target: str, credentials: grpc.ChannelCredentials | None) -> int:
    if credentials is None:
        channel = grpc.insecure_channel(target)
    else:
        channel = grpc.secure_channel(target, credentials)
    with channel:
        stub = models_pb2_grpc.ModelServiceStub(channel)
        return len(stub.ListModels(models_pb2.ListModelsRequest(), timeout=5).models)


def test_tls_and_mutual_tls(demo_repository, pki) -> None:
    tls = server_settings(
        demo_repository, metrics_port=None, tls_cert=pki["server_cert"], tls_key=pki["server_key"]
    )
    ca = pki["ca"].read_bytes()
    with BackgroundServer(tls) as srv:
        target = f"localhost:{srv.port}"
        assert _list_models(target, grpc.ssl_channel_credentials(root_certificates=ca)) == 4
        with pytest.raises(grpc.RpcError) as info:
            _list_models(target, None)  # plaintext against a TLS port
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    mutual = tls.model_copy(update={"tls_client_ca": pki["ca"]})
    with BackgroundServer(mutual) as srv:
        target = f"localhost:{srv.port}"
        with pytest.raises(grpc.RpcError) as info:
            _list_models(target, grpc.ssl_channel_credentials(root_certificates=ca))
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE
        with_cert = grpc.ssl_channel_credentials(
            root_certificates=ca,
            private_key=pki["client_key"].read_bytes(),
            certificate_chain=pki["client_cert"].read_bytes(),
        )
        assert _list_models(target, with_cert) == 4


def test_a_client_built_from_the_proto_files_alone_reads_profile_events(
    server: BackgroundServer, tmp_path: Path, demo_test_data
) -> None:
    """Generate stubs into a temp dir and call Profile from a process that imports only them."""
    out = tmp_path / "stubs"
    out.mkdir()
    protos = sorted((ROOT / "proto" / "interscope" / "v1").glob("*.proto"))
    subprocess.run(
        [
            sys.executable, "-m", "grpc_tools.protoc", f"-I{ROOT / 'proto'}",
            f"--python_out={out}", f"--grpc_python_out={out}",
            *[str(p.relative_to(ROOT / "proto")) for p in protos],
        ],
        check=True,
    )  # fmt: skip
    for package in (out / "interscope", out / "interscope" / "v1"):
        (package / "__init__.py").write_text("")
    x, y = demo_test_data
    np.save(tmp_path / "x.npy", x[:1])
    script = textwrap.dedent(
        f"""
        import sys
        sys.path.insert(0, {str(out)!r})
        import grpc
        import numpy
        import interscope
        assert interscope.__file__.startswith({str(out)!r}), interscope.__file__
        from interscope.v1 import analysis_pb2, analysis_pb2_grpc, tensor_pb2
        x = numpy.load({str(tmp_path / "x.npy")!r}).astype("<f4")
        request = analysis_pb2.ProfileRequest(
            model="digits-cnn",
            inputs=tensor_pb2.Tensor(datatype="FP32", shape=x.shape, raw_data=x.tobytes()),
            labels=[{int(y[0])}],
            spec=analysis_pb2.InteractionSpec(
                players=analysis_pb2.PlayerSpec(grid=analysis_pb2.GridPlayers(rows=2, cols=3)),
                estimator=analysis_pb2.ESTIMATOR_KIND_EXACT,
            ),
        )
        with grpc.insecure_channel({server.address!r}) as channel:
            stub = analysis_pb2_grpc.AnalysisServiceStub(channel)
            events = list(stub.Profile(request))
        kinds = [event.WhichOneof("event") for event in events]
        last = events[-1].result
        kinds = sorted(set(kinds) - {{"progress"}})
        print(",".join(kinds), len(last.orders), last.profiles[0].n_players)
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120, cwd=tmp_path
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["profile,result", "5", "6"]


def _scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as reply:
        text = reply.read().decode()
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def test_metrics_endpoint_counts_calls_and_forward_passes(
    server: BackgroundServer, models, analysis, demo_test_data
) -> None:
    assert server.metrics_port is not None
    list_key = (
        "interscope_rpc_calls_total",
        (("code", "OK"), ("method", "ModelService/ListModels")),
    )
    not_found_key = (
        "interscope_rpc_calls_total",
        (("code", "NOT_FOUND"), ("method", "ModelService/GetModel")),
    )
    forward_key = ("interscope_model_forward_passes_total", (("model", "digits-cnn-ts"),))
    before = _scrape(server.metrics_port)
    for _ in range(3):
        models.ListModels(models_pb2.ListModelsRequest())
    with pytest.raises(grpc.RpcError):
        models.GetModel(models_pb2.GetModelRequest(name="missing"))
    x, y = demo_test_data
    request = analysis_pb2.ProfileRequest(
        model="digits-cnn-ts",
        inputs=to_tensor(x[:1]),
        labels=[int(y[0])],
        spec=grid(2, 3, estimator=analysis_pb2.ESTIMATOR_KIND_EXACT),
    )
    list(analysis.Profile(request))
    after = _scrape(server.metrics_port)
    assert after[list_key] - before.get(list_key, 0.0) == 3
    assert after[not_found_key] - before.get(not_found_key, 0.0) == 1
    # 2^6 coalitions plus one clean forward for the prediction.
    assert after[forward_key] - before.get(forward_key, 0.0) == 2**6 + 1
    duration = ("interscope_rpc_duration_seconds_count", (("method", "AnalysisService/Profile"),))
    assert after[duration] >= 1
    assert ("interscope_model_queue_depth", (("model", "digits-cnn-ts"),)) in after
