"""Runs a synchronous event iterator (engine, attacks) on a worker thread as an async iterator."""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections import deque
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Iterator
from concurrent.futures import Executor
from contextlib import AbstractAsyncContextManager
from typing import TypeVar

from interscope_server.cancel import CancelToken

T = TypeVar("T")


async def iterate_in_thread(
    executor: Executor,
    make_events: Callable[[], Iterator[T]],
    cancel: CancelToken,
    slot: AbstractAsyncContextManager[None] | None = None,
) -> AsyncIterator[T]:
    """Yield what `make_events()` yields, computed on `executor` without blocking the loop.

    `slot` (a WorkerLanes slot) is entered before the work is handed to `executor` and left
    when it has stopped, so a long computation holds its lane exactly while it has a thread.

    When the consumer stops early (the client cancelled, or an error), the token is cancelled so
    the worker stops at its next chunk, and this waits for it: no computation outlives its call.
    """
    # The events are closed explicitly, before the slot is left: the worker must have stopped
    # before the slot is given back.
    async with (
        slot if slot is not None else contextlib.nullcontext(),
        contextlib.aclosing(_iterate(executor, make_events, cancel)) as events,
    ):
        async for item in events:
            yield item


async def _iterate(
    executor: Executor, make_events: Callable[[], Iterator[T]], cancel: CancelToken
) -> AsyncGenerator[T, None]:
    loop = asyncio.get_running_loop()
    # The worker appends to `items`; it wakes the loop only when the consumer waits on an empty
    # deque, so a burst of events (a small profile's partials, profile and end) costs one
    # wake-up instead of one per event.
    items: deque[tuple[bool, T | BaseException | None]] = deque()
    lock = threading.Lock()
    waiter: list[asyncio.Future[None]] = []  # the consumer's future while it waits

    def wake(future: asyncio.Future[None]) -> None:
        if not future.done():
            future.set_result(None)

    def put(item: tuple[bool, T | BaseException | None]) -> None:
        with lock:
            items.append(item)
            waiting = waiter.pop() if waiter else None
        if waiting is not None:
            loop.call_soon_threadsafe(wake, waiting)

    def work() -> None:
        try:
            for event in make_events():
                put((False, event))
                # Raise rather than break: a stopped computation must end its call with the
                # token's status, never look like a complete result.
                cancel.check()
            put((True, None))
        except BaseException as exc:  # handed over to the event loop
            put((True, exc))

    future = loop.run_in_executor(executor, work)
    try:
        while True:
            with lock:
                if items:
                    done, item = items.popleft()
                    empty = None
                else:
                    empty = loop.create_future()
                    waiter.append(empty)
            if empty is not None:
                await empty
                continue
            if done:
                if isinstance(item, BaseException):
                    raise item
                return
            yield item  # type: ignore[misc]
    finally:
        if not future.done():
            cancel.cancel()
            # Wait for the worker to notice, so the in-flight work really has stopped; shield it
            # because this may run inside a task that is itself being cancelled.
            await asyncio.shield(future)
