"""Gradient-masking diagnostics: flags computed from per-example checks (pure, mergeable).

A white-box attack that fails may mean the model is robust, or that its gradients hide the
adversarial examples from the attack (gradient masking: Athalye et al. 2018, "Obfuscated
Gradients Give a False Sense of Security"; Carlini et al. 2019, "On Evaluating Adversarial
Robustness"). The server runs cheap checks on every example a white-box attack left robust
(`ExampleChecks`); the flags below are decided from those per-example records only, so the
server's summary and the SDK's summary recomputed across replicas agree exactly.

Both the server (attack and audit summaries) and the SDK (`interscope._summary`) import this
module; it needs nothing beyond the standard library.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

#: Below this many checked examples a share is mostly noise: no flag is raised from them.
MIN_CHECKED = 5
#: An input gradient whose L1 norm is at most this is treated as zero: float32 CE gradients
#: of a working model are many orders larger, and a masked one is exactly 0 (or underflows).
ZERO_GRADIENT = 1e-12
#: The attack's loss "did not rise" when CE(x_adv) - CE(x) is at most this: a real attack on an
#: example it fails on still raises the loss by far more than float32 round-off.
LOSS_RISE_FLOOR = 1e-6
#: LOSS_FLAT fires when at least this share of the checked examples had a zero or non-finite
#: gradient or a loss that did not rise: a majority, not the odd saturated example.
FLAT_SHARE = 0.5
#: BLACK_BOX_WINS and MORE_STEPS_WIN fire when the cheap second attack fools at least this
#: share of the examples the white-box attack left robust, and at least MIN_WINS of them: a
#: weak, small-budget attack beating the main one on a tenth of them says the main one failed.
WIN_SHARE = 0.1
MIN_WINS = 2
#: NON_MONOTONE fires when robust accuracy at some eps exceeds that at a smaller eps by at
#: least RISE_SHARE of the samples and at least MIN_WINS samples (one sample is noise).
RISE_SHARE = 0.02


@dataclass(frozen=True)
class ExampleChecks:
    """The checks on one example the white-box attack attacked and did not fool.

    gradient_l1: L1 norm of the attack loss's (CE) gradient at the clean input; NaN when any
        entry is non-finite.
    loss_gain: CE(x_adv) - CE(x) (minus CE of the target when targeted, so higher is always
        better for the attacker).
    black_box_fooled: whether the black-box check (Square, small budget) fooled it; None when
        that check was off.
    more_steps_fooled: whether a fresh run with twice the steps fooled it; None when the
        example was not re-run (off, not in the subsample, or a one-step attack).
    """

    gradient_l1: float
    loss_gain: float
    black_box_fooled: bool | None = None
    more_steps_fooled: bool | None = None


@dataclass(frozen=True)
class Flag:
    """One raised diagnostic: a stable code, what it means, what to try, and its numbers."""

    code: str
    meaning: str
    advice: str
    numbers: Mapping[str, float] = field(default_factory=dict)


LOSS_FLAT = "LOSS_FLAT"
BLACK_BOX_WINS = "BLACK_BOX_WINS"
MORE_STEPS_WIN = "MORE_STEPS_WIN"
NON_MONOTONE = "NON_MONOTONE"

_TEXT: dict[str, tuple[str, str]] = {
    LOSS_FLAT: (
        "On most examples the attack left robust, the loss gradient at the input is zero or "
        "not finite, or the attack's loss never rose: the attack had nothing to follow, so "
        "its failure says little about robustness (gradient masking or saturation).",
        "Attack a differentiable surrogate (drop rounding or quantisation, use BPDA), attack "
        "the logits with a margin loss (PGD_MARGIN) instead of the saturated cross-entropy, "
        "and confirm with a black-box attack such as SQUARE.",
    ),
    BLACK_BOX_WINS: (
        "A small-budget black-box attack (Square) fooled examples the white-box attack left "
        "robust: the gradients mislead the white-box attack, so the robust accuracy it "
        "reports is too high.",
        "Report the robust accuracy of both attacks together (an example is robust only if "
        "every attack fails); run SQUARE with a full budget; look for gradient obfuscation.",
    ),
    MORE_STEPS_WIN: (
        "A fresh run with twice the steps fooled examples the attack left robust: the attack "
        "had not converged, so the robust accuracy falls with more steps or restarts.",
        "Raise steps and restarts until the robust accuracy stops falling, or use APGD, whose "
        "step-size schedule needs no tuning.",
    ),
    NON_MONOTONE: (
        "Robust accuracy rises at a larger eps: a larger ball contains the smaller one, so "
        "the attack is failing at the larger eps (a step-size or gradient problem), not "
        "finding robustness.",
        "Check the step size scales with eps, raise steps and restarts at the larger eps, and "
        "confirm with a black-box attack such as SQUARE.",
    ),
}


def _flag(code: str, numbers: Mapping[str, float]) -> Flag:
    meaning, advice = _TEXT[code]
    return Flag(code, meaning, advice, dict(numbers))


def _wins(flags: Sequence[bool | None], code: str, what: str) -> Flag | None:
    tried = [f for f in flags if f is not None]
    wins = sum(tried)
    if len(tried) < MIN_CHECKED or wins < MIN_WINS or wins < WIN_SHARE * len(tried):
        return None
    return _flag(code, {f"n_{what}": len(tried), "n_fooled": wins, "share": wins / len(tried)})


def diagnose(
    checks: Sequence[ExampleChecks],
    sweep_eps: Sequence[float] = (),
    sweep_robust: Sequence[Sequence[bool]] = (),
) -> list[Flag]:
    """The flags raised by per-example checks and, when given, an eps sweep.

    checks: one record per example the white-box attack failed on. sweep_eps: the sweep's eps
    values, ascending; sweep_robust: per sample, whether it stayed robust at each of them.
    """
    flags: list[Flag] = []
    if len(checks) >= MIN_CHECKED:
        nonfinite = sum(not math.isfinite(c.gradient_l1) for c in checks)
        zero = sum(math.isfinite(c.gradient_l1) and c.gradient_l1 <= ZERO_GRADIENT for c in checks)
        not_rising = sum(c.loss_gain <= LOSS_RISE_FLOOR for c in checks)
        flat = sum(
            not math.isfinite(c.gradient_l1)
            or c.gradient_l1 <= ZERO_GRADIENT
            or c.loss_gain <= LOSS_RISE_FLOOR
            for c in checks
        )
        if flat >= FLAT_SHARE * len(checks):
            flags.append(
                _flag(
                    LOSS_FLAT,
                    {
                        "n_checked": len(checks),
                        "n_zero_gradient": zero,
                        "n_nonfinite_gradient": nonfinite,
                        "n_loss_not_rising": not_rising,
                        "share": flat / len(checks),
                    },
                )
            )
    for flag in (
        _wins([c.black_box_fooled for c in checks], BLACK_BOX_WINS, "checked"),
        _wins([c.more_steps_fooled for c in checks], MORE_STEPS_WIN, "rerun"),
    ):
        if flag is not None:
            flags.append(flag)
    if sweep_eps:
        rise = non_monotone(sweep_eps, sweep_robust)
        if rise is not None:
            flags.append(_flag(NON_MONOTONE, rise))
    return flags


def robustness_curve(
    sweep_eps: Sequence[float], sweep_robust: Sequence[Sequence[bool]]
) -> list[float]:
    """Robust accuracy at each sweep eps over the samples (NaN for each eps when none)."""
    n = len(sweep_robust)
    return [
        sum(bool(row[i]) for row in sweep_robust) / n if n else float("nan")
        for i in range(len(sweep_eps))
    ]


def non_monotone(
    sweep_eps: Sequence[float], sweep_robust: Sequence[Sequence[bool]]
) -> dict[str, float] | None:
    """The largest rise of robust accuracy from a smaller eps to a larger one, when it is big
    enough to flag: {eps_low, eps_high, accuracy_low, accuracy_high, rise}; else None."""
    n = len(sweep_robust)
    counts = [sum(bool(row[i]) for row in sweep_robust) for i in range(len(sweep_eps))]
    best: tuple[int, int, int] | None = None  # (rise in samples, low index, high index)
    low = 0  # index of the smallest count so far
    for j in range(1, len(counts)):
        if counts[j - 1] < counts[low]:
            low = j - 1
        rise = counts[j] - counts[low]
        if best is None or rise > best[0]:
            best = (rise, low, j)
    if best is None or n == 0:
        return None
    rise, i, j = best
    if rise < MIN_WINS or rise < RISE_SHARE * n:
        return None
    return {
        "eps_low": float(sweep_eps[i]),
        "eps_high": float(sweep_eps[j]),
        "robust_accuracy_low": counts[i] / n,
        "robust_accuracy_high": counts[j] / n,
        "rise": rise / n,
    }
