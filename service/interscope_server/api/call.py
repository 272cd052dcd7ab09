"""What every analysis call shares: admission, the registry, the worker threads, provenance.

The flows (`profile_flow`, `attack_flow`, `audit_flow`) take a `CallContext` and nothing of the
servicer's, so each RPC's servicer method is a few lines and the flows import no servicer.

Small calls run on the event loop. A 4-player Profile computes for a fraction of a millisecond
and waits as long again on one forward in its model's host; handing it to a worker thread and
its events back cost two thread hops, the GIL handed to and fro, and under concurrent load most
of the server's context switches (59 per call against 9 on the loop, in bench_floor's 8-client
run). A call whose admitted cost is at most `loop_call_forwards` passes, on a model in a host
process, is computed on the loop's own thread with every wait on the model bounded by
`LOOP_WAIT_S` (blocking.py). A wait that would take longer (the model is busy with other rows,
or slow, or hangs) raises WouldStall: the call's events, kept back until then, are dropped, and
the call runs again from the start on a worker thread as any call does, so a slow or hostile
model costs the loop at most `LOOP_WAIT_S` per `LOOP_COOLDOWN_S`, during which that model's
small calls go straight to the workers.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
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
from interscope_server import blocking, errors
from interscope_server.api import convert
from interscope_server.api.lanes import WorkerLanes
from interscope_server.api.streaming import iterate_in_thread
from interscope_server.cancel import CancelToken
from interscope_server.config import Settings
from interscope_server.evaluator import Evaluator
from interscope_server.models.registry import LoadedModel, ModelRegistry

T = TypeVar("T")

log = logging.getLogger(__name__)

#: Longest one wait on a model may hold the event loop in a small call before the call runs
#: again on a worker thread: about 40 forwards of a tiny Profile on this repository's demo CNN.
LOOP_WAIT_S = 0.01
#: After a small call on a model had to run again on a worker, that model's small calls go to
#: the workers directly for this long.
LOOP_COOLDOWN_S = 5.0


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
        #: Small calls computed on the loop ("ran") or run again on a worker ("fell_back").
        self.loop_outcomes: collections.Counter[str] = collections.Counter()
        self._loop_cooldown: dict[str, float] = {}  # model name -> until when (monotonic)
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
        self,
        make_events: Callable[[], Iterator[T]],
        cost: int,
        call: Call,
        model: LoadedModel | None = None,
    ) -> AsyncIterator[T]:
        """`make_events()` run on a worker thread, in the lane its admitted cost puts it in; or
        on the event loop when the call is small and `model` (the only model it evaluates)
        runs in a host process (see the module docstring)."""
        if model is not None and self._fits_on_loop(model, cost):
            return self._events_on_loop(make_events, cost, call, model)
        return self._events_in_thread(make_events, cost, call)

    def _events_in_thread(
        self, make_events: Callable[[], Iterator[T]], cost: int, call: Call
    ) -> AsyncIterator[T]:
        return iterate_in_thread(
            self.executor, make_events, call.cancel, self.lanes.slot(cost, call.cancel)
        )

    def _fits_on_loop(self, model: LoadedModel, cost: int) -> bool:
        return (
            0 < cost <= self.settings.loop_call_forwards
            and model.backend.stops_on_cancel  # its waits can give up (a model host)
            and time.monotonic() >= self._loop_cooldown.get(model.name, 0.0)
        )

    async def _events_on_loop(
        self, make_events: Callable[[], Iterator[T]], cost: int, call: Call, model: LoadedModel
    ) -> AsyncIterator[T]:
        items = self._compute_on_loop(make_events, call, model)
        if items is None:
            async for item in self._events_in_thread(make_events, cost, call):
                yield item
            return
        for item in items:
            yield item

    def _compute_on_loop(
        self, make_events: Callable[[], Iterator[T]], call: Call, model: LoadedModel
    ) -> list[T] | None:
        """Every event of `make_events()`, computed on this (the loop's) thread; None when a
        wait on the model would have held the loop longer than LOOP_WAIT_S. The events are
        kept back until the end, so a call that runs again elsewhere has sent none of them."""
        items: list[T] = []
        try:
            with blocking.bounded_waits(LOOP_WAIT_S):
                for event in make_events():
                    items.append(event)
                    call.cancel.check()
        except blocking.WouldStall as stall:
            self._loop_cooldown[model.name] = time.monotonic() + LOOP_COOLDOWN_S
            self.loop_outcomes["fell_back"] += 1
            log.info(
                "model %s: a small call runs on a worker thread instead of the event loop (%s); "
                "its small calls use workers for %.0f s",
                model.name,
                stall,
                LOOP_COOLDOWN_S,
            )
            return None
        self.loop_outcomes["ran"] += 1
        return items

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
