"""Dynamic batcher: routing under concurrency, fairness, backpressure, cancellation, shutdown."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from interscope_server.cancel import CancelToken
from interscope_server.errors import BackendFailed, Cancelled, ResourceExhausted, Unavailable
from interscope_server.models import (
    BackendOptions,
    BatcherOptions,
    DynamicBatcher,
    ModelObserver,
    ModelRegistry,
    ModelRepository,
)


def _identity_logits(x: np.ndarray) -> np.ndarray:
    """Two 'logits' per row that identify it: (caller id, row index) stored in the input."""
    return x[:, :2].copy()


class _Gate:
    """A forward function that blocks until released, and records every batch it saw."""

    def __init__(self) -> None:
        self.entered = threading.Event()
        self.release = threading.Event()
        self.batches: list[np.ndarray] = []

    def __call__(self, x: np.ndarray) -> np.ndarray:
        self.batches.append(x.copy())
        self.entered.set()
        self.release.wait()
        return _identity_logits(x)


class _DepthWatch(ModelObserver):
    """Signals when the queue depth reaches a target, so tests wait on state, not on time."""

    def __init__(self, target: int) -> None:
        self.target = target
        self.reached = threading.Event()
        self.batch_sizes: list[int] = []

    def on_queue_depth(self, model: str, rows: int) -> None:
        if rows >= self.target:
            self.reached.set()

    def on_batch(self, model: str, rows: int, seconds: float) -> None:
        self.batch_sizes.append(rows)


def _rows(caller: int, n: int) -> np.ndarray:
    return np.stack([np.full(n, caller, np.float32), np.arange(n, dtype=np.float32)], axis=1)


def test_concurrent_callers_get_their_own_rows() -> None:
    watch = _DepthWatch(target=10**9)
    callers_per_batch: list[int] = []

    def forward(x: np.ndarray) -> np.ndarray:
        callers_per_batch.append(len(np.unique(x[:, 0])))
        return _identity_logits(x)

    batcher = DynamicBatcher("m", forward, num_outputs=2, max_batch_size=64, observer=watch)
    try:
        sizes = [1 + (7 * i) % 150 for i in range(48)]
        with ThreadPoolExecutor(16) as pool:
            outs = list(pool.map(lambda i: batcher.submit(_rows(i, sizes[i])), range(48)))
        for i, out in enumerate(outs):
            np.testing.assert_array_equal(out, _rows(i, sizes[i]))
        assert sum(watch.batch_sizes) == sum(sizes)
        assert max(watch.batch_sizes) <= 64
        assert max(callers_per_batch) > 1  # rows of different callers were merged
    finally:
        batcher.close()


def test_real_model_routes_rows_under_concurrent_load(
    repository: ModelRepository, demo_test_data: tuple[np.ndarray, np.ndarray]
) -> None:
    registry = ModelRegistry(repository, backend_options=BackendOptions(device="cpu"))
    try:
        model = registry.load("digits-cnn")
        x, _ = demo_test_data
        rng = np.random.default_rng(0)
        # Distinct inputs per request: different images, different sizes, different noise.
        requests = [
            np.clip(
                x[rng.choice(len(x), 1 + i % 37)] + rng.normal(0, 0.05, (1, 1, 16, 16)), 0, 1
            ).astype(np.float32)
            for i in range(40)
        ]
        expected = [model.backend.forward(r) for r in requests]
        with ThreadPoolExecutor(12) as pool:
            got = list(pool.map(model.evaluate, requests))
        for want, have in zip(expected, got, strict=True):
            np.testing.assert_allclose(have, want, rtol=1e-5, atol=1e-5)
    finally:
        registry.close()


def test_small_request_is_not_starved_by_a_huge_one() -> None:
    gate = _Gate()
    watch = _DepthWatch(target=65_536 + 8)
    batcher = DynamicBatcher(
        "m",
        gate,
        num_outputs=2,
        max_batch_size=1024,
        options=BatcherOptions(max_delay_s=0.0, chunk_rows=256),
        observer=watch,
    )
    with ThreadPoolExecutor(3) as pool:
        first = pool.submit(batcher.submit, _rows(9, 1))
        gate.entered.wait()  # the worker is busy; the next two queue up behind it
        huge = pool.submit(batcher.submit, _rows(1, 65_536))
        small = pool.submit(batcher.submit, _rows(2, 8))
        assert watch.reached.wait(10)
        gate.release.set()
        np.testing.assert_array_equal(small.result(), _rows(2, 8))
        np.testing.assert_array_equal(huge.result(), _rows(1, 65_536))
        first.result()
    # The small request rode in the first batch after the blocked one, not after 64 batches.
    assert 2 in gate.batches[1][:, 0]
    batcher.close()


def test_full_queue_is_resource_exhausted() -> None:
    gate = _Gate()
    watch = _DepthWatch(target=80)
    batcher = DynamicBatcher(
        "m",
        gate,
        num_outputs=2,
        max_batch_size=16,
        options=BatcherOptions(max_delay_s=0.0, max_queue_rows=100),
        observer=watch,
    )
    with ThreadPoolExecutor(2) as pool:
        first = pool.submit(batcher.submit, _rows(0, 1))
        gate.entered.wait()
        queued = pool.submit(batcher.submit, _rows(1, 80))
        assert watch.reached.wait(10)
        with pytest.raises(ResourceExhausted, match=r"80 rows queued; 30 more .* limit of 100"):
            batcher.submit(_rows(2, 30))
        with pytest.raises(ResourceExhausted, match="send fewer rows per call"):
            batcher.submit(_rows(3, 101))
        gate.release.set()
        np.testing.assert_array_equal(queued.result(), _rows(1, 80))
        first.result()
    batcher.submit(_rows(4, 30))  # room again once the queue drained
    batcher.close()


def test_cancel_drops_pending_rows_and_raises() -> None:
    gate = _Gate()
    watch = _DepthWatch(target=500)
    batcher = DynamicBatcher(
        "m",
        gate,
        num_outputs=2,
        max_batch_size=10,
        options=BatcherOptions(max_delay_s=0.0),
        observer=watch,
    )
    token = CancelToken()
    with ThreadPoolExecutor(2) as pool:
        first = pool.submit(batcher.submit, _rows(0, 1))
        gate.entered.wait()
        cancelled = pool.submit(batcher.submit, _rows(1, 500), token)
        assert watch.reached.wait(10)
        token.cancel("client went away")
        with pytest.raises(Cancelled, match="client went away"):
            cancelled.result()
        assert batcher.queue_depth == 0
        gate.release.set()
        first.result()
    # Only the blocked batch ran: none of the cancelled call's 500 rows were computed.
    assert all(1 not in b[:, 0] for b in gate.batches)
    with pytest.raises(Cancelled):
        batcher.submit(_rows(2, 1), token)  # an already-cancelled token fails fast
    batcher.close()


def test_close_fails_waiting_callers_with_unavailable() -> None:
    gate = _Gate()
    watch = _DepthWatch(target=5)
    batcher = DynamicBatcher(
        "m",
        gate,
        num_outputs=2,
        max_batch_size=4,
        options=BatcherOptions(max_delay_s=0.0),
        observer=watch,
    )
    with ThreadPoolExecutor(3) as pool:
        first = pool.submit(batcher.submit, _rows(0, 1))
        gate.entered.wait()
        waiting = pool.submit(batcher.submit, _rows(1, 5))
        assert watch.reached.wait(10)
        closer = pool.submit(batcher.close)
        gate.release.set()
        closer.result()
        first.result()
        with pytest.raises(Unavailable, match="unloaded or the server is stopping"):
            waiting.result()
    with pytest.raises(Unavailable):
        batcher.submit(_rows(2, 1))


def test_forward_errors_reach_every_caller_in_the_batch(tmp_path: Path) -> None:
    def broken(x: np.ndarray) -> np.ndarray:
        raise ValueError("boom")

    batcher = DynamicBatcher("m", broken, num_outputs=2, max_batch_size=8)
    try:
        with pytest.raises(BackendFailed, match="ValueError: boom"):
            batcher.submit(_rows(0, 20))
        assert batcher.queue_depth == 0
    finally:
        batcher.close()


def test_a_lone_caller_pays_no_fill_delay_but_concurrent_callers_still_merge() -> None:
    """With a fill delay far longer than the test, a lone caller's rows run at once (nobody
    else will send rows); rows of two threads that meet in the queue wait for each other."""
    gate = _Gate()
    watch = _DepthWatch(target=3)
    batcher = DynamicBatcher(
        "m",
        gate,
        num_outputs=2,
        max_batch_size=64,
        options=BatcherOptions(max_delay_s=3600.0),
        observer=watch,
    )
    try:
        gate.release.set()
        alone = threading.Thread(target=lambda: [batcher.submit(_rows(0, 4)) for _ in range(3)])
        alone.start()
        alone.join(timeout=60)  # an hour-long delay per forward would never get here
        assert not alone.is_alive()
        assert [len(b) for b in gate.batches] == [4, 4, 4]
        # Now two threads: the first one's batch is held in the forward; the second submits
        # while it runs (the model is shared), then a third: they wait and merge.
        gate.release.clear()
        gate.entered.clear()
        with ThreadPoolExecutor(3) as pool:
            first = pool.submit(batcher.submit, _rows(1, 2))
            assert gate.entered.wait(10)
            second = pool.submit(batcher.submit, _rows(2, 1))
            third = pool.submit(batcher.submit, _rows(3, 2))
            assert watch.reached.wait(10)  # 3 rows of two callers queued behind the forward
            gate.release.set()
            first.result(10)
            # The delay is an hour: the merged batch runs only because it is closed out.
            batcher.close(drain=True, timeout=10)
            np.testing.assert_array_equal(second.result(10), _rows(2, 1))
            np.testing.assert_array_equal(third.result(10), _rows(3, 2))
        assert [len(b) for b in gate.batches] == [4, 4, 4, 2, 3]
    finally:
        batcher.close()


class _Direct:
    """A `direct` forward that records each call's thread and token, blocking while gated."""

    def __init__(self) -> None:
        self.gate = _Gate()
        self.gate.release.set()
        self.threads: list[int] = []
        self.tokens: list[CancelToken | None] = []

    def __call__(self, x: np.ndarray, cancel: CancelToken | None) -> np.ndarray:
        self.threads.append(threading.get_ident())
        self.tokens.append(cancel)
        return self.gate(x)


def test_a_lone_caller_runs_its_own_rows_and_others_still_merge_behind_it() -> None:
    """With `direct`, a lone caller's rows never visit the worker: they run on the caller's
    thread with its token. Rows that arrive meanwhile go through the worker and merge."""
    worker = _Gate()
    worker.release.set()
    direct = _Direct()
    watch = _DepthWatch(target=3)
    batcher = DynamicBatcher(
        "m",
        worker,
        num_outputs=2,
        max_batch_size=64,
        options=BatcherOptions(max_delay_s=3600.0),
        observer=watch,
        direct=direct,
    )
    try:
        token = CancelToken()
        for caller in range(3):
            np.testing.assert_array_equal(batcher.submit(_rows(caller, 4), token), _rows(caller, 4))
        assert direct.threads == [threading.get_ident()] * 3
        assert direct.tokens == [token] * 3
        assert worker.batches == [] and watch.batch_sizes == [4, 4, 4]
        # Over the max batch size, a call goes through the worker in batches of 64.
        np.testing.assert_array_equal(batcher.submit(_rows(9, 100)), _rows(9, 100))
        assert [len(b) for b in worker.batches] == [64, 36]
        # A lone caller holds a direct forward; two more threads' rows queue behind it (the
        # model is now shared) and wait for each other: the hour-long delay ends only at close.
        direct.gate.release.clear()
        with ThreadPoolExecutor(3) as pool:
            first = pool.submit(batcher.submit, _rows(1, 2))
            assert direct.gate.entered.wait(10)
            second = pool.submit(batcher.submit, _rows(2, 1))
            third = pool.submit(batcher.submit, _rows(3, 2))
            assert watch.reached.wait(10)
            direct.gate.release.set()
            np.testing.assert_array_equal(first.result(10), _rows(1, 2))
            assert batcher.close(drain=True, timeout=10)
            np.testing.assert_array_equal(second.result(10), _rows(2, 1))
            np.testing.assert_array_equal(third.result(10), _rows(3, 2))
        assert [len(b) for b in worker.batches] == [64, 36, 3]
        assert len(direct.threads) == 4
    finally:
        batcher.close()


def test_a_direct_forward_fails_like_a_batched_one_and_close_waits_for_it() -> None:
    def failing(x: np.ndarray, cancel: CancelToken | None) -> np.ndarray:
        if x[0, 0] == 0:
            raise ValueError("boom")
        raise Cancelled("the caller left")

    batcher = DynamicBatcher("m", _identity_logits, num_outputs=2, max_batch_size=8, direct=failing)
    with pytest.raises(BackendFailed, match="ValueError: boom"):
        batcher.submit(_rows(0, 2))
    with pytest.raises(Cancelled, match="the caller left"):
        batcher.submit(_rows(1, 2))
    batcher.close()

    direct = _Direct()
    direct.gate.release.clear()
    batcher = DynamicBatcher("m", _identity_logits, num_outputs=2, max_batch_size=8, direct=direct)
    with ThreadPoolExecutor(1) as pool:
        running = pool.submit(batcher.submit, _rows(5, 3))
        assert direct.gate.entered.wait(10)
        # close() reports the forward still running on the caller's thread past its timeout...
        assert not batcher.close(drain=True, timeout=0.05)
        with pytest.raises(Unavailable):
            batcher.submit(_rows(6, 1))
        direct.gate.release.set()
        # ...and the call it let start finishes with its own rows.
        np.testing.assert_array_equal(running.result(10), _rows(5, 3))
    assert batcher.close(timeout=10)
