"""Exact estimator: PAPER.md identities 1-5 on random games, and games with known interactions."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from engine_identities import check_identities

from interscope_server.analysis.exact import exact_interactions
from interscope_server.analysis.game import TabularGame, coalitions_from_bitmasks

TOL = 1e-9


def random_values(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=2**n)


def brute_force_interactions(v: np.ndarray, n: int) -> np.ndarray:
    """I^(m)(i,j) by looping over every context S (the definition, no vectorisation)."""

    def val(s: tuple[int, ...] | set[int]) -> float:
        return float(v[sum(1 << k for k in s)])

    out = np.zeros((n - 1, n, n))
    for i, j in itertools.permutations(range(n), 2):
        others = [k for k in range(n) if k not in (i, j)]
        for m in range(n - 1):
            deltas = [
                val({*s, i, j}) - val({*s, i}) - val({*s, j}) + val(s)
                for s in itertools.combinations(others, m)
            ]
            out[m, i, j] = np.mean(deltas)
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
