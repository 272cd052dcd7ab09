"""Audit summaries computed client-side from sample results (identical however the run went)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from interscope._diagnostics import diagnose, robustness_curve
from interscope._models import (
    AuditSummary,
    ClassBreakdown,
    OrderStatistic,
    RobustnessCurve,
    SampleResult,
)
from interscope._specificity import CategorySpecificity, category_specificity

#: Two-sided 95% normal quantile; the CI is mean +- Z95 * sd / sqrt(n) (normal approximation,
#: so the client needs no scipy; with n = 1 the interval collapses to the mean).
Z95 = 1.959963984540054


def order_statistic(rows: np.ndarray) -> OrderStatistic:
    """Mean over samples (axis 0) with a 95% CI per order; empty input gives empty arrays."""
    if rows.size == 0:
        empty = np.zeros(rows.shape[1:] if rows.ndim == 2 else (0,), dtype=np.float64)
        return OrderStatistic(empty, empty.copy(), empty.copy())
    mean = rows.mean(axis=0)
    n = rows.shape[0]
    half = Z95 * rows.std(axis=0, ddof=1) / math.sqrt(n) if n > 1 else np.zeros_like(mean)
    return OrderStatistic(mean, mean - half, mean + half)


def _rate(flags: Sequence[bool]) -> float:
    return float(np.mean(flags)) if len(flags) else float("nan")


def summarize(
    samples: Sequence[SampleResult], classes: Sequence[str] = (), sweep_eps: Sequence[float] = ()
) -> AuditSummary:
    """Accuracies, per-order means with 95% CIs, per-class accuracies, gradient-masking flags
    and (with `sweep_eps`, ascending) the robustness curve over `samples`.

    Failed samples are counted in `n_failed` and left out of every statistic. Samples whose
    profile has other orders than the first one's (which a single config never produces) are
    left out of the per-order statistics only.
    """
    ok = [s for s in samples if s.error is None]
    profiled = [s for s in ok if s.perturbation is not None and s.perturbation.clean is not None]
    orders = np.zeros(0, dtype=np.int64)
    ratios = np.zeros(0, dtype=np.float64)
    clean_rows: list[np.ndarray] = []
    adv_rows: list[np.ndarray] = []
    delta_rows: list[np.ndarray] = []
    clean_d: list[np.ndarray] = []
    adv_d: list[np.ndarray] = []
    kept: list[SampleResult] = []
    if profiled:
        first = profiled[0].perturbation
        assert first is not None and first.clean is not None
        orders, ratios = first.clean.orders, first.clean.ratios
        for s in profiled:
            p = s.perturbation
            assert p is not None and p.clean is not None
            if p.adversarial is None or not np.array_equal(p.clean.orders, orders):
                continue
            clean_rows.append(p.clean.mean_abs)
            adv_rows.append(p.adversarial.mean_abs)
            delta_rows.append(p.delta_mean)
            clean_d.append(p.clean.disentanglement)
            adv_d.append(p.adversarial.disentanglement)
            kept.append(s)
    width = len(orders)

    def stat(rows: list[np.ndarray]) -> OrderStatistic:
        return order_statistic(np.asarray(rows, dtype=np.float64).reshape(len(rows), width))

    per_class = []
    for label in sorted({s.label for s in ok}):
        members = [s for s in ok if s.label == label]
        per_class.append(
            ClassBreakdown(
                label=label,
                name=classes[label] if 0 <= label < len(classes) else str(label),
                n=len(members),
                clean_accuracy=_rate([s.clean_correct for s in members]),
                robust_accuracy=_rate([s.robust for s in members]),
            )
        )
    sweep_rows = [list(s.sweep_robust) for s in ok]
    checks = [s.checks for s in ok if s.checks is not None]
    return AuditSummary(
        n_samples=len(ok),
        n_failed=len(samples) - len(ok),
        clean_accuracy=_rate([s.clean_correct for s in ok]),
        robust_accuracy=_rate([s.robust for s in ok]),
        success_rate=_rate([s.attack_success for s in ok]),
        orders=orders,
        ratios=ratios,
        clean_mean_abs=stat(clean_rows),
        adversarial_mean_abs=stat(adv_rows),
        delta_mean=stat(delta_rows),
        per_class=per_class,
        masking_flags=diagnose(checks, sweep_eps, sweep_rows) if ok else [],
        robustness_curve=(
            RobustnessCurve(
                np.asarray(sweep_eps, dtype=np.float64),
                np.asarray(robustness_curve(sweep_eps, sweep_rows), dtype=np.float64),
            )
            if sweep_eps and ok
            else None
        ),
        clean_disentanglement=stat(clean_d),
        adversarial_disentanglement=stat(adv_d),
        clean_specificity=_specificity(kept, "clean"),
        adversarial_specificity=_specificity(kept, "adversarial"),
    )


def _specificity(samples: Sequence[SampleResult], which: str) -> CategorySpecificity | None:
    """Category specificity over the samples whose profile carries per-pair values for the
    first one's pairs (None when none does: an older server)."""
    values, labels = [], []
    pairs: np.ndarray | None = None
    for s in samples:
        assert s.perturbation is not None
        profile = getattr(s.perturbation, which)
        if profile is None or profile.interactions is None or profile.pairs is None:
            continue
        if pairs is None:
            pairs = profile.pairs
        if np.array_equal(profile.pairs, pairs):
            values.append(profile.interactions)
            labels.append(s.label)
    if pairs is None:
        return None
    return category_specificity(np.stack(values), np.asarray(labels), pairs)
