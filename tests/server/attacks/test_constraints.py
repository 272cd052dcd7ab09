"""Every attack, under every norm, returns inputs inside the eps ball and the value range."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch

from interscope_server.attacks import (
    ATTACK_NAMES,
    NORMS,
    AttackName,
    AttackSpec,
    Evaluator,
    Norm,
    run_attack,
)

EPS = {"linf": 0.1, "l2": 0.7}  # neither is a float32 number, so rounding is exercised


def _check(x: np.ndarray, x_adv: np.ndarray, spec: AttackSpec) -> None:
    assert x_adv.dtype == np.float32
    assert x_adv.shape == x.shape
    # float64 differences of float32 numbers are exact: no tolerance is needed or allowed.
    delta = (x_adv.astype(np.float64) - x.astype(np.float64)).reshape(len(x), -1)
    if spec.norm == "linf":
        assert np.abs(delta).max() <= spec.eps
    else:
        assert np.sqrt((delta**2).sum(axis=1)).max() <= spec.eps
    low, high = spec.value_range
    assert x_adv.min() >= low
    assert x_adv.max() <= high


def _spec(name: AttackName, norm: Norm, **extra: Any) -> AttackSpec:
    budget: dict[str, Any] = {"max_queries": 60} if name in ("simba", "square") else {}
    if name in ("pgd", "apgd", "margin_pgd"):
        budget["steps"] = 8
    return AttackSpec(name, norm=norm, eps=EPS[norm], **budget, **extra)


@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("name", ATTACK_NAMES)
def test_results_stay_in_ball_and_range(
    name: AttackName,
    norm: Norm,
    standard_model: torch.nn.Module,
    standard_onnx: Evaluator,
    digits: tuple[np.ndarray, np.ndarray],
) -> None:
    x, y = digits[0][:16], digits[1][:16]
    spec = _spec(name, norm)
    report = run_attack(spec, x, y, standard_model, standard_onnx, batch_size=8)
    _check(x, report.x_adv, spec)
    for r in report.results:
        assert (r.linf if norm == "linf" else r.l2) <= spec.eps
    assert any(r.l0 > 0 for r in report.results)  # the attack did move something


@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("name", ["pgd", "fgsm", "apgd", "square"])
def test_odd_value_range_is_respected_exactly(
    name: AttackName, norm: Norm, tiny_model: torch.nn.Module
) -> None:
    # Bounds float32 cannot represent, inputs on the nearest float32 inside them, big steps.
    low, high = -0.1, 0.7
    low32 = np.nextafter(np.float32(low), np.float32(1))
    high32 = np.nextafter(np.float32(high), np.float32(0))
    assert low32 >= low and high32 <= high
    x = np.random.default_rng(0).uniform(low, high, size=(12, 1, 8, 8)).astype(np.float32)
    x = np.clip(x, low32, high32)
    x[:, :, :2] = low32
    x[:, :, -2:] = high32
    y = np.arange(12) % 3

    def evaluate(batch: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            out: np.ndarray = tiny_model(torch.from_numpy(batch)).numpy()
        return out

    extra: dict[str, Any] = {"value_range": (low, high)}
    if name in ("pgd", "fgsm"):
        extra["step_size"] = 1.0
    spec = _spec(name, norm, **extra)
    report = run_attack(spec, x, y, tiny_model, evaluate, batch_size=5)
    _check(x, report.x_adv, spec)
