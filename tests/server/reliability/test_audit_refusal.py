"""An audit over two streams whose config the server refuses gets the server's status, never
INTERNAL "Internal error from Core" (issue 14 item 13), against a real server."""

from __future__ import annotations

import collections
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import interscope
from interscope_server.server import BackgroundServer
from tests.server.api.conftest import server_settings
from tests.server.reliability.conftest import Outcomes, copy_models

ROUNDS = 40  # before the fix about one round in six answered INTERNAL


def test_a_refused_audit_config_reports_the_servers_status(
    demo_repository: Path, tmp_path: Path, demo_test_data: Any, outcomes: Outcomes
) -> None:
    repository = copy_models(demo_repository, tmp_path / "repo", ["digits-cnn"])
    x, y = demo_test_data
    seen: collections.Counter[str] = collections.Counter()
    with BackgroundServer(server_settings(repository, metrics_port=None)) as srv:
        client = interscope.Client(srv.address)
        for _ in range(ROUNDS):
            try:
                # The SDK cannot know the images are 16x16: only the server refuses the grid.
                client.audit(
                    model="digits-cnn",
                    x=x[:8],
                    y=y[:8],
                    attack={"attack": "square", "eps": 0.05, "query_budget": 10},
                    profile={"grid": (40, 40)},
                    streams_per_address=2,
                )
                seen["OK"] += 1
                outcomes.record("audit: refused config, 2 streams", "OK")
            except interscope.InterscopeError as error:
                seen[f"{type(error).__name__}: {error}"] += 1
                outcomes.record("audit: refused config, 2 streams", error.code)
    assert list(seen) == [
        "InvalidArgumentError: INVALID_ARGUMENT: grid 40x40 is larger than the image (16x16); "
        "rows must be <= 16 and cols <= 16"
    ], seen


def test_a_config_over_a_cost_limit_is_not_retried_but_a_busy_server_is_marked_retryable(
    demo_repository: Path, tmp_path: Path, demo_test_data: Any
) -> None:
    """RESOURCE_EXHAUSTED carries the server's retry hint: "no" for a request over a limit (the
    SDK's audit then fails at once with the server's message instead of retrying every stream
    and reporting an UNAVAILABLE "audit stopped"), "later" for the call limit."""
    import grpc
    import numpy as np

    from interscope.codec import to_tensor
    from interscope.v1 import analysis_pb2, analysis_pb2_grpc

    repository = copy_models(demo_repository, tmp_path / "repo", ["digits-cnn"])
    x, y = demo_test_data
    settings = server_settings(
        repository, metrics_port=None, max_attack_forwards_per_request=1000, max_concurrent_calls=1
    )
    with BackgroundServer(settings) as srv, interscope.Client(srv.address) as client:
        attack = {"attack": "square", "eps": 0.05, "query_budget": 5000}
        try:
            client.audit(
                model="digits-cnn", x=x[:8], y=y[:8], attack=attack, profile={"grid": (2, 2)}
            )
        except interscope.ResourceExhaustedError as error:
            assert "max_attack_forwards_per_request" in str(error)
        else:
            raise AssertionError("the audit over the attack limit was admitted")
        channel = grpc.insecure_channel(srv.address)
        stub = analysis_pb2_grpc.AnalysisServiceStub(channel)
        # An Audit stream that sends nothing holds the one call slot until its idle timeout.
        release = threading.Event()
        held = stub.Audit(_silent_until(release), timeout=30)
        request = analysis_pb2.ProfileRequest(
            model="digits-cnn",
            inputs=to_tensor(np.asarray(x[:1])),
            labels=[int(y[0])],
            spec=analysis_pb2.InteractionSpec(
                players=analysis_pb2.PlayerSpec(grid=analysis_pb2.GridPlayers(rows=2, cols=2))
            ),
        )
        hints = []
        # Until the held stream has taken the slot (observable state). Bounded by time, not by
        # a count of calls: a fast Profile could otherwise run out the count first.
        give_up = time.monotonic() + 60
        while not hints and time.monotonic() < give_up:
            try:
                list(stub.Profile(request, timeout=10))
            except grpc.RpcError as error:
                assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, error.details()
                hints = [v for k, v in error.trailing_metadata() or () if k == "interscope-retry"]
                break
        assert hints == ["later"], hints
        release.set()
        held.cancel()
        channel.close()


def _silent_until(release: threading.Event) -> Iterator[Any]:
    """An Audit request stream that sends nothing until released, then ends."""
    release.wait()
    yield from ()
