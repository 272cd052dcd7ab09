"""attacks.masking: the per-example checks the runner adds to white-box attacks, on a linear
model whose CE gradient is known in closed form."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from interscope_server.attacks import AttackSpec, run_attack
from interscope_server.attacks.masking import MAX_EPS_SWEEP, sweep_specs
from interscope_server.errors import InvalidArgument


def _linear() -> torch.nn.Module:
    torch.manual_seed(0)
    model = torch.nn.Linear(6, 3)
    with torch.no_grad():
        model.weight.mul_(0.2)
    return model.eval()


def test_checks_run_on_robust_examples_with_the_exact_gradient() -> None:
    model = _linear()
    rng = np.random.default_rng(1)
    x = rng.uniform(0, 1, size=(20, 6)).astype(np.float32)
    with torch.no_grad():
        y = model(torch.from_numpy(x)).argmax(1).numpy()
    spec = AttackSpec(
        name="pgd", eps=0.01, steps=3, layout="features", check_queries=7, check_reruns=4
    )
    report = run_attack(spec, x, y, model, lambda b: model(torch.from_numpy(b)).detach().numpy())
    robust = [r for r in report.results if not r.success]
    assert robust and all(r.checks is not None for r in robust)
    assert all(r.checks is None and r.check_queries == 0 for r in report.results if r.success)
    w = model.weight.detach().double().numpy()
    b = model.bias.detach().double().numpy()
    for r in robust:
        z = w @ x[r.index].astype(np.float64) + b
        p = np.exp(z - z.max()) / np.exp(z - z.max()).sum()
        p[r.label] -= 1  # d CE / d z = softmax - onehot
        assert r.checks.gradient_l1 == pytest.approx(np.abs(w.T @ p).sum(), rel=1e-5)
        assert r.checks.black_box_fooled is not None
    rerun = [r for r in robust if r.checks.more_steps_fooled is not None]
    assert len(rerun) == min(4, len(robust))
    # One gradient pass, at most 7 Square queries, and 2 * 3 steps + 1 final pass per re-run.
    for r in robust:
        extra = 7 if r.checks.more_steps_fooled is None else 7 + 7
        assert 1 + 1 <= r.check_queries <= 1 + extra
    assert report.summary.check_queries == sum(r.check_queries for r in report.results)
    # Turning both second attacks off leaves only the gradient probe.
    off = run_attack(
        AttackSpec(
            name="pgd", eps=0.01, steps=3, layout="features", check_queries=0, check_reruns=0
        ),
        x,
        y,
        model,
        None,
    )
    assert all(r.check_queries == 1 for r in off.results if not r.success)
    assert all(
        r.checks.black_box_fooled is None and r.checks.more_steps_fooled is None
        for r in off.results
        if r.checks
    )
    # The checks leave the attack's own results untouched.
    assert [r.adversarial_prediction for r in off.results] == [
        r.adversarial_prediction for r in report.results
    ]


def test_sweep_specs_sort_and_refuse() -> None:
    spec = AttackSpec(name="pgd", eps=0.1)
    assert [s.eps for s in sweep_specs(spec, [0.2, 0.05])] == [0.05, 0.2]
    assert all(s.check_queries == 0 and s.check_reruns == 0 for s in sweep_specs(spec, [0.2]))
    for bad in (
        [0.0],
        [-1.0],
        [2.0],
        [0.1, 0.1],
        [0.01] * 0 + [0.01 * (i + 1) for i in range(MAX_EPS_SWEEP + 1)],
    ):
        with pytest.raises(InvalidArgument):
            sweep_specs(spec, bad)


def test_check_options_are_validated() -> None:
    with pytest.raises(InvalidArgument, match="check_queries"):
        AttackSpec(name="pgd", check_queries=-1)
    with pytest.raises(InvalidArgument, match="check_reruns"):
        AttackSpec(name="pgd", check_reruns=10**6)
