"""Exact estimator: PAPER.md identities 1-5 on random games, and games with known interactions."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from engine_identities import check_identities

from interscope_server.analysis import exact
from interscope_server.analysis.exact import exact_interactions
from interscope_server.analysis.game import TabularGame, coalitions_from_bitmasks

TOL = 1e-9


def random_values(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=2**n)


def pair_deltas(v: np.ndarray, n: int) -> dict[tuple[int, int, int], list[float]]:
    """Delta v(i,j,S) for every ordered pair and every context S, keyed by (m = |S|, i, j)."""

    def val(s: tuple[int, ...] | set[int]) -> float:
        return float(v[sum(1 << k for k in s)])

    deltas = {}
    for i, j in itertools.permutations(range(n), 2):
        others = [k for k in range(n) if k not in (i, j)]
        for m in range(n - 1):
            deltas[m, i, j] = [
                val({*s, i, j}) - val({*s, i}) - val({*s, j}) + val(s)
                for s in itertools.combinations(others, m)
            ]
    return deltas


def brute_force_interactions(v: np.ndarray, n: int) -> np.ndarray:
    """I^(m)(i,j) by looping over every context S (the definition, no vectorisation)."""
    out = np.zeros((n - 1, n, n))
    for key, deltas in pair_deltas(v, n).items():
        out[key] = np.mean(deltas)
    return out


@pytest.mark.parametrize(("n", "seed"), [(2, 0), (3, 1), (5, 2), (7, 3)])
def test_identities_on_random_games(n: int, seed: int) -> None:
    v = random_values(n, seed)
    e = exact_interactions(v, n)
    np.testing.assert_allclose(e.interactions, brute_force_interactions(v, n), atol=TOL)
    check_identities(e, TOL)


def test_efficiency_and_recurrence_at_ten_players() -> None:
    n = 10
    v = random_values(n, 4)
    e = exact_interactions(v, n)
    assert abs(e.efficiency_residual()) < TOL
    step = e.order_shapley[1:] - e.order_shapley[:-1]
    np.testing.assert_allclose(step, e.interactions.sum(axis=2) / (n - 1), atol=TOL)
    assert e.shapley_values.sum() == pytest.approx(v[-1] - v[0], abs=TOL)


def brute_force_mean_abs_and_order_shapley(v: np.ndarray, n: int) -> tuple[np.ndarray, ...]:
    """mean over |S| = m of |Delta v(i,j,S)|, and phi^(m)(i), by looping over every S."""
    mean_abs = np.zeros((n - 1, n, n))
    for key, deltas in pair_deltas(v, n).items():
        mean_abs[key] = np.mean(np.abs(deltas))
    order_shapley = np.zeros((n, n))
    for i in range(n):
        others = [k for k in range(n) if k != i]
        for m in range(n):
            contexts = [sum(1 << k for k in s) for s in itertools.combinations(others, m)]
            order_shapley[m, i] = np.mean([v[s | 1 << i] - v[s] for s in contexts])
    return mean_abs, order_shapley


@pytest.mark.parametrize(("n", "seed"), [(2, 11), (4, 12), (7, 13)])
def test_gathered_and_row_by_row_paths_give_the_definitions_numbers(n: int, seed: int) -> None:
    # Games of up to 12 players take every pair's differences at once, larger ones one row of
    # pairs at a time: both must agree with the definitions, whichever a game size picks.
    v = random_values(n, seed)
    mean_abs, order_shapley = brute_force_mean_abs_and_order_shapley(v, n)
    interactions = brute_force_interactions(v, n)
    for path in (exact._by_gather, exact._by_rows):
        e = path(v, n)
        np.testing.assert_allclose(e.interactions, interactions, atol=TOL)
        np.testing.assert_allclose(e.mean_abs_dv, mean_abs, atol=TOL)
        np.testing.assert_allclose(e.order_shapley, order_shapley, atol=TOL)


def test_thirteen_players_go_row_by_row_and_keep_the_identities() -> None:
    n = exact._GATHER_MAX_PLAYERS + 1
    v = random_values(n, 14)
    e = exact_interactions(v, n)
    np.testing.assert_allclose(e.interactions, exact._by_rows(v, n).interactions, atol=0)
    small = exact_interactions(v[: 2 ** (n - 1)], n - 1)  # the largest gathered game
    np.testing.assert_allclose(
        small.interactions, exact._by_rows(v[: 2 ** (n - 1)], n - 1).interactions, atol=TOL
    )
    check_identities(e, TOL)


def test_linearity() -> None:
    n = 6
    v1, v2 = random_values(n, 5), random_values(n, 6)
    e1, e2 = exact_interactions(v1, n), exact_interactions(v2, n)
    e = exact_interactions(2.5 * v1 - 0.75 * v2, n)
    np.testing.assert_allclose(
        e.interactions, 2.5 * e1.interactions - 0.75 * e2.interactions, atol=TOL
    )


def tabulate(n: int, fn: object) -> np.ndarray:
    return TabularGame.from_function(n, fn).values  # type: ignore[arg-type]


def test_and_of_two_players_interacts_at_every_order() -> None:
    n = 6
    v = tabulate(n, lambda c: (c[:, 1] & c[:, 4]).astype(float) * 3.0)
    inter = exact_interactions(v, n).interactions
    expected = np.zeros((n, n))
    expected[1, 4] = expected[4, 1] = 3.0
    np.testing.assert_allclose(inter, np.broadcast_to(expected, inter.shape), atol=TOL)


def test_and_of_three_players_grows_with_order() -> None:
    # Delta v(0,1,S) = [2 in S]: I^(m)(0,1) = P(2 in S) = m/(n-2).
    n = 7
    v = tabulate(n, lambda c: (c[:, 0] & c[:, 1] & c[:, 2]).astype(float))
    inter = exact_interactions(v, n).interactions
    np.testing.assert_allclose(inter[:, 0, 1], np.arange(n - 1) / (n - 2), atol=TOL)
    np.testing.assert_allclose(inter[:, 3, 5], 0.0, atol=TOL)


def test_additive_game_has_no_interactions() -> None:
    n = 7
    w = np.random.default_rng(7).normal(size=n)
    e = exact_interactions(tabulate(n, lambda c: c.astype(float) @ w), n)
    np.testing.assert_allclose(e.interactions, 0.0, atol=TOL)
    np.testing.assert_allclose(e.shapley_values, w, atol=TOL)


def test_dummy_player_has_no_interactions() -> None:
    n = 7
    base = random_values(n - 1, 8)  # a game of players 0..5; player 6 adds a constant
    masks = np.arange(2**n)
    v = base[masks & (2 ** (n - 1) - 1)] + 1.7 * ((masks >> (n - 1)) & 1)
    e = exact_interactions(v, n)
    np.testing.assert_allclose(e.interactions[:, 6, :], 0.0, atol=TOL)
    np.testing.assert_allclose(e.interactions[:, :, 6], 0.0, atol=TOL)
    assert e.shapley_values[6] == pytest.approx(1.7, abs=TOL)
    check_identities(e, TOL)


def test_coalition_bitmask_round_trip() -> None:
    n = 5
    c = coalitions_from_bitmasks(np.arange(2**n), n)
    assert c.shape == (32, 5) and c[1].tolist() == [True, False, False, False, False]
    assert TabularGame(np.arange(32.0))(c).tolist() == list(range(32))
