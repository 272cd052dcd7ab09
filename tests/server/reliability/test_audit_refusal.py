"""An audit over two streams whose config the server refuses gets the server's status, never
INTERNAL "Internal error from Core" (issue 14 item 13), against a real server."""

from __future__ import annotations

import collections
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
