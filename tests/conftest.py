"""Shared test fixtures: the demo model repository, built once per session and cached on disk."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from interscope_server.config import Settings
from interscope_server.demo import TEST_DATA_FILE, build_demo_repository
from interscope_server.server import BackgroundServer
from tests.zoo import ZooModel, build_zoo

#: Gitignored; reused across sessions, rebuilt when the demo recipe changes (see its stamp file).
DEMO_CACHE = Path(__file__).resolve().parent.parent / ".cache" / "demo-repository"


@pytest.fixture(scope="session")
def demo_repository() -> Path:
    """The demo model repository (four digits CNNs plus held-out data), built on first use."""
    return build_demo_repository(DEMO_CACHE)


@pytest.fixture(scope="session")
def demo_test_data(demo_repository: Path) -> tuple[np.ndarray, np.ndarray]:
    """Held-out digits: x float32 (N, 1, 16, 16) in [0, 1], y int64 (N,)."""
    with np.load(demo_repository / TEST_DATA_FILE) as data:
        return data["x"], data["y"]


@pytest.fixture(scope="module")
def address(demo_repository: Path) -> Iterator[str]:
    """A replica serving digits-cnn on a free loopback port, for the CLI tests of a module."""
    settings = Settings(
        host="127.0.0.1",
        port=0,
        metrics_port=None,
        model_repository=demo_repository,
        load_models=["digits-cnn"],
        worker_threads=2,
    )
    with BackgroundServer(settings) as srv:
        yield srv.address


@pytest.fixture(scope="session")
def zoo() -> dict[str, ZooModel]:
    """The real-model zoo (tests/zoo.py), trained and exported once per session."""
    return build_zoo()


def pytest_configure(config: pytest.Config) -> None:
    """Run models in the server process unless a test asks for hosts (model_hosts="process").

    The product default is isolation; each host costs a fresh interpreter importing torch
    (seconds on 2 cores), which tests whose point is not isolation need not pay. Subprocess
    servers inherit the variable too. tests/server/reliability/test_hosts.py sets "process".
    """
    os.environ.setdefault("INTERSCOPE_MODEL_HOSTS", "inline")
