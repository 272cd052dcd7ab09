"""Model hosts: each model's forward and gradient passes run in a supervised child process.

The pattern is Triton's Python-backend stubs. The server keeps the gRPC front, admission, the
engine and the attacks' control loops; a host process owns one model's backend (any Backend:
the child builds it from the config and path with `open_backend`, so every backend feature works
inside a host without code here) and, on a GPU, its own CUDA context. Requests and replies are
small pickled headers on a pipe; tensors travel through two shared-memory segments per host
(inputs written by the server, outputs by the host), so a batch is copied once each way and
never pickled.

The server side supervises each host:
- a request whose callers have all left (deadline passed, cancelled) and that is still running
  `grace_s` later gets its host killed: a TorchScript `while` loop cannot be interrupted any
  other way, and a thread that runs on forever is what kept UnloadModel and SIGTERM from
  finishing before hosts existed;
- a host whose resident memory (RSS, polled while a request runs) passes `memory_bytes` is
  killed. RSS polling rather than RLIMIT_AS: torch and CUDA reserve far more address space than
  they touch (a CUDA context alone maps tens of GiB), so an address-space limit would refuse
  healthy models, and an allocation refused by RLIMIT_AS inside a native library can abort the
  process anyway. The cost is that a model may overshoot the budget by what it allocates in one
  polling interval (`poll_s`);
- a host that dies for any reason (killed above, crashed, SIGKILLed from outside) is restarted
  by its supervisor thread, and its model marked FAILED with the reason when the restart fails or
  it died more than `max_restarts` times within `restart_window_s`.
Only the requests on that model fail, with UNAVAILABLE or DEADLINE_EXCEEDED naming the model.
"""

from __future__ import annotations

import collections
import contextlib
import ctypes
import itertools
import logging
import mmap
import os
import pickle
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from multiprocessing.connection import Connection
from multiprocessing.shared_memory import SharedMemory
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from interscope_server import blocking, errors, openmp
from interscope_server.cancel import CancelToken
from interscope_server.models.backend import (
    Backend,
    BackendOptions,
    value_bounds,
)
from interscope_server.models.config import ModelConfig

logger = logging.getLogger(__name__)

MiB = 1024 * 1024

#: Smallest shared-memory segment; segments grow to the next power of two a batch needs.
_MIN_SEGMENT = 1 * MiB

#: Array descriptors in a header: (shape, numpy dtype string, byte offset in the segment).
_Meta = tuple[tuple[int, ...], str, int]


@dataclass(frozen=True)
class HostOptions:
    """Where models run and how their host processes are supervised; filled from Settings."""

    #: process: one supervised child process per model (the default); inline: in the server.
    mode: Literal["process", "inline"] = "process"
    #: Resident memory a host may use before it is killed; 0 disables the budget.
    memory_bytes: int = 4096 * MiB
    #: How long a request may run past its callers' deadline or cancel, or an unload or
    #: shutdown may wait for a busy host, before the host is killed.
    grace_s: float = 5.0
    #: Longest a host may take to start: spawn, imports, loading the model file.
    start_timeout_s: float = 120.0
    #: Longest the probe forward on a blank input may take when a host starts.
    probe_timeout_s: float = 30.0
    #: Backstop for a request that carries no deadline at all.
    call_timeout_s: float = 600.0
    #: Restarts allowed within restart_window_s; one more death marks the model FAILED.
    max_restarts: int = 3
    restart_window_s: float = 60.0
    #: How often a waiting request checks the host's memory, its callers and the time.
    poll_s: float = 0.02


# -- the child process -----------------------------------------------------------------------


def _die_with_parent() -> None:
    """Ask Linux to SIGKILL this host when the server dies, so no host outlives a crash."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        pr_set_pdeathsig = 1
        libc.prctl(pr_set_pdeathsig, signal.SIGKILL)
    except (OSError, AttributeError):  # not Linux: the pipe's EOF still ends an idle host
        pass


class _Segment:
    """The host's view of a shared-memory segment created by the server, mapped by name.

    Mapped through /dev/shm rather than SharedMemory(name): on Python < 3.13 attaching
    registers the segment with the resource tracker, which would then unlink it (or warn)
    when this process exits; the server owns and unlinks every segment.
    """

    def __init__(self, name: str) -> None:
        self.name = name
        fd = os.open(f"/dev/shm/{name}", os.O_RDWR)
        try:
            self.map = mmap.mmap(fd, os.fstat(fd).st_size)
        finally:
            os.close(fd)

    def close(self) -> None:
        self.map.close()


class _ChildState:
    """What one host process holds between requests."""

    def __init__(self, backend: Backend) -> None:
        self.backend = backend
        #: The mapped input and output segments; replaced when the server grows one.
        self.segments: dict[str, _Segment] = {}
        #: Graphs of recent gradient-enabled forwards, so the matching backward runs once;
        #: bounded because a caller may never ask for its backward.
        self.graphs: collections.OrderedDict[int, tuple[torch.Tensor, torch.Tensor]] = (
            collections.OrderedDict()
        )

    def segment(self, slot: str, name: str) -> _Segment:
        seg = self.segments.get(slot)
        if seg is None or seg.name != name:
            if seg is not None:
                seg.close()
            seg = self.segments[slot] = _Segment(name)
        return seg

    def module(self) -> torch.nn.Module:
        module = self.backend.torch_module()
        if module is None:
            raise errors.FailedPrecondition(
                f"model {self.backend.config.name!r} has no gradients "
                f"({self.backend.gradient_note or 'no differentiable form'})"
            )
        return module

    def run(self, op: str, arrays: list[np.ndarray], key: int) -> list[np.ndarray]:
        if op == "forward":
            return [self.backend.forward(arrays[0])]
        device = self.backend.torch_device
        if op == "forward_grad":
            # A copy: the input segment is rewritten by the next request, the graph outlives it.
            x = torch.tensor(arrays[0], device=device).requires_grad_(True)
            with torch.enable_grad():
                out = self.module()(x)
            self.graphs[key] = (x, out)
            while len(self.graphs) > 8:
                self.graphs.popitem(last=False)
            return [out.detach().float().cpu().numpy()]
        if op == "vjp":
            saved = self.graphs.pop(key, None)
            if saved is None:  # evicted: recompute the forward
                x = torch.tensor(arrays[0], device=device).requires_grad_(True)
                with torch.enable_grad():
                    saved = (x, self.module()(x))
            x, out = saved
            grad_out = torch.tensor(arrays[1], device=device, dtype=out.dtype)
            (grad,) = torch.autograd.grad(out, x, grad_out)
            return [grad.float().cpu().numpy()]
        if op == "drop":
            self.graphs.pop(key, None)
            return []
        raise errors.InvalidArgument(f"unknown host operation {op!r}")


def _read(segment: _Segment, metas: Sequence[_Meta]) -> list[np.ndarray]:
    return [
        np.ndarray(shape, dtype=np.dtype(dtype), buffer=segment.map, offset=offset)
        for shape, dtype, offset in metas
    ]


def _layout(arrays: Sequence[np.ndarray]) -> tuple[list[_Meta], int]:
    """Offsets of each array packed one after another (64-byte aligned) and the total size."""
    metas: list[_Meta] = []
    offset = 0
    for a in arrays:
        metas.append((tuple(int(d) for d in a.shape), a.dtype.str, offset))
        offset += (a.nbytes + 63) // 64 * 64
    return metas, offset


def _write(buffer: Any, arrays: Sequence[np.ndarray], metas: Sequence[_Meta]) -> None:
    for a, (shape, dtype, offset) in zip(arrays, metas, strict=True):
        np.ndarray(shape, dtype=np.dtype(dtype), buffer=buffer, offset=offset)[...] = a


def _metadata(backend: Backend) -> dict[str, Any]:
    """The backend's plain attributes (config, format, device, flags, notes), picklable ones.

    Sent whole rather than a fixed list, so attributes other backends add are visible in the
    server through HostedBackend.__getattr__ without changes here.
    """
    meta: dict[str, Any] = {}
    for name in sorted(set(dir(type(backend))) | set(vars(backend))):
        if name.startswith("_") or name in ("torch_device", "path"):
            continue
        try:
            value = getattr(backend, name)
        except Exception:  # a property that needs what the child alone has
            continue
        if callable(value) and not isinstance(value, type):
            continue
        try:
            pickle.dumps(value)
        except Exception:
            continue
        meta[name] = value
    return meta


def _error_reply(seq: int, exc: BaseException) -> tuple[Any, ...]:
    kind = type(exc).__name__ if isinstance(exc, errors.InterscopeError) else "RuntimeError"
    text = str(exc) if isinstance(exc, errors.InterscopeError) else f"{type(exc).__name__}: {exc}"
    return (seq, "error", kind, text)


def host_main(fd: int) -> None:
    """Entry point of a host process (`fd`: its end of the socket pair): build the backend
    from the first message, then answer requests until the server closes the pipe."""
    _die_with_parent()
    # Ctrl-C in a terminal reaches the whole process group; stopping hosts is the server's job.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    conn = Connection(fd)
    try:
        config_json, path, options = conn.recv()
        from interscope_server.models.registry import open_backend

        if options.intra_op_threads:
            torch.set_num_threads(options.intra_op_threads)
        backend = open_backend(ModelConfig.model_validate_json(config_json), Path(path), options)
        conn.send((0, "ready", _metadata(backend)))
    except BaseException as exc:
        conn.send(_error_reply(0, exc))
        return
    state = _ChildState(backend)
    while True:
        try:
            message = conn.recv()
        except (EOFError, OSError):  # the server closed the pipe or died: nothing left to do
            return
        seq, op, in_name, in_metas, out_name, out_size, key = message
        try:
            arrays = _read(state.segment("in", in_name), in_metas) if in_metas else []
            results = [np.ascontiguousarray(r) for r in state.run(op, arrays, key)]
            metas, size = _layout(results)
            if size <= out_size:
                _write(state.segment("out", out_name).map, results, metas)
                conn.send((seq, "ok", metas, None))
            else:  # larger than the server sized the segment for: pickled on the pipe, rare
                conn.send((seq, "ok", None, results))
        except BaseException as exc:
            conn.send(_error_reply(seq, exc))


# -- the server side -------------------------------------------------------------------------


def _rss_bytes(pid: int) -> int:
    """Resident set size of `pid` from /proc (0 where /proc is missing or the process is gone)."""
    try:
        with open(f"/proc/{pid}/statm", "rb") as handle:
            return int(handle.read().split()[1]) * mmap.PAGESIZE
    except (OSError, IndexError, ValueError):
        return 0


def _describe_exit(code: int | None) -> str:
    if code is None:
        return "stopped answering"
    if code < 0:
        try:
            return f"was killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited with code {code}"


class _Process:
    """One generation of a host: the child process and its end of the pipe."""

    def __init__(self, popen: subprocess.Popen[bytes], conn: Connection, generation: int) -> None:
        self.popen = popen
        self.conn = conn
        self.generation = generation
        #: Set by whoever kills this process on purpose, read by whoever reports its death.
        self.kill_reason: str | None = None

    @property
    def pid(self) -> int:
        return self.popen.pid

    @property
    def alive(self) -> bool:
        return self.popen.poll() is None

    def kill(self, reason: str) -> None:
        if self.kill_reason is None:
            self.kill_reason = reason
        if self.alive:
            self.popen.kill()

    def wait(self, timeout: float | None) -> None:
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.popen.wait(timeout)

    def death(self) -> str:
        """Why this process is gone (after it has gone)."""
        self.wait(1.0)
        return self.kill_reason or _describe_exit(self.popen.returncode)


class ModelHost:
    """The server's handle on one model's host process: requests, supervision, restarts.

    `call` is thread-safe; requests are served one at a time (the batcher already merges
    concurrent callers into batches, and white-box attack steps are one batch each).
    """

    def __init__(
        self,
        config: ModelConfig,
        path: Path,
        backend_options: BackendOptions,
        options: HostOptions,
        on_failed: Callable[[str], None] | None = None,
    ) -> None:
        self.name = config.name
        self._config_json = config.model_dump_json()
        self._path = path
        self._backend_options = backend_options
        self.options = options
        self._on_failed = on_failed
        self._lock = threading.Lock()  # one exchange at a time on the pipe and segments
        self._state = threading.Condition()  # guards the fields below; notified on changes
        self._closed = False
        self._failed: str | None = None
        self._abandoned_seq = -1
        self._inflight_seq = -1
        self._deaths: collections.deque[float] = collections.deque()
        self._seq = itertools.count(1)
        self._generations = itertools.count(1)
        #: Keys of host-side gradient graphs, unique across every module bound to this host.
        self.graph_keys = itertools.count(1)
        self._in = SharedMemory(create=True, size=_MIN_SEGMENT)
        self._out = SharedMemory(create=True, size=_MIN_SEGMENT)
        try:
            self._proc, self.metadata = self._spawn()
        except BaseException:
            self._unlink()
            raise
        self._supervisor = threading.Thread(
            target=self._supervise, name=f"host-{self.name}", daemon=True
        )
        self._supervisor.start()

    # -- state -----------------------------------------------------------------------------

    @property
    def pid(self) -> int:
        """The current host process id (changes on every restart)."""
        with self._state:
            return self._proc.pid

    @property
    def generation(self) -> int:
        """1 for the first host process, +1 per restart."""
        with self._state:
            return self._proc.generation

    @property
    def closed(self) -> bool:
        with self._state:
            return self._closed

    @property
    def failed(self) -> str | None:
        """Why the host was given up (the model is FAILED), or None."""
        with self._state:
            return self._failed

    def wait_for_generation(self, generation: int, timeout: float) -> bool:
        """Block until a host of at least `generation` serves; False if it failed or timed out."""

        def settled() -> bool:
            serving = self._proc.generation >= generation and self._proc.alive
            return serving or self._failed is not None or self._closed

        with self._state:
            return (
                self._state.wait_for(settled, timeout) and self._failed is None and not self._closed
            )

    def wait_busy(self, timeout: float) -> bool:
        """Block until a request is running in the host (True) or `timeout` passes."""
        with self._state:
            return self._state.wait_for(lambda: self._inflight_seq > 0, timeout)

    # -- start -----------------------------------------------------------------------------

    def _spawn(self) -> tuple[_Process, dict[str, Any]]:
        """Start a host process, wait until its backend is built and a probe forward passes."""
        # A fresh interpreter, as multiprocessing's "spawn" starts one (never a fork of this
        # threaded server), without its re-import of the server's main module: the host
        # imports only the backend it runs. The parent's sys.path finds the same packages.
        ours, theirs = socket.socketpair()
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
        # torch's OpenMP wait, which only a fresh process can set (interscope_server.openmp).
        env.update(openmp.environment(self._backend_options.spinning))
        popen = subprocess.Popen(
            [
                sys.executable,
                "-c",
                "import sys; from interscope_server.models.host import host_main; "
                "host_main(int(sys.argv[1]))",
                str(theirs.fileno()),
            ],
            pass_fds=(theirs.fileno(),),
            env=env,
            stdin=subprocess.DEVNULL,
        )
        theirs.close()
        proc = _Process(popen, Connection(ours.detach()), next(self._generations))
        try:
            proc.conn.send((self._config_json, str(self._path), self._backend_options))
            reply = self._await(proc, 0, None, self.options.start_timeout_s, "start")
            assert reply is not None  # no bound: a reply or an error
            if reply[1] == "error":
                error = _error(reply[2], reply[3])
                if isinstance(error, errors.InterscopeError):
                    raise error
                raise errors.InvalidArgument(f"model {self.name!r} failed to load: {reply[3]}")
            metadata: dict[str, Any] = reply[2]
            probe = value_bounds(metadata["config"])[0][None].astype(np.float32)
            cancel = CancelToken(time.monotonic() + self.options.probe_timeout_s)
            try:
                self._exchange(proc, "forward", [probe], 0, cancel, probing=True)
            except errors.DeadlineExceeded:
                raise errors.InvalidArgument(
                    f"model {self.name!r} failed to load: its probe forward on a blank input "
                    f"did not finish within {self.options.probe_timeout_s:g} s "
                    "(INTERSCOPE_MODEL_HOST_PROBE_TIMEOUT_SECONDS), so its host was killed"
                ) from None
        except BaseException:
            proc.kill("its start failed")
            proc.death()
            proc.conn.close()
            raise
        return proc, metadata

    # -- requests --------------------------------------------------------------------------

    def call(
        self,
        op: str,
        arrays: Sequence[np.ndarray],
        *,
        key: int = 0,
        cancel: CancelToken | None = None,
    ) -> list[np.ndarray]:
        """Run `op` on `arrays` in the host; waits for a restart in progress (cancel permitting).

        Raises Unavailable (host died, was killed, the model is FAILED or unloading),
        DeadlineExceeded / Cancelled from `cancel`, or the host's own error for the request.
        """
        bound = blocking.wait_bound()
        if bound is not None:
            return self._call_bounded(op, arrays, key, cancel, bound)
        proc = self._acquire(cancel)
        try:
            return self._exchange(proc, op, arrays, key, cancel)
        finally:
            self._lock.release()

    def _call_bounded(
        self,
        op: str,
        arrays: Sequence[np.ndarray],
        key: int,
        cancel: CancelToken | None,
        bound: float,
    ) -> list[np.ndarray]:
        """`call` for the event loop's thread (blocking.py): waits at most `bound` seconds for
        the exchange lock and again for the reply, else raises WouldStall. A request already
        sent is finished by a thread of its own, under the call's cancel token as any request
        is (its deadline plus the grace kills a host that hangs), before the lock is released:
        the pipe and segments stay in step for the next request."""
        if not self._lock.acquire(timeout=bound):
            raise blocking.WouldStall(f"model {self.name!r}'s host is busy with a request")
        handed_over = False
        try:
            with self._state:
                proc, failed, closed = self._proc, self._failed, self._closed
            if closed or failed is not None or not proc.alive:
                raise blocking.WouldStall(f"model {self.name!r}'s host is not serving")
            seq = self._send(proc, op, arrays, key)
            started = time.monotonic()
            timeout = self.options.call_timeout_s
            reply = self._await(proc, seq, cancel, timeout, "request", bound=bound)
            if reply is None:
                handed_over = True
                threading.Thread(
                    target=self._finish,
                    args=(proc, seq, cancel, started + timeout - time.monotonic()),
                    name=f"host-finish-{self.name}",
                    daemon=True,
                ).start()
                raise blocking.WouldStall(
                    f"model {self.name!r} took longer than {bound * 1e3:g} ms over one request"
                )
            return self._received(reply)
        finally:
            if not handed_over:
                self._lock.release()

    def _finish(self, proc: _Process, seq: int, cancel: CancelToken | None, timeout: float) -> None:
        """Wait out a request the event loop stopped waiting for, then free the lock."""
        try:
            self._await(proc, seq, cancel, max(timeout, 0.0), "request")
        except BaseException as exc:  # its caller runs again elsewhere; the reply is not needed
            logger.debug("model %s: a request the event loop handed over ended: %s", self.name, exc)
        finally:
            with self._state:
                self._inflight_seq = -1
            self._lock.release()

    def abandon(self) -> None:
        """Every caller of the request now running has left: kill it unless it ends in grace."""
        with self._state:
            self._abandoned_seq = self._inflight_seq

    def _acquire(self, cancel: CancelToken | None) -> _Process:
        """Hold the exchange lock on a live host process, waiting out a restart."""
        waited_until = time.monotonic() + self.options.start_timeout_s + self.options.grace_s
        while True:
            while not self._lock.acquire(timeout=self.options.poll_s):
                if cancel is not None:
                    cancel.check()
            with self._state:
                proc, failed, closed = self._proc, self._failed, self._closed
            if closed:
                self._lock.release()
                raise errors.Unavailable(
                    f"model {self.name!r} is unloading or the server is stopping; retry"
                )
            if failed is not None:
                self._lock.release()
                raise errors.Unavailable(f"model {self.name!r} is out of service: {failed}")
            if proc.alive:
                return proc
            # Dead and not yet replaced: let the supervisor restart it, then try again.
            self._lock.release()
            with self._state:
                while self._proc is proc and self._failed is None and not self._closed:
                    if cancel is not None:
                        cancel.check()
                    if time.monotonic() > waited_until:
                        raise errors.Unavailable(
                            f"model {self.name!r}'s host is restarting and not ready yet; retry"
                        )
                    self._state.wait(self.options.poll_s)

    def _ensure_room(self, which: str, size: int) -> SharedMemory:
        segment = self._in if which == "in" else self._out
        if segment.size >= size:
            return segment
        grown = SharedMemory(create=True, size=max(_MIN_SEGMENT, 1 << (size - 1).bit_length()))
        segment.close()
        segment.unlink()
        if which == "in":
            self._in = grown
        else:
            self._out = grown
        return grown

    def _exchange(
        self,
        proc: _Process,
        op: str,
        arrays: Sequence[np.ndarray],
        key: int,
        cancel: CancelToken | None,
        *,
        probing: bool = False,
    ) -> list[np.ndarray]:
        """Send one request to `proc` (exchange lock held, or a host not yet published)."""
        seq = self._send(proc, op, arrays, key)
        timeout = self.options.probe_timeout_s if probing else self.options.call_timeout_s
        reply = self._await(proc, seq, cancel, timeout, "probe" if probing else "request")
        assert reply is not None  # no bound: _await returns a reply or raises
        return self._received(reply)

    def _send(self, proc: _Process, op: str, arrays: Sequence[np.ndarray], key: int) -> int:
        """Write `arrays` to the input segment and send request `op`; its sequence number."""
        arrays = [np.ascontiguousarray(a) for a in arrays]
        metas, size = _layout(arrays)
        segment_in = self._ensure_room("in", size)
        assert segment_in.buf is not None
        _write(segment_in.buf, arrays, metas)
        # Outputs are logits or an input-shaped gradient: room for the larger of the two.
        segment_out = self._ensure_room("out", max(size, 4096))
        seq = next(self._seq)
        with self._state:
            self._inflight_seq = seq
            self._state.notify_all()
        try:
            proc.conn.send(
                (seq, op, segment_in.name, metas, segment_out.name, segment_out.size, key)
            )
        except (OSError, ValueError):
            raise errors.Unavailable(
                f"model {self.name!r}'s host {proc.death()}; it is restarting; retry"
            ) from None
        return seq

    def _received(self, reply: tuple[Any, ...]) -> list[np.ndarray]:
        """The outputs of a request's reply (or its error, raised)."""
        with self._state:
            self._inflight_seq = -1
        if reply[1] == "error":
            raise _error(reply[2], reply[3])
        out_metas, inline = reply[2], reply[3]
        if inline is not None:
            return list(inline)
        segment_out = self._out
        assert segment_out.buf is not None
        # Copies: the segment is rewritten by the next request while callers hold these.
        return [
            np.array(np.ndarray(shape, dtype=np.dtype(dt), buffer=segment_out.buf, offset=off))
            for shape, dt, off in out_metas
        ]

    def _await(
        self,
        proc: _Process,
        seq: int,
        cancel: CancelToken | None,
        timeout: float,
        what: str,
        *,
        bound: float | None = None,
    ) -> tuple[Any, ...] | None:
        """The reply to `seq`, while enforcing the memory budget, the callers' deadline + grace
        and the backstop timeout; a host that breaks one is killed and Unavailable raised.
        With `bound`, None once `bound` seconds have passed without the reply."""
        started = time.monotonic()
        left_at: float | None = None
        stop: errors.InterscopeError | None = None
        budget = self.options.memory_bytes
        while True:
            poll = self.options.poll_s
            if bound is not None:
                poll = min(poll, started + bound - time.monotonic())
                if poll <= 0 and not proc.conn.poll(0):
                    return None
            try:
                ready = proc.conn.poll(max(poll, 0.0))
                reply = proc.conn.recv() if ready else None
            except (EOFError, OSError):
                reply, ready = None, True
            if reply is not None:
                if reply[0] == seq or what == "start":
                    if stop is not None:
                        raise stop  # finished within grace, but no one is waiting any more
                    return tuple(reply)
                continue  # a reply to an earlier, abandoned request
            if ready or not proc.alive:
                reason = proc.death()
                if stop is not None:
                    raise stop
                if self.closed:
                    raise errors.Unavailable(
                        f"model {self.name!r} was unloaded or the server is stopping before "
                        "this request finished; retry"
                    )
                if what == "start":
                    raise errors.InvalidArgument(
                        f"model {self.name!r} failed to load: its host process {reason} "
                        "while loading the model file"
                    )
                raise errors.Unavailable(
                    f"model {self.name!r}'s host process {reason} during this {what}; the "
                    "host is restarting, retry"
                    + (" (only the requests on this model failed)" if what == "request" else "")
                )
            now = time.monotonic()
            if budget and _rss_bytes(proc.pid) > budget:
                proc.kill(
                    f"exceeded its memory budget of {budget // MiB} MiB "
                    "(INTERSCOPE_MODEL_HOST_MEMORY_BYTES)"
                )
                continue  # the next poll sees the death and reports it
            if left_at is None:
                if cancel is not None:
                    try:
                        cancel.check()
                    except errors.InterscopeError as exc:
                        left_at, stop = now, _named(exc, self.name, what)
                with self._state:
                    abandoned = self._abandoned_seq == seq and seq > 0
                if abandoned:
                    left_at = now
                    stop = errors.Cancelled(
                        f"model {self.name!r}: every request waiting on this batch left"
                    )
            if left_at is not None and now > left_at + self.options.grace_s:
                proc.kill(
                    f"was still running {self.options.grace_s:g} s after its callers' deadline "
                    f"or cancel, so it was killed"
                )
                continue
            if now > started + timeout:
                proc.kill(f"took longer than {timeout:g} s over one {what}, so it was killed")
                continue

    # -- supervision -----------------------------------------------------------------------

    def _supervise(self) -> None:
        """Wait for the host to die; restart it, or mark it failed; until closed."""
        while True:
            with self._state:
                if self._closed or self._failed is not None:
                    return
                proc = self._proc
            proc.popen.wait()
            reason = proc.death()
            with self._state:
                if self._closed:
                    return
            logger.warning("model %s: host process %s %s", self.name, proc.pid, reason)
            with self._lock:  # the request in flight, if any, has seen the death and left
                now = time.monotonic()
                self._deaths.append(now)
                while self._deaths and self._deaths[0] < now - self.options.restart_window_s:
                    self._deaths.popleft()
                failure: str | None = None
                if len(self._deaths) > self.options.max_restarts:
                    failure = (
                        f"its host process {reason}, the {len(self._deaths)}th death within "
                        f"{self.options.restart_window_s:g} s, so it was not restarted"
                    )
                else:
                    try:
                        fresh, _ = self._spawn()
                    except Exception as exc:
                        failure = f"its host process {reason} and the restart failed: {exc}"
                proc.conn.close()
                with self._state:
                    if failure is None and self._closed:  # closed while it was starting
                        fresh.kill("the model was unloaded or the server stopped")
                        fresh.conn.close()
                        return
                    if failure is None:
                        self._proc = fresh
                        logger.info("model %s: host restarted as pid %s", self.name, fresh.pid)
                    else:
                        self._failed = failure
                    self._state.notify_all()
            if failure is not None:
                logger.error("model %s: %s", self.name, failure)
                if self._on_failed is not None:
                    self._on_failed(failure)
                return

    def close(self) -> None:
        """Stop the host: at once when idle, killed when still busy after `grace_s`."""
        with self._state:
            if self._closed:
                return
            self._closed = True
            proc = self._proc
            self._state.notify_all()
        if self._lock.acquire(timeout=self.options.grace_s):
            try:
                proc.conn.close()  # an idle host exits on EOF
                proc.wait(self.options.grace_s)
            finally:
                self._lock.release()
        proc.kill("the model was unloaded or the server stopped")
        proc.wait(self.options.grace_s)
        if threading.current_thread() is not self._supervisor:
            self._supervisor.join(self.options.grace_s)
        with self._lock:
            self._unlink()

    def _unlink(self) -> None:
        for segment in (self._in, self._out):
            try:
                segment.close()
                segment.unlink()
            except FileNotFoundError:
                pass


def _error(kind: str, message: str) -> Exception:
    """The host's error for a request, as the class it raised (a RuntimeError for non-domain
    errors, which the batcher reports as BackendFailed naming the model)."""
    cls = getattr(errors, kind, None)
    if isinstance(cls, type) and issubclass(cls, errors.InterscopeError):
        return cls(message)
    return RuntimeError(message)


def _named(exc: errors.InterscopeError, name: str, what: str) -> errors.InterscopeError:
    """The caller's cancel or deadline error, naming the model whose host was still busy."""
    return type(exc)(f"{exc} (model {name!r} was still computing the {what})")


# -- the backend and module the server uses ----------------------------------------------------


class _HostGradient(torch.autograd.Function):
    """Logits from the host; the backward asks the host for the vector-Jacobian product."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, module: HostModule) -> torch.Tensor:
        key = next(module.host.graph_keys)
        (logits,) = module.host.call("forward_grad", [_numpy(x)], key=key, cancel=module.cancel)
        ctx.key, ctx.module = key, module
        ctx.save_for_backward(x)
        return torch.from_numpy(logits)

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor, None]:
        (x,) = ctx.saved_tensors
        module: HostModule = ctx.module
        (grad,) = module.host.call(
            "vjp",
            [_numpy(x), _numpy(grad_out)],
            key=ctx.key,
            cancel=module.cancel,
        )
        return torch.from_numpy(grad), None


class HostModule(torch.nn.Module):
    """Raw input -> logits answered by a model host, differentiable with respect to the input.

    Attack code uses it as it uses any module: forward asks the host for logits (keeping the
    host-side graph when gradients are wanted); backward asks it for the input gradient of the
    caller's loss. Tensors are float32 on the CPU of the server process (the host moves them
    to its device). `bound(cancel)` ties the host calls to one request's deadline.
    """

    def __init__(self, host: ModelHost, cancel: CancelToken | None = None) -> None:
        super().__init__()
        self.host = host
        self.cancel = cancel
        # Attacks read the module's device from its parameters or buffers.
        self.register_buffer("anchor", torch.zeros(0), persistent=False)

    def bound(self, cancel: CancelToken) -> HostModule:
        """The same host, its calls stopped by `cancel` (a request's deadline or cancel)."""
        return HostModule(self.host, cancel)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() and x.requires_grad:
            out: torch.Tensor = _HostGradient.apply(x, self)
            return out
        (logits,) = self.host.call("forward", [_numpy(x)], cancel=self.cancel)
        return torch.from_numpy(logits)


def _numpy(x: torch.Tensor) -> np.ndarray:
    array: np.ndarray = x.detach().float().cpu().contiguous().numpy()
    return array


class HostedBackend(Backend):
    """Any backend, run in a model host process: the server-side face of a ModelHost."""

    def __init__(
        self,
        config: ModelConfig,
        path: Path,
        backend_options: BackendOptions,
        options: HostOptions,
        on_failed: Callable[[HostedBackend, str], None] | None = None,
    ) -> None:
        # No super().__init__: the host hashes the file and reports the backend's attributes.
        def failed(reason: str) -> None:
            if on_failed is not None:
                on_failed(self, reason)

        self.host = ModelHost(config, path, backend_options, options, failed)
        self._meta = self.host.metadata
        self.config = self._meta["config"]
        self.path = path
        self.content_hash = self._meta["content_hash"]
        self.gradient_note = self._meta.get("gradient_note", "")
        self._module = HostModule(self.host) if self._meta.get("gradients_available") else None

    def __getattr__(self, name: str) -> Any:
        # Attributes other backends define (not known here) as the host's backend reported them.
        meta = self.__dict__.get("_meta")
        if meta is not None and name in meta:
            return meta[name]
        raise AttributeError(name)

    @property
    def format(self) -> str:
        return str(self._meta["format"])

    @property
    def device(self) -> str:
        return str(self._meta["device"])

    @property
    def gradients_available(self) -> bool:
        return self._module is not None

    def torch_module(self) -> torch.nn.Module | None:
        return self._module

    def forward(self, x: np.ndarray) -> np.ndarray:
        """The host backend's own `forward` (it checks the batch and the output)."""
        return self._forward(x)

    forward_checked = forward  # the host checks the output as well
    stops_on_cancel = True  # the host kills a forward that outlives its caller by the grace

    def forward_until(self, x: np.ndarray, cancel: CancelToken | None) -> np.ndarray:
        (out,) = self.host.call("forward", [x], cancel=cancel)
        return out

    def _forward(self, x: np.ndarray) -> np.ndarray:
        return self.forward_until(x, None)

    def abandon_forward(self) -> None:
        self.host.abandon()

    def close(self) -> None:
        self.host.close()
