"""PGD (L-inf) against torchattacks.PGD on the same model, batch, eps, steps and step size."""

from __future__ import annotations

import argparse
import statistics
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from interscope_server.attacks import AttackSpec, run_attack
from interscope_server.demo import TEST_DATA_FILE, build_demo_repository

DEMO_CACHE = Path(__file__).resolve().parent.parent / ".cache" / "demo-repository"


class RawInput(torch.nn.Module):
    """The demo network behind its normalisation, as the registry hands it to white-box attacks."""

    def __init__(self, inner: torch.nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.inner((x - 0.5) / 0.5)
        return out


def load_torchscript(path: Path) -> torch.nn.Module:
    """A demo TorchScript model behind its normalisation, taking raw [0, 1] inputs."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        inner = torch.jit.load(str(path), map_location="cpu")
    return RawInput(inner.eval()).eval()


def _time(run: Callable[[], float]) -> tuple[float, float]:
    """Seconds for one run and the robust accuracy it returned."""
    start = time.perf_counter()
    accuracy = run()
    return time.perf_counter() - start, accuracy


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="digits-cnn-ts", help="demo TorchScript model")
    parser.add_argument("--eps", type=float, default=0.1)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--step-size", type=float, default=0.01)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    args = parser.parse_args()

    import torchattacks  # dev-only comparison; not a dependency of the service

    torch.set_num_threads(args.threads)
    root = build_demo_repository(DEMO_CACHE)
    model = load_torchscript(root / args.model / "model.pt")
    with np.load(root / TEST_DATA_FILE) as data:
        x, y = data["x"], data["y"]
    x_t, y_t = torch.from_numpy(x), torch.from_numpy(y)

    spec = AttackSpec(
        "pgd", eps=args.eps, steps=args.steps, step_size=args.step_size, random_start=True
    )

    passes = [0]

    def ours() -> float:
        # End to end: clean pass, attack, results and summary (the service's real cost).
        report = run_attack(spec, x, y, model, None, batch_size=args.batch_size)
        passes[0] = report.summary.total_queries
        return report.summary.robust_accuracy

    reference = torchattacks.PGD(
        model, eps=args.eps, alpha=args.step_size, steps=args.steps, random_start=True
    )

    def theirs() -> float:
        torch.manual_seed(0)
        correct = 0
        for start in range(0, len(x), args.batch_size):
            xb, yb = x_t[start : start + args.batch_size], y_t[start : start + args.batch_size]
            adv = reference(xb, yb)
            with torch.no_grad():
                correct += int((model(adv).argmax(dim=1) == yb).sum())
        return correct / len(x)

    for _ in range(2):  # warm-up: TorchScript profiling runs and allocator growth
        ours(), theirs()
    # Rounds run both back to back, alternating which goes first, and the ratio is the median of
    # per-round ratios, so a busy neighbor slows both sides of a round alike.
    rounds: list[tuple[float, float]] = []
    acc_ours = acc_theirs = 0.0
    for i in range(args.repeats):
        if i % 2:
            (t_theirs, acc_theirs), (t_ours, acc_ours) = _time(theirs), _time(ours)
        else:
            (t_ours, acc_ours), (t_theirs, acc_theirs) = _time(ours), _time(theirs)
        rounds.append((t_ours, t_theirs))
    t_ours = statistics.median(o for o, _ in rounds)
    t_theirs = statistics.median(t for _, t in rounds)
    ratio = statistics.median(o / t for o, t in rounds)

    print(
        f"PGD L-inf on {args.model}: {len(x)} inputs, batch {args.batch_size}, eps {args.eps}, "
        f"{args.steps} steps of {args.step_size}, random start, {args.threads} thread(s), "
        f"median of {args.repeats} rounds"
    )
    # Attack passes over input rows (ours: forward-backward plus the final forward of inputs
    # never fooled); ours stops each input at its first successful iterate.
    print(f"{'':24s}{'seconds':>10s}{'robust acc':>12s}{'row passes':>12s}")
    print(f"{'interscope PGD':24s}{t_ours:10.3f}{acc_ours:12.4f}{passes[0]:12d}")
    print(f"{'torchattacks.PGD':24s}{t_theirs:10.3f}{acc_theirs:12.4f}{args.steps * len(x):12d}")
    time_ok = ratio <= 1.0
    acc_ok = acc_ours <= acc_theirs + 0.01
    verdict = "ok" if time_ok else "MISSED"
    print(f"time ratio (ours / torchattacks, median per round): {ratio:.3f}  <= 1.0: {verdict}")
    print(
        f"robust accuracy difference: {acc_ours - acc_theirs:+.4f}  target <= +0.01: "
        f"{'ok' if acc_ok else 'MISSED'}"
    )
    return 0 if time_ok and acc_ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
