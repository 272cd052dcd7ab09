"""Cooperative cancellation shared by long computations (engine, attacks, batcher waits)."""

from __future__ import annotations

import threading
import time

from interscope_server.errors import Cancelled, DeadlineExceeded, InterscopeError


class CancelToken:
    """Set by the request's owner; checked by workers at every chunk boundary.

    Thread-safe. A deadline (monotonic seconds) makes `check()` raise DeadlineExceeded once it
    has passed, so a computation honours a gRPC deadline even if no one calls `cancel()`.
    """

    def __init__(self, deadline: float | None = None) -> None:
        self._event = threading.Event()
        self._deadline = deadline
        self._reason = "the request was cancelled"
        self._error: type[InterscopeError] = Cancelled

    def cancel(
        self,
        reason: str = "the request was cancelled",
        error: type[InterscopeError] = Cancelled,
    ) -> None:
        """Ask the work to stop; `check()` then raises `error(reason)` (e.g. Unavailable on
        shutdown, so the caller learns to retry elsewhere rather than that it cancelled)."""
        if not self._event.is_set():
            self._reason, self._error = reason, error
        self._event.set()

    @property
    def cancelled(self) -> bool:
        return self._event.is_set()

    def check(self) -> None:
        """Raise Cancelled or DeadlineExceeded if the work should stop now."""
        if self._event.is_set():
            raise self._error(self._reason)
        if self._deadline is not None and time.monotonic() > self._deadline:
            raise DeadlineExceeded("the request's deadline passed before the work finished")

    def wait(self, timeout: float) -> bool:
        """Sleep up to `timeout` seconds, waking early on cancel; True if cancelled."""
        return self._event.wait(timeout)
