"""Bounded waits for work that runs on the event loop's own thread.

A small call runs its engine on the event loop (api/call.py), which saves the two thread hops
to a worker and back that were most of its cost. Nothing on the loop may wait long: every other
call waits with it. So while such work runs, `bounded_waits(seconds)` marks the thread, and the
places that can block on a model (the batcher's queue, a model host's exchange) check
`wait_bound()`: rather than wait longer than the bound they raise `WouldStall`, leaving nothing
half done (a host request already sent is finished by a thread of its own), and the call is run
again from the start on a worker thread, where waiting is allowed.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator

_local = threading.local()


class WouldStall(BaseException):
    """A wait would exceed the thread's bound: run the work again on a worker thread.

    A BaseException, like GeneratorExit: it must pass through every `except Exception` between
    the forward and the loop lane that catches it, never be reported as the call's error."""


@contextlib.contextmanager
def bounded_waits(seconds: float) -> Iterator[None]:
    """While the block runs, waits on models in this thread take at most `seconds` each."""
    previous = getattr(_local, "bound", None)
    _local.bound = seconds
    try:
        yield
    finally:
        _local.bound = previous


def wait_bound() -> float | None:
    """The longest this thread may wait on a model, or None: as long as the work needs."""
    bound: float | None = getattr(_local, "bound", None)
    return bound
