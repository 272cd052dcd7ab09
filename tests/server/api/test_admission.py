"""Admission counts what the engine will do: the pair count behind a profile's cost (and behind
AUTO's choice of shared or independent contexts) is the engine's own."""

from __future__ import annotations

import dataclasses

import pytest

from interscope_server.analysis.players import FeaturePlayers, GridPlayers
from interscope_server.analysis.profile import (
    PairSelection,
    ProfileSpec,
    resolve_orders,
    select_pairs,
)
from interscope_server.analysis.sampled import (
    TargetStatistic,
    expected_sampled_forwards,
    independent_contexts,
)
from interscope_server.api import admission

GRID = ProfileSpec(players=GridPlayers(16, 16), pairs=PairSelection.NEIGHBORS)


@pytest.mark.parametrize(
    "spec",
    [
        GRID,
        dataclasses.replace(GRID, neighbor_radius=2),
        dataclasses.replace(GRID, n_neighbor_pairs=30),  # the paper draws 200 of them
        dataclasses.replace(GRID, n_neighbor_pairs=200),
        dataclasses.replace(GRID, players=GridPlayers(3, 5), neighbor_radius=3),
        dataclasses.replace(GRID, pairs=PairSelection.ALL),
        dataclasses.replace(GRID, pairs=PairSelection.RANDOM, n_random_pairs=50),
        ProfileSpec(players=FeaturePlayers(), pairs=PairSelection.RANDOM, n_random_pairs=10),
    ],
    ids=lambda s: f"{s.pairs.value}-r{s.neighbor_radius}-k{s.n_neighbor_pairs}",
)
def test_pair_count_is_the_engines(spec: ProfileSpec) -> None:
    n = 30 if isinstance(spec.players, FeaturePlayers) else spec.players.n_players
    assert admission.pair_count(spec, n) == len(select_pairs(spec, n))


@pytest.mark.parametrize("statistic", list(TargetStatistic))
def test_the_cost_follows_the_engines_sharing_decision(statistic: TargetStatistic) -> None:
    # 30 drawn neighbor pairs of 870: under every crossover, so AUTO shares for any statistic;
    # counting all 870 would have priced the request as independent.
    spec = dataclasses.replace(GRID, n_neighbor_pairs=30, target_statistic=statistic)
    n = 256
    pairs = len(select_pairs(spec, n))
    independent = independent_contexts(spec.context_sharing, statistic, pairs)
    orders = resolve_orders(spec, n)
    expected = expected_sampled_forwards(n, orders, pairs, spec.contexts_per_order, independent)
    assert admission.profile_cost(spec, n, 1) == int(expected) + n + 3
