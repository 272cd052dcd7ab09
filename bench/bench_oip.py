"""Remote-backend benchmark: forwards/s of one model through interscope, loaded locally and
through a real Open Inference Protocol server (MLServer), side by side in one run.

Starts MLServer (its venv under .cache/, built on first use by the test helper) serving the demo
digits-cnn ONNX file, and one interscope replica whose repository holds the same model twice:
`digits-cnn` (onnxruntime in process) and `digits-remote` (format oip, pointing at MLServer).
Each round runs the same exact Profile on both, alternating, so machine noise hits both alike;
it also times MLServer alone (ModelInfer with our stubs, no interscope) on the same batches, to
show which part of the remote cost is MLServer's. Prints forwards/s and the ratio remote/local.

    python bench/bench_oip.py                  # 3 rounds, 4x4 grid (65,536 forwards per input)
    python bench/bench_oip.py --rounds 5 --grid 3x4 --remote-batch 256 --concurrency 4
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import grpc
import numpy as np

import interscope
from interscope.oip.v2 import grpc_predict_v2_pb2 as pb
from interscope.oip.v2 import grpc_predict_v2_pb2_grpc as pb_grpc
from interscope_server.config import Settings
from interscope_server.demo import TEST_DATA_FILE, build_demo_repository
from interscope_server.server import BackgroundServer

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests" / "server" / "models"))
from oip_mlserver import RemoteModel, mlserver  # noqa: E402  (the tests' MLServer launcher)


def _profile_rate(
    client: interscope.Client, model: str, x: np.ndarray, grid: tuple[int, int]
) -> float:
    started = time.perf_counter()
    result = client.profile(model=model, x=x, grid=grid, estimator="exact")
    seconds = time.perf_counter() - started
    assert result.provenance is not None
    return result.provenance.forwards / seconds


def _mlserver_rate(remote: RemoteModel, x: np.ndarray, batch: int, rows: int) -> float:
    """ModelInfer calls of `batch` rows straight to MLServer, one at a time: its own rate."""
    with grpc.insecure_channel(remote.url) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        chunk = np.ascontiguousarray(np.resize(x, (batch, *x.shape[1:])), dtype=np.float32)
        request = pb.ModelInferRequest(
            model_name=remote.name,
            model_version=remote.version,
            inputs=[
                pb.ModelInferRequest.InferInputTensor(
                    name="input", datatype="FP32", shape=list(chunk.shape)
                )
            ],
            raw_input_contents=[chunk.tobytes()],
        )
        calls = max(1, rows // batch)
        started = time.perf_counter()
        for _ in range(calls):
            stub.ModelInfer(request, timeout=60)
        return calls * batch / (time.perf_counter() - started)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--grid", default="4x4", help="players RxC of the exact profile")
    parser.add_argument("--inputs", type=int, default=1, help="digits profiled per call")
    parser.add_argument("--remote-batch", type=int, default=256, help="rows per ModelInfer")
    parser.add_argument("--concurrency", type=int, default=2, help="ModelInfers in flight")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    grid_rows, grid_cols = (int(v) for v in args.grid.split("x"))
    demo = build_demo_repository(ROOT / ".cache" / "demo-repository")
    with np.load(demo / TEST_DATA_FILE) as data:
        x = data["x"][: args.inputs]
    local: list[float] = []
    remote_rates: list[float] = []
    direct: list[float] = []
    with (
        mlserver(demo / "digits-cnn" / "model.onnx") as remote,
        tempfile.TemporaryDirectory(prefix="bench-oip-") as tmp,
    ):
        repo = Path(tmp)
        shutil.copytree(demo / "digits-cnn", repo / "digits-cnn")
        config = json.loads((demo / "digits-cnn" / "config.json").read_text())
        config.update(name="digits-remote", format="oip", file="", input={})
        config["oip"] = {
            "url": remote.url,
            "model": remote.name,
            "version": remote.version,
            "max_batch_size": args.remote_batch,
            "max_concurrency": args.concurrency,
        }
        config["max_batch_size"] = args.remote_batch * args.concurrency
        (repo / "digits-remote").mkdir()
        (repo / "digits-remote" / "config.json").write_text(json.dumps(config))
        settings = Settings(host="127.0.0.1", port=0, metrics_port=None, model_repository=repo)
        with BackgroundServer(settings) as server, interscope.Client(server.address) as client:
            grid = (grid_rows, grid_cols)
            # One untimed round at full size: first large batches allocate (both paths).
            _profile_rate(client, "digits-cnn", x, grid)
            _profile_rate(client, "digits-remote", x, grid)
            for round_ in range(args.rounds):
                local.append(_profile_rate(client, "digits-cnn", x, grid))
                remote_rates.append(_profile_rate(client, "digits-remote", x, grid))
                direct.append(
                    _mlserver_rate(remote, x, args.remote_batch, 2 ** (grid_rows * grid_cols))
                )
                print(
                    f"round {round_ + 1}: local {local[-1]:,.0f}/s, "
                    f"remote {remote_rates[-1]:,.0f}/s, MLServer alone {direct[-1]:,.0f}/s"
                )
    figures = {
        "grid": args.grid,
        "remote_batch": args.remote_batch,
        "concurrency": args.concurrency,
        "local_forwards_per_s": statistics.median(local),
        "remote_forwards_per_s": statistics.median(remote_rates),
        "mlserver_alone_forwards_per_s": statistics.median(direct),
    }
    figures["remote_over_local"] = (
        figures["remote_forwards_per_s"] / figures["local_forwards_per_s"]
    )
    figures["remote_over_mlserver_alone"] = (
        figures["remote_forwards_per_s"] / figures["mlserver_alone_forwards_per_s"]
    )
    print(
        f"median over {args.rounds} rounds: local {figures['local_forwards_per_s']:,.0f} "
        f"forwards/s, remote {figures['remote_forwards_per_s']:,.0f} forwards/s "
        f"(ratio {figures['remote_over_local']:.3f}); MLServer alone "
        f"{figures['mlserver_alone_forwards_per_s']:,.0f}/s (remote through interscope / "
        f"alone {figures['remote_over_mlserver_alone']:.3f})"
    )
    if args.json is not None:
        args.json.write_text(json.dumps(figures, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
