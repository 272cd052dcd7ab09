"""Prometheus collectors owned by one server instance (no import-time globals)."""

from __future__ import annotations

import threading
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

# Forward passes per batch span from 1 (a lone attack step) to tens of thousands (exact games).
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384, 65536)
# Calls span milliseconds (metadata) to minutes (audits).
_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)


class Metrics:
    """All interscope_* collectors of one server, on a registry of its own.

    Tests start several servers in one process; a registry per instance keeps their counts apart.
    """

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.rpc_calls = Counter(
            "interscope_rpc_calls",
            "gRPC calls finished, by method and status code.",
            ["method", "code"],
            registry=self.registry,
        )
        self.rpc_duration = Histogram(
            "interscope_rpc_duration_seconds",
            "Wall time of gRPC calls from arrival to the last message, by method.",
            ["method"],
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.rpc_in_flight = Gauge(
            "interscope_rpc_in_flight",
            "gRPC calls being served now, by method.",
            ["method"],
            registry=self.registry,
        )
        self.forward_passes = Counter(
            "interscope_model_forward_passes",
            "Rows evaluated by each model (one row is one forward pass of one input).",
            ["model"],
            registry=self.registry,
        )
        self.batch_size = Histogram(
            "interscope_model_batch_size",
            "Rows per batch handed to each model's backend.",
            ["model"],
            buckets=_BATCH_BUCKETS,
            registry=self.registry,
        )
        self.queue_depth = Gauge(
            "interscope_model_queue_depth",
            "Rows waiting in each model's batcher.",
            ["model"],
            registry=self.registry,
        )
        self.model_loads = Counter(
            "interscope_model_loads",
            "Model loads by outcome (success or failure).",
            ["model", "outcome"],
            registry=self.registry,
        )
        self.remote_calls = Counter(
            "interscope_remote_infer_calls",
            "ModelInfer calls to remote (format oip) models, by outcome (ok or the error).",
            ["model", "outcome"],
            registry=self.registry,
        )
        self.remote_latency = Histogram(
            "interscope_remote_infer_seconds",
            "Wall time of each ModelInfer call to a remote (format oip) model, retries included.",
            ["model"],
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.send_stalls = Counter(
            "interscope_send_stalls",
            "Streaming calls cancelled because the client read nothing for send_stall_seconds.",
            ["method"],
            registry=self.registry,
        )
        self.long_calls_running = Gauge(
            "interscope_long_calls_running",
            "Long analysis calls (or audit samples) holding a worker thread of the long lane.",
            registry=self.registry,
        )
        self.long_calls_waiting = Gauge(
            "interscope_long_calls_waiting",
            "Long analysis calls (or audit samples) waiting for a slot of the long lane.",
            registry=self.registry,
        )
        self.gpu_memory = Gauge(
            "interscope_gpu_memory_bytes",
            "GPU memory allocated by torch on each CUDA device.",
            ["device"],
            registry=self.registry,
        )
        self._http: tuple[WSGIServer, threading.Thread] | None = None

    def observe_batch(self, model: str, rows: int) -> None:
        """Record one backend batch (batcher threads call this; the collectors are thread-safe)."""
        self.forward_passes.labels(model).inc(rows)
        self.batch_size.labels(model).observe(rows)

    def set_queue_depth(self, model: str, rows: int) -> None:
        self.queue_depth.labels(model).set(rows)

    def update_gpu_memory(self) -> None:
        """Refresh the GPU memory gauge; a no-op without CUDA."""
        try:
            import torch
        except ImportError:  # pragma: no cover - the server extra brings torch
            return
        if not torch.cuda.is_available():
            return
        for index in range(torch.cuda.device_count()):
            self.gpu_memory.labels(f"cuda:{index}").set(torch.cuda.memory_allocated(index))

    def serve_http(self, host: str, port: int) -> int:
        """Expose /metrics over HTTP; returns the bound port (port 0 picks a free one)."""
        server, thread = start_http_server(port, addr=host, registry=self.registry)
        self._http = (server, thread)
        return int(server.server_port)

    def close(self) -> None:
        if self._http is not None:
            server, thread = self._http
            server.shutdown()
            server.server_close()
            thread.join(timeout=5)
            self._http = None
