"""Sampled multi-order interactions: shared contexts, unbiased per pair, with standard errors.

One context serves every selected pair it can. For low orders a context is a set S of size m and
serves the pairs outside it (v(S), v(S+i), v(S+j), v(S+i+j)); for high orders it is a set T of size
m+2 and serves the pairs inside it, with S = T - {i,j}. Either way, for a fixed pair the context
S is uniform over the m-subsets of N - {i,j} whenever the pair is served, so every pair's mean of
Delta v is unbiased, while one forward pass feeds many pairs. Per order the scheme serving the
larger share of pairs is used, so at least about a quarter of the pairs share each context.
Contexts that serve no selected pair are dropped before any forward pass.
"""

from __future__ import annotations

import enum
import functools
import itertools
import math
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from interscope_server.analysis.game import Game
from interscope_server.cancel import CancelToken
from interscope_server.errors import InvalidArgument

DEFAULT_RATIOS: tuple[float, ...] = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.95, 1.0)


def orders_from_ratios(ratios: tuple[float, ...] | list[float], n: int) -> np.ndarray:
    """m = int(r * (n - 2)) for each ratio, deduplicated and sorted (read-only)."""
    return _orders_from_ratios(tuple(float(r) for r in ratios), n)


@functools.lru_cache(maxsize=64)  # every small call asks again for the same few
def _orders_from_ratios(ratios: tuple[float, ...], n: int) -> np.ndarray:
    r = np.asarray(ratios, dtype=np.float64)
    if r.size == 0 or np.any(~np.isfinite(r)) or np.any(r < 0) or np.any(r > 1):
        raise InvalidArgument(f"order ratios {list(ratios)} are not allowed: give ratios in [0, 1]")
    # The small epsilon keeps e.g. 0.3 * 10 = 2.9999999999999996 from flooring to 2.
    orders = np.unique(np.floor(r * (n - 2) + 1e-9).astype(np.int64))
    orders.setflags(write=False)
    return orders


def check_orders(orders: tuple[int, ...] | list[int] | np.ndarray, n: int) -> np.ndarray:
    """The distinct orders, sorted, each in 0..n-2 (read-only when given as a tuple: a spec's
    orders, checked again by every step of a call, are checked once)."""
    if isinstance(orders, tuple):
        return _check_order_tuple(orders, n)
    return _check_orders(orders, n)


def _check_orders(orders: tuple[int, ...] | list[int] | np.ndarray, n: int) -> np.ndarray:
    m = np.unique(np.asarray(orders, dtype=np.int64))
    if m.size == 0 or m.min() < 0 or m.max() > n - 2:
        raise InvalidArgument(
            f"orders {list(np.asarray(orders).tolist())} are not allowed for {n} players: "
            f"give orders in 0..{n - 2}"
        )
    return m


@functools.lru_cache(maxsize=64)
def _check_order_tuple(orders: tuple[int, ...], n: int) -> np.ndarray:
    m = _check_orders(orders, n)
    m.setflags(write=False)
    return m


def check_pairs(pairs: np.ndarray, n: int) -> np.ndarray:
    p = np.asarray(pairs, dtype=np.int64)
    if p.ndim != 2 or p.shape[1] != 2 or p.shape[0] == 0:
        raise InvalidArgument(f"pairs must be a non-empty (k, 2) array; got shape {p.shape}")
    if p.min() < 0 or p.max() >= n or np.any(p[:, 0] >= p[:, 1]):
        raise InvalidArgument(f"pairs must be (i, j) with 0 <= i < j <= {n - 1}")
    if len(np.unique(p, axis=0)) != len(p):
        raise InvalidArgument("pairs must not repeat")
    return p


@dataclass(frozen=True)
class OrderPlan:
    """The contexts of one order and the coalitions (rows) they need.

    Row r is contexts[row_context[r]] with players row_flip_a[r] and row_flip_b[r] toggled (-1:
    none). For the t-th served (context, pair) in np.nonzero(served) order, v00..v11 index the rows
    holding v(S), v(S+i), v(S+j), v(S+i+j).
    """

    order: int
    inside: bool
    exhaustive: bool  # every subset of the size taken once: the estimates are exact
    contexts: np.ndarray  # (T, n) bool: S (outside scheme) or T = S + {i,j} (inside scheme)
    served: np.ndarray  # (T, k) bool
    row_context: np.ndarray
    row_flip_a: np.ndarray
    row_flip_b: np.ndarray
    v00: np.ndarray
    v10: np.ndarray
    v01: np.ndarray
    v11: np.ndarray

    @property
    def forwards(self) -> int:
        return int(self.row_context.size)

    @property
    def samples(self) -> int:
        return int(self.v00.size)

    def coalitions(self, start: int, stop: int) -> np.ndarray:
        rows = self.contexts[self.row_context[start:stop]].copy()
        r = np.arange(rows.shape[0])
        for flips in (self.row_flip_a[start:stop], self.row_flip_b[start:stop]):
            has = flips >= 0
            rows[r[has], flips[has]] ^= True
        return rows

    def delta_v(self, row_values: np.ndarray) -> np.ndarray:
        """Dense (T, k) Delta v, NaN where the pair is not served by the context."""
        d = np.full(self.served.shape, np.nan)
        d[self.served] = (
            row_values[self.v11]
            - row_values[self.v10]
            - row_values[self.v01]
            + row_values[self.v00]
        )
        return d


def served_fraction(n: int, m: int) -> tuple[bool, float]:
    """(inside scheme?, share of pairs a context serves) for order m, the better scheme."""
    outside = (n - m) * (n - m - 1) / (n * (n - 1))
    inside = (m + 2) * (m + 1) / (n * (n - 1))
    return (inside > outside, max(inside, outside))


def expected_sampled_forwards(
    n: int, orders: np.ndarray, n_pairs: int, contexts_per_order: int, independent: bool = False
) -> float:
    """The expected pair rows of a sampling plan, computed without drawing it.

    Each order takes ceil(contexts_per_order / share) contexts (or every subset, when there are
    fewer), and a context evaluates one row per pair it serves; its own row and its singletons
    come on top, so the plan's real cost is somewhat higher. Planners use this to refuse a
    request before allocating a plan whose arrays grow with contexts x pairs.
    """
    if independent:
        return 4.0 * len(orders) * n_pairs * contexts_per_order
    total = 0.0
    for m in orders:
        inside, share = served_fraction(n, int(m))
        size = int(m) + 2 if inside else int(m)
        contexts = min(math.ceil(contexts_per_order / share), math.comb(n, size))
        total += contexts * share * n_pairs
    return total


class ContextSharing(enum.Enum):
    AUTO = "auto"  # by the target statistic and the number of pairs (independent_contexts)
    SHARED = "shared"  # one context serves every selected pair it fits
    INDEPENDENT = "independent"  # the paper's scheme: contexts of its own for every pair


class TargetStatistic(enum.Enum):
    """The statistic whose standard error the caller cares most about (all are returned)."""

    PAIRS = "pairs"  # each pair's I^(m)(i,j); the default
    STRENGTH = "strength"  # mean |I^(m)| over pairs
    SIGNED_MEAN = "signed_mean"  # E_ij I^(m)(i,j)


#: Above this many pairs, independent contexts reach the standard error of the given statistic
#: with fewer forwards than shared ones (bench/bench_crossover.py: digits CNN, 8 x 8 grid,
#: neighbor pairs, twelve orders, four images; efficiency of shared at equal standard error
#: 1.06x at 32 pairs and 0.80x at 64 for the signed mean, 1.05x at 64 and 0.92x at 128 for
#: mean |I|; the crossovers, interpolated in log pairs, near 37 and 82). Shared
#: contexts cost fewer forwards per sample, but the pairs one context serves move together, so
#: averages over many pairs gain less from them. Per-pair values always favour sharing.
SHARED_MAX_PAIRS: dict[TargetStatistic, float] = {
    TargetStatistic.SIGNED_MEAN: 40,
    TargetStatistic.STRENGTH: 80,
    TargetStatistic.PAIRS: math.inf,
}


def independent_contexts(sharing: ContextSharing, target: TargetStatistic, n_pairs: int) -> bool:
    """Whether a sampled profile over `n_pairs` pairs draws contexts per pair."""
    if sharing is ContextSharing.AUTO:
        return n_pairs > SHARED_MAX_PAIRS[target]
    return sharing is ContextSharing.INDEPENDENT


#: Every sampled pair gets at least this many contexts per order: an estimate and its SE.
MIN_SAMPLES_PER_PAIR = 2


def _top_up(
    contexts: np.ndarray,
    served: np.ndarray,
    pairs: np.ndarray,
    m: int,
    inside: bool,
    rng: np.random.Generator,
    minimum: int = MIN_SAMPLES_PER_PAIR,
) -> tuple[np.ndarray, np.ndarray]:
    """Dedicated contexts for pairs the shared draw served under `minimum` times.

    With few contexts (or a pair the draw happened to miss) a pair would have no estimate. Each
    added context is a uniform m-subset S of N minus {i, j} (plus i and j for the inside scheme)
    and serves only its own pair, so that pair's samples stay i.i.d. uniform and no other pair's
    estimate is tilted by contexts chosen for someone else.
    """
    counts = served.sum(axis=0)
    short = np.nonzero(counts < minimum)[0]
    if short.size == 0:
        return contexts, served
    owner = np.repeat(short, minimum - counts[short])
    rows = np.arange(owner.size)
    n = contexts.shape[1]
    keys = rng.random((owner.size, n))
    keys[rows, pairs[owner, 0]] = 2.0  # i and j sort last, so they are never drawn into S
    keys[rows, pairs[owner, 1]] = 2.0
    extra = np.zeros((owner.size, n), dtype=bool)
    extra[rows[:, None], np.argsort(keys, axis=1)[:, :m]] = True
    if inside:
        extra[rows, pairs[owner, 0]] = True
        extra[rows, pairs[owner, 1]] = True
    extra_served = np.zeros((owner.size, served.shape[1]), dtype=bool)
    extra_served[rows, owner] = True
    return np.concatenate([contexts, extra]), np.concatenate([served, extra_served])


def plan_order(
    n: int,
    m: int,
    pairs: np.ndarray,
    contexts_per_order: int,
    rng: np.random.Generator,
    independent: bool = False,
) -> OrderPlan:
    if independent:
        # The paper's scheme: every pair gets contexts of its own (4 forwards per sample). Its
        # pairs' errors are independent, so per-order means of the signed interaction converge
        # faster per sample than with shared contexts, which correlate the pairs they serve.
        no_contexts = np.zeros((0, n), dtype=bool)
        no_served = np.zeros((0, pairs.shape[0]), dtype=bool)
        contexts, served = _top_up(
            no_contexts, no_served, pairs, m, False, rng, minimum=contexts_per_order
        )
        return _order_rows(m, False, False, contexts, served, pairs)
    inside, frac = served_fraction(n, m)
    size = m + 2 if inside else m
    n_ctx = math.ceil(contexts_per_order / frac)
    exhaustive = math.comb(n, size) <= n_ctx
    if exhaustive:
        # Fewer subsets than draws (e.g. m = 0): take each once, which is exact and cheaper.
        members = np.array(list(itertools.combinations(range(n), size)), dtype=np.int64)
        n_ctx = members.shape[0]
    else:
        # A uniform random subset of the given size per context: the first `size` of a permutation.
        members = np.argsort(rng.random((n_ctx, n)), axis=1)[:, :size]
    contexts = np.zeros((n_ctx, n), dtype=bool)
    contexts[np.arange(n_ctx)[:, None], members.reshape(n_ctx, size)] = True
    i, j = pairs[:, 0], pairs[:, 1]
    served = contexts[:, i] & contexts[:, j] if inside else ~contexts[:, i] & ~contexts[:, j]
    if not exhaustive:
        contexts, served = _top_up(contexts, served, pairs, m, inside, rng)
    return _order_rows(m, inside, exhaustive, contexts, served, pairs)


def _order_rows(
    m: int,
    inside: bool,
    exhaustive: bool,
    contexts: np.ndarray,
    served: np.ndarray,
    pairs: np.ndarray,
) -> OrderPlan:
    """The rows (coalitions) that the served (context, pair) samples of one order need."""
    n = contexts.shape[1]
    i, j = pairs[:, 0], pairs[:, 1]
    keep = served.any(axis=1)
    contexts, served = contexts[keep], served[keep]
    n_ctx = contexts.shape[0]

    needed = np.zeros((n_ctx, n), dtype=bool)
    ts, ps = np.nonzero(served)
    needed[ts, i[ps]] = True
    needed[ts, j[ps]] = True
    tu, uu = np.nonzero(needed)
    single_row = np.full((n_ctx, n), -1, dtype=np.int64)
    single_row[tu, uu] = n_ctx + np.arange(tu.size)
    pair_row = n_ctx + tu.size + np.arange(ts.size)

    none = np.full(n_ctx, -1, dtype=np.int64)
    row_context = np.concatenate([np.arange(n_ctx), tu, ts]).astype(np.int64)
    row_flip_a = np.concatenate([none, uu, i[ps]]).astype(np.int64)
    row_flip_b = np.concatenate([none, np.full(tu.size, -1), j[ps]]).astype(np.int64)
    with_i, with_j = single_row[ts, i[ps]], single_row[ts, j[ps]]
    if inside:  # the base row is T = S+i+j; flipping removes players
        v11, v10, v01, v00 = ts, with_j, with_i, pair_row
    else:  # the base row is S; flipping adds players
        v00, v10, v01, v11 = ts, with_i, with_j, pair_row
    return OrderPlan(
        m,
        inside,
        exhaustive,
        contexts,
        served,
        row_context,
        row_flip_a,
        row_flip_b,
        np.asarray(v00),
        np.asarray(v10),
        np.asarray(v01),
        np.asarray(v11),
    )


@dataclass(frozen=True)
class SamplingPlan:
    """All contexts of a sampled estimate; reusable on any game with the same n."""

    n: int
    pairs: np.ndarray
    orders: np.ndarray
    contexts_per_order: int
    seed: int
    order_plans: tuple[OrderPlan, ...]
    independent: bool = False  # contexts drawn per pair instead of shared

    @property
    def forwards(self) -> int:
        return sum(p.forwards for p in self.order_plans)

    @property
    def samples(self) -> int:
        return sum(p.samples for p in self.order_plans)


class SampledEstimator:
    """Plans and runs shared-context sampling of I^(m)(i,j) for the given pairs and orders.

    `contexts_per_order` is the expected number of contexts S averaged per pair and order (the
    paper used 100); each pair's count is random around it. The plan depends only on n, pairs,
    orders, contexts_per_order and seed, so the same contexts serve a clean and a perturbed input.
    """

    def __init__(
        self,
        pairs: np.ndarray,
        orders: np.ndarray,
        contexts_per_order: int,
        seed: int,
        independent: bool = False,
    ):
        if contexts_per_order < 2:
            raise InvalidArgument(
                f"contexts per order {contexts_per_order} is not allowed: give at least 2 so a "
                "standard error can be estimated"
            )
        self.pairs = np.asarray(pairs, dtype=np.int64)
        self.orders = np.asarray(orders, dtype=np.int64)
        self.contexts_per_order = int(contexts_per_order)
        self.seed = int(seed)
        self.independent = bool(independent)

    def plan(self, n: int) -> SamplingPlan:
        pairs = check_pairs(self.pairs, n)
        orders = check_orders(self.orders, n)
        # One child stream per order: an order's contexts do not depend on which others are asked.
        children = np.random.SeedSequence([self.seed, 1]).spawn(int(orders.max()) + 1)
        plans = tuple(
            plan_order(
                n,
                int(m),
                pairs,
                self.contexts_per_order,
                np.random.default_rng(children[int(m)]),
                self.independent,
            )
            for m in orders
        )
        return SamplingPlan(
            n, pairs, orders, self.contexts_per_order, self.seed, plans, self.independent
        )


def run_order(
    game: Game, plan: OrderPlan, chunk_size: int, cancel: CancelToken | None = None
) -> Iterator[int | np.ndarray]:
    """Evaluate one order's rows chunk by chunk; yield the forwards done after each chunk, then
    the dense (T, k) Delta v."""
    values = np.empty(plan.forwards)
    for start in range(0, plan.forwards, chunk_size):
        if cancel is not None:
            cancel.check()
        stop = min(start + chunk_size, plan.forwards)
        values[start:stop] = game(plan.coalitions(start, stop))
        yield stop - start
    yield plan.delta_v(values)


@dataclass(frozen=True)
class OrderStats:
    """Per-pair and aggregate statistics of one order from sampled Delta v (NaN = not served)."""

    pair_mean: np.ndarray  # (k,) NaN where a pair got no sample
    pair_se: np.ndarray  # (k,) NaN where a pair got fewer than 2 samples
    pair_mean_abs_dv: np.ndarray
    counts: np.ndarray
    mean: float
    mean_stderr: float
    mean_abs: float
    mean_abs_stderr: float
    disentanglement: float
    disentanglement_stderr: float


def _cluster_se(influence: np.ndarray) -> float:
    """SE of a sum of independent per-context terms with zero mean (contexts are the units)."""
    t = influence.size
    if t < 2:
        return float("nan")
    return float(np.sqrt(t / (t - 1) * np.sum(influence**2)))


def order_stats(d: np.ndarray, exhaustive: bool = False) -> OrderStats:
    """Aggregate a (T, k) matrix of Delta v samples (NaN where not served).

    Standard errors treat contexts as independent units: a context feeds many pairs, so the
    pairs' estimates are correlated and a per-pair SE would understate the aggregate's error.
    Each aggregate's SE is that of its linearisation (delta method) summed over contexts.
    With `exhaustive` contexts (every subset once) the estimates are exact and the SEs 0.
    """
    served = ~np.isnan(d)
    counts = served.sum(axis=0)
    dz = np.where(served, d, 0.0)
    with np.errstate(invalid="ignore", divide="ignore"):
        a = dz.sum(axis=0) / counts
        b = np.abs(dz).sum(axis=0) / counts
        resid = np.where(served, d - a, 0.0)
        var = (resid**2).sum(axis=0) / (counts - 1)
        pair_se = np.where(counts >= 2, np.sqrt(var / counts), np.nan)
    valid = counts > 0
    n_valid = int(valid.sum())
    if n_valid == 0:
        nan = float("nan")
        return OrderStats(a, pair_se, b, counts, nan, nan, nan, nan, nan, nan)
    w = np.zeros_like(a)
    w[valid] = 1.0 / (n_valid * counts[valid])
    mean = float(a[valid].mean())
    mean_stderr = _cluster_se(resid @ w)
    sign = np.sign(np.where(valid, a, 0.0))
    mean_abs = float(np.abs(a[valid]).mean())
    mean_abs_stderr = _cluster_se(resid @ (w * sign))
    dvalid = valid & (np.nan_to_num(b) > 0)
    if dvalid.any():
        nd = int(dvalid.sum())
        wd = np.zeros_like(a)
        wd[dvalid] = 1.0 / (nd * counts[dvalid])
        bd = np.where(dvalid, b, 1.0)
        ad = np.where(dvalid, a, 0.0)
        dis = float((np.abs(ad[dvalid]) / bd[dvalid]).mean())
        abs_resid = np.where(served, np.abs(dz) - np.where(dvalid, b, 0.0), 0.0)
        infl = resid @ (wd * np.sign(ad) / bd) - abs_resid @ (wd * np.abs(ad) / bd**2)
        dis_se = _cluster_se(infl)
    else:
        dis, dis_se = float("nan"), float("nan")
    if exhaustive:
        pair_se = np.where(valid, 0.0, np.nan)
        mean_stderr = mean_abs_stderr = 0.0
        dis_se = 0.0 if np.isfinite(dis) else dis
    return OrderStats(
        a, pair_se, b, counts, mean, mean_stderr, mean_abs, mean_abs_stderr, dis, dis_se
    )


def estimate(
    game: Game, plan: SamplingPlan, chunk_size: int = 4096, cancel: CancelToken | None = None
) -> list[OrderStats]:
    """Run a plan on a game without streaming: one OrderStats per order of the plan."""
    out: list[OrderStats] = []
    for op in plan.order_plans:
        for item in run_order(game, op, chunk_size, cancel):
            if isinstance(item, np.ndarray):
                out.append(order_stats(item, op.exhaustive))
    return out
