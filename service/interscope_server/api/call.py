"""What every analysis call shares: admission, the registry, the worker threads, provenance.

The flows (`profile_flow`, `attack_flow`, `audit_flow`) take a `CallContext` and nothing of the
servicer's, so each RPC's servicer method is a few lines and the flows import no servicer.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import Any, TypeVar

import grpc
import numpy as np
from google.protobuf.message import Message

from interscope.v1 import analysis_pb2, tensor_pb2
from interscope_server import errors
from interscope_server.api import convert
from interscope_server.api.lanes import WorkerLanes
from interscope_server.api.streaming import iterate_in_thread
from interscope_server.cancel import CancelToken
from interscope_server.config import Settings
from interscope_server.evaluator import Evaluator
from interscope_server.models.registry import LoadedModel, ModelRegistry

T = TypeVar("T")


@dataclass(eq=False)  # identity semantics: calls live in a set
class Call:
    """One admitted analysis call: its cancel token (with the call's deadline) and start time."""

    cancel: CancelToken
    started: float = field(default_factory=time.monotonic)

    def evaluator(self, model: LoadedModel) -> Evaluator:
        """The model's forward pass, stopped by this call's cancel token."""

        def evaluate(batch: np.ndarray) -> np.ndarray:
            return model.evaluate(batch, self.cancel)

        return evaluate


class CallContext:
    """Admits analysis calls and gives them the registry, worker threads and provenance."""

    def __init__(
        self,
        settings: Settings,
        registry: ModelRegistry,
        executor: Executor,
        lanes: WorkerLanes | None = None,
    ) -> None:
        self.settings = settings
        self.registry = registry
        self.executor = executor
        # Long calls share a bounded part of `executor`, so short ones always find a thread.
        self.lanes = lanes or WorkerLanes(
            settings.worker_threads,
            settings.reserved_worker_threads,
            settings.long_call_forwards,
        )
        self._calls: set[Call] = set()
        self._idle = asyncio.Event()  # set while no analysis call runs; lets shutdown drain
        self._idle.set()
        self.shutting_down = False

    @property
    def running(self) -> int:
        """Analysis calls admitted and not yet ended."""
        return len(self._calls)

    @contextlib.asynccontextmanager
    async def admit(self, context: grpc.aio.ServicerContext) -> AsyncIterator[Call]:
        """A call slot for the RPC (Overloaded when all are taken), with the RPC's deadline."""
        if self.shutting_down:
            raise errors.Unavailable("the server is shutting down; retry on another replica")
        if len(self._calls) >= self.settings.max_concurrent_calls:
            raise errors.Overloaded(
                f"{len(self._calls)} analysis calls are running, the most this server allows "
                f"({self.settings.max_concurrent_calls}); retry later"
            )
        remaining = context.time_remaining()
        deadline = None if remaining is None else time.monotonic() + remaining
        call = Call(CancelToken(deadline))
        self._calls.add(call)
        self._idle.clear()
        try:
            yield call
        finally:
            call.cancel.cancel()
            self._calls.discard(call)
            if not self._calls:
                self._idle.set()

    async def drain(self, grace: float) -> None:
        """Wait up to `grace` seconds for running calls to finish, then stop the rest with
        UNAVAILABLE, so their callers retry on another replica."""
        try:
            await asyncio.wait_for(self._idle.wait(), timeout=grace)
        except asyncio.TimeoutError:  # (distinct from TimeoutError before Python 3.11)
            for call in list(self._calls):
                call.cancel.cancel(
                    "the server is shutting down; retry on another replica", errors.Unavailable
                )

    def model(self, name: str) -> LoadedModel:
        return self.registry.get(name)

    def inputs(self, model: LoadedModel, tensor: tensor_pb2.Tensor, what: str) -> np.ndarray:
        """A request's input batch, checked against the model's shape and the server's limits."""
        return convert.decode_inputs(
            tensor,
            tuple(model.config.input.shape),
            what=what,
            max_bytes=self.settings.max_tensor_bytes,
            max_inputs=self.settings.max_inputs_per_request,
        )

    def events(
        self, make_events: Callable[[], Iterator[T]], cost: int, call: Call
    ) -> AsyncIterator[T]:
        """`make_events()` run on a worker thread, in the lane its admitted cost puts it in."""
        return iterate_in_thread(
            self.executor, make_events, call.cancel, self.lanes.slot(cost, call.cancel)
        )

    async def run(self, cost: int, call: Call, fn: Callable[..., T], *args: Any) -> T:
        """`fn(*args)` on a worker thread, in the lane its admitted cost puts it in."""
        return await self.lanes.run(self.executor, cost, call.cancel, fn, *args)

    def provenance(
        self, model: LoadedModel, spec: Message, seed: int, call: Call, forwards: int
    ) -> analysis_pb2.Provenance:
        """What computed the call's result; `forwards` are the model's rows it ran."""
        return convert.provenance(
            model.name,
            model.backend,
            convert.spec_json(spec),
            seed,
            time.monotonic() - call.started,
            forwards,
            socket.gethostname(),
        )
