"""The engine on the demo CNN: identities, masking, decomposition, streaming, limits."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest
from engine_identities import check_identities

from interscope_server.analysis.baselines import ConstantBaseline, ZeroBaseline
from interscope_server.analysis.exact import exact_interactions
from interscope_server.analysis.game import ModelGame
from interscope_server.analysis.players import GridPlayers
from interscope_server.analysis.profile import (
    EstimatorChoice,
    PairSelection,
    ProfileSpec,
    profile_events,
    run_perturbation,
    run_profile,
)
from interscope_server.analysis.results import ForwardProgress, InteractionProfile, OrderEstimate
from interscope_server.analysis.values import ClassChoice, ValueFunction
from interscope_server.cancel import CancelToken
from interscope_server.errors import Cancelled, InvalidArgument, ResourceExhausted

Evaluate = Callable[[np.ndarray], np.ndarray]
GRID = GridPlayers(3, 4)  # 12 players
# Values are float64 computed from float32 logits; the identities are algebraic in the value
# table, so they hold to rounding of sums of ~1e3 terms of size ~1e1.
F32_TOL = 1e-6


def perturbed(x: np.ndarray, seed: int = 0, eps: float = 0.15) -> np.ndarray:
    noise = np.sign(np.random.default_rng(seed).normal(size=x.shape))
    return np.clip(x + eps * noise, 0.0, 1.0).astype(np.float32)


def test_masked_inputs_keep_the_coalition_and_baseline_elsewhere(
    digits_evaluate: Evaluate, digit: tuple[np.ndarray, int]
) -> None:
    x, y = digit
    game = ModelGame(
        digits_evaluate, x, GRID, ConstantBaseline(0.25), ValueFunction.LOG_PROB, y, chunk_size=3
    )
    coalitions = np.random.default_rng(0).random((7, 12)) < 0.5
    masked = game.masked_inputs(coalitions[:3]).copy()
    pmap = GRID.player_map(x.shape)
    for row in range(3):
        keep = coalitions[row][pmap]
        assert np.array_equal(masked[row][keep], x[keep])
        assert np.all(masked[row][~keep] == np.float32(0.25))
    values = game(coalitions)
    assert game.forwards == 7
    direct = np.log(np.exp(digits_evaluate(masked).astype(np.float64)))
    z = direct - np.log(np.exp(direct).sum(axis=1, keepdims=True))
    np.testing.assert_allclose(values[:3], z[:, y], atol=1e-6)


def test_identities_on_the_demo_cnn(
    digits_evaluate: Evaluate, digit: tuple[np.ndarray, int]
) -> None:
    x, y = digit
    spec = ProfileSpec(
        players=GRID, estimator=EstimatorChoice.EXACT, return_pairs=True, orders=tuple(range(11))
    )
    prof = run_profile(digits_evaluate, x, spec, y)
    assert prof.estimator == "exact" and prof.forwards == 2**12
    assert prof.efficiency_residual is not None and abs(prof.efficiency_residual) < F32_TOL
    assert prof.shapley_efficiency_residual is not None
    assert abs(prof.shapley_efficiency_residual) < F32_TOL

    game = ModelGame(digits_evaluate, x, GRID, ZeroBaseline(), ValueFunction.LOG_PROB, y)
    from interscope_server.analysis.game import coalitions_from_bitmasks

    values = game(coalitions_from_bitmasks(np.arange(2**12), 12))
    e = exact_interactions(values, 12)
    check_identities(e, F32_TOL)
    assert prof.pair_interactions is not None
    np.testing.assert_allclose(
        prof.pair_interactions, e.interactions[:, prof.pairs[:, 0], prof.pairs[:, 1]]
    )
    np.testing.assert_allclose(prof.mean, prof.pair_interactions.mean(axis=1))
    assert np.mean(prof.strength) == pytest.approx(1.0)
    assert np.all((prof.disentanglement >= 0) & (prof.disentanglement <= 1))


def test_perturbation_decomposition_closes(
    digits_evaluate: Evaluate, digit: tuple[np.ndarray, int]
) -> None:
    x, y = digit
    spec = ProfileSpec(
        players=GRID,
        estimator=EstimatorChoice.EXACT,
        return_pairs=True,
        value=ValueFunction.LOG_ODDS,
    )
    result = run_perturbation(digits_evaluate, x, perturbed(x), spec, y)
    assert result.decomposition_complete
    assert abs(result.utility_change) > 1e-3  # the perturbation does something
    assert abs(result.residual) < F32_TOL
    assert result.baseline_term == pytest.approx(0.0, abs=1e-12)  # shared baseline
    total = result.baseline_term + result.first_order_term + result.order_terms.sum()
    assert total == pytest.approx(result.utility_change, abs=F32_TOL)
    assert result.delta_pair_interactions is not None and result.clean.pair_interactions is not None
    assert result.adversarial.pair_interactions is not None
    np.testing.assert_allclose(
        result.delta_pair_interactions,
        result.clean.pair_interactions - result.adversarial.pair_interactions,
    )
    assert result.forwards == 2 * 2**12


def test_events_stream_progress_then_orders_then_result(
    digits_evaluate: Evaluate, digit: tuple[np.ndarray, int]
) -> None:
    x, _ = digit
    spec = ProfileSpec(
        players=GridPlayers(3, 3),
        class_choice=ClassChoice.PREDICTED,
        chunk_size=100,
        estimator=EstimatorChoice.SAMPLED,
        pairs=PairSelection.NEIGHBORS,
        contexts_per_order=20,
        seed=3,
    )
    events = list(profile_events(digits_evaluate, x, spec))
    progress = [e for e in events if isinstance(e, ForwardProgress)]
    orders = [e for e in events if isinstance(e, OrderEstimate)]
    final = events[-1]
    assert isinstance(final, InteractionProfile) and final.estimator == "sampled"
    assert progress[-1].forwards_done == progress[-1].forwards_planned == final.forwards
    done = [p.forwards_done for p in progress]
    assert done == sorted(done)
    assert [o.order for o in orders] == final.orders.tolist()
    assert final.class_index == int(np.argmax(digits_evaluate(x[None])[0]))
    assert len(final.pairs) == 20  # the 3x3 grid's 8-neighbor pairs


def test_cancel_stops_at_the_next_chunk(
    digits_evaluate: Evaluate, digit: tuple[np.ndarray, int]
) -> None:
    x, y = digit
    token = CancelToken()
    calls: list[int] = []

    def evaluate(batch: np.ndarray) -> np.ndarray:
        calls.append(len(batch))
        token.cancel("stop")
        return digits_evaluate(batch)

    spec = ProfileSpec(players=GRID, estimator=EstimatorChoice.EXACT, chunk_size=256)
    with pytest.raises(Cancelled, match="stop"):
        run_profile(evaluate, x, spec, y, cancel=token)
    assert calls == [256]


def test_limits_and_spec_errors(digits_evaluate: Evaluate, digit: tuple[np.ndarray, int]) -> None:
    x, y = digit
    with pytest.raises(ResourceExhausted, match=r"needs 4096 forward passes.*limit is 1000"):
        run_profile(
            digits_evaluate,
            x,
            ProfileSpec(players=GRID, estimator=EstimatorChoice.EXACT, max_forwards=1000),
            y,
        )
    with pytest.raises(ResourceExhausted, match="at most 10 players"):
        run_profile(
            digits_evaluate,
            x,
            ProfileSpec(players=GRID, estimator=EstimatorChoice.EXACT, max_exact_players=10),
            y,
        )
    with pytest.raises(InvalidArgument, match=r"orders in 0\.\.10"):
        run_profile(digits_evaluate, x, ProfileSpec(players=GRID, orders=(11,)), y)
    with pytest.raises(InvalidArgument, match="needs a class index"):
        run_profile(digits_evaluate, x, ProfileSpec(players=GRID))
    with pytest.raises(InvalidArgument, match="larger than the image"):
        run_profile(digits_evaluate, x, ProfileSpec(players=GridPlayers(17, 2)), y)
    with pytest.raises(InvalidArgument, match=r"random pairs .* 1\.\.66"):
        run_profile(
            digits_evaluate,
            x,
            ProfileSpec(players=GRID, pairs=PairSelection.RANDOM, n_random_pairs=67),
            y,
        )


def test_auto_prefers_exact_when_it_is_cheaper(
    digits_evaluate: Evaluate, digit: tuple[np.ndarray, int]
) -> None:
    x, y = digit
    small = run_profile(digits_evaluate, x, ProfileSpec(players=GridPlayers(3, 3)), y)
    assert small.estimator == "exact"
    # A few pairs and contexts on 25 players cost far fewer than 2^25 forwards.
    big = run_profile(
        digits_evaluate,
        x,
        ProfileSpec(
            players=GridPlayers(5, 5),
            pairs=PairSelection.RANDOM,
            n_random_pairs=3,
            contexts_per_order=4,
            ratios=(0.5,),
        ),
        y,
    )
    assert big.estimator == "sampled"
