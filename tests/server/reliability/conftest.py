"""Fixtures for the reliability tests: private model repositories, outcome tallies, helpers."""

from __future__ import annotations

import collections
import shutil
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import grpc
import numpy as np
import pytest

from interscope.codec import to_tensor
from interscope.v1 import analysis_pb2
from interscope_server.server import BackgroundServer
from tests.server.api.conftest import grid

#: Where the tallies of every RPC outcome live for the session (see `pytest_terminal_summary`).
OUTCOMES = pytest.StashKey[collections.Counter[tuple[str, str]]]()

#: Statuses no request may ever get: they mean a bug (or an unmapped error) in the service.
FORBIDDEN = frozenset({grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN})


class Outcomes:
    """Counts (rpc, status) pairs seen by the tests; printed as a table at the end of the run."""

    def __init__(self, counter: collections.Counter[tuple[str, str]]) -> None:
        self.counter = counter

    def record(self, rpc: str, code: grpc.StatusCode | str) -> None:
        name = code if isinstance(code, str) else code.name
        self.counter[(rpc, name)] += 1

    def total(self, rpc: str | None = None) -> int:
        return sum(n for (r, _), n in self.counter.items() if rpc is None or r == rpc)


@pytest.fixture(scope="session")
def outcomes(request: pytest.FixtureRequest) -> Outcomes:
    config = request.config
    if OUTCOMES not in config.stash:
        config.stash[OUTCOMES] = collections.Counter()
    return Outcomes(config.stash[OUTCOMES])


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    counter = terminalreporter.config.stash.get(OUTCOMES, None)
    if not counter:
        return
    rpcs = sorted({rpc for rpc, _ in counter})
    codes = sorted({code for _, code in counter})
    width = max(len(c) for c in codes) + 2
    first = max(len(r) for r in rpcs) + 2
    terminalreporter.write_sep("-", f"reliability: {sum(counter.values())} calls by status")
    terminalreporter.write_line(f"{'rpc':<{first}}" + "".join(f"{c:>{width}}" for c in codes))
    for rpc in rpcs:
        cells = "".join(f"{counter.get((rpc, c), 0):>{width}}" for c in codes)
        terminalreporter.write_line(f"{rpc:<{first}}{cells}")


def copy_models(demo_repository: Path, target: Path, names: Iterable[str]) -> Path:
    """A private repository holding copies of some demo models (uploads and unloads stay in it)."""
    target.mkdir(parents=True, exist_ok=True)
    for name in names:
        shutil.copytree(demo_repository / name, target / name)
    return target


def reference_request(x: np.ndarray, y: np.ndarray, model: str) -> analysis_pb2.ProfileRequest:
    """A small exact profile (6 players, 64 coalitions): fast, deterministic, comparable."""
    return analysis_pb2.ProfileRequest(
        model=model,
        inputs=to_tensor(x[:2]),
        labels=[int(v) for v in y[:2]],
        spec=grid(2, 3, estimator=analysis_pb2.ESTIMATOR_KIND_EXACT, return_pairs=True),
    )


def profile_numbers(result: analysis_pb2.ProfileResult) -> np.ndarray:
    """The numbers of a profile result that must not change between equal calls."""
    rows = [list(result.mean), list(result.mean_abs)]
    for profile in result.profiles:
        rows += [list(profile.mean_abs), list(profile.disentanglement), [profile.value_full]]
    return np.concatenate([np.asarray(r, dtype=np.float64) for r in rows])


def gauge(srv: BackgroundServer, name: str, labels: dict[str, str]) -> float:
    assert srv.server is not None
    return srv.server.metrics.registry.get_sample_value(name, labels) or 0.0


def in_flight_total(srv: BackgroundServer) -> float:
    """RPCs the server is still working on, over every method."""
    assert srv.server is not None
    total = 0.0
    for family in srv.server.metrics.registry.collect():
        for sample in family.samples:
            if sample.name == "interscope_rpc_in_flight":
                total += sample.value
    return total


def wait_until(condition: Callable[[], bool], timeout: float, step: float = 0.02) -> bool:
    """Poll `condition` until it holds or `timeout` seconds pass; True if it held."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(step)
    return bool(condition())
