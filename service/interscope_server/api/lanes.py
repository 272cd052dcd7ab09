"""Fair share of the worker threads: long calls run on a bounded lane, so short calls never wait.

An analysis call holds one worker thread for its whole computation (the engine and the attacks
are synchronous generators, and torch's grad mode is thread-local, so a computation cannot hop
between threads mid-way). Before this lane, 16 attacks at the largest budgets took all 16
threads for minutes and a 4-player Profile queued behind their whole work until its deadline.

The admitted cost of every call is known before it starts (admission.py). A call whose planned
forward and gradient passes exceed `long_call_forwards` is *long*: it must take one of at most
`worker_threads - reserved` lane slots before it is given a thread, waiting in FIFO order (its
deadline and cancellation still apply while it waits). Short calls go straight to the pool. So
long work never holds more than `worker_threads - reserved` threads, the reserved threads are
always free for short calls, and a short call queues at most behind other short calls. Long
calls share their lane first come, first served; an audit takes a slot per sample, so several
audits and attacks interleave sample by sample. Inside the model, the batcher already shares
every batch round-robin by call, so a short call's rows join the next batch rather than waiting
for a long call's queued rows.

Why not time slices (a long call yielding its thread every few steps): the engine's generators
yield only at their own chunk boundaries (a Square batch can run for minutes between events),
and resuming one on another thread would move it out of its thread-local torch state.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
from collections.abc import AsyncIterator, Callable
from concurrent.futures import Executor
from typing import Any, TypeVar

from prometheus_client import Gauge

from interscope_server.cancel import CancelToken

T = TypeVar("T")

#: How often a long call waiting for a slot re-checks its token (deadline, shutdown drain).
_WAIT_POLL_S = 0.05


class WorkerLanes:
    """Admits long calls to at most `long_slots` worker threads at once (event-loop only)."""

    def __init__(
        self,
        worker_threads: int,
        reserved_threads: int,
        long_call_forwards: int,
        running: Gauge | None = None,
        waiting: Gauge | None = None,
    ) -> None:
        # At least one slot for long work, and at most half the pool reserved: with 2 threads
        # one is kept for short calls, with 1 thread nothing can be kept.
        reserved = min(reserved_threads, worker_threads // 2)
        self.long_slots = max(1, worker_threads - reserved)
        self.long_call_forwards = long_call_forwards
        self._running = 0
        self._waiters: collections.deque[asyncio.Future[None]] = collections.deque()
        self._running_gauge = running
        self._waiting_gauge = waiting

    def is_long(self, cost: int) -> bool:
        return cost > self.long_call_forwards

    @property
    def running(self) -> int:
        """Long calls holding a slot now."""
        return self._running

    @property
    def waiting(self) -> int:
        """Long calls waiting for a slot."""
        return len(self._waiters)

    def _report(self) -> None:
        if self._running_gauge is not None:
            self._running_gauge.set(self._running)
        if self._waiting_gauge is not None:
            self._waiting_gauge.set(len(self._waiters))

    @contextlib.asynccontextmanager
    async def slot(self, cost: int, cancel: CancelToken) -> AsyncIterator[None]:
        """Hold a worker-thread slot for a computation of `cost` planned passes.

        Short work enters at once. Long work waits for a free lane slot; while it waits,
        `cancel.check()` runs every few tens of milliseconds, so a deadline or a shutdown ends
        the wait with the token's status. A call cancelled by its client (task cancellation)
        leaves the queue at once.
        """
        if not self.is_long(cost):
            yield
            return
        await self._acquire(cancel)
        try:
            yield
        finally:
            self._release()

    async def run(
        self,
        executor: Executor,
        cost: int,
        cancel: CancelToken,
        function: Callable[..., T],
        *args: Any,
    ) -> T:
        """`function(*args)` on `executor` under a slot for `cost`; the slot is kept until the
        thread has returned, even when the awaiting task is cancelled (the token is cancelled
        then, so the work stops at its next check)."""
        async with self.slot(cost, cancel):
            future = asyncio.get_running_loop().run_in_executor(executor, function, *args)
            try:
                return await asyncio.shield(future)
            except asyncio.CancelledError:
                cancel.cancel()
                with contextlib.suppress(BaseException):
                    await asyncio.shield(future)
                raise

    async def _acquire(self, cancel: CancelToken) -> None:
        if self._running < self.long_slots and not self._waiters:
            self._running += 1
            self._report()
            return
        ticket: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(ticket)
        self._report()
        try:
            while True:
                cancel.check()
                done, _ = await asyncio.wait({ticket}, timeout=_WAIT_POLL_S)
                if done:
                    return  # _release handed its slot over: _running already counts this call
        except BaseException:
            if ticket.done() and not ticket.cancelled():
                self._release()  # granted while being cancelled: pass the slot on
            else:
                ticket.cancel()
                self._waiters.remove(ticket)
                self._report()
            raise

    def _release(self) -> None:
        # Hand the slot straight to the first waiter, so no newcomer can overtake the queue.
        while self._waiters:
            ticket = self._waiters.popleft()
            if not ticket.done():
                ticket.set_result(None)
                self._report()
                return
        self._running -= 1
        self._report()
