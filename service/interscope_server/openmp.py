"""How torch's OpenMP threads wait between parallel regions, in the server and model hosts.

libgomp reads its wait policy once, when torch loads, so it is set in the environment of a
process before that process imports torch: the CLI's `serve` for the server process, the
spawn environment for each model host (models.host).

The default is OMP_WAIT_POLICY=PASSIVE: an idle thread sleeps at once. libgomp's own default
busy-waits 300,000 iterations first, and on a busy 2-core machine those spinning threads took
the cores the work needed (digits forwards ran 10x slower). An operator who exports
OMP_WAIT_POLICY or GOMP_SPINCOUNT gets exactly that instead. On a dedicated machine a short
spin pays: GOMP_SPINCOUNT=10000 bridges the microsecond gaps between the parallel regions of
one forward and still sleeps between forwards; Square through the server took 1.65x
torchattacks' time against 2.57x under PASSIVE, but 2.5x longer than PASSIVE with one core
taken by another process (bench/bench_floor.py (c); figures in the README).
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
