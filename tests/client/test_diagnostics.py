"""interscope._diagnostics on synthetic per-example checks: each flag at its threshold."""

from __future__ import annotations

import math

import pytest

from interscope._diagnostics import (
    BLACK_BOX_WINS,
    LOSS_FLAT,
    MIN_CHECKED,
    MORE_STEPS_WIN,
    NON_MONOTONE,
    ExampleChecks,
    diagnose,
    non_monotone,
    robustness_curve,
)

HEALTHY = ExampleChecks(
    gradient_l1=3.0, loss_gain=1.5, black_box_fooled=False, more_steps_fooled=False
)


def _codes(flags) -> list[str]:
    return [f.code for f in flags]


def test_healthy_checks_raise_nothing() -> None:
    assert diagnose([HEALTHY] * 50) == []


def test_loss_flat_counts_zero_nonfinite_and_flat_loss_together() -> None:
    checks = (
        [ExampleChecks(0.0, 1.0)] * 2
        + [ExampleChecks(math.nan, 1.0)] * 2
        + [ExampleChecks(2.0, 0.0)] * 1
        + [HEALTHY] * 5
    )
    (flag,) = diagnose(checks)
    assert flag.code == LOSS_FLAT
    assert dict(flag.numbers) == {
        "n_checked": 10,
        "n_zero_gradient": 2,
        "n_nonfinite_gradient": 2,
        "n_loss_not_rising": 1,
        "share": 0.5,
    }
    # One flat example fewer: below half, quiet.
    assert diagnose([*checks[1:], HEALTHY]) == []


def test_too_few_checked_examples_give_no_verdict() -> None:
    assert diagnose([ExampleChecks(0.0, 0.0, True, True)] * (MIN_CHECKED - 1)) == []
    assert _codes(diagnose([ExampleChecks(0.0, 0.0, True, True)] * MIN_CHECKED)) == [
        LOSS_FLAT,
        BLACK_BOX_WINS,
        MORE_STEPS_WIN,
    ]


@pytest.mark.parametrize(
    "field, code", [("black_box_fooled", BLACK_BOX_WINS), ("more_steps_fooled", MORE_STEPS_WIN)]
)
def test_second_attack_wins_need_a_tenth_and_two(field: str, code: str) -> None:
    def checks(wins: int, n: int) -> list[ExampleChecks]:
        return [ExampleChecks(1.0, 1.0, **{field: i < wins}) for i in range(n)]

    (flag,) = diagnose(checks(3, 30))
    assert flag.code == code and flag.numbers["n_fooled"] == 3 and flag.numbers["share"] == 0.1
    assert diagnose(checks(2, 30)) == []  # 2/30 < 0.1
    assert diagnose(checks(1, 5)) == []  # a fifth, but one example only
    # Examples the check did not run on (None) are not counted.
    assert diagnose(checks(2, 10) + [ExampleChecks(1.0, 1.0)] * 90)[0].numbers["share"] == 0.2


def test_curve_and_non_monotone_rise() -> None:
    eps = [0.01, 0.02, 0.03]
    rows = [[True, False, True]] * 3 + [[False, False, False]] * 7
    assert robustness_curve(eps, rows) == [0.3, 0.0, 0.3]
    assert non_monotone(eps, rows) == {
        "eps_low": 0.02,
        "eps_high": 0.03,
        "robust_accuracy_low": 0.0,
        "robust_accuracy_high": 0.3,
        "rise": 0.3,
    }
    (flag,) = diagnose([], eps, rows)
    assert flag.code == NON_MONOTONE
    # Non-increasing curves, and a rise of one sample, are quiet.
    assert non_monotone(eps, [[True, True, False]] * 10) is None
    assert non_monotone(eps, [[False, False, True]] + [[False] * 3] * 9) is None
    assert all(math.isnan(v) for v in robustness_curve(eps, []))
