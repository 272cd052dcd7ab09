"""A client that stops reading, against a real server: its call is cancelled after
`send_stall_seconds`, its slot and buffers are freed and the server stays healthy (issue 14
item 5)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import grpc
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc

from interscope.codec import to_tensor
from interscope.v1 import analysis_pb2, analysis_pb2_grpc
from interscope_server.server import BackgroundServer
from tests.server.api.conftest import server_settings
from tests.server.reliability.conftest import (
    Outcomes,
    copy_models,
    gauge,
    profile_numbers,
    reference_request,
    wait_until,
)

C = grpc.StatusCode
STALL_S = 1.0
#: A small HTTP/2 window and no BDP probing: the client's transport takes only a few of the
#: events before flow control holds the server's writes, as a client that stops reading does.
SMALL_WINDOW = [("grpc.http2.lookahead_bytes", 16 * 1024), ("grpc.http2.bdp_probe", 0)]


def _stalls(srv: BackgroundServer) -> float:
    return gauge(srv, "interscope_send_stalls_total", {"method": "AnalysisService/Attack"})


def test_a_client_that_stops_reading_is_cancelled_and_its_slot_freed(
    demo_repository: Path, tmp_path: Path, demo_test_data: Any, outcomes: Outcomes
) -> None:
    repository = copy_models(demo_repository, tmp_path / "repo", ["digits-cnn"])
    settings = server_settings(
        repository, metrics_port=None, max_concurrent_calls=1, send_stall_seconds=STALL_S
    )
    x, y = demo_test_data
    # FGSM with every adversarial input returned: one ~1 KiB event per input, thousands of
    # them, megabytes in all, computed in well under a second.
    n = min(len(x), 4096)
    repeats = -(-4096 // n)
    inputs = np.concatenate([x] * repeats)[:4096]
    labels = [int(v) for v in np.concatenate([y] * repeats)[:4096]]
    flood = analysis_pb2.AttackRequest(
        model="digits-cnn",
        inputs=to_tensor(inputs),
        labels=labels,
        attack=analysis_pb2.AttackSpec(kind=analysis_pb2.ATTACK_KIND_FGSM, eps=0.05),
    )
    with BackgroundServer(settings) as srv:
        with grpc.insecure_channel(srv.address) as channel:
            reference = analysis_pb2_grpc.AnalysisServiceStub(channel).Profile(
                reference_request(x, y, "digits-cnn"), timeout=30
            )
            expected = profile_numbers(next(e for e in reference if e.HasField("result")).result)
        with grpc.insecure_channel(srv.address, options=SMALL_WINDOW) as stalled_channel:
            stalled = analysis_pb2_grpc.AnalysisServiceStub(stalled_channel).Attack(
                flood, timeout=120
            )
            try:
                # The stream is never advanced. The server gives up on it after the stall
                # limit: observable as the stall counted (no sleep).
                assert wait_until(lambda: _stalls(srv) == 1, 30), "the stalled call went on"
                assert srv.server is not None
                # Its slot is free (the call limit is 1): its computation and buffered events
                # are gone; grpc holds one message for the client until it reads or leaves.
                assert srv.server.analysis.calls.running == 0
                with grpc.insecure_channel(srv.address) as channel:
                    analysis = analysis_pb2_grpc.AnalysisServiceStub(channel)
                    events = list(
                        analysis.Profile(reference_request(x, y, "digits-cnn"), timeout=30)
                    )
                    result = next(e for e in events if e.HasField("result")).result
                    np.testing.assert_allclose(
                        profile_numbers(result), expected, rtol=1e-6, atol=1e-9
                    )
                    check = health_pb2_grpc.HealthStub(channel).Check(
                        health_pb2.HealthCheckRequest(), timeout=5
                    )
                    assert check.status == health_pb2.HealthCheckResponse.SERVING
                # The stalled client, reading at last, gets what was sent and then the status
                # saying why: not the whole result, and not a silent end.
                received = 0
                try:
                    for _ in stalled:
                        received += 1
                    code, details = C.OK, ""
                except grpc.RpcError as exc:
                    code, details = exc.code(), exc.details() or ""
                outcomes.record("liveness: client stops reading", code)
                assert code == C.DEADLINE_EXCEEDED, (code, details)
                assert "stopped reading" in details and "send_stall_seconds" in details
                assert received < len(inputs)
                assert wait_until(
                    lambda: (
                        gauge(srv, "interscope_rpc_in_flight", {"method": "AnalysisService/Attack"})
                        == 0
                    ),
                    10,
                )
            finally:
                stalled.cancel()
