"""Dynamic batcher benchmark: concurrent small streams vs one large stream, and per-call overhead.

Run: python bench/bench_batcher.py [--rows-per-call 32] [--calls 64] [--streams 8]

All figures come from one run on one machine, side by side, on the demo ONNX model:
  A. `streams` threads, each sending `calls` calls of `rows-per-call` rows through the batcher;
  B. one thread sending the same rows in calls of max_batch_size rows straight to the backend
     (the best a single well-batched client can do); target: A >= 0.8 x B in rows/s;
  C. per-call latency of small calls from a single caller, through the batcher vs direct;
  D. the same lone caller on a model host process (the server's default), with the caller
     running its own rows (the batcher's `direct` path) vs handing them to the batcher's worker
     thread and waiting for it (the path every forward took before), alternating rounds.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path

import numpy as np

from interscope_server.cancel import CancelToken
from interscope_server.demo import build_demo_repository
from interscope_server.models import (
    BackendOptions,
    BatcherOptions,
    DynamicBatcher,
    ModelRepository,
    OnnxBackend,
)
from interscope_server.models.host import HostedBackend, HostOptions


def _throughput(run: Callable[[], None], rows: int, repeats: int) -> float:
    """Best-of-`repeats` rows per second (best, because the CPU is shared with other work)."""
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        run()
        best = min(best, time.perf_counter() - started)
    return rows / best


def _latency_us(call: Callable[[], object], n: int) -> float:
    samples = []
    for _ in range(n):
        started = time.perf_counter()
        call()
        samples.append(time.perf_counter() - started)
    return statistics.median(samples) * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--streams", type=int, default=8)
    parser.add_argument("--calls", type=int, default=64)
    parser.add_argument("--rows-per-call", type=int, default=32)
    parser.add_argument("--max-batch", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=0, help="onnxruntime intra-op threads")
    parser.add_argument(
        "--repository",
        type=Path,
        default=Path(__file__).resolve().parents[1] / ".cache/demo-repository",
    )
    args = parser.parse_args()

    root = build_demo_repository(args.repository)
    repository = ModelRepository(root)
    config = repository.read_config("digits-cnn").model_copy(
        update={"max_batch_size": args.max_batch}
    )
    backend = OnnxBackend(
        config,
        repository.model_file(config),
        BackendOptions(device="cpu", intra_op_threads=args.threads),
    )
    rng = np.random.default_rng(0)
    total = args.streams * args.calls * args.rows_per_call
    data = rng.uniform(0, 1, (total, *config.input.shape)).astype(np.float32)
    per_stream = data.reshape(args.streams, args.calls, args.rows_per_call, *config.input.shape)

    def direct_large() -> None:
        for start in range(0, total, args.max_batch):
            backend.forward(data[start : start + args.max_batch])

    direct_large()  # warm-up: first runs pay for allocations and onnxruntime's lazy init
    batchers = {
        delay_ms: DynamicBatcher(
            "digits-cnn",
            backend.forward,
            num_outputs=backend.num_classes,
            max_batch_size=args.max_batch,
            options=BatcherOptions(max_delay_s=delay_ms / 1000),
        )
        for delay_ms in (0.0, 2.0)
    }
    pool = ThreadPoolExecutor(args.streams)

    def streams(b: DynamicBatcher) -> None:
        def one(s: int) -> None:
            for c in range(args.calls):
                b.submit(per_stream[s, c])

        list(pool.map(one, range(args.streams)))

    def large_via_batcher(b: DynamicBatcher) -> None:
        for start in range(0, total, args.max_batch):
            b.submit(data[start : start + args.max_batch])

    setups: dict[str, Callable[[], None]] = {
        "B  1 stream, batches of max size, backend directly": direct_large,
    }
    for delay_ms, b in batchers.items():
        label = (
            f"A  {args.streams} streams of {args.rows_per_call}-row calls, batcher {delay_ms:g} ms"
        )
        setups[label] = partial(streams, b)
        setups[f"B' 1 stream, batches of max size, batcher {delay_ms:g} ms"] = partial(
            large_via_batcher, b
        )
    # Interleave the setups round by round and keep each one's best round: the CPU is shared, so
    # load from other processes hits every setup alike instead of whichever ran at a bad moment.
    best = dict.fromkeys(setups, 0.0)
    for _ in range(args.repeats):
        for label, run in setups.items():
            best[label] = max(best[label], _throughput(run, total, 1))
    rows_direct = best["B  1 stream, batches of max size, backend directly"]
    print(
        f"demo CNN, {os.cpu_count()} CPUs, {total} rows; "
        f"{args.streams} streams x {args.calls} calls x {args.rows_per_call} rows; "
        f"max batch {args.max_batch}; best of {args.repeats} interleaved rounds\n"
    )
    print(f"{'setup':58s} {'rows/s':>10s} {'vs B':>6s}")
    for label, rate in best.items():
        print(f"{label:58s} {rate:10.0f} {rate / rows_direct:6.2f}")

    lat_rows = []
    for rows in (1, args.rows_per_call):
        x = data[:rows]
        direct = _latency_us(partial(backend.forward, x), 300)
        batched = _latency_us(partial(batchers[0.0].submit, x), 300)
        lat_rows.append((rows, direct, batched))
    for b in batchers.values():
        b.close()
    pool.shutdown()

    header = "per-call latency, 1 caller, batcher 0 ms"
    print(f"\n{header:42s} {'direct':>9s} {'batcher':>9s} {'+us':>7s}")
    for rows, direct, batched in lat_rows:
        print(
            f"{f'{rows} row(s) per call':42s} {direct:9.0f} {batched:9.0f} {batched - direct:7.0f}"
        )
    print("(median microseconds; with a max delay d > 0 a lone caller also waits up to d)")
    _host_hop(repository, data, args.threads)


def _host_hop(repository: ModelRepository, data: np.ndarray, threads: int) -> None:
    """D: a lone caller's small calls on a model host, own thread vs the batcher's worker."""
    config = repository.read_config("digits-cnn")
    hosted = HostedBackend(
        config,
        repository.model_file(config),
        BackendOptions(device="cpu", intra_op_threads=threads),
        HostOptions(),
    )
    batchers = {
        label: DynamicBatcher(
            "digits-cnn",
            hosted.forward_checked,
            num_outputs=hosted.num_classes,
            max_batch_size=config.max_batch_size,
            direct=direct,
        )
        for label, direct in (("own thread", hosted.forward_until), ("worker", None))
    }
    print(
        f"\n{'lone caller, model host process':42s} {'own thr.':>9s} {'worker':>9s} {'saved':>7s}"
    )
    try:
        for rows in (1, 16, 64):
            x = data[:rows]
            rounds: dict[str, list[float]] = {label: [] for label in batchers}
            for _ in range(20):
                for label, b in batchers.items():
                    token = CancelToken()
                    rounds[label].append(_latency_us(partial(b.submit, x, token), 100))
            own, hop = (statistics.median(rounds[label]) for label in batchers)
            print(f"{f'{rows} row(s) per call':42s} {own:9.0f} {hop:9.0f} {hop - own:7.0f}")
    finally:
        for b in batchers.values():
            b.close()
        hosted.close()
    print("(median over 20 alternating rounds of each round's median of 100 calls, microseconds)")


if __name__ == "__main__":
    main()
