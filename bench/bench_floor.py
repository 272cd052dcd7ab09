"""The per-call floor: tiny calls against a health check on the same server, and Square through
the server against torchattacks' Square in-process on the same model.

Run from the repository root: `python bench/bench_floor.py [--hosts process|inline]`. The server
is `interscope serve` in a subprocess (the product's defaults: models in host processes unless
`--hosts inline`), the clients are the SDK over loopback; every ratio is of two things measured
in this one run.

- (a) one client, sequential calls: the median round trip of a 4-player exact Profile (17
  forwards of the demo CNN), of ListModels and of a health check, in 10 rounds of each in turn;
  in the same rounds, the Profile and health check on a second server whose small calls run on
  worker threads (INTERSCOPE_LOOP_CALL_FORWARDS=0) rather than on the event loop;
- (b) 8 client processes for a fixed time each: calls/s of tiny Profiles against calls/s of
  health checks from the same 8 processes;
- (c) Square L-inf on 100 digits with 1000 queries each, through the server (the CLI's path)
  against torchattacks.Square in this process on the same TorchScript model: time and robust
  accuracy (`pip install --no-deps torchattacks`); through a server with the defaults and
  through a second one started with INTERSCOPE_RUNTIME_SPINNING=true (the hosts' thread pools
  spin between forwards; see interscope_server.openmp for what that costs on a shared machine).
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from bench_attacks import load_torchscript

import interscope
from interscope_server.demo import TEST_DATA_FILE, build_demo_repository

ROOT = Path(__file__).resolve().parent.parent
CLIENTS = 8
ROUNDS = 10  # of (a)


def start_server(
    repository: Path, hosts: str, extra_env: dict[str, str] | None = None
) -> tuple[subprocess.Popen[bytes], str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {
        **os.environ,
        **(extra_env or {}),
        "INTERSCOPE_HOST": "127.0.0.1",
        "INTERSCOPE_PORT": str(port),
        "INTERSCOPE_METRICS_PORT": "0",
        "INTERSCOPE_MODEL_REPOSITORY": str(repository),
        "INTERSCOPE_MODEL_HOSTS": hosts,
    }
    server = subprocess.Popen(
        [sys.executable, "-m", "interscope.cli", "serve"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    address = f"127.0.0.1:{port}"
    with interscope.Client(address) as client:
        deadline = time.monotonic() + 180
        while True:
            try:
                if all(m.state == "ready" for m in client.list_models()):
                    break
            except interscope.InterscopeError:
                pass
            if time.monotonic() > deadline or server.poll() is not None:
                raise SystemExit("the server did not become ready")
            time.sleep(0.2)
    return server, address


def median_ms(call: Callable[[], object], n: int) -> float:
    for _ in range(10):
        call()
    times = []
    for _ in range(n):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def tiny_profile(client: interscope.Client, x: np.ndarray, y: np.ndarray) -> object:
    return client.profile(model="digits-cnn", x=x, label=y, grid=(2, 2), estimator="exact")


def load_client(address: str, kind: str, seconds: float, start: Any, queue: Any) -> None:
    """One client process: as many calls of `kind` as it can make in `seconds`, begun when
    every client has imported and made its first call (`start`, a barrier)."""
    repository = build_demo_repository(ROOT / ".cache" / "demo-repository")
    with np.load(repository / TEST_DATA_FILE) as data:
        x, y = data["x"][:1], data["y"][:1]
    with interscope.Client(address) as client:
        call: Callable[[], object] = (
            client.health if kind == "health" else (lambda: tiny_profile(client, x, y))
        )
        call()
        start.wait()  # no client is still importing (CPU the others would lose) when timing
        done, began = 0, time.perf_counter()
        while time.perf_counter() - began < seconds:
            call()
            done += 1
        queue.put(done / (time.perf_counter() - began))


def concurrent_rate(address: str, kind: str, seconds: float) -> float:
    context = multiprocessing.get_context("spawn")
    start, queue = context.Barrier(CLIENTS), context.Queue()
    procs = [
        context.Process(target=load_client, args=(address, kind, seconds, start, queue))
        for _ in range(CLIENTS)
    ]
    for p in procs:
        p.start()
    rates = [queue.get() for _ in procs]
    for p in procs:
        p.join()
    return sum(rates)


#: Small calls on worker threads, as before the loop lane (interscope_server.api.call).
LOOP_OFF_ENV = {"INTERSCOPE_LOOP_CALL_FORWARDS": "0"}
#: What an operator may set on a machine whose cores are theirs (interscope_server.openmp).
SPIN_ENV = {"INTERSCOPE_RUNTIME_SPINNING": "true"}


def square(addresses: dict[str, str], repository: Path, queries: int, eps: float) -> None:
    """Square through each server in `addresses` (label -> address) and torchattacks' Square
    in this process, in rounds that rotate which goes first; each ratio is per round."""
    import torchattacks  # bench-only comparison

    with np.load(repository / TEST_DATA_FILE) as data:
        x, y = data["x"][:100], data["y"][:100]
    model = load_torchscript(repository / "digits-cnn-ts" / "model.pt")
    reference = torchattacks.Square(model, eps=eps, n_queries=queries, seed=0)
    x_t, y_t = torch.from_numpy(x), torch.from_numpy(y)

    def theirs() -> float:
        adv = reference(x_t, y_t)
        with torch.no_grad():
            return float((model(adv).argmax(dim=1) == y_t).float().mean())

    clients = {label: interscope.Client(address) for label, address in addresses.items()}

    def through(client: interscope.Client) -> Callable[[], float]:
        def ours() -> float:
            result = client.attack(
                model="digits-cnn-ts",
                x=x,
                y=y,
                attack="square",
                eps=eps,
                query_budget=queries,
                omit_adversarial=True,
            )
            return result.robust_accuracy

        return ours

    runs = {**{label: through(c) for label, c in clients.items()}, "torchattacks": theirs}
    for run in runs.values():
        run()  # warm-up
    labels = list(runs)
    timed: dict[str, list[tuple[float, float]]] = {label: [] for label in labels}
    for i in range(3):
        for label in labels[i % len(labels) :] + labels[: i % len(labels)]:
            began = time.perf_counter()
            accuracy = runs[label]()
            timed[label].append((time.perf_counter() - began, accuracy))
    for client in clients.values():
        client.close()
    base = [t for t, _ in timed["torchattacks"]]
    print(
        f"(c) Square L-inf eps {eps}, {queries} queries, 100 digits, digits-cnn-ts; "
        f"torchattacks in-process {statistics.median(base):.2f} s "
        f"(robust accuracy {timed['torchattacks'][-1][1]:.2f}); through the server:"
    )
    for label in addresses:
        times = [t for t, _ in timed[label]]
        ratio = statistics.median(t / b for t, b in zip(times, base, strict=True))
        print(
            f"    {label}: {statistics.median(times):.2f} s (robust accuracy "
            f"{timed[label][-1][1]:.2f}) = {ratio:.2f}x (median of 3 rounds)"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--hosts", choices=["process", "inline"], default="process")
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--calls", type=int, default=300)
    parser.add_argument("--skip-square", action="store_true")
    args = parser.parse_args()
    repository = build_demo_repository(ROOT / ".cache" / "demo-repository")
    with np.load(repository / TEST_DATA_FILE) as data:
        x, y = data["x"][:1], data["y"][:1]
    server, address = start_server(repository, args.hosts)
    try:
        print(f"server: interscope serve, models in {args.hosts} hosts; SDK over loopback")
        # A second server with small calls on worker threads (INTERSCOPE_LOOP_CALL_FORWARDS=0,
        # the previous behaviour), measured in the same rounds: what the loop lane gives.
        off, off_address = start_server(repository, args.hosts, LOOP_OFF_ENV)
        try:
            with interscope.Client(address) as client, interscope.Client(off_address) as other:
                # Rounds of each call in turn, so a change in the machine's speed (its
                # neighbours) moves both sides of a round's ratio alike.
                per_round = max(args.calls // ROUNDS, 10)
                rounds = [
                    (
                        median_ms(client.health, per_round),
                        median_ms(client.list_models, per_round),
                        median_ms(lambda: tiny_profile(client, x, y), per_round),
                        median_ms(other.health, per_round),
                        median_ms(lambda: tiny_profile(other, x, y), per_round),
                    )
                    for _ in range(ROUNDS)
                ]
        finally:
            off.terminate()
            off.wait(30)
        health, listing, profile, _, off_profile = (
            statistics.median(r[k] for r in rounds) for k in range(5)
        )
        ratio = statistics.median(r[2] / r[0] for r in rounds)
        off_ratio = statistics.median(r[4] / r[3] for r in rounds)
        print(
            f"(a) median round trip: health {health:.2f} ms, ListModels {listing:.2f} ms, "
            f"4-player exact Profile {profile:.2f} ms = {ratio:.1f}x health (median of "
            f"{ROUNDS} rounds' ratios); with small calls on worker threads instead of the "
            f"event loop {off_profile:.2f} ms = {off_ratio:.1f}x its server's health check"
        )
        health_rate = concurrent_rate(address, "health", args.seconds)
        profile_rate = concurrent_rate(address, "profile", args.seconds)
        print(
            f"(b) {CLIENTS} client processes: {profile_rate:,.0f} tiny Profiles/s against "
            f"{health_rate:,.0f} health checks/s = {profile_rate / health_rate:.2f}x"
        )
        if not args.skip_square:
            spinning, spin_address = start_server(repository, args.hosts, SPIN_ENV)
            try:
                addresses = {"defaults": address, "runtime_spinning": spin_address}
                square(addresses, repository, queries=1000, eps=0.1)
            finally:
                spinning.terminate()
                spinning.wait(30)
    finally:
        server.terminate()
        server.wait(30)


if __name__ == "__main__":
    main()
