"""Model host benchmark: forwards through a host process against the same backend in-process.

Run: python bench/bench_hosts.py [--batch 256] [--calls 40] [--repeats 5] [--threads 1]

All figures come from one run, side by side, on the demo CNNs (ONNX and TorchScript), with
the same thread count in the host and in this process; host and inline runs alternate so
load from other work on the machine hits both alike:
  A. forwards/s at batch `batch`, host / inline (target >= 0.9);
  B. per-call overhead: median latency of a 1-row forward, host minus inline (target <= 0.3 ms);
  C. one white-box step (forward + input gradient of a CE loss) at batch 128, host / inline;
  D. what a host costs to start (fresh interpreter, imports, load, probe) against an inline load.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import numpy as np
import torch

from interscope_server.demo import build_demo_repository
from interscope_server.models import BackendOptions, ModelRepository, open_backend
from interscope_server.models.backend import Backend
from interscope_server.models.host import HostedBackend, HostOptions


def _best_seconds(run: Callable[[], object], calls: int, repeats: int) -> float:
    """Best-of-`repeats` seconds per call (best, because the CPU is shared with other work)."""
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        for _ in range(calls):
            run()
        best = min(best, (time.perf_counter() - started) / calls)
    return best


def _median_seconds(run: Callable[[], object], n: int) -> float:
    samples = []
    for _ in range(n):
        started = time.perf_counter()
        run()
        samples.append(time.perf_counter() - started)
    return statistics.median(samples)


def _step(backend: Backend, x: torch.Tensor, y: torch.Tensor) -> Callable[[], object]:
    module = backend.torch_module()
    assert module is not None

    def run() -> object:
        xv = x.clone().requires_grad_(True)
        loss = torch.nn.functional.cross_entropy(module(xv), y, reduction="sum")
        return torch.autograd.grad(loss, xv)

    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--calls", type=int, default=40)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    root = build_demo_repository(
        Path(__file__).resolve().parent.parent / ".cache" / "demo-repository"
    )
    repository = ModelRepository(root)
    options = BackendOptions(device="cpu", intra_op_threads=args.threads)
    rng = np.random.default_rng(0)
    print(
        f"threads {args.threads}, batch {args.batch}, best of {args.repeats} x {args.calls} calls"
    )
    for name in ("digits-cnn", "digits-cnn-ts"):
        config = repository.read_config(name)
        path = repository.model_file(config)
        started = time.perf_counter()
        hosted = HostedBackend(config, path, options, HostOptions())
        start_host = time.perf_counter() - started
        started = time.perf_counter()
        inline = open_backend(config, path, options)
        # The registry's probe, which the host ran too: TorchScript's profiling executor
        # specialises on the first shapes it sees, so both must see the same ones.
        inline.forward(np.full((1, *config.input.shape), config.value_range[0], np.float32))
        start_inline = time.perf_counter() - started
        x = rng.random((args.batch, *config.input.shape), dtype=np.float32)
        one = x[:1]
        np.testing.assert_array_equal(hosted.forward(x), inline.forward(x))
        a = {"host": 0.0, "inline": 0.0}
        b = {"host": 0.0, "inline": 0.0}
        c = {"host": 0.0, "inline": 0.0}
        xt = torch.from_numpy(x[:128])
        yt = torch.from_numpy(rng.integers(0, len(config.classes), 128))
        for _ in range(2):  # alternate, keep the best of each
            for label, backend in (("host", hosted), ("inline", inline)):
                backend.forward(x)
                per = _best_seconds(partial(backend.forward, x), args.calls, args.repeats)
                a[label] = max(a[label], args.batch / per)
                lat = _median_seconds(partial(backend.forward, one), 20 * args.calls)
                b[label] = lat if not b[label] else min(b[label], lat)
                step = _step(backend, xt, yt)
                step()
                per_step = _best_seconds(step, max(1, args.calls // 4), args.repeats)
                c[label] = per_step if not c[label] else min(c[label], per_step)
        hosted.close()
        inline.close()
        print(f"\n{name} ({config.format})")
        print(
            f"  A. forwards/s at batch {args.batch}: host {a['host']:,.0f}, inline "
            f"{a['inline']:,.0f}: ratio {a['host'] / a['inline']:.3f} (target >= 0.9)"
        )
        print(
            f"  B. 1-row forward: host {b['host'] * 1e3:.3f} ms, inline {b['inline'] * 1e3:.3f} ms"
            f": overhead {(b['host'] - b['inline']) * 1e3:+.3f} ms per call (target <= 0.3 ms)"
        )
        print(
            f"  C. white-box step at batch 128: host {c['host'] * 1e3:.2f} ms, inline "
            f"{c['inline'] * 1e3:.2f} ms: ratio {c['inline'] / c['host']:.3f} of inline speed"
        )
        print(f"  D. start: host {start_host:.2f} s, inline load {start_inline:.2f} s")


if __name__ == "__main__":
    main()
