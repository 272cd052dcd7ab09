"""Gradient-masking figures: the flags and checks of PGD (eps 0.1, 10 steps) on the demo models
and on masking variants of the standard one, and the demo models' robustness curves.

    PYTHONPATH=$PWD/client:$PWD/service:$PWD .venv/bin/python bench/bench_masking.py [--samples 48]

Runs a real server on a temporary repository (the demo's models plus tests/server/masking's
variants); prints one line per model and attack summary, then each audit's curve.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
from pathlib import Path

import numpy as np

from interscope import Client
from interscope_server.config import Settings
from interscope_server.demo import TEST_DATA_FILE, build_demo_repository
from interscope_server.server import BackgroundServer
from tests.server.masking.masking_models import build_masking_repository

DEMO = Path(__file__).resolve().parent.parent / ".cache" / "demo-repository"


def _counts(examples) -> str:
    checks = [e.checks for e in examples if e.checks is not None]
    zero = sum(c.gradient_l1 <= 1e-12 for c in checks)
    flat = sum(c.loss_gain <= 1e-6 for c in checks)
    bb = [c.black_box_fooled for c in checks if c.black_box_fooled is not None]
    ms = [c.more_steps_fooled for c in checks if c.more_steps_fooled is not None]
    return (
        f"checked {len(checks)}, zero-gradient {zero}, loss not rising {flat}, "
        f"Square fooled {sum(bb)}/{len(bb)}, 2x steps fooled {sum(ms)}/{len(ms)}"
    )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--samples", type=int, default=48)
    args = parser.parse_args()
    demo = build_demo_repository(DEMO)
    with np.load(demo / TEST_DATA_FILE) as data:
        x, y = data["x"][: args.samples], data["y"][: args.samples]
    with tempfile.TemporaryDirectory() as tmp:
        repo = build_masking_repository(demo, Path(tmp))
        for name in ("digits-cnn", "digits-cnn-adv"):
            shutil.copytree(demo / name, repo / name)
        settings = Settings(
            host="127.0.0.1",
            port=0,
            metrics_port=None,
            model_repository=repo,
            model_hosts="inline",  # eight models: one host interpreter each would dominate
        )
        with BackgroundServer(settings) as srv, Client(srv.address) as client:
            names = ["digits-cnn", "digits-cnn-adv", "digits-quantised", "digits-saturated"]
            names += ["digits-shattered", "digits-gated"]
            for name in names:
                result = client.attack(
                    model=name, x=x, y=y, options={"eps": 0.1, "steps": 10}, omit_adversarial=True
                )
                s = result.summary
                flags = ", ".join(
                    f"{f.code} {dict(sorted(f.numbers.items()))}" for f in s.masking_flags
                )
                print(
                    f"{name}: clean {s.clean_accuracy:.4f} robust {s.robust_accuracy:.4f}; "
                    f"{_counts(result.examples)}; flags: {flags or 'none'}",
                    flush=True,
                )
            for name in ("digits-cnn", "digits-cnn-adv", "digits-gated"):
                report = client.audit(
                    model=name,
                    x=x,
                    y=y,
                    # The curve is the point here; the Square check is reported above.
                    attack={"eps": 0.1, "steps": 10, "check_queries": 0},
                    profile={"grid": (2, 2), "estimator": "exact"},
                    eps_sweep=[0.02, 0.05, 0.1, 0.15, 0.2],
                )
                curve = report.summary.robustness_curve
                assert curve is not None
                points = ", ".join(
                    f"{e:g}: {a:.4f}" for e, a in zip(curve.eps, curve.robust_accuracy, strict=True)
                )
                flags = ", ".join(f.code for f in report.summary.masking_flags) or "none"
                print(f"audit {name}: robust accuracy by eps {points}; flags: {flags}", flush=True)


if __name__ == "__main__":
    main()
