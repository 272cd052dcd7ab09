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
    budget: dict[str, Any] = {"query_budget": 60} if name in ("simba", "square") else {}
    if name in ("pgd", "apgd", "pgd_margin"):
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


#: Per-feature ranges of very different widths, none with float32-exact bounds.
FEATURE_RANGES = ((-0.1, 0.7), (1000.3, 5000.7), (0.001, 0.0013), (-7.7, -3.3), (0.0, 1e-5))


@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("name", ATTACK_NAMES)
def test_per_feature_ranges_and_eps_units_are_respected_exactly(
    name: AttackName, norm: Norm
) -> None:
    pairs = np.asarray(FEATURE_RANGES)
    low32 = np.array([np.nextafter(np.float32(a), np.float32(np.inf)) for a in pairs[:, 0]])
    high32 = np.array([np.nextafter(np.float32(b), np.float32(-np.inf)) for b in pairs[:, 1]])
    rng = np.random.default_rng(0)
    x = rng.uniform(pairs[:, 0], pairs[:, 1], size=(12, len(pairs))).astype(np.float32)
    x = np.clip(x, low32, high32)
    x[:3] = low32.astype(np.float32)
    x[3:6] = high32.astype(np.float32)
    # Four classes: AUTOATTACK's targeted DLR loss needs them.
    y = np.arange(12) % 4
    torch.manual_seed(0)
    # Works on unit-scaled features, so every feature matters despite the scales.
    scale = torch.from_numpy(1 / (pairs[:, 1] - pairs[:, 0])).float()
    offset = torch.from_numpy(pairs[:, 0]).float()
    linear = torch.nn.Linear(len(pairs), 4)
    model = torch.nn.Sequential(_Affine(offset, scale), linear).eval()

    def evaluate(batch: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            out: np.ndarray = model(torch.from_numpy(batch)).numpy()
        return out

    eps = 0.3
    extra: dict[str, Any] = {"value_range": FEATURE_RANGES, "layout": "features"}
    if name in ("pgd", "fgsm"):
        extra["step_size"] = 1.0  # big steps, so the projection does the work
    spec = AttackSpec(name, norm=norm, eps=eps, **_budget(name), **extra)
    report = run_attack(spec, x, y, model, evaluate, batch_size=5)
    adv, x64 = report.x_adv.astype(np.float64), x.astype(np.float64)
    width = pairs[:, 1] - pairs[:, 0]
    assert (adv >= pairs[:, 0]).all() and (adv <= pairs[:, 1]).all()
    if norm == "linf":
        assert (np.abs(adv - x64) <= eps * width).all()
    else:
        assert (np.sqrt((((adv - x64) / width) ** 2).sum(axis=1)) <= eps).all()
    # Features of tiny and huge ranges alike moved: eps is in units of each range (Square L2
    # may move one feature's mass elsewhere, so not every feature need end moved).
    moved = (adv != x64).any(axis=0)
    assert moved.sum() >= 3 and (moved[2] or moved[4])


class _Affine(torch.nn.Module):
    def __init__(self, offset: torch.Tensor, scale: torch.Tensor) -> None:
        super().__init__()
        self.offset, self.scale = offset, scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.offset) * self.scale


def _budget(name: AttackName) -> dict[str, Any]:
    if name in ("simba", "square"):
        return {"query_budget": 60}
    if name == "autoattack":
        return {"steps": 4, "query_budget": 60}
    return {"steps": 8} if name in ("pgd", "apgd", "pgd_margin", "fab") else {}
