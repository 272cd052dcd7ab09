"""One interface over the exact and the sampled estimator, for the profile flows.

An estimator measures one game, or two on the same contexts (a clean and a perturbed input),
and says per order what it found as an `OrderTable`; the flows in `profile.py` build the
InteractionProfile, OrderEstimate and PerturbationProfile from those tables in one place each,
whichever estimator ran. Adding an estimator is a subclass here plus its choice in `_plan`.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Generator, Iterator, Sequence
from dataclasses import dataclass

import numpy as np

from interscope_server.analysis.exact import ExactInteractions, exact_interactions, tabulate
from interscope_server.analysis.game import Game
from interscope_server.analysis.results import OrderEstimate
from interscope_server.analysis.sampled import OrderStats, SamplingPlan, order_stats, run_order
from interscope_server.cancel import CancelToken

DELTA = "delta"  # the stage name of the paired difference clean - adversarial


@dataclass(frozen=True)
class OrderTable:
    """One game's statistics by order (rows) over the selected pairs (pair_* columns)."""

    n: int
    orders: np.ndarray
    mean: np.ndarray
    mean_stderr: np.ndarray
    mean_abs: np.ndarray
    mean_abs_stderr: np.ndarray
    disentanglement: np.ndarray
    disentanglement_stderr: np.ndarray
    samples_per_pair: np.ndarray
    pair_mean: np.ndarray  # (orders, pairs)
    pair_se: np.ndarray

    @property
    def ratios(self) -> np.ndarray:
        return np.asarray(self.orders / max(self.n - 2, 1), dtype=np.float64)

    def estimates(self, stage: str) -> Iterator[OrderEstimate]:
        """Each order's OrderEstimate (the one place they are built)."""
        for row, m in enumerate(self.orders):
            yield OrderEstimate(
                stage,
                int(m),
                float(self.ratios[row]),
                float(self.mean[row]),
                float(self.mean_abs[row]),
                float(self.disentanglement[row]),
                float(self.mean_stderr[row]),
                float(self.mean_abs_stderr[row]),
                float(self.disentanglement_stderr[row]),
                float(self.samples_per_pair[row]),
            )

    @classmethod
    def of_stats(cls, n: int, orders: np.ndarray, stats: Sequence[OrderStats]) -> OrderTable:
        """The table of sampled orders' statistics."""
        return cls(
            n,
            np.asarray(orders),
            np.array([s.mean for s in stats]),
            np.array([s.mean_stderr for s in stats]),
            np.array([s.mean_abs for s in stats]),
            np.array([s.mean_abs_stderr for s in stats]),
            np.array([s.disentanglement for s in stats]),
            np.array([s.disentanglement_stderr for s in stats]),
            np.array([float(s.counts.mean()) for s in stats]),
            np.stack([s.pair_mean for s in stats]),
            np.stack([s.pair_se for s in stats]),
        )


@dataclass(frozen=True)
class GameMeasure:
    """What an estimator measured of one game."""

    table: OrderTable
    value_full: float
    value_empty: float
    first_order_term: float  # sum_i v({i}) - v(empty); NaN when not measured
    forwards: int  # the game's own forwards
    exact: ExactInteractions | None = None  # the full tables, when the estimator is exact


@dataclass(frozen=True)
class Measured:
    """An estimator's answer: one measure per game, and their paired difference for two."""

    games: list[GameMeasure]
    delta: OrderTable | None


@dataclass(frozen=True)
class Decomposition:
    """v(N) - v'(N)'s pair part by order: the orders it covers, their terms, complete or not."""

    orders: np.ndarray
    terms: np.ndarray
    terms_se: np.ndarray
    complete: bool


#: What `Estimator.measure` yields: a stage name after each chunk of forwards, or a partial.
Tick = str | OrderEstimate


class Estimator(ABC):
    """Measures interactions of the selected pairs and orders on one or two games."""

    name: str
    seed: int | None
    context_sharing = ""  # how sampled contexts serve pairs: "shared" or "independent"

    def __init__(self, n: int, pairs: np.ndarray, orders: np.ndarray, chunk_size: int) -> None:
        self.n, self.pairs, self.orders, self.chunk_size = n, pairs, orders, chunk_size

    @property
    @abstractmethod
    def forwards_per_game(self) -> int:
        """Forwards one game's measure costs (admission and progress count on it)."""

    @abstractmethod
    def measure(
        self,
        games: Sequence[tuple[str, Game]],
        with_singletons: bool,
        cancel: CancelToken | None,
    ) -> Generator[Tick, None, Measured]:
        """Measure each (stage, game) on the same contexts; yields ticks, returns the result."""

    @abstractmethod
    def decompose(self, measured: Measured, all_pairs: bool) -> Decomposition:
        """The order terms of the first game minus the second's (two games measured)."""


class ExactEstimator(Estimator):
    """Every coalition's value (2^n forwards per game), every order's interactions exactly."""

    name = "exact"
    seed = None

    @property
    def forwards_per_game(self) -> int:
        return 2**self.n

    def measure(
        self,
        games: Sequence[tuple[str, Game]],
        with_singletons: bool,
        cancel: CancelToken | None,
    ) -> Generator[Tick, None, Measured]:
        found = []
        for stage, game in games:
            values = np.empty(2**self.n)
            for _ in tabulate(game, values, self.chunk_size, cancel):
                yield stage
            found.append(exact_interactions(values, self.n))
        measures = [
            GameMeasure(
                self._table(e.interactions, e.mean_abs_dv),
                e.value_full,
                e.value_empty,
                float(e.singletons.sum()),
                game.forwards,
                e,
            )
            for e, (_, game) in zip(found, games, strict=True)
        ]
        # No partials: every order is complete at the same moment, and the profile built next
        # carries them all (on the wire each partial would be one more message to write).
        delta = None
        if len(found) == 2:
            delta = self._table(found[0].interactions - found[1].interactions, None)
        return Measured(measures, delta)

    def _table(self, interactions: np.ndarray, mean_abs_dv: np.ndarray | None) -> OrderTable:
        """Per-pair I (orders, pairs) and per order its mean, mean |I| and D over the pairs."""
        i, j = self.pairs[:, 0], self.pairs[:, 1]
        inter = interactions[self.orders][:, i, j]
        dis = np.full(len(self.orders), np.nan)
        if mean_abs_dv is not None:
            # Per order, the mean of |I| / mean|Delta v| over the pairs whose Delta v is not
            # all zero (NaN when there are none).
            absdv = mean_abs_dv[self.orders][:, i, j]
            ok = absdv > 0
            kept = ok.sum(axis=1)
            ratio = np.divide(np.abs(inter), absdv, out=np.zeros_like(inter), where=ok)
            np.divide(ratio.sum(axis=1), kept, out=dis, where=kept > 0)
        zeros = np.zeros(len(self.orders))
        counts = [float(math.comb(self.n - 2, int(m))) for m in self.orders]
        if mean_abs_dv is None:  # a difference: row by row, as its partials always summed
            mean_abs = np.array([np.abs(row).mean() for row in inter])
        else:
            mean_abs = np.abs(inter).mean(axis=1)
        return OrderTable(
            self.n,
            self.orders,
            inter.mean(axis=1),
            zeros,
            mean_abs,
            zeros,
            dis,
            zeros,
            np.array(counts),
            inter,
            np.zeros_like(inter),
        )

    def decompose(self, measured: Measured, all_pairs: bool) -> Decomposition:
        clean, perturbed = (m.exact for m in measured.games)
        assert clean is not None and perturbed is not None
        delta = clean.interactions - perturbed.interactions
        terms = clean.order_weights() * delta.sum(axis=(1, 2))
        return Decomposition(np.arange(self.n - 1), terms, np.zeros_like(terms), True)


class SampledPlanEstimator(Estimator):
    """Shared-context sampling (`analysis/sampled.py`): the plan's forwards per game."""

    name = "sampled"

    def __init__(self, plan: SamplingPlan, chunk_size: int) -> None:
        super().__init__(plan.n, plan.pairs, plan.orders, chunk_size)
        self.plan = plan
        self.seed = plan.seed
        self.context_sharing = "independent" if plan.independent else "shared"

    @property
    def forwards_per_game(self) -> int:
        return self.plan.forwards + 2  # v(empty) and v(N) besides the contexts

    def measure(
        self,
        games: Sequence[tuple[str, Game]],
        with_singletons: bool,
        cancel: CancelToken | None,
    ) -> Generator[Tick, None, Measured]:
        ends = [_ends_and_singletons(game, with_singletons) for _, game in games]
        stats: list[list[OrderStats]] = [[] for _ in range(len(games) + (len(games) == 2))]
        stages = [stage for stage, _ in games] + ([DELTA] if len(games) == 2 else [])
        for op in self.plan.order_plans:
            deltas: list[np.ndarray] = []
            for stage, game in games:
                for item in run_order(game, op, self.chunk_size, cancel):
                    if isinstance(item, int):
                        yield stage
                    else:
                        deltas.append(item)
            if len(deltas) == 2:
                deltas.append(deltas[0] - deltas[1])  # paired: the same contexts on both
            for column, d, stage in zip(stats, deltas, stages, strict=True):
                column.append(order_stats(d, op.exhaustive))
                yield from OrderTable.of_stats(self.n, np.array([op.order]), column[-1:]).estimates(
                    stage
                )
        tables = [OrderTable.of_stats(self.n, self.orders, column) for column in stats]
        measures = [
            GameMeasure(
                table,
                float(e[1]),
                float(e[0]),
                float((e[2:] - e[0]).sum()) if with_singletons else float("nan"),
                game.forwards,
            )
            for table, e, (_, game) in zip(tables, ends, games, strict=False)
        ]
        return Measured(measures, tables[2] if len(games) == 2 else None)

    def decompose(self, measured: Measured, all_pairs: bool) -> Decomposition:
        assert measured.delta is not None
        weights = (self.n - 1 - self.orders).astype(np.float64)  # w_m n(n-1): pair mean -> sum
        complete = all_pairs and np.array_equal(self.orders, np.arange(self.n - 1))
        return Decomposition(
            self.orders,
            weights * measured.delta.mean,
            weights * measured.delta.mean_stderr,
            bool(complete),
        )


def _ends_and_singletons(game: Game, with_singletons: bool) -> np.ndarray:
    """v(empty), v(N) and, if asked, v({i}) for every i."""
    n = game.n_players
    coalitions = np.stack([np.zeros(n, dtype=bool), np.ones(n, dtype=bool)])
    if with_singletons:
        coalitions = np.concatenate([coalitions, np.eye(n, dtype=bool)])
    return np.asarray(game(coalitions))
