"""A real Open Inference Protocol server for tests and bench: MLServer in a venv of its own.

MLServer's pins clash with interscope's (protobuf, pydantic, fastapi), so it gets a virtual
environment under the repository's gitignored .cache/, keyed by a hash of its pinned
requirements: built once (about a minute, network needed), reused by every later session.
The server listens on 127.0.0.1 only, on free ports found by binding, and is ready when its
gRPC ModelReady says so.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import grpc

from interscope.oip.v2 import grpc_predict_v2_pb2 as pb
from interscope.oip.v2 import grpc_predict_v2_pb2_grpc as pb_grpc

ROOT = Path(__file__).resolve().parents[3]
HERE = Path(__file__).resolve().parent
#: What MLServer's environment holds; changing a pin builds a fresh one beside the old.
REQUIREMENTS = ("mlserver==1.7.1", "onnxruntime==1.32.0")
RUNTIME_MODULE = "mlserver_onnx_runtime"
_STAMP = ".complete"
#: Never set: its wait() is the readiness poll's interval.
_POLL = threading.Event()


def venv_dir() -> Path:
    key = hashlib.sha256("\n".join(REQUIREMENTS).encode()).hexdigest()[:16]
    return ROOT / ".cache" / f"mlserver-venv-{key}"


def ensure_venv() -> Path:
    """MLServer's venv, built on first use; concurrent sessions serialise on a lock file."""
    venv = venv_dir()
    if (venv / _STAMP).is_file():
        return venv
    venv.parent.mkdir(parents=True, exist_ok=True)
    with (venv.parent / f"{venv.name}.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (venv / _STAMP).is_file():
            return venv
        shutil.rmtree(venv, ignore_errors=True)  # a half-built one from an interrupted session
        env = _clean_env()
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, env=env)
        done = subprocess.run(
            [str(venv / "bin" / "python"), "-m", "pip", "install", "-q", *REQUIREMENTS],
            env=env,
            timeout=900,
            capture_output=True,
            text=True,
        )
        if done.returncode != 0:
            raise RuntimeError(f"building MLServer's venv failed:\n{done.stdout}{done.stderr}")
        (venv / _STAMP).write_text("\n".join(REQUIREMENTS) + "\n")
    return venv


def _clean_env() -> dict[str, str]:
    # Our PYTHONPATH (client:service) must not leak into MLServer's interpreter.
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    return env


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass(frozen=True)
class RemoteModel:
    """A model on a running MLServer: where to reach it and what it is called there."""

    url: str
    name: str
    version: str


def _write_model(
    folder: Path, name: str, onnx_file: Path, input_shape: list[int], classes: int
) -> None:
    model = folder / name
    model.mkdir(parents=True)
    shutil.copy(onnx_file, model / "model.onnx")
    shutil.copy(HERE / f"{RUNTIME_MODULE}.py", model / f"{RUNTIME_MODULE}.py")
    settings = {
        "name": name,
        "implementation": f"{RUNTIME_MODULE}.OnnxRuntimeModel",
        "parameters": {"uri": "./model.onnx", "version": "1"},
        "inputs": [{"name": "input", "datatype": "FP32", "shape": [-1, *input_shape]}],
        "outputs": [{"name": "logits", "datatype": "FP32", "shape": [-1, classes]}],
    }
    (model / "model-settings.json").write_text(json.dumps(settings))


@contextmanager
def mlserver(
    onnx_file: Path,
    *,
    name: str = "digits",
    input_shape: list[int] | None = None,
    classes: int = 10,
    timeout_s: float = 120.0,
) -> Iterator[RemoteModel]:
    """MLServer serving `onnx_file` on 127.0.0.1 until the block ends; yields where it is."""
    venv = ensure_venv()
    with tempfile.TemporaryDirectory(prefix="mlserver-") as tmp:
        folder = Path(tmp)
        _write_model(folder, name, onnx_file, input_shape or [1, 16, 16], classes)
        grpc_port = free_port()
        settings = {
            "host": "127.0.0.1",
            "http_port": free_port(),
            "grpc_port": grpc_port,
            "metrics_port": free_port(),
            # Inference in the server process: worker processes would cost seconds and memory.
            "parallel_workers": 0,
            "debug": False,
        }
        (folder / "settings.json").write_text(json.dumps(settings))
        log = (folder / "mlserver.log").open("w")
        process = subprocess.Popen(
            [str(venv / "bin" / "mlserver"), "start", str(folder)],
            cwd=folder,
            env=_clean_env(),
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        url = f"127.0.0.1:{grpc_port}"
        try:
            _wait_ready(process, url, name, folder / "mlserver.log", timeout_s)
            yield RemoteModel(url=url, name=name, version="1")
        finally:
            process.terminate()
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
            log.close()


def _wait_ready(
    process: subprocess.Popen[bytes], url: str, name: str, log: Path, timeout_s: float
) -> None:
    """Block until ModelReady(name) is true; fail with MLServer's log if it dies or times out."""
    deadline = time.monotonic() + timeout_s
    with grpc.insecure_channel(url) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise RuntimeError(f"MLServer exited with {process.returncode}:\n{log.read_text()}")
            try:
                # wait_for_ready blocks until the port accepts (or the short timeout passes).
                answer = stub.ModelReady(
                    pb.ModelReadyRequest(name=name, version="1"), timeout=2.0, wait_for_ready=True
                )
                if answer.ready:
                    return
            except grpc.RpcError as exc:
                if exc.code() is grpc.StatusCode.DEADLINE_EXCEEDED:
                    continue  # the port is not up yet; the call itself did the waiting
            # Up, but the model is still loading: poll its readiness at a short interval.
            _POLL.wait(0.1)
    raise RuntimeError(f"MLServer not ready after {timeout_s} s:\n{log.read_text()}")


if __name__ == "__main__":
    # CI builds the venv ahead of the tests: python tests/server/models/oip_mlserver.py
    print(ensure_venv())
