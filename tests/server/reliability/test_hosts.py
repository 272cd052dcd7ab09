"""Model hosts against a real server: hung, greedy and killed models fail alone and recover."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

import interscope
from interscope.errors import (
    DeadlineExceededError,
    InterscopeError,
    UnavailableError,
)
from interscope.v1 import models_pb2
from interscope_server import openmp
from interscope_server.config import Settings
from interscope_server.models.host import HostedBackend
from interscope_server.server import BackgroundServer

ROOT = Path(__file__).resolve().parents[3]
SHAPE = (1, 4, 4)
GRACE = 1.0


class Linear(torch.nn.Module):
    """A healthy model: 2 logits, a linear function of the 16 inputs."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.fc = torch.nn.Linear(16, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x.flatten(1))


# The load-time gradient check runs each model on random inputs, and the load probe on a blank
# (all-zero) one; the faulty models below misbehave only on inputs these never send, except
# LoopOnBlank, whose point is to hang while loading.
HALF = 0.5


class LoopOnHalf(torch.nn.Module):
    """Loops forever in forward when some row of the batch is all 0.5."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = x.flatten(1).sum(1, keepdim=True)
        total = s.sum()
        while bool((x.flatten(1) == 0.5).all(1).any()):
            total = total + 1.0
        return torch.cat([s, -s], 1) + total * 0.0


class LoopOnBlank(torch.nn.Module):
    """Loops forever on an all-zero input: the load probe hangs."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = x.flatten(1).sum(1, keepdim=True)
        total = s.sum()
        while bool((x == 0.0).all()):
            total = total + 1.0
        return torch.cat([s, -s], 1) + total * 0.0


class HogOnHalf(torch.nn.Module):
    """Allocates 2 GiB in forward when some row of the batch is all 0.5."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = x.flatten(1).sum(1, keepdim=True)
        # The size depends on the input (a constant one is folded when the graph is optimised).
        hog = torch.ones(int((x.flatten(1) == 0.5).all(1).any()) * 512 * 1024 * 1024)
        return torch.cat([s, -s], 1) + hog[:1].sum() * 0.0


class SlowLinear(torch.nn.Module):
    """Linear's logits exactly, after tens of milliseconds of work whose result is discarded:
    slower than a small call may keep the event loop waiting (api/call.py's LOOP_WAIT_S)."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = Linear()
        self.w = torch.nn.Parameter(torch.eye(256) * 0.5, requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = x.flatten(1).repeat(1, 16)
        for _ in range(300):
            z = torch.tanh(z @ self.w)
        return self.linear(x) + z.sum() * 0.0


UPLOAD_CONFIG = models_pb2.ModelConfig(
    format=models_pb2.MODEL_FORMAT_TORCHSCRIPT,
    input=models_pb2.TensorInfo(name="x", shape=list(SHAPE)),
    classes=["a", "b"],
)


def _config(name: str) -> dict[str, object]:
    return {
        "name": name,
        "format": "torchscript",
        "file": "model.pt",
        "input": {"name": "x", "shape": list(SHAPE), "datatype": "FP32"},
        "output_name": "logits",
        "classes": ["a", "b"],
        "value_range": [0.0, 1.0],
    }


def _script(module: torch.nn.Module, path: Path) -> None:
    with warnings.catch_warnings():
        # torch 2.13 marks TorchScript deprecated; it is still the format we serve.
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.jit.script(module).save(str(path))


def _write(root: Path, name: str, module: torch.nn.Module) -> None:
    folder = root / name
    folder.mkdir(parents=True)
    _script(module, folder / "model.pt")
    (folder / "config.json").write_text(json.dumps(_config(name)))


@pytest.fixture(scope="module")
def repository(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("host-models")
    _write(root, "linear", Linear())
    _write(root, "loop", LoopOnHalf())
    _write(root, "hog", HogOnHalf())
    _write(root, "slow", SlowLinear())
    return root


def _settings(repository: Path, **overrides: object) -> Settings:
    values: dict[str, object] = {
        "host": "127.0.0.1",
        "port": 0,
        "metrics_port": None,
        "model_repository": repository,
        "model_hosts": "process",
        "model_host_grace_seconds": GRACE,
        "model_host_memory_bytes": 1024 * 1024 * 1024,
        "model_host_probe_timeout_seconds": 3.0,
        "allow_uploads": True,
        "worker_threads": 8,
    }
    values.update(overrides)
    return Settings(**values)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def server(repository: Path) -> Iterator[BackgroundServer]:
    with BackgroundServer(_settings(repository)) as srv:
        yield srv


@pytest.fixture()
def client(server: BackgroundServer) -> Iterator[interscope.Client]:
    # No client-side retries: each request that hits a dying host is one death, counted.
    with interscope.Client(server.address, retries=0) as c:
        yield c


def _host(server: BackgroundServer, name: str) -> HostedBackend:
    backend = server.server.registry.get(name).backend
    assert isinstance(backend, HostedBackend)
    return backend


def _gone(pid: int) -> bool:
    """True once `pid` has exited and been reaped (or is a zombie no one will run again)."""
    try:
        with open(f"/proc/{pid}/stat") as handle:
            return handle.read().split(") ")[1].startswith("Z")
    except FileNotFoundError:
        return True


def _profile(client: interscope.Client, model: str, x: np.ndarray, **kw: object) -> object:
    return client.profile(
        model=model, x=x, label=0, grid=(2, 2), baseline="zero", estimator="exact", **kw
    )


X_POS = np.full(SHAPE, HALF, dtype=np.float32)
X_OTHER = np.full(SHAPE, 0.25, dtype=np.float32)  # answered by every model here


def _reference_linear(repository: Path) -> torch.jit.ScriptModule:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        return torch.jit.load(str(repository / "linear" / "model.pt"))


def test_models_run_in_their_own_processes(server: BackgroundServer) -> None:
    pids = {name: _host(server, name).host.pid for name in ("linear", "loop", "hog")}
    assert len(set(pids.values())) == 3
    assert os.getpid() not in pids.values()
    assert all(not _gone(pid) for pid in pids.values())


def test_hosts_start_with_sleeping_openmp_threads(server: BackgroundServer) -> None:
    # Spinning OpenMP threads made a digits forward 10x slower on a busy 2-core machine; the
    # policy can only be set before torch loads, so the host must be spawned with it.
    # An operator's own policy or spin count wins (interscope_server.openmp).
    expected = {**os.environ, **openmp.environment(spinning=False)}
    pid = _host(server, "linear").host.pid
    with open(f"/proc/{pid}/environ", "rb") as handle:
        env = dict(item.split(b"=", 1) for item in handle.read().split(b"\0") if b"=" in item)
    for name in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT"):
        value = env.get(name.encode())
        assert (None if value is None else value.decode()) == expected.get(name), name
    assert "OMP_WAIT_POLICY" in expected or "GOMP_SPINCOUNT" in expected


def test_openmp_waits_passively_unless_the_operator_chose() -> None:
    assert openmp.environment(False, {}) == {"OMP_WAIT_POLICY": "PASSIVE"}
    assert openmp.environment(False, {"GOMP_SPINCOUNT": "10000"}) == {}
    assert openmp.environment(False, {"OMP_WAIT_POLICY": "ACTIVE"}) == {}
    assert openmp.environment(True, {}) == {}  # runtime_spinning: libgomp's own default


def test_values_and_gradients_through_a_host_match_the_model(
    server: BackgroundServer, repository: Path
) -> None:
    reference = _reference_linear(repository)
    x = torch.rand(5, *SHAPE, generator=torch.Generator().manual_seed(1))
    backend = _host(server, "linear")
    # float32 roundoff only: the server computes the same graph through its own wrapper.
    expected = reference(x).detach().numpy()
    np.testing.assert_allclose(backend.forward(x.numpy()), expected, rtol=1e-5, atol=1e-7)
    module = backend.torch_module()
    assert module is not None
    for model in (module, reference):
        xv = x.clone().requires_grad_(True)
        loss = torch.nn.functional.cross_entropy(model(xv), torch.tensor([0, 1, 0, 1, 1]))
        (grad,) = torch.autograd.grad(loss, xv)
        if model is module:
            host_grad = grad
    np.testing.assert_allclose(host_grad.numpy(), grad.numpy(), rtol=1e-5, atol=1e-7)
    assert float(host_grad.abs().max()) > 0


def test_white_box_attack_through_a_host(client: interscope.Client, repository: Path) -> None:
    x = np.random.default_rng(2).random((6, *SHAPE), dtype=np.float32)
    reference = _reference_linear(repository)
    y = reference(torch.from_numpy(x)).argmax(1).numpy()
    result = client.attack(
        model="linear", x=x, y=y, attack="fgsm", norm="linf", eps=0.3, timeout=60
    )
    # FGSM on a linear model: the step is eps * sign of the gradient of the CE loss, which
    # for two classes is the sign of (w_other - w_label): computed here from the weights.
    w = reference.fc.weight.detach().numpy()
    step = np.sign(w[1 - y] - w[y]).reshape(x.shape) * 0.3
    expected = np.clip(x + step, 0.0, 1.0)
    assert result.adversarial is not None
    np.testing.assert_allclose(result.adversarial, expected, atol=1e-6)


def test_hung_forward_gets_its_deadline_and_the_host_is_killed(
    server: BackgroundServer, client: interscope.Client, repository: Path
) -> None:
    loop = _host(server, "loop")
    pid, generation = loop.host.pid, loop.host.generation
    errors: list[BaseException] = []

    def call_hung() -> None:
        try:
            _profile(client, "loop", X_POS, timeout=1.5)
        except InterscopeError as exc:
            errors.append(exc)

    calls = server.server.analysis.calls
    fell_back = calls.loop_outcomes["fell_back"]
    hung = threading.Thread(target=call_hung)
    hung.start()
    # While the loop model hangs, another model keeps answering, with its reference values.
    reference = _reference_linear(repository)
    for _ in range(3):
        result = _profile(client, "linear", X_POS, timeout=30)
        assert result.orders.size > 0  # type: ignore[attr-defined]
    np.testing.assert_allclose(
        _host(server, "linear").forward(X_POS[None]),
        reference(torch.from_numpy(X_POS[None])).detach().numpy(),
        rtol=1e-5,
        atol=1e-7,
    )
    hung.join(30)
    assert len(errors) == 1 and isinstance(errors[0], DeadlineExceededError)
    # The hung call started on the event loop (a small call) and left it after LOOP_WAIT_S.
    assert calls.loop_outcomes["fell_back"] == fell_back + 1
    # Killed within the deadline plus its grace, then restarted by its supervisor.
    assert loop.host.wait_for_generation(generation + 1, timeout=120)
    assert _gone(pid)
    assert _profile(client, "loop", X_OTHER, timeout=30) is not None


def _numbers(result: object) -> dict[str, object]:
    out = result.to_dict()  # type: ignore[attr-defined]
    out.pop("provenance")  # timings and host name differ between calls
    return out


def test_small_profiles_run_on_the_event_loop_with_the_worker_path_s_numbers(
    server: BackgroundServer, client: interscope.Client, tmp_path: Path
) -> None:
    calls = server.server.analysis.calls
    before = dict(calls.loop_outcomes)
    x = np.random.default_rng(4).random(SHAPE, dtype=np.float32)
    on_loop = _profile(client, "linear", x, timeout=30)
    assert calls.loop_outcomes["ran"] == before.get("ran", 0) + 1
    assert calls.loop_outcomes["fell_back"] == before.get("fell_back", 0)
    # The same call through the worker threads and an in-process model (inline hosts never
    # use the loop: their forwards cannot give up waiting) gives the same numbers.
    root = tmp_path / "models"
    root.mkdir()
    _write(root, "linear", Linear())
    with (
        BackgroundServer(_settings(root, model_hosts="inline")) as inline,
        interscope.Client(inline.address, retries=0) as other,
    ):
        in_thread = _profile(other, "linear", x, timeout=30)
        assert dict(inline.server.analysis.calls.loop_outcomes) == {}
    np.testing.assert_equal(_numbers(on_loop), _numbers(in_thread))


def test_a_slow_model_sends_small_calls_back_to_the_workers_without_harm(
    server: BackgroundServer, client: interscope.Client
) -> None:
    slow = _host(server, "slow")
    generation = slow.host.generation
    calls = server.server.analysis.calls
    fell_back = calls.loop_outcomes["fell_back"]
    x = np.random.default_rng(5).random(SHAPE, dtype=np.float32)
    # Its forward outlasts LOOP_WAIT_S: the request the loop sent is finished by a thread of
    # its own, and the call runs again on a worker, with the numbers of the same logits.
    result = _profile(client, "slow", x, timeout=60)
    assert calls.loop_outcomes["fell_back"] == fell_back + 1
    np.testing.assert_equal(_numbers(result), _numbers(_profile(client, "linear", x, timeout=30)))
    # Within the cool-down its small calls go straight to the workers; nothing was killed.
    assert _profile(client, "slow", X_OTHER, timeout=60) is not None
    assert calls.loop_outcomes["fell_back"] == fell_back + 1
    assert slow.host.generation == generation


def test_unload_of_a_hung_model_finishes_within_its_grace(
    server: BackgroundServer, client: interscope.Client, repository: Path
) -> None:
    loop = _host(server, "loop")
    pid = loop.host.pid
    outcome: list[BaseException] = []

    def call_hung() -> None:
        try:
            _profile(client, "loop", X_POS, timeout=120)
        except InterscopeError as exc:
            outcome.append(exc)

    hung = threading.Thread(target=call_hung)
    hung.start()
    assert loop.host.wait_busy(timeout=30)
    started = time.monotonic()
    client.unload_model("loop", timeout=30)
    took = time.monotonic() - started
    hung.join(30)
    # Two graces at most: the batcher's drain, then the host's own stop.
    assert took < 2 * GRACE + 2.0, took
    assert len(outcome) == 1 and isinstance(outcome[0], UnavailableError)
    assert "'loop'" in str(outcome[0])
    assert _gone(pid)
    client.load_model("loop", timeout=120)  # the repository copy loads and serves again
    assert _profile(client, "loop", X_OTHER, timeout=30) is not None


def test_a_model_over_its_memory_budget_is_killed_and_reported(
    server: BackgroundServer, client: interscope.Client
) -> None:
    hog = _host(server, "hog")
    pid, generation = hog.host.pid, hog.host.generation
    with pytest.raises(UnavailableError, match=r"'hog'.*memory budget of 1024 MiB"):
        _profile(client, "hog", X_POS, timeout=60)
    assert _gone(pid)
    assert hog.host.wait_for_generation(generation + 1, timeout=120)
    assert _profile(client, "hog", X_OTHER, timeout=30) is not None


def test_a_host_killed_from_outside_is_restarted(
    server: BackgroundServer, client: interscope.Client, repository: Path
) -> None:
    linear = _host(server, "linear")
    pid, generation = linear.host.pid, linear.host.generation
    os.kill(pid, signal.SIGKILL)
    assert linear.host.wait_for_generation(generation + 1, timeout=120)
    assert linear.host.pid != pid
    reference = _reference_linear(repository)
    x = np.random.default_rng(3).random((4, *SHAPE), dtype=np.float32)
    np.testing.assert_allclose(
        linear.forward(x), reference(torch.from_numpy(x)).detach().numpy(), rtol=1e-5, atol=1e-7
    )
    assert _profile(client, "linear", X_POS, timeout=30) is not None


def test_an_uploaded_model_that_hangs_leaves_the_server_healthy_after_restart(
    tmp_path: Path, repository: Path
) -> None:
    root = tmp_path / "models"
    root.mkdir()
    _write(root, "linear", Linear())
    hang = tmp_path / "hang.pt"
    _script(LoopOnBlank(), hang)
    with (
        # The backend's own load probes (config, gradients) run in the host's start, so a
        # model hanging on a blank input is caught by the start timeout or the probe's.
        BackgroundServer(_settings(root, model_host_start_timeout_seconds=20)) as srv,
        interscope.Client(srv.address, retries=0) as client,
    ):
        with pytest.raises(InterscopeError, match=r"probe forward|took longer than 20 s"):
            client.load_model(
                "hang", model_bytes=hang.read_bytes(), config=UPLOAD_CONFIG, timeout=120
            )
        assert client.health() == "SERVING"
    # The refused upload left nothing on disk. Had it stayed (it did before uploads were
    # vetted; a folder copied in by hand does), a restarted server must still become healthy.
    assert not (root / "hang").exists()
    _write(root, "hang", LoopOnBlank())
    with (
        # The backend's own load probes (config, gradients) run in the host's start, so a
        # model hanging on a blank input is caught by the start timeout or the probe's.
        BackgroundServer(_settings(root, model_host_start_timeout_seconds=20)) as srv,
        interscope.Client(srv.address, retries=0) as client,
    ):
        assert client.health() == "SERVING"
        assert client.health("linear") == "SERVING"
        assert client.get_model("hang").state == "failed"
        assert _profile(client, "linear", X_POS, timeout=30) is not None


SERVE_SCRIPT = """
import sys
from interscope_server.config import Settings
from interscope_server.server import serve
serve(Settings(host="127.0.0.1", port=0, metrics_port=None, model_repository=sys.argv[1],
               grace_seconds=1.0, model_host_grace_seconds=1.0, worker_threads=4, {settings}))
import torch
print("server torch threads", torch.get_num_threads(), flush=True)
"""


@contextlib.contextmanager
def _serving(repository: Path, settings: str) -> Iterator[tuple[subprocess.Popen[str], str]]:
    """`serve()` in a process of its own, with `settings` (Settings keywords as source); yields
    it and its address. After serve() returns, it prints its torch's intra-op thread count."""
    process = subprocess.Popen(
        [sys.executable, "-c", SERVE_SCRIPT.format(settings=settings), str(repository)],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        cwd=ROOT,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    try:
        assert process.stdout is not None
        address = ""
        for line in process.stdout:
            if line.startswith("interscope listening on "):
                address = line.split()[-1]
                break
        assert address, f"the server exited early with {process.wait()}"
        yield process, address
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(10)
        if process.stdout is not None:
            process.stdout.close()


def _torch_threads_printed(process: subprocess.Popen[str]) -> str:
    assert process.stdout is not None
    words = process.stdout.read().split()
    assert words[-4:-1] == ["server", "torch", "threads"], words
    return words[-1]


def test_sigterm_stops_a_server_whose_model_hangs(repository: Path) -> None:
    settings = 'load_models=["loop"], model_hosts="process"'
    with _serving(repository, settings) as (process, address):
        hosts = _children(process.pid)
        assert len(hosts) == 1, "the model should run in a child process of the server"
        with interscope.Client(address, retries=0) as client:
            outcome: list[BaseException] = []

            def call_hung() -> None:
                try:
                    _profile(client, "loop", X_POS, timeout=120)
                except InterscopeError as exc:
                    outcome.append(exc)

            hung = threading.Thread(target=call_hung)
            hung.start()
            assert _wait_for_cpu(hosts[0])  # the host is in its loop
            started = time.monotonic()
            process.send_signal(signal.SIGTERM)
            code = process.wait(30)
            took = time.monotonic() - started
            hung.join(30)
        assert code == 0
        # grace_seconds for calls, then the host's grace, plus process teardown.
        assert took < 1.0 + 2 * 1.0 + 5.0, took
        assert len(outcome) == 1 and isinstance(outcome[0], UnavailableError)
        assert all(_gone(pid) for pid in hosts)
        # The forwards ran in the host; the server's own torch kept one thread
        # (interscope_server.openmp.server_threads).
        assert _torch_threads_printed(process) == "1"


def test_inline_models_run_on_the_configured_torch_threads(repository: Path) -> None:
    # With models inline the server's torch runs them: INTERSCOPE_INTRA_OP_THREADS must reach
    # it as it reaches a host process (it used to reach only ONNX Runtime there).
    settings = 'load_models=["linear"], model_hosts="inline", intra_op_threads=3'
    with _serving(repository, settings) as (process, address):
        with interscope.Client(address, retries=0) as client:
            # Answered by the event loop once serve() has set its signal handlers.
            assert client.health("linear") == "SERVING"
        process.send_signal(signal.SIGTERM)
        assert process.wait(30) == 0
        assert _torch_threads_printed(process) == "3"


def _children(pid: int) -> list[int]:
    """The model-host processes whose parent is `pid`."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as handle:
                    parent = int(handle.read().rsplit(") ", 1)[1].split()[1])
                with open(f"/proc/{entry}/cmdline", "rb") as handle:
                    if parent == pid and b"interscope_server.models.host" in handle.read():
                        found.append(int(entry))
            except (FileNotFoundError, IndexError, ValueError):
                continue
    return found


def _wait_for_cpu(pid: int, timeout: float = 30.0) -> bool:
    """True once `pid` has burned 0.2 s of CPU since the call (it is inside its loop)."""

    def cpu() -> float:
        with open(f"/proc/{pid}/stat") as handle:
            fields = handle.read().rsplit(") ", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    start, deadline = cpu(), time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cpu() - start > 0.2:
            return True
        time.sleep(0.05)
    return False
