"""Load benchmark: concurrent Profile streams against one server process for a fixed time.

Starts `serve()` in a child process (so its memory is measured alone), measures the raw
onnxruntime batched forward rate of the same model in this process first, then runs `--streams`
concurrent Profile streams (small exact profiles, many calls each) for `--duration` seconds and
prints errors, latency percentiles, forwards per second against the raw rate, and the server's
RSS from start to end.

    python bench/bench_load.py                       # 32 streams, 60 s, digits-cnn
    python bench/bench_load.py --duration 10 --json out.json
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import grpc
import numpy as np
import onnxruntime as ort

from interscope.codec import to_tensor
from interscope.v1 import analysis_pb2, analysis_pb2_grpc
from interscope_server.demo import TEST_DATA_FILE, build_demo_repository

ROOT = Path(__file__).resolve().parent.parent

SERVE = """
import sys
from interscope_server.config import Settings
from interscope_server.server import serve
serve(Settings(host="127.0.0.1", port=0, metrics_port=None, model_repository=sys.argv[1],
               load_models=[sys.argv[2]], log_level="WARNING"))
"""


@dataclass
class Report:
    streams: int
    duration_s: float
    model: str
    players: int
    calls: int = 0
    errors: dict[str, int] = field(default_factory=dict)
    p50_ms: float = 0.0
    p99_ms: float = 0.0
    max_ms: float = 0.0
    forwards_per_s: float = 0.0
    raw_forwards_per_s: float = 0.0
    rss_start_mib: float = 0.0
    rss_warm_mib: float = 0.0
    rss_end_mib: float = 0.0


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


def raw_rate(model_file: Path, batch: int, seconds: float = 3.0) -> float:
    """Rows per second of onnxruntime alone on full batches (the batcher's ceiling)."""
    session = ort.InferenceSession(str(model_file), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    shape = [batch, *session.get_inputs()[0].shape[1:]]
    x = np.random.default_rng(0).uniform(0, 1, shape).astype(np.float32)
    session.run(None, {name: x})
    rows, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        session.run(None, {name: x})
        rows += batch
    return rows / (time.perf_counter() - started)


async def load(
    address: str, request: analysis_pb2.ProfileRequest, streams: int, duration: float,
    warm: float, on_warm: asyncio.Event,
) -> tuple[list[float], collections.Counter[str], int]:  # fmt: skip
    latencies: list[float] = []
    errors: collections.Counter[str] = collections.Counter()
    forwards = 0
    async with grpc.aio.insecure_channel(address) as channel:
        stub = analysis_pb2_grpc.AnalysisServiceStub(channel)
        started = time.perf_counter()
        measure_from = started + warm
        end = measure_from + duration

        async def stream() -> None:
            nonlocal forwards
            while (now := time.perf_counter()) < end:
                try:
                    last = None
                    async for event in stub.Profile(request, timeout=30):
                        last = event
                    ok = last is not None and last.WhichOneof("event") == "result"
                    if now >= measure_from:
                        if not ok:
                            errors["no result"] += 1
                        else:
                            latencies.append(time.perf_counter() - now)
                            forwards += last.result.provenance.forwards  # type: ignore[union-attr]
                except grpc.aio.AioRpcError as exc:
                    if now >= measure_from:
                        errors[exc.code().name] += 1
                if not on_warm.is_set() and time.perf_counter() >= measure_from:
                    on_warm.set()

        await asyncio.gather(*(stream() for _ in range(streams)))
    return latencies, errors, forwards


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=60.0, help="measured seconds")
    parser.add_argument("--warmup", type=float, default=5.0, help="unmeasured seconds first")
    parser.add_argument("--streams", type=int, default=32)
    parser.add_argument("--model", default="digits-cnn")
    parser.add_argument("--grid", default="2x3", help="players, rows x cols (exact estimator)")
    parser.add_argument("--repository", type=Path, default=ROOT / ".cache" / "demo-repository")
    parser.add_argument("--json", type=Path, help="also write the report here")
    args = parser.parse_args()

    repository = build_demo_repository(args.repository)
    rows, cols = (int(v) for v in args.grid.split("x"))
    with np.load(repository / TEST_DATA_FILE) as data:
        x = data["x"][:1]
    config = json.loads((repository / args.model / "config.json").read_text())
    request = analysis_pb2.ProfileRequest(
        model=args.model,
        inputs=to_tensor(x),
        class_choice=analysis_pb2.CLASS_CHOICE_PREDICTED,
        spec=analysis_pb2.InteractionSpec(
            players=analysis_pb2.PlayerSpec(grid=analysis_pb2.GridPlayers(rows=rows, cols=cols)),
            estimator=analysis_pb2.ESTIMATOR_KIND_EXACT,
        ),
    )
    report = Report(args.streams, args.duration, args.model, rows * cols)
    print(f"raw onnxruntime rate, batch {config['max_batch_size']} ...", flush=True)
    report.raw_forwards_per_s = raw_rate(
        repository / args.model / config["file"], config["max_batch_size"]
    )

    server = subprocess.Popen(
        [sys.executable, "-c", SERVE, str(repository), args.model],
        stdout=subprocess.PIPE,
        text=True,
        cwd=ROOT,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    try:
        assert server.stdout is not None
        for line in server.stdout:
            if line.startswith("interscope listening on "):
                address = line.split()[-1]
                break
        else:
            raise SystemExit(f"server exited with {server.wait()}")
        report.rss_start_mib = rss_mib(server.pid)
        print(
            f"{args.streams} streams x {args.duration:g} s on {address} "
            f"({args.warmup:g} s warm-up) ...",
            flush=True,
        )

        async def run() -> tuple[list[float], collections.Counter[str], int]:
            warm = asyncio.Event()

            async def sample_warm_rss() -> None:
                await warm.wait()
                report.rss_warm_mib = rss_mib(server.pid)

            sampler = asyncio.create_task(sample_warm_rss())
            result = await load(address, request, args.streams, args.duration, args.warmup, warm)
            sampler.cancel()
            return result

        latencies, errors, forwards = asyncio.run(run())
        report.rss_end_mib = rss_mib(server.pid)
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(30)
        if server.stdout is not None:
            server.stdout.close()

    lat = np.array(latencies) * 1000
    report.calls = len(latencies)
    report.errors = dict(errors)
    if lat.size:
        report.p50_ms = float(np.percentile(lat, 50))
        report.p99_ms = float(np.percentile(lat, 99))
        report.max_ms = float(lat.max())
    report.forwards_per_s = forwards / args.duration
    growth_warm = 100 * (report.rss_end_mib / max(report.rss_warm_mib, 1e-9) - 1)
    growth_start = 100 * (report.rss_end_mib / report.rss_start_mib - 1)
    print(
        f"""
calls            {report.calls} ({report.calls / args.duration:.1f}/s), errors {sum(errors.values())} {report.errors or ""}
latency          p50 {report.p50_ms:.1f} ms, p99 {report.p99_ms:.1f} ms, max {report.max_ms:.1f} ms
forwards/s       {report.forwards_per_s:,.0f} served vs {report.raw_forwards_per_s:,.0f} raw onnxruntime ({100 * report.forwards_per_s / report.raw_forwards_per_s:.0f}%)
server RSS (MiB) {report.rss_start_mib:.0f} idle, {report.rss_warm_mib:.0f} after warm-up, {report.rss_end_mib:.0f} at end: {growth_warm:+.1f}% since warm-up, {growth_start:+.1f}% since idle"""  # noqa: E501
    )
    if args.json:
        args.json.write_text(json.dumps(asdict(report), indent=2) + "\n")


if __name__ == "__main__":
    main()
