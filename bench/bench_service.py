"""End-to-end cost of the service: an exact profile over loopback gRPC vs the in-process engine.

Both sides run the same exact 4x4-grid profile (65,536 forwards) of the same input on the same
loaded model (the server's own registry and batcher), alternating, in one process. The ratio is
what the gRPC layer, the converters and the thread hand-off add on top of the engine.

    python bench/bench_service.py [--rounds 5] [--grid 4x4]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import grpc
import numpy as np

from interscope.codec import to_tensor
from interscope.v1 import analysis_pb2, analysis_pb2_grpc
from interscope_server.analysis.players import GridPlayers
from interscope_server.analysis.profile import EstimatorChoice, ProfileSpec, run_profile
from interscope_server.config import Settings
from interscope_server.demo import TEST_DATA_FILE, build_demo_repository
from interscope_server.server import BackgroundServer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--grid", default="4x4")
    parser.add_argument("--model", default="digits-cnn")
    parser.add_argument(
        "--repository", type=Path, default=Path(tempfile.gettempdir()) / "interscope-bench-repo"
    )
    args = parser.parse_args()
    rows, cols = (int(v) for v in args.grid.split("x"))
    repository = build_demo_repository(args.repository)
    with np.load(repository / TEST_DATA_FILE) as data:
        x, y = data["x"][:1], data["y"][:1]
    settings = Settings(host="127.0.0.1", port=0, metrics_port=None, model_repository=repository)
    request = analysis_pb2.ProfileRequest(
        model=args.model,
        inputs=to_tensor(x),
        labels=[int(y[0])],
        spec=analysis_pb2.InteractionSpec(
            players=analysis_pb2.PlayerSpec(grid=analysis_pb2.GridPlayers(rows=rows, cols=cols)),
            estimator=analysis_pb2.ESTIMATOR_KIND_EXACT,
        ),
    )
    n = rows * cols
    spec = ProfileSpec(
        players=GridPlayers(rows, cols),
        estimator=EstimatorChoice.EXACT,
        orders=tuple(range(n - 1)),
    )
    with BackgroundServer(settings) as srv, grpc.insecure_channel(srv.address) as channel:
        assert srv.server is not None
        model = srv.server.registry.get(args.model)
        stub = analysis_pb2_grpc.AnalysisServiceStub(channel)

        def over_grpc() -> np.ndarray:
            events = list(stub.Profile(request))
            return np.array(events[-1].result.profiles[0].mean_abs)

        def in_process() -> np.ndarray:
            return run_profile(model.evaluate, x[0], spec, int(y[0])).mean_abs

        np.testing.assert_allclose(over_grpc(), in_process(), rtol=1e-9)  # warm-up, same answer
        times: dict[str, list[float]] = {"grpc": [], "engine": []}
        for _ in range(args.rounds):
            for name, run in (("engine", in_process), ("grpc", over_grpc)):
                started = time.perf_counter()
                run()
                times[name].append(time.perf_counter() - started)
    grpc_s, engine_s = statistics.median(times["grpc"]), statistics.median(times["engine"])
    print(
        f"exact profile, {rows}x{cols} grid ({2**n} forwards), {args.model}, median of "
        f"{args.rounds} rounds"
    )
    print(f"  in-process engine : {engine_s:7.3f} s")
    print(f"  over loopback gRPC: {grpc_s:7.3f} s")
    print(f"  ratio grpc/engine : {grpc_s / engine_s:7.3f}   (target <= 1.10)")


if __name__ == "__main__":
    main()
