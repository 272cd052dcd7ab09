"""How torch's OpenMP threads wait between parallel regions, in the server and model hosts.

libgomp reads its wait policy once, when torch loads, so it is set in the environment of a
process before that process imports torch: the CLI's `serve` for the server process, the
spawn environment for each model host (models.host).

The default is OMP_WAIT_POLICY=PASSIVE: an idle thread sleeps at once. libgomp's own default
(what `runtime_spinning` and an unset policy give) busy-waits 300,000 iterations first. Measured
through the server with Square on the demo TorchScript model (bench/bench_floor.py (c), figures
in the README), spinning is a bet on having the cores to oneself:
- one model busy on an idle 2-core machine: spinning hosts 1.4-1.6x the time of torchattacks
  in-process, PASSIVE 2.1-2.5x (a sleeping thread is woken for every parallel region of a
  forward);
- one core taken by another process: spinning 1.4x slower than PASSIVE (4.58 s vs 3.21 s);
- two models attacked at once (two hosts, each pool spinning on the same 2 cores): 5x slower
  (27.0 s vs 5.3 s), the kind of slowdown (digits forwards 10x slower on a busy machine) that
  made PASSIVE the default.
A short explicit spin (GOMP_SPINCOUNT=10000) was slower than full spinning on a quiet machine
(1.89x against 1.64x; PASSIVE 2.50x) and, with one core taken, 3x slower than PASSIVE (9.8 s):
the sleeping threads' wake-ups seem to wait for the other process's time slice. An operator's
own OMP_WAIT_POLICY or GOMP_SPINCOUNT wins.

When the models run in host processes, the server process itself keeps one intra-op thread
(`server_threads`): its own torch work is the attacks' elementwise steps between forwards,
which a second thread does not speed up, while that thread's pool woke (or, spinning, took a
core) against the host's forward. Square through the server took 2.14x torchattacks' time
against 2.64x with the pool under PASSIVE, and with spinning 1.64x against 3.63x (each pair
side by side in one run).
"""

from __future__ import annotations

import os
from collections.abc import Mapping


def environment(spinning: bool, environ: Mapping[str, str] = os.environ) -> dict[str, str]:
    """The variables to add to `environ` for a process that will load torch: none when the
    operator chose a policy or a spin count, or asked for spinning (libgomp's default)."""
    if spinning or "OMP_WAIT_POLICY" in environ or "GOMP_SPINCOUNT" in environ:
        return {}
    return {"OMP_WAIT_POLICY": "PASSIVE"}


def server_threads(model_hosts: str, intra_op_threads: int = 0) -> int | None:
    """torch's intra-op threads for the server process: 1 when every model runs in a host
    process (the hosts' forwards have the cores); when models run inline in the server, the
    operator's `intra_op_threads` (what a host process would use), None for torch's default."""
    if model_hosts == "process":
        return 1
    return intra_op_threads or None
