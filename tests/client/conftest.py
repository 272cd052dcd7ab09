"""Client fixtures: real interscope servers on free ports, serving the demo repository."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest

from interscope_server.config import Settings
from interscope_server.server import BackgroundServer


def server_settings(repository: Path, **overrides: object) -> Settings:
    """A replica on 127.0.0.1, a free port, no metrics, only the model the tests use."""
    values: dict[str, object] = {
        "host": "127.0.0.1",
        "port": 0,
        "metrics_port": None,
        "model_repository": repository,
        "load_models": ["digits-cnn"],
        "worker_threads": 2,
    }
    values.update(overrides)
    return Settings(**values)  # type: ignore[arg-type]


@pytest.fixture(scope="session")
def server(demo_repository: Path) -> Iterator[BackgroundServer]:
    """One replica shared by the read-only SDK and CLI tests."""
    with BackgroundServer(server_settings(demo_repository)) as srv:
        yield srv


@pytest.fixture(scope="session")
def digits(demo_test_data: tuple[np.ndarray, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """A few held-out digits: x (N, 1, 16, 16) in [0, 1], y (N,)."""
    x, y = demo_test_data
    return x[:12].copy(), y[:12].copy()


@pytest.fixture(scope="session")
def make_settings() -> Callable[..., Settings]:
    """`make_settings(repository, **overrides)`: settings for one more test replica."""
    return server_settings
