"""Attacks on the demo digits CNNs do what their papers say: fool, hit targets, stop at margins."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch

from interscope_server.attacks import AttackName, AttackSpec, Evaluator, Norm, run_attack

EPS = 0.1  # the demo's training and evaluation radius (L-inf, raw [0, 1] scale)


def _refuse(x: np.ndarray) -> np.ndarray:
    raise AssertionError("white-box attacks must not call the evaluator")


@pytest.mark.parametrize("name", ["pgd", "apgd"])
def test_targeted_attacks_reach_their_targets(
    name: AttackName, standard_model: torch.nn.Module, digits: tuple[np.ndarray, np.ndarray]
) -> None:
    x, y = digits[0][:24], digits[1][:24]
    targets = tuple(int(t) for t in (y + 3) % 10)
    spec = AttackSpec(name, eps=0.3, steps=40, targeted=True, target_classes=targets)
    report = run_attack(spec, x, y, standard_model, _refuse, batch_size=12)
    reached = [r.adversarial_prediction == r.target for r in report.results]
    assert [r.success for r in report.results] == reached
    assert np.mean(reached) >= 0.9
    assert report.summary.n_attacked == 24  # no clean input already predicts its target


def test_adversarial_training_keeps_more_robust_accuracy_under_pgd(
    standard_model: torch.nn.Module,
    adversarial_model: torch.nn.Module,
    digits: tuple[np.ndarray, np.ndarray],
) -> None:
    x, y = digits
    spec = AttackSpec("pgd", eps=EPS, steps=20, step_size=0.01)
    standard = run_attack(spec, x, y, standard_model, _refuse, batch_size=24).summary
    robust = run_attack(spec, x, y, adversarial_model, _refuse, batch_size=24).summary
    assert standard.clean_accuracy > 0.9 and robust.clean_accuracy > 0.9
    assert robust.robust_accuracy >= standard.robust_accuracy + 0.15


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_square_lowers_onnx_accuracy_with_forward_passes_only(
    norm: Norm, standard_onnx: Any, digits: tuple[np.ndarray, np.ndarray]
) -> None:
    x, y = digits[0][:32], digits[1][:32]
    budget = 200
    spec = AttackSpec("square", norm=norm, eps=EPS if norm == "linf" else 1.5, query_budget=budget)
    report = run_attack(spec, x, y, None, standard_onnx, batch_size=16)
    summary = report.summary
    assert summary.robust_accuracy <= summary.clean_accuracy - 0.15
    # Every forward pass went through the evaluator: the clean pass plus the attack's queries.
    assert standard_onnx.rows == len(x) + summary.total_queries
    for r in report.results:
        if not r.attacked:
            assert r.queries == 0
        elif r.success:
            assert 1 <= r.queries < budget
        else:
            assert r.queries == budget
        assert r.steps == max(r.queries - 1, 0)


def test_margin_pgd_ends_at_the_threshold(
    standard_model: torch.nn.Module, digits: tuple[np.ndarray, np.ndarray]
) -> None:
    x, y = digits[0][:24], digits[1][:24]
    threshold, tolerance = 6.0, 0.5
    spec = AttackSpec(
        "pgd_margin", eps=0.3, steps=100, margin_threshold=threshold, margin_tolerance=tolerance
    )
    report = run_attack(spec, x, y, standard_model, _refuse, batch_size=12)
    # The paper's margin, max_{c != y} z_c - z_y, is minus the label margin reported.
    attack_margins = np.array([-r.adversarial_margin for r in report.results])
    started_past = np.array([-r.clean_margin >= threshold for r in report.results])
    kept = ~started_past & (attack_margins >= threshold)
    assert kept.mean() >= 0.8
    assert (attack_margins[kept] <= threshold + tolerance).all()
    assert all(r.attacked and r.success for r, k in zip(report.results, kept, strict=True) if k)
    # Halving on overshoot takes extra steps; the step budget is still a hard cap.
    assert max(r.steps for r in report.results) <= 100


def test_pgd_early_stop_spends_fewer_steps_than_the_budget(
    standard_model: torch.nn.Module, digits: tuple[np.ndarray, np.ndarray]
) -> None:
    x, y = digits[0][:24], digits[1][:24]
    spec = AttackSpec("pgd", eps=0.3, steps=30, step_size=0.02)
    report = run_attack(spec, x, y, standard_model, _refuse, batch_size=24)
    fooled = [r for r in report.results if r.attacked and r.success]
    assert fooled and all(r.steps < 30 for r in fooled)
    # A fooled example stopped at its first successful iterate: one forward per step taken, +1.
    assert all(r.queries == r.steps + 1 for r in fooled)


def test_targeted_square_counts_only_its_targets(
    standard_onnx: Evaluator, digits: tuple[np.ndarray, np.ndarray]
) -> None:
    x, y = digits[0][:16], digits[1][:16]
    targets = tuple(int(t) for t in (y + 1) % 10)
    spec = AttackSpec("square", eps=0.3, query_budget=150, targeted=True, target_classes=targets)
    report = run_attack(spec, x, y, None, standard_onnx, batch_size=16)
    assert [r.success for r in report.results] == [
        r.adversarial_prediction == r.target for r in report.results
    ]
    assert report.summary.success_rate >= 0.5
