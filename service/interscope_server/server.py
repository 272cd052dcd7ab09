"""Builds, runs and stops one interscope replica: gRPC services, health, reflection, metrics."""

from __future__ import annotations

import asyncio
import errno
import logging
import signal
import socket
import tempfile
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import TracebackType

import grpc
import torch
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from interscope.v1 import analysis_pb2, analysis_pb2_grpc, models_pb2, models_pb2_grpc
from interscope_server import openmp
from interscope_server.api.analysis_servicer import AnalysisServicer
from interscope_server.api.interceptors import (
    AuthInterceptor,
    ObservabilityInterceptor,
    StallInterceptor,
    WireInterceptor,
)
from interscope_server.api.lanes import WorkerLanes
from interscope_server.api.model_servicer import ModelServicer
from interscope_server.config import Settings
from interscope_server.errors import StartupError
from interscope_server.metrics import Metrics
from interscope_server.models.backend import BackendOptions
from interscope_server.models.batcher import BatcherOptions, ModelObserver
from interscope_server.models.host import HostOptions
from interscope_server.models.registry import ModelRegistry, ModelState, ModelStatus
from interscope_server.models.repository import ModelRepository

log = logging.getLogger(__name__)

SERVICE_NAMES = (
    analysis_pb2.DESCRIPTOR.services_by_name["AnalysisService"].full_name,
    models_pb2.DESCRIPTOR.services_by_name["ModelService"].full_name,
    health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
    reflection.SERVICE_NAME,
)


def _read(path: Path | None) -> bytes | None:
    return None if path is None else Path(path).read_bytes()


class MetricsObserver(ModelObserver):
    """Feeds the batcher's and registry's events into this server's Prometheus collectors."""

    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics

    def on_batch(self, model: str, rows: int, seconds: float) -> None:
        self._metrics.observe_batch(model, rows)

    def on_queue_depth(self, model: str, rows: int) -> None:
        self._metrics.set_queue_depth(model, rows)

    def on_load(self, model: str, outcome: str) -> None:
        self._metrics.model_loads.labels(model, outcome).inc()

    def on_remote_call(self, model: str, seconds: float, outcome: str) -> None:
        self._metrics.remote_calls.labels(model, outcome).inc()
        self._metrics.remote_latency.labels(model).observe(seconds)


class InterscopeServer:
    """One replica. Create it, `await start()`, then `await stop()` (or serve() does both)."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.metrics = Metrics()
        self.port: int | None = None
        self.metrics_port: int | None = None
        self.executor = ThreadPoolExecutor(
            max_workers=settings.worker_threads, thread_name_prefix="interscope-work"
        )
        # ModelService work (loads, unloads) gets threads of its own, so control RPCs never
        # queue behind analysis work that holds every worker thread.
        self.control_executor = ThreadPoolExecutor(
            max_workers=2, thread_name_prefix="interscope-control"
        )
        if settings.model_repository is None:
            # Without a repository, uploads still need a home: a private temporary one.
            self._scratch: tempfile.TemporaryDirectory[str] | None = tempfile.TemporaryDirectory(
                prefix="interscope-models-"
            )
            root = Path(self._scratch.name)
        else:
            self._scratch = None
            root = Path(settings.model_repository)
            if not root.is_dir():
                raise StartupError(
                    f"model repository {str(root)!r} is not a directory",
                    "set --model-repository / INTERSCOPE_MODEL_REPOSITORY to a folder with one "
                    "subfolder per model; `interscope demo-repository DIR` writes an example",
                )
        self.registry = ModelRegistry(
            ModelRepository(
                root,
                max_upload_bytes=settings.max_upload_bytes,
                memory_budget_bytes=settings.model_memory_budget_bytes,
            ),
            backend_options=BackendOptions(
                device=settings.device,
                half_precision=settings.half_precision,
                intra_op_threads=settings.intra_op_threads,
                spinning=settings.runtime_spinning,
            ),
            batcher_options=BatcherOptions(
                max_delay_s=settings.max_batch_delay_ms / 1000.0,
                max_queue_rows=settings.max_queue_rows,
            ),
            observer=MetricsObserver(self.metrics),
            listener=self._on_model_state,
            host_options=HostOptions(
                mode=settings.model_hosts,
                memory_bytes=settings.model_host_memory_bytes,
                grace_s=settings.model_host_grace_seconds,
                start_timeout_s=settings.model_host_start_timeout_seconds,
                probe_timeout_s=settings.model_host_probe_timeout_seconds,
                max_restarts=settings.model_host_max_restarts,
            ),
        )
        self.health = health.aio.HealthServicer()
        self._server: grpc.aio.Server | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        lanes = WorkerLanes(
            settings.worker_threads,
            settings.reserved_worker_threads,
            settings.long_call_forwards,
            running=self.metrics.long_calls_running,
            waiting=self.metrics.long_calls_waiting,
        )
        self.analysis = AnalysisServicer(settings, self.registry, self.executor, lanes)

    def _credentials(self) -> grpc.ServerCredentials | None:
        s = self.settings
        if s.tls_cert is None or s.tls_key is None:
            return None
        return grpc.ssl_server_credentials(
            [(Path(s.tls_key).read_bytes(), Path(s.tls_cert).read_bytes())],
            root_certificates=_read(s.tls_client_ca),
            require_client_auth=s.tls_client_ca is not None,
        )

    def _on_model_state(self, status: ModelStatus) -> None:
        """Registry listener (any thread): mirror a model's state into its health status."""
        name = status.name
        serving = (
            health_pb2.HealthCheckResponse.SERVING
            if status.state is ModelState.READY and status.serving
            else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        loop = self._loop
        if loop is not None and not loop.is_closed():
            asyncio.run_coroutine_threadsafe(self.health.set(name, serving), loop)

    async def start(self) -> int:
        """Bind, load models, and start serving; returns the gRPC port."""
        s = self.settings
        self._loop = asyncio.get_running_loop()
        interceptors: list[grpc.aio.ServerInterceptor] = [
            ObservabilityInterceptor(self.metrics),
            WireInterceptor(),
            StallInterceptor(s.send_stall_seconds, self.metrics),
        ]
        if s.auth_tokens:
            interceptors.insert(0, AuthInterceptor([*s.auth_tokens, *s.admin_tokens]))
        server = grpc.aio.server(
            interceptors=interceptors,
            options=[
                ("grpc.max_send_message_length", s.max_message_bytes),
                ("grpc.max_receive_message_length", s.max_message_bytes),
                # Refuse to share a port with another process: a second replica on the same
                # port must fail loudly instead of splitting traffic.
                ("grpc.so_reuseport", 0),
            ],
        )
        analysis_pb2_grpc.add_AnalysisServiceServicer_to_server(self.analysis, server)
        models_pb2_grpc.add_ModelServiceServicer_to_server(
            ModelServicer(self.registry, self.control_executor, s), server
        )
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        reflection.enable_server_reflection(SERVICE_NAMES, server)
        address = f"{s.host}:{s.port}"
        credentials = self._credentials()
        port = 0
        # Checked before grpc tries, so the one line an operator reads is ours rather than
        # C-core's log line; grpc's own failure (0 or RuntimeError) still covers the race.
        if not s.port or _port_free(s.host, s.port):
            try:
                if credentials is None:
                    port = server.add_insecure_port(address)
                else:
                    port = server.add_secure_port(address, credentials)
            except RuntimeError:  # grpc's "Failed to bind to address"
                port = 0
        if port == 0:
            raise StartupError(
                f"cannot bind the gRPC port {address}: another process holds it, or the "
                "address is not this machine's",
                "pick another --port / INTERSCOPE_PORT (0 picks a free one) or --host",
            )
        self.port = port
        self._server = server
        if s.metrics_port is not None:
            try:
                self.metrics_port = self.metrics.serve_http(s.metrics_host, s.metrics_port)
            except OSError as error:
                raise StartupError(
                    f"cannot bind the metrics port {s.metrics_host}:{s.metrics_port} "
                    f"({error.strerror or error}); a second replica on one machine needs its own",
                    "pick another --metrics-port / INTERSCOPE_METRICS_PORT (0 picks a free "
                    "one), or --no-metrics",
                ) from None
        await self.health.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
        await server.start()
        # Models load off the event loop so health answers (NOT_SERVING per model) meanwhile.
        await asyncio.get_running_loop().run_in_executor(
            self.executor, self.registry.load_all, s.load_models
        )
        await self.health.set("", health_pb2.HealthCheckResponse.SERVING)
        log.info("interscope listening on %s:%d", s.host, port)
        return port

    async def wait(self) -> None:
        assert self._server is not None
        await self._server.wait_for_termination()

    async def stop(self, grace: float | None = None) -> None:
        """Refuse new calls, let in-flight calls finish for `grace` seconds, then end them with
        UNAVAILABLE (callers retry elsewhere) and release the models."""
        grace = self.settings.grace_seconds if grace is None else grace
        await self.health.enter_graceful_shutdown()
        self.analysis.calls.shutting_down = True
        if self._server is not None:
            # grpc refuses new RPCs at once; its own hard stop comes a little after ours, so the
            # calls we end at `grace` still get to send their UNAVAILABLE status.
            stopping = asyncio.ensure_future(self._server.stop(grace + 2.0))
            await self.analysis.calls.drain(grace)
            await stopping
        self.registry.close()
        self.metrics.close()
        self.executor.shutdown(wait=False, cancel_futures=True)
        self.control_executor.shutdown(wait=False, cancel_futures=True)
        if self._scratch is not None:
            self._scratch.cleanup()


def _port_free(host: str, port: int) -> bool:
    """Whether `host:port` can be bound now (a name that resolves nowhere counts as free: grpc
    then reports it)."""
    try:
        infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM)
    except socket.gaierror:
        return True
    for family, kind, proto, _, address in infos:
        with socket.socket(family, kind, proto) as probe:
            # As grpc binds: a port lingering in TIME_WAIT is free, one with a listener is not.
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind(address)
            except OSError as error:
                if error.errno == errno.EADDRINUSE:
                    return False
    return True


def _address_for_clients(host: str, port: int) -> str:
    if host in ("0.0.0.0", "::", "[::]", ""):
        host = "127.0.0.1"
    return f"{host}:{port}"


def serve(settings: Settings) -> None:
    """Run a replica until SIGTERM or SIGINT, then drain gracefully (the CLI's `serve`)."""
    logging.basicConfig(
        level=settings.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    threads = openmp.server_threads(settings.model_hosts, settings.intra_op_threads)
    if threads is not None:
        torch.set_num_threads(threads)

    async def main() -> None:
        server = InterscopeServer(settings)
        port = await server.start()
        print(f"interscope listening on {settings.host}:{port}", flush=True)
        if server.metrics_port is not None:
            print(f"metrics on http://{settings.metrics_host}:{server.metrics_port}/metrics")
        stopping = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stopping.set)
        await stopping.wait()
        log.info("signal received: draining for up to %.1f s", settings.grace_seconds)
        await server.stop()

    asyncio.run(main())


class BackgroundServer:
    """A replica on its own event-loop thread, for tests, the demo and embedding.

    with BackgroundServer(Settings(port=0, metrics_port=None, ...)) as srv:
        client = interscope.Client(srv.address)
    """

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.server: InterscopeServer | None = None
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self.port: int | None = None

    @property
    def address(self) -> str:
        assert self.port is not None, "the server is not started"
        return _address_for_clients(self.settings.host, self.port)

    @property
    def metrics_port(self) -> int | None:
        return None if self.server is None else self.server.metrics_port

    def start(self) -> BackgroundServer:
        self._thread.start()

        async def start() -> int:
            self.server = InterscopeServer(self.settings)
            return await self.server.start()

        self.port = asyncio.run_coroutine_threadsafe(start(), self._loop).result(timeout=300)
        return self

    def stop(self, grace: float | None = 0.5) -> None:
        if self.server is not None:
            asyncio.run_coroutine_threadsafe(self.server.stop(grace), self._loop).result(60)
            self.server = None
        if self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=10)
        if not self._loop.is_closed() and not self._loop.is_running():
            self._loop.close()

    def __enter__(self) -> BackgroundServer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
