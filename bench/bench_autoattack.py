"""Our AUTOATTACK through the server against torchattacks' AutoAttack on the same models.

Run from the repository root: `python bench/bench_autoattack.py` (the reference, for this bench
only: `pip install --no-deps torchattacks==3.5.1`). The server is `interscope serve` in a
subprocess with one intra-op thread (bench_floor's `start_server`), the client is the SDK over
loopback, so our time includes the wire; torchattacks runs in this process, also on one
thread, on the same TorchScript network (bench_attacks' loader). Both attack the same first
--n held-out digits of each demo model, L-inf at eps 0.1 on [0, 1] inputs (the demo's eps),
standard version, seed 0; robust accuracy counts clean mistakes as not robust in both.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import numpy as np
import torch
from bench_attacks import load_torchscript
from bench_floor import start_server

import interscope
from interscope_server.demo import TEST_DATA_FILE, build_demo_repository

ROOT = Path(__file__).resolve().parent.parent
MODELS = ("digits-cnn-ts", "digits-cnn-adv-ts")
TOLERANCE = 0.02


def reference(model: torch.nn.Module, x: np.ndarray, y: np.ndarray, eps: float) -> float:
    import torchattacks  # bench-only comparison; not a dependency of the service

    attack = torchattacks.AutoAttack(
        model, norm="Linf", eps=eps, version="standard", n_classes=10, seed=0
    )
    x_t, y_t = torch.from_numpy(x), torch.from_numpy(y)
    adv = attack(x_t, y_t)
    with torch.no_grad():
        return float((model(adv).argmax(dim=1) == y_t).float().mean())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--n", type=int, default=100, help="held-out digits per model")
    parser.add_argument("--eps", type=float, default=0.1)
    parser.add_argument(
        "--hosts",
        choices=["process", "inline"],
        default="process",
        help="models in host processes (the product's default) or in the server's own",
    )
    args = parser.parse_args()

    torch.set_num_threads(1)
    os.environ["INTERSCOPE_INTRA_OP_THREADS"] = "1"
    repository = build_demo_repository(ROOT / ".cache" / "demo-repository")
    with np.load(repository / TEST_DATA_FILE) as data:
        x, y = data["x"][: args.n], data["y"][: args.n]
    server, address = start_server(repository, args.hosts)
    rows = []
    try:
        with interscope.Client(address, timeout=3600) as client:
            for name in MODELS:
                began = time.perf_counter()
                ours = client.attack(
                    model=name,
                    x=x,
                    y=y,
                    attack="autoattack",
                    norm="linf",
                    eps=args.eps,
                    seed=0,
                    omit_adversarial=True,
                )
                t_ours = time.perf_counter() - began
                model = load_torchscript(repository / name / "model.pt")
                began = time.perf_counter()
                theirs = reference(model, x, y, args.eps)
                t_theirs = time.perf_counter() - began
                rows.append((name, ours.robust_accuracy, theirs, t_ours, t_theirs))
                print(
                    f"{name}: ours {ours.robust_accuracy:.3f} in {t_ours:.1f} s, torchattacks "
                    f"{theirs:.3f} in {t_theirs:.1f} s",
                    flush=True,
                )
    finally:
        server.terminate()
        server.wait()

    print(
        f"\nAutoAttack standard, L-inf eps {args.eps}, {args.n} digits, seed 0, one thread each; "
        f"ours through the server, models in {args.hosts} hosts"
    )
    print(f"{'model':20s}{'ours':>8s}{'theirs':>8s}{'|diff|':>8s}{'ours s':>9s}{'theirs s':>10s}"
          f"{'ratio':>7s}")  # fmt: skip
    ok = True
    for name, acc_ours, acc_theirs, t_ours, t_theirs in rows:
        diff = abs(acc_ours - acc_theirs)
        ok &= diff <= TOLERANCE
        print(
            f"{name:20s}{acc_ours:8.3f}{acc_theirs:8.3f}{diff:8.3f}{t_ours:9.1f}{t_theirs:10.1f}"
            f"{t_ours / t_theirs:7.2f}"
        )
    print(f"robust accuracies within {TOLERANCE}: {'ok' if ok else 'MISSED'}")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
