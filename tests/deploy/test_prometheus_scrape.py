"""A real Prometheus scrapes a real interscope replica; its HTTP API shows our counters.

Uses Debian's `prometheus` binary when installed (scripts/install-prometheus.sh, which
scripts/setup.sh runs); skips, saying how to get it, only when it is absent.
Everything listens on 127.0.0.1 and is stopped at the end.
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest

import interscope
from interscope.v1 import models_pb2, models_pb2_grpc
from interscope_server.config import Settings
from interscope_server.server import BackgroundServer

REPO_ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = REPO_ROOT / "deploy" / "grafana" / "interscope-dashboard.json"
#: Bounds every wait on Prometheus (start, first scrapes); scraping runs every second.
DEADLINE_S = 60.0
MODEL = "digits-cnn"
LIST_CALLS = 3
PROMETHEUS = shutil.which("prometheus")

# Decided before any fixture runs, so a machine without the binary starts no server either.
pytestmark = pytest.mark.skipif(
    PROMETHEUS is None,
    reason="the prometheus binary is not on PATH: as root, `bash scripts/install-prometheus.sh` "
    "(Debian's package), or put an upstream Prometheus release binary on PATH",
)


@dataclass
class Prometheus:
    url: str
    log: Path

    def query(self, promql: str) -> dict[str, Any]:
        """The raw /api/v1/query answer (status, data or error)."""
        params = urllib.parse.urlencode({"query": promql})
        try:
            with urllib.request.urlopen(f"{self.url}/api/v1/query?{params}", timeout=5) as reply:
                answer: dict[str, Any] = json.load(reply)
        except urllib.error.HTTPError as error:  # 400 for bad PromQL, with a JSON body
            answer = json.load(error)
        return answer

    def value(self, promql: str) -> float | None:
        """The single sample `promql` evaluates to now, or None while there is none."""
        answer = self.query(promql)
        assert answer["status"] == "success", f"{promql}: {answer}"
        result = answer["data"]["result"]
        if not result:
            return None
        assert len(result) == 1, f"{promql}: expected one series, got {result}"
        return float(result[0]["value"][1])


def _free_loopback_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _wait_for(what: str, check: Callable[[], bool], log: Path | None = None) -> None:
    deadline = time.monotonic() + DEADLINE_S
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.25)
    tail = log.read_text()[-3000:] if log is not None and log.exists() else ""
    pytest.fail(f"timed out after {DEADLINE_S:.0f}s waiting for {what}\n{tail}")


@pytest.fixture
def replica(demo_repository: Path) -> Iterator[BackgroundServer]:
    settings = Settings(
        host="127.0.0.1",
        port=0,
        metrics_host="127.0.0.1",
        metrics_port=0,
        model_repository=demo_repository,
        load_models=[MODEL],
    )
    with BackgroundServer(settings) as server:
        yield server


@pytest.fixture
def prometheus(replica: BackgroundServer, tmp_path: Path) -> Iterator[Prometheus]:
    binary = PROMETHEUS
    assert binary is not None  # the module's skipif mark
    assert replica.metrics_port is not None
    config = tmp_path / "prometheus.yml"
    # JSON is YAML: no YAML library needed to write the config.
    config.write_text(
        json.dumps(
            {
                "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
                "scrape_configs": [
                    {
                        "job_name": "interscope",
                        "scrape_interval": "1s",
                        "scrape_timeout": "1s",
                        "static_configs": [{"targets": [f"127.0.0.1:{replica.metrics_port}"]}],
                    }
                ],
            }
        )
    )
    port = _free_loopback_port()
    log = tmp_path / "prometheus.log"
    with log.open("w") as log_stream:
        process = subprocess.Popen(
            [
                binary,
                f"--config.file={config}",
                f"--storage.tsdb.path={tmp_path / 'data'}",
                f"--web.listen-address=127.0.0.1:{port}",
                "--storage.tsdb.retention.time=1h",
            ],
            stdout=log_stream,
            stderr=subprocess.STDOUT,
        )
    server = Prometheus(url=f"http://127.0.0.1:{port}", log=log)

    def ready() -> bool:
        if process.poll() is not None:
            pytest.fail(f"prometheus exited with {process.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(f"{server.url}/-/ready", timeout=2) as reply:
                return bool(reply.status == 200)
        except OSError:
            return False

    try:
        _wait_for("prometheus to be ready", ready, log)
        yield server
    finally:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)


def test_prometheus_scrapes_call_and_forward_pass_counters(
    replica: BackgroundServer,
    prometheus: Prometheus,
    demo_test_data: tuple[np.ndarray, np.ndarray],
) -> None:
    # The scrape target is up before we call, so the counters' first values are seen too.
    _wait_for(
        "the replica's /metrics target to be up",
        lambda: prometheus.value('up{job="interscope"}') == 1.0,
        prometheus.log,
    )

    with grpc.insecure_channel(replica.address) as channel:
        stub = models_pb2_grpc.ModelServiceStub(channel)
        for _ in range(LIST_CALLS):
            reply = stub.ListModels(models_pb2.ListModelsRequest(), timeout=30)
            assert MODEL in [model.name for model in reply.models]

    x, y = demo_test_data
    with interscope.Client(replica.address) as client:
        result = client.profile(model=MODEL, x=x[:2], label=y[:2], grid=(2, 3), seed=0)
    forwards = result.provenance.forwards
    assert forwards > 0

    expected = {
        'interscope_rpc_calls_total{method="ModelService/ListModels",code="OK"}': LIST_CALLS,
        'interscope_rpc_calls_total{method="AnalysisService/Profile",code="OK"}': 1,
        f'interscope_model_forward_passes_total{{model="{MODEL}"}}': forwards,
    }
    seen: dict[str, float | None] = {}

    def all_seen() -> bool:
        seen.update({promql: prometheus.value(promql) for promql in expected})
        return all(seen[promql] == value for promql, value in expected.items())

    deadline = time.monotonic() + DEADLINE_S
    while not all_seen():
        if time.monotonic() > deadline:
            pytest.fail(f"Prometheus never showed {expected}; last seen {seen}")
        time.sleep(0.5)

    # Histograms and gauges arrive with the same scrape.
    assert (
        prometheus.value(
            'sum(interscope_rpc_duration_seconds_count{method="AnalysisService/Profile"})'
        )
        == 1
    )
    assert prometheus.value(f'sum(interscope_model_batch_size_sum{{model="{MODEL}"}})') == forwards


def test_dashboard_queries_parse_and_name_real_metrics(
    replica: BackgroundServer, prometheus: Prometheus
) -> None:
    """Every panel query is valid PromQL for this Prometheus and names metrics the server has."""
    assert replica.metrics_port is not None
    with urllib.request.urlopen(f"http://127.0.0.1:{replica.metrics_port}/metrics") as reply:
        exposition = reply.read().decode()
    # Family names as the exposition declares them; a counter's may or may not carry _total.
    families = {
        line.split()[2].removesuffix("_total")
        for line in exposition.splitlines()
        if line.startswith("# TYPE ")
    }
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for panel in dashboard["panels"] for t in panel["targets"]]
    assert exprs
    for expr in exprs:
        # Grafana's variables, as Grafana would substitute them for "All" and a short range.
        promql = expr.replace("$__rate_interval", "1m").replace("$namespace", ".*")
        answer = prometheus.query(promql)
        assert answer["status"] == "success", f"{expr}: {answer.get('error')}"
        names = {
            word
            for word in promql.replace("(", " ").replace("{", " ").split()
            if word.startswith("interscope_")
        }
        for name in names:
            family = name
            for suffix in ("_bucket", "_count", "_sum", "_total"):
                family = family.removesuffix(suffix)
            assert family in families, f"{expr}: {name} is not exposed by the server"
