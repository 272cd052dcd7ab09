"""Sampled estimator: unbiased shared contexts, agreement with exact, error ~ 1/sqrt(budget)."""

from __future__ import annotations

import itertools
from collections.abc import Callable

import numpy as np
import pytest

from interscope_server.analysis.baselines import ZeroBaseline
from interscope_server.analysis.exact import ExactInteractions, all_pairs, exact_interactions
from interscope_server.analysis.game import ModelGame, TabularGame, coalitions_from_bitmasks
from interscope_server.analysis.players import GridPlayers
from interscope_server.analysis.profile import (
    EstimatorChoice,
    ProfileSpec,
    run_perturbation,
)
from interscope_server.analysis.sampled import (
    MIN_SAMPLES_PER_PAIR,
    SHARED_MAX_PAIRS,
    ContextSharing,
    SampledEstimator,
    TargetStatistic,
    estimate,
    independent_contexts,
    orders_from_ratios,
)
from interscope_server.analysis.values import ValueFunction

Evaluate = Callable[[np.ndarray], np.ndarray]
N = 12
MID_ORDERS = np.arange(2, 9)  # orders whose contexts are sampled, not enumerated


@pytest.fixture(scope="module")
def cnn_table(
    digits_evaluate: Evaluate, digit: tuple[np.ndarray, int]
) -> tuple[TabularGame, ExactInteractions]:
    """The demo CNN's game on a 3x4 grid, tabulated once so the sampling tests cost no forwards."""
    x, y = digit
    game = ModelGame(
        digits_evaluate, x, GridPlayers(3, 4), ZeroBaseline(), ValueFunction.LOG_PROB, y
    )
    values = game(coalitions_from_bitmasks(np.arange(2**N), N))
    return TabularGame(values), exact_interactions(values, N)


def test_orders_from_ratios() -> None:
    assert orders_from_ratios((0.1, 0.3, 0.85, 0.9, 1.0, 0.3), 12).tolist() == [1, 3, 8, 9, 10]
    assert orders_from_ratios((0.0, 0.5), 2).tolist() == [0]


def test_plan_contexts_are_valid_and_reproducible() -> None:
    pairs = all_pairs(N)
    est = SampledEstimator(pairs, np.array([1, 5, 9]), contexts_per_order=6, seed=11)
    plan, again = est.plan(N), est.plan(N)
    for op, op2 in zip(plan.order_plans, again.order_plans, strict=True):
        assert np.array_equal(op.contexts, op2.contexts)
        rows = op.coalitions(0, op.forwards)
        _, ps = np.nonzero(op.served)
        i, j = pairs[ps, 0], pairs[ps, 1]
        s = rows[op.v00]
        # v00 is S: size m, without i or j; v10 = S+i, v01 = S+j, v11 = S+i+j.
        assert np.all(s.sum(axis=1) == op.order)
        assert not s[np.arange(len(i)), i].any() and not s[np.arange(len(j)), j].any()
        for idx, add in ((op.v10, [i]), (op.v01, [j]), (op.v11, [i, j])):
            expect = s.copy()
            for a in add:
                expect[np.arange(len(a)), a] = True
            assert np.array_equal(rows[idx], expect)
    # Shared contexts: about one forward per Delta v sample with all pairs.
    assert plan.forwards / plan.samples < 1.5


def test_served_contexts_are_uniform_for_each_pair() -> None:
    # For a fixed pair, every other player is in S with probability m/(n-2).
    pairs = all_pairs(N)
    est = SampledEstimator(pairs, np.array([3, 8]), contexts_per_order=400, seed=2)
    for op in est.plan(N).order_plans:
        rows = op.coalitions(0, op.forwards)[op.v00]
        _, ps = np.nonzero(op.served)
        sel = ps == 7  # pair (0, 8)
        freq = rows[sel].mean(axis=0)
        others = np.delete(freq, pairs[7])
        np.testing.assert_allclose(others, op.order / (N - 2), atol=0.09)


def test_every_pair_gets_two_contexts_even_on_a_tiny_budget(
    cnn_table: tuple[TabularGame, ExactInteractions],
) -> None:
    # Two contexts per order cannot serve one given pair by chance alone; the plan tops it up.
    game, exact = cnn_table
    pair = np.array([[2, 9]])
    plan = SampledEstimator(pair, MID_ORDERS, contexts_per_order=2, seed=0).plan(N)
    for op in plan.order_plans:
        assert op.served.sum() >= MIN_SAMPLES_PER_PAIR
    # A dedicated context is a uniform S of the other players, so the estimate stays unbiased:
    # over many seeds the mean of the estimates approaches the exact interaction.
    m = 5
    estimates = [
        estimate(game, SampledEstimator(pair, np.array([m]), 2, seed=seed).plan(N))[0].mean
        for seed in range(300)
    ]
    assert np.isfinite(estimates).all()
    truth = exact.interactions[m][2, 9]
    spread = np.std(estimates) / np.sqrt(len(estimates))
    assert abs(np.mean(estimates) - truth) < 4 * spread


def test_context_sharing_auto_switches_at_each_statistics_crossover() -> None:
    for target in TargetStatistic:
        limit = SHARED_MAX_PAIRS[target]
        assert not independent_contexts(ContextSharing.AUTO, target, 1)
        assert independent_contexts(ContextSharing.AUTO, target, 10**6) == (limit < 10**6)
        if limit < 10**6:
            assert not independent_contexts(ContextSharing.AUTO, target, int(limit))
            assert independent_contexts(ContextSharing.AUTO, target, int(limit) + 1)
        # An explicit choice is kept whatever the statistic and the pairs.
        assert independent_contexts(ContextSharing.INDEPENDENT, target, 1)
        assert not independent_contexts(ContextSharing.SHARED, target, 10**6)
    # Per-pair values always favour sharing; averages over many pairs do not.
    assert SHARED_MAX_PAIRS[TargetStatistic.PAIRS] == float("inf")
    signed, strength = TargetStatistic.SIGNED_MEAN, TargetStatistic.STRENGTH
    assert SHARED_MAX_PAIRS[signed] < SHARED_MAX_PAIRS[strength]


def test_independent_contexts_are_the_papers_per_pair_scheme(
    cnn_table: tuple[TabularGame, ExactInteractions],
) -> None:
    game, exact = cnn_table
    pairs = all_pairs(N)
    plan = SampledEstimator(pairs, MID_ORDERS, 30, seed=3, independent=True).plan(N)
    for op in plan.order_plans:
        assert (op.served.sum(axis=1) == 1).all()  # one pair per context
        assert (op.served.sum(axis=0) == 30).all()  # 30 contexts per pair
        assert op.forwards == 4 * op.samples  # v(S), v(S+i), v(S+j), v(S+i+j) each time
    for m, s in zip(MID_ORDERS, estimate(game, plan), strict=True):
        truth = exact.interactions[m][pairs[:, 0], pairs[:, 1]].mean()
        assert abs(s.mean - truth) < 3 * s.mean_stderr


def test_sampled_agrees_with_exact_within_three_standard_errors(
    cnn_table: tuple[TabularGame, ExactInteractions],
) -> None:
    game, exact = cnn_table
    pairs = all_pairs(N)
    stats = estimate(game, SampledEstimator(pairs, MID_ORDERS, 40, seed=5).plan(N))
    z_pairs = []
    for m, s in zip(MID_ORDERS, stats, strict=True):
        truth = exact.interactions[m][pairs[:, 0], pairs[:, 1]]
        assert abs(s.mean - truth.mean()) < 3 * s.mean_stderr
        assert s.mean_stderr > 0
        err = s.pair_mean - truth
        # Cells that equal the baseline are dummies: every sample is exactly 0, and so is the SE.
        flat = s.pair_se == 0
        np.testing.assert_allclose(err[flat], 0.0, atol=1e-12)
        z_pairs.append(err[~flat] / s.pair_se[~flat])
    z = np.concatenate(z_pairs)
    # Per pair, Delta v is sparse and heavy-tailed (most contexts ~0, a few large), so a t-ratio
    # with an SE estimated from ~40 samples covers less than the normal 99.7%; observed ~96%.
    assert np.mean(np.abs(z) < 3) > 0.93


def test_error_shrinks_as_one_over_sqrt_budget(
    cnn_table: tuple[TabularGame, ExactInteractions],
) -> None:
    game, exact = cnn_table
    pairs = all_pairs(N)
    # Orders with hundreds of possible contexts, so no budget here enumerates them all.
    orders = np.array([4, 5, 6])
    truth = exact.interactions[orders][:, pairs[:, 0], pairs[:, 1]]
    budgets = (8, 32, 128)
    rmse = []
    for budget in budgets:
        errs = []
        for seed in range(3):
            stats = estimate(game, SampledEstimator(pairs, orders, budget, seed).plan(N))
            est = np.stack([s.pair_mean for s in stats])
            errs.append(np.nanmean((est - truth) ** 2))
        rmse.append(np.sqrt(np.mean(errs)))
    # Each 4x budget should halve the error; allow a generous band for sampling noise.
    for lo, hi in itertools.pairwise(rmse):
        assert 1.5 < lo / hi < 2.7
    assert rmse[0] / rmse[-1] == pytest.approx(4.0, rel=0.35)


def test_sampled_perturbation_uses_the_same_contexts(
    digits_evaluate: Evaluate, digit: tuple[np.ndarray, int]
) -> None:
    x, y = digit
    x_adv = np.clip(x + 0.2 * np.sign(np.random.default_rng(1).normal(size=x.shape)), 0, 1)
    spec = ProfileSpec(
        players=GridPlayers(3, 3),
        estimator=EstimatorChoice.SAMPLED,
        orders=tuple(range(8)),
        contexts_per_order=6,
        seed=4,
        return_pairs=True,
    )
    result = run_perturbation(digits_evaluate, x, x_adv.astype(np.float32), spec, y)
    assert result.estimator == "sampled" and result.decomposition_complete
    assert result.delta_pair_interactions is not None
    assert result.clean.pair_interactions is not None
    assert result.adversarial.pair_interactions is not None
    np.testing.assert_allclose(
        result.delta_pair_interactions,
        result.clean.pair_interactions - result.adversarial.pair_interactions,
        atol=1e-12,
    )
    spread = 4 * np.sqrt(np.sum(result.order_terms_stderr**2)) + 1e-6
    assert abs(result.residual) < spread
