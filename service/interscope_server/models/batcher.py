"""Dynamic batching per model: merge concurrent callers' rows into batches, fairly, with limits.

Callers are synchronous threads (the engine and attacks run in worker threads). Each call's rows
are cut into chunks; the worker takes chunks round-robin across callers until a batch is full or
the oldest waiting row has waited `max_delay_s`, runs one forward pass off the callers' threads,
and copies each output row back into the array of the call that asked for it. Round-robin by
call means a 65,536-row exact profile and an 8-row request share every batch rather than the
small one waiting behind the whole profile.

The fill delay is paid only while the model is shared: waiting for rows that nobody else is
going to send would put `max_delay_s` on every forward of a lone caller (a 4-player Profile
makes two, so the delay was most of its round trip). A submit that finds another thread's rows
queued or running marks the model shared for `_SHARED_WINDOW_S`; outside that window a batch
runs as soon as it has rows.

A lone caller goes further when the model's forward can stop itself (`direct`, a model host's
forward, which kills a request that outlives its caller's deadline or cancel by the grace): if
nothing is queued or running and the model is not shared, the caller runs its own rows on its
own thread, without the two thread hops to the batcher's worker and back. Rows that arrive
meanwhile queue as usual and make the model shared, so concurrent callers still merge.
"""

from __future__ import annotations

import collections
import itertools
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from interscope_server import blocking
from interscope_server.cancel import CancelToken
from interscope_server.errors import (
    BackendFailed,
    InterscopeError,
    Overloaded,
    Unavailable,
)

#: How often a waiting caller re-checks its CancelToken (which has no wake-up hook of its own).
_CANCEL_POLL_S = 0.01
#: How long a model counts as shared after two threads' rows last met in its queue: long
#: against the gaps between one stream's forwards (sub-millisecond to a few ms), so concurrent
#: streams keep merging; short enough that a lone caller after them stops paying the delay.
_SHARED_WINDOW_S = 0.05


class ModelObserver:
    """Hooks for metrics; the server subclasses it to feed Prometheus. No-ops by default.

    Suggested series: interscope_model_forward_passes_total{model} (sum of `rows`),
    interscope_model_batch_size{model} (histogram of `rows`), interscope_model_queue_depth{model}
    (gauge), interscope_model_loads_total{model,outcome}. Called from the batcher's worker and the
    registry's loading threads: implementations must be thread-safe and quick.
    """

    def on_batch(self, model: str, rows: int, seconds: float) -> None:
        """One forward pass of `rows` rows took `seconds`."""

    def on_queue_depth(self, model: str, rows: int) -> None:
        """Rows waiting (not yet in a forward pass) for `model` changed to `rows`."""

    def on_load(self, model: str, outcome: str) -> None:
        """A load of `model` ended: outcome "success" or "failure"."""

    def on_remote_call(self, model: str, seconds: float, outcome: str) -> None:
        """One ModelInfer call of a remote (format oip) model took `seconds`; outcome "ok" or
        the error class it ended in."""


@dataclass(frozen=True)
class BatcherOptions:
    """Batching knobs shared by every model; max batch size comes from each model's config."""

    #: Longest time the oldest waiting row waits for a batch to fill, while other callers share
    #: the model (a lone caller's rows run at once).
    max_delay_s: float = 0.002
    #: Rows waiting per model beyond which new calls get RESOURCE_EXHAUSTED.
    max_queue_rows: int = 1_000_000
    #: Rows per chunk in the round-robin (0: a quarter of the max batch size).
    chunk_rows: int = 0


class _Call:
    """One caller's submission: its rows, where its outputs go, and how far it has got."""

    __slots__ = ("done", "error", "finished", "left", "next_row", "out", "thread", "x")

    def __init__(self, x: np.ndarray, num_outputs: int) -> None:
        self.x = x
        self.thread = threading.get_ident()  # who submitted: rows of one thread never merge
        self.out = np.empty((x.shape[0], num_outputs), dtype=np.float32)
        self.next_row = 0  # first row not yet handed to a batch
        self.finished = 0  # rows whose outputs are in `out`
        self.error: BaseException | None = None
        self.done = threading.Event()
        self.left = False  # the caller gave up waiting (cancel, deadline)


class DynamicBatcher:
    """Merges rows of concurrent `submit` calls into forward passes of at most `max_batch_size`."""

    def __init__(
        self,
        name: str,
        forward: Callable[[np.ndarray], np.ndarray],
        *,
        num_outputs: int,
        max_batch_size: int,
        options: BatcherOptions | None = None,
        observer: ModelObserver | None = None,
        on_abandoned: Callable[[], None] | None = None,
        direct: Callable[[np.ndarray, CancelToken | None], np.ndarray] | None = None,
    ) -> None:
        """`on_abandoned` is called when every caller of the forward pass now running has left
        (from the last caller's thread): a model host uses it to stop a forward that hangs.

        `direct(x, cancel)` is `forward` for a batch that one caller runs on its own thread; it
        must give up by itself when `cancel` fires (see the module docstring). None: every
        forward runs on the batcher's worker."""
        options = options or BatcherOptions()
        self.name = name
        self._forward = forward
        self._num_outputs = num_outputs
        self.max_batch_size = max_batch_size
        self._max_delay_s = options.max_delay_s
        self._max_queue_rows = options.max_queue_rows
        self._chunk = options.chunk_rows or max(1, max_batch_size // 4)
        self._observer = observer or ModelObserver()
        self._on_abandoned = on_abandoned
        self._direct = direct
        self._running: list[_Call] = []  # the calls with rows in the forward pass now running
        self._direct_running: list[_Call] = []  # calls running their own rows (`direct`)
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._direct_idle = threading.Condition(self._lock)  # notified as direct calls end
        self._calls: collections.deque[_Call] = collections.deque()  # calls with unsent rows
        self._queued_rows = 0
        self._oldest: float | None = None  # when the oldest unsent row arrived
        self._shared_until = 0.0  # until when the fill delay applies (see the module docstring)
        self._closed = False
        self._drain = False
        self._worker = threading.Thread(target=self._run, name=f"batcher-{name}", daemon=True)
        self._worker.start()

    @property
    def queue_depth(self) -> int:
        """Rows submitted but not yet in a forward pass."""
        with self._lock:
            return self._queued_rows

    def submit(self, x: np.ndarray, cancel: CancelToken | None = None) -> np.ndarray:
        """Logits for every row of `x` (float32, (B, ...)), in order. Blocks until done.

        Raises Overloaded (a ResourceExhausted) when the queue is full, Unavailable when the
        batcher is closed, BackendFailed when the forward pass raised, Cancelled /
        DeadlineExceeded from `cancel` (the call's unsent rows are dropped).
        """
        if cancel is not None:
            cancel.check()
        call = _Call(x, self._num_outputs)
        rows = x.shape[0]
        if rows == 0:
            return call.out
        with self._lock:
            if self._closed:
                raise Unavailable(f"model {self.name!r} is unloading or the server is stopping")
            if self._queued_rows + rows > self._max_queue_rows:
                raise Overloaded(
                    f"model {self.name!r} has {self._queued_rows} rows queued; {rows} more would "
                    f"exceed the queue limit of {self._max_queue_rows} rows; retry later"
                    + (" or send fewer rows per call" if rows > self._max_queue_rows else "")
                )
            now = time.monotonic()
            others = itertools.chain(self._calls, self._running, self._direct_running)
            if any(c.thread != call.thread for c in others):
                self._shared_until = now + _SHARED_WINDOW_S
            direct = (
                self._direct is not None
                and rows <= self.max_batch_size
                and not (self._calls or self._running or self._direct_running)
                and now >= self._shared_until
            )
            if direct:
                self._direct_running.append(call)
            elif blocking.wait_bound() is not None:
                # The event loop's thread (blocking.py) does not wait in the queue: its call
                # runs again on a worker thread. Nothing was queued yet.
                raise blocking.WouldStall(f"model {self.name!r} has rows queued or running")
            else:
                self._calls.append(call)
                self._queued_rows += rows
                if self._oldest is None:
                    self._oldest = now
                depth = self._queued_rows
                # Wake the worker only when it has something to act on: the first rows (it may
                # be idle) or a full batch; otherwise its max-delay timeout wakes it. Waking it
                # on every submit costs a context switch per caller on a busy CPU.
                if depth == rows or depth >= self.max_batch_size:
                    self._wake.notify()
        if direct:
            self._run_direct(call, cancel)
            return call.out
        self._observer.on_queue_depth(self.name, depth)
        self._wait(call, cancel)
        if call.error is not None:
            self._raise(call.error)
        return call.out

    def _run_direct(self, call: _Call, cancel: CancelToken | None) -> None:
        """Run a lone caller's rows on its own thread (see the module docstring)."""
        assert self._direct is not None
        started = time.perf_counter()
        try:
            call.out[:] = self._direct(call.x, cancel)
        except BaseException as exc:
            self._raise(exc)
        finally:
            with self._lock:
                self._direct_running.remove(call)
                if not self._direct_running:
                    self._direct_idle.notify_all()
        self._observer.on_batch(self.name, call.x.shape[0], time.perf_counter() - started)

    def _raise(self, error: BaseException) -> None:
        """Raise a forward's failure in the caller's thread: our own errors as they are (a new
        instance: the same one may reach several callers), anything else as BackendFailed."""
        if isinstance(error, blocking.WouldStall):
            raise error  # not a failure: the call runs again where it may wait
        if isinstance(error, InterscopeError):
            raise type(error)(str(error))
        reason = f"{type(error).__name__}: {error}".rstrip(": ")
        raise BackendFailed(
            f"model {self.name!r} failed while computing this request ({reason}); the "
            "request was stopped and the model keeps serving; retry, and if it fails again "
            "the model cannot run these inputs"
        ) from error

    def _wait(self, call: _Call, cancel: CancelToken | None) -> None:
        if cancel is None:
            call.done.wait()
            return
        while not call.done.wait(_CANCEL_POLL_S):
            try:
                cancel.check()
            except InterscopeError:
                self._withdraw(call, left=True)
                raise

    def _withdraw(self, call: _Call, *, left: bool = False) -> None:
        """Drop a cancelled call's unsent rows; rows already in a batch are computed and ignored.

        `left`: the caller stopped waiting; if no caller of the running batch waits any more,
        `on_abandoned` is told (under the lock, so it cannot hit the next batch's forward).
        """
        with self._lock:
            call.left = call.left or left
            if (
                left
                and self._on_abandoned is not None
                and self._running
                and all(c.left for c in self._running)
            ):
                self._on_abandoned()
            if call in self._calls:
                self._calls.remove(call)
                self._queued_rows -= call.x.shape[0] - call.next_row
                call.next_row = call.x.shape[0]
                if not self._calls:
                    self._oldest = None
            depth = self._queued_rows
        self._observer.on_queue_depth(self.name, depth)

    def close(self, *, drain: bool = False, timeout: float | None = None) -> bool:
        """Stop the worker. Waiting calls get Unavailable, or are served first with `drain`.

        Returns whether the worker and every caller running its own rows stopped within
        `timeout` (None: wait however long it takes); False leaves a forward pass running, which
        the caller stops by closing the backend.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._lock:
            self._closed = True
            self._drain = drain
            self._wake.notify_all()
        if threading.current_thread() is not self._worker:
            self._worker.join(timeout)
        with self._lock:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            direct_done = self._direct_idle.wait_for(lambda: not self._direct_running, left)
        worker_done = not self._worker.is_alive() or threading.current_thread() is self._worker
        return worker_done and direct_done

    def _take_batch(self) -> list[tuple[_Call, int, int]] | None:
        """Under the lock: wait for work, then take up to max_batch_size rows round-robin."""
        while True:
            if self._closed and not (self._drain and self._calls):
                return None
            if not self._calls:
                self._wake.wait()
                continue
            assert self._oldest is not None
            now = time.monotonic()
            wait = self._oldest + self._max_delay_s - now
            shared = now < self._shared_until
            if shared and self._queued_rows < self.max_batch_size and wait > 0 and not self._closed:
                self._wake.wait(wait)
                continue
            break
        pieces: list[tuple[_Call, int, int]] = []
        room = self.max_batch_size
        while room and self._calls:
            call = self._calls.popleft()
            take = min(self._chunk, room, call.x.shape[0] - call.next_row)
            pieces.append((call, call.next_row, call.next_row + take))
            call.next_row += take
            room -= take
            if call.next_row < call.x.shape[0]:
                self._calls.append(call)
        self._queued_rows -= self.max_batch_size - room
        self._oldest = time.monotonic() if self._calls else None
        return pieces

    def _run(self) -> None:
        while True:
            with self._lock:
                pieces = self._take_batch()
                depth = self._queued_rows
                if pieces is None:
                    abandoned = list(self._calls)
                    self._calls.clear()
                    self._queued_rows = 0
            if pieces is None:
                for call in abandoned:
                    call.error = Unavailable(
                        f"model {self.name!r} was unloaded or the server is stopping before "
                        "this request finished; retry"
                    )
                    call.done.set()
                self._observer.on_queue_depth(self.name, 0)
                return
            self._observer.on_queue_depth(self.name, depth)
            self._execute(pieces)

    def _execute(self, pieces: list[tuple[_Call, int, int]]) -> None:
        if len(pieces) == 1:
            call, lo, hi = pieces[0]
            batch = call.x[lo:hi]
        else:
            batch = np.concatenate([call.x[lo:hi] for call, lo, hi in pieces])
        with self._lock:
            self._running = [call for call, _, _ in pieces]
        started = time.perf_counter()
        try:
            out = self._forward(batch)
        except BaseException as exc:  # every caller in the batch must hear of it
            with self._lock:
                self._running = []
            for call, _, _ in pieces:
                call.error = exc
                self._withdraw(call)
                call.done.set()
            return
        with self._lock:
            self._running = []
        self._observer.on_batch(self.name, batch.shape[0], time.perf_counter() - started)
        offset = 0
        for call, lo, hi in pieces:
            call.out[lo:hi] = out[offset : offset + hi - lo]
            offset += hi - lo
            call.finished += hi - lo
            if call.finished == call.x.shape[0]:
                call.done.set()
