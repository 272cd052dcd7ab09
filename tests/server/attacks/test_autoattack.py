"""DLR loss, FAB and AUTOATTACK: exact values, closed-form boundaries, and the composition."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from interscope_server.attacks import AttackSpec, run_attack
from interscope_server.attacks.base import Goal, dlr
from interscope_server.attacks.fab import project_onto_plane
from interscope_server.errors import InvalidArgument


class CountingModule(torch.nn.Module):
    """Counts the rows of every forward pass of the module it wraps."""

    def __init__(self, inner: torch.nn.Module) -> None:
        super().__init__()
        self.inner = inner
        self.rows = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.rows += x.shape[0]
        out: torch.Tensor = self.inner(x)
        return out


def test_dlr_matches_hand_computed_values() -> None:
    logits = torch.tensor([[3.0, 1.0, 2.0, 0.0], [3.0, 1.0, 2.0, 0.0], [0.5, 4.0, -1.0, 2.0]])
    labels = torch.tensor([0, 2, 1])
    # Sorted rows: (3, 2, 1, 0) twice, (4, 2, 0.5, -1).
    # Untargeted: -(z_y - max_other) / (z1 - z3).
    expected = [-(3 - 2) / (3 - 1), -(2 - 3) / (3 - 1), -(4 - 2) / (4 - 0.5)]
    np.testing.assert_allclose(dlr(logits, labels).numpy(), expected, rtol=1e-6)
    # Targeted: -(z_y - z_t) / (z1 - (z3 + z4) / 2).
    targets = torch.tensor([3, 1, 0])
    expected_t = [-(3 - 0) / (3 - 0.5), -(2 - 1) / (3 - 0.5), -(4 - 0.5) / (4 - (0.5 - 1) / 2)]
    np.testing.assert_allclose(dlr(logits, labels, targets).numpy(), expected_t, rtol=1e-6)
    goal = Goal(labels, targets)
    np.testing.assert_allclose(goal.objective(logits, "dlr").numpy(), expected_t, rtol=1e-6)


def test_dlr_does_not_change_when_logits_are_shifted_or_scaled() -> None:
    logits = torch.randn(8, 10, generator=torch.Generator().manual_seed(0))
    labels = torch.arange(8)
    np.testing.assert_allclose(
        dlr(7 * logits + 3, labels).numpy(), dlr(logits, labels).numpy(), rtol=1e-4
    )


def test_apgd_dlr_attacks_and_its_loss_is_checked(
    tiny_model: torch.nn.Module, standard_model: torch.nn.Module, digits
) -> None:
    x, y = digits[0][:16], digits[1][:16]
    ce = run_attack(AttackSpec("apgd", eps=0.15, steps=10), x, y, standard_model, None)
    dlr_run = run_attack(
        AttackSpec("apgd", eps=0.15, steps=10, loss="dlr"), x, y, standard_model, None
    )
    assert dlr_run.summary.robust_accuracy < dlr_run.summary.clean_accuracy
    assert ce.summary.robust_accuracy < ce.summary.clean_accuracy
    with pytest.raises(InvalidArgument, match="pgd does not take a loss choice"):
        AttackSpec("pgd", loss="dlr")
    with pytest.raises(InvalidArgument, match="unknown loss"):
        AttackSpec("apgd", loss="hinge")  # type: ignore[arg-type]
    # tiny_model has 3 classes: enough for DLR, not for targeted DLR.
    x3 = np.random.default_rng(0).random((4, 1, 8, 8), dtype=np.float32)
    y3 = np.zeros(4, dtype=np.int64)
    run_attack(AttackSpec("apgd", eps=0.1, steps=2, loss="dlr"), x3, y3, tiny_model, None)
    targeted = AttackSpec("apgd", eps=0.1, steps=2, loss="dlr", targeted=True, target_classes=(1,))
    with pytest.raises(InvalidArgument, match="at least 4 classes, this one has 3"):
        run_attack(targeted, x3, y3, tiny_model, None)


def _affine(w: torch.Tensor, b: float) -> torch.nn.Module:
    """Two classes with logits (0, w . x + b): the boundary is the plane w . x + b = 0."""
    layer = torch.nn.Linear(w.numel(), 2)
    with torch.no_grad():
        layer.weight.copy_(torch.stack([torch.zeros_like(w), w]))
        layer.bias.copy_(torch.tensor([0.0, b]))
    return layer.eval().requires_grad_(False)


@pytest.mark.parametrize("norm", ["l2", "linf"])
def test_fab_finds_the_closed_form_distance_to_an_affine_boundary(norm: str) -> None:
    gen = torch.Generator().manual_seed(3)
    w = torch.randn(6, generator=gen)
    model = _affine(w, 0.3)
    x = torch.rand((10, 6), generator=gen) * 2 - 1
    score = (x @ w + 0.3).numpy().astype(np.float64)
    y = (score > 0).astype(np.int64)
    dual = np.abs(w.numpy()).sum() if norm == "linf" else float(w.norm())
    distance = np.abs(score) / dual
    spec = AttackSpec(
        "fab",
        norm=norm,
        eps=9.0,
        value_range=(-10.0, 10.0),
        layout="features",  # type: ignore[arg-type]
    )
    report = run_attack(spec, x.numpy(), y, model, None)
    assert all(r.success for r in report.results)
    found = np.array([r.linf if norm == "linf" else r.l2 for r in report.results])
    # The eta = 1.05 overshoot and beta = 0.9 pull-back settle into a cycle whose best point
    # lies 0.5% beyond the boundary on a plane (worked by hand: 1.0052 times the distance).
    np.testing.assert_allclose(found, distance, rtol=1e-2)
    assert (found >= distance * (1 - 1e-5)).all()  # never inside the boundary
    # Success only within eps: an eps below every distance leaves every input robust.
    small = AttackSpec(
        "fab",
        norm=norm,  # type: ignore[arg-type]
        eps=float(distance.min()) * 0.9,
        value_range=(-10.0, 10.0),
        layout="features",
        steps=20,
    )
    assert run_attack(small, x.numpy(), y, model, None).summary.n_success == 0


@pytest.mark.parametrize("norm", ["l2", "linf"])
def test_box_constrained_projection_reaches_the_plane_at_least_norm(norm: str) -> None:
    # One coordinate has no room upwards, so the optimum moves the others further.
    w = torch.tensor([[1.0, 2.0, -1.0]], dtype=torch.float64)
    c = torch.tensor([1.0], dtype=torch.float64)
    up = torch.tensor([[10.0, 0.0, 10.0]], dtype=torch.float64)
    down = torch.tensor([[10.0, 10.0, 10.0]], dtype=torch.float64)
    delta = project_onto_plane(w, c, up, down, norm)  # type: ignore[arg-type]
    assert float((w * delta).sum()) == pytest.approx(1.0, abs=1e-9)
    assert float(delta[0, 1]) == 0.0
    # Closed forms on the two free coordinates (w = 1 and -1): L-inf moves both by 1/2,
    # L2 moves along (1, -1) / 2 too (equal |w|), so both give (0.5, 0, -0.5).
    np.testing.assert_allclose(delta.numpy(), [[0.5, 0.0, -0.5]], atol=1e-9)


def test_autoattack_beats_apgd_ce_and_attacks_only_what_is_still_robust(
    adversarial_model: torch.nn.Module, digits
) -> None:
    x, y = digits[0][:12], digits[1][:12]
    steps, queries = 5, 30
    apgd_spec = AttackSpec("apgd", eps=0.15, steps=steps, seed=4)
    apgd = run_attack(apgd_spec, x, y, adversarial_model, None)
    counted = CountingModule(adversarial_model)
    # The runner's gradient-masking checks off: this counts AutoAttack's own passes.
    spec = AttackSpec(
        "autoattack",
        eps=0.15,
        steps=steps,
        query_budget=queries,
        seed=4,
        check_queries=0,
        check_reruns=0,
    )
    auto = run_attack(spec, x, y, counted, None)
    assert auto.summary.robust_accuracy <= apgd.summary.robust_accuracy
    assert auto.summary.robust_accuracy < auto.summary.clean_accuracy
    for a, b in zip(apgd.results, auto.results, strict=True):
        assert b.adversarial_prediction == b.label or b.success
        if a.success:  # APGD-CE ran first with the same start: it fooled these, nothing else ran
            assert b.success and b.queries == 1 + a.queries
        elif b.attacked:  # the rest went on to APGD-T (and further, until one fooled them)
            assert b.queries > 1 + a.queries
        assert b.linf <= 0.15
    # Every forward the model saw is in some example's count (plus the runner's clean pass).
    # (and the gradient-masking checks' own count, kept apart in the summary).
    assert counted.rows == len(x) + auto.summary.total_queries + auto.summary.check_queries
    robust = [r for r in auto.results if r.attacked and not r.success]
    # Those no attack fooled paid for all of them, Square's whole budget included.
    assert all(r.queries >= 1 + (steps + 1) * 10 + 9 * (2 * steps + 1) + queries for r in robust)


def test_autoattack_l2_keeps_to_the_ball(standard_model: torch.nn.Module, digits) -> None:
    x, y = digits[0][:8], digits[1][:8]
    apgd = run_attack(
        AttackSpec("apgd", norm="l2", eps=1.0, steps=5, seed=1), x, y, standard_model, None
    )
    spec = AttackSpec("autoattack", norm="l2", eps=1.0, steps=5, query_budget=30, seed=1)
    auto = run_attack(spec, x, y, standard_model, None)
    assert auto.summary.robust_accuracy <= apgd.summary.robust_accuracy
    assert max(r.l2 for r in auto.results) <= 1.0
    assert all(r.x_adv.min() >= 0.0 and r.x_adv.max() <= 1.0 for r in auto.results)
    # With the default masking checks: the gradient checks only; its own Square stage is the
    # black-box check, and no second ensemble run is spent on the more-steps one.
    checked = [r.checks for r in auto.results if r.attacked and not r.success]
    assert checked and all(c is not None and math.isfinite(c.gradient_l1) for c in checked)
    assert all(c.black_box_fooled is None and c.more_steps_fooled is None for c in checked)


def test_autoattack_rejects_what_it_cannot_honour(tiny_model: torch.nn.Module) -> None:
    with pytest.raises(InvalidArgument, match="autoattack is untargeted"):
        AttackSpec("autoattack", targeted=True, target_classes=(1,))
    with pytest.raises(InvalidArgument, match="restarts must be 1"):
        AttackSpec("autoattack", restarts=2)
    with pytest.raises(InvalidArgument, match="sets its own step size"):
        AttackSpec("autoattack", step_size=0.01)
    with pytest.raises(InvalidArgument, match="does not take a loss choice"):
        AttackSpec("autoattack", loss="dlr")
    x3 = np.random.default_rng(0).random((2, 1, 8, 8), dtype=np.float32)
    with pytest.raises(InvalidArgument, match="at least 4 classes"):
        run_attack(AttackSpec("autoattack"), x3, np.zeros(2, np.int64), tiny_model, None)
