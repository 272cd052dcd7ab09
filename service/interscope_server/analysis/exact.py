"""Exact multi-order interactions from the values of all 2^n coalitions."""

from __future__ import annotations

import functools
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
from scipy.special import comb

from interscope_server.analysis.game import Game, coalitions_from_bitmasks
from interscope_server.cancel import CancelToken
from interscope_server.errors import InvalidArgument


def popcounts(bits: int) -> np.ndarray:
    """popcount of 0 .. 2^bits - 1 as int64."""
    idx = np.arange(2**bits, dtype=np.int64)
    pc = np.zeros(idx.size, dtype=np.int64)
    for b in range(bits):
        pc += (idx >> b) & 1
    return pc


def tabulate(
    game: Game, out: np.ndarray, chunk_size: int, cancel: CancelToken | None = None
) -> Iterator[int]:
    """Fill out[mask] = v(mask) for every bitmask (player k = bit k); yield forwards done."""
    n = game.n_players
    total = 2**n
    if out.shape != (total,):
        raise InvalidArgument(f"the value table must have 2^{n} = {total} entries")
    for start in range(0, total, chunk_size):
        if cancel is not None:
            cancel.check()
        stop = min(start + chunk_size, total)
        out[start:stop] = game(coalitions_from_bitmasks(np.arange(start, stop), n))
        yield stop


@dataclass(frozen=True)
class ExactInteractions:
    """Everything the exact estimator derives from one value table.

    interactions[m, i, j] = I^(m)(i,j) (symmetric in i, j; zero diagonal), m = 0..n-2;
    mean_abs_dv[m, i, j] = mean over |S| = m of |Delta v(i,j,S)| (for disentanglement);
    order_shapley[m, i] = phi^(m)(i), m = 0..n-1.
    """

    n: int
    values: np.ndarray
    interactions: np.ndarray
    mean_abs_dv: np.ndarray
    order_shapley: np.ndarray

    @property
    def value_full(self) -> float:
        return float(self.values[-1])

    @property
    def value_empty(self) -> float:
        return float(self.values[0])

    @property
    def singletons(self) -> np.ndarray:
        """mu_i = v({i}) - v(empty)."""
        return np.asarray(self.values[1 << np.arange(self.n)] - self.values[0], dtype=np.float64)

    @property
    def shapley_values(self) -> np.ndarray:
        return np.asarray(self.order_shapley.mean(axis=0), dtype=np.float64)

    @property
    def shapley_interaction(self) -> np.ndarray:
        """I_Sh(i,j) = (1/(n-1)) sum_m I^(m)(i,j): the Shapley interaction index (SII)."""
        return np.asarray(self.interactions.sum(axis=0) / (self.n - 1), dtype=np.float64)

    def order_weights(self) -> np.ndarray:
        """w_m = (n-1-m) / (n(n-1)) for m = 0..n-2: the weight of an ordered pair's I^(m)."""
        m = np.arange(self.n - 1)
        return np.asarray((self.n - 1 - m) / (self.n * (self.n - 1)), dtype=np.float64)

    def efficiency_residual(self) -> float:
        """Identity 2: v(N) - v(0) - sum_i mu_i - sum_{i != j} sum_m w_m I^(m)(i,j)."""
        pair_term = float(np.einsum("m,mij->", self.order_weights(), self.interactions))
        return self.value_full - self.value_empty - float(self.singletons.sum()) - pair_term


_OrderSums = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]

#: Largest game whose sums by |S| and index tables are kept (under 3 MB at 12 players) and whose
#: pairs are gathered at once; larger games build their sums afresh and go row by row.
_GATHER_MAX_PLAYERS = 12


def _order_sums(n: int) -> _OrderSums:
    """What exact_interactions needs to sum by |S| for n players, the same for every game:
    the (2^(n-2), n-1) one-hot of |S| over the subsets of the other n-2 players, |S| over
    those of n-1, and the number of subsets of each size (read-only). Kept for small games,
    where building them is a large part of the work (the one-hot of 20 players is 40 MB)."""
    return _small_order_sums(n) if n <= _GATHER_MAX_PLAYERS else _build_order_sums(n)


def _build_order_sums(n: int) -> _OrderSums:
    onehot_pairs = np.zeros((2 ** (n - 2), n - 1))
    onehot_pairs[np.arange(2 ** (n - 2)), popcounts(n - 2)] = 1.0
    arrays = (
        onehot_pairs,
        popcounts(n - 1),
        comb(n - 2, np.arange(n - 1)),
        comb(n - 1, np.arange(n)),
    )
    for a in arrays:
        a.setflags(write=False)
    return arrays


_small_order_sums = functools.lru_cache(maxsize=None)(_build_order_sums)


def exact_interactions(values: np.ndarray, n: int) -> ExactInteractions:
    """All I^(m)(i,j), mean |Delta v| and phi^(m)(i) from the 2^n values (player k = bit k).

    Small games (n <= _GATHER_MAX_PLAYERS) gather every pair's Delta v at once through index
    tables kept per n (a 4-player Profile spent most of its engine time in the row loop's small
    numpy calls); larger ones go one row of pairs at a time, in O(n 2^n) memory. Both take the
    same differences over the same contexts and sum them by |S|; the sums may differ in the last
    bits.
    """
    v = np.asarray(values, dtype=np.float64)
    if v.shape != (2**n,):
        raise InvalidArgument(f"exact interactions need 2^{n} values; got {v.shape}")
    if n < 2:
        raise InvalidArgument(f"pair interactions need n >= 2 players; got {n}")
    if n <= _GATHER_MAX_PLAYERS:
        return _by_gather(v, n)
    return _by_rows(v, n)


def _by_rows(v: np.ndarray, n: int) -> ExactInteractions:
    """exact_interactions on v as a (2,)*n array: a player's difference is a difference along
    its axis, and the flat index of what is left encodes S, so |S| is a popcount shared by every
    pair. Pairs are processed one row i at a time."""
    table = v.reshape((2,) * n)  # C order: player k is axis n-1-k
    onehot_pairs, pc_single, counts_pairs, counts_single = _order_sums(n)

    interactions = np.zeros((n - 1, n, n))
    mean_abs = np.zeros((n - 1, n, n))
    order_shapley = np.zeros((n, n))
    for i in range(n):
        ai = n - 1 - i
        di = table.take(1, axis=ai) - table.take(0, axis=ai)
        order_shapley[:, i] = np.bincount(pc_single, weights=di.reshape(-1), minlength=n)
        order_shapley[:, i] /= counts_single
        js = np.arange(i + 1, n)
        if js.size == 0:
            continue
        block = np.empty((js.size, 2 ** (n - 2)))
        for row, j in enumerate(js):
            aj = n - 1 - j  # j > i so aj < ai: its axis index is unchanged in di
            np.subtract(
                di.take(1, axis=aj).reshape(-1), di.take(0, axis=aj).reshape(-1), out=block[row]
            )
        sums = (block @ onehot_pairs) / counts_pairs
        np.abs(block, out=block)
        abs_sums = (block @ onehot_pairs) / counts_pairs
        interactions[:, i, js] = sums.T
        interactions[:, js, i] = sums.T
        mean_abs[:, i, js] = abs_sums.T
        mean_abs[:, js, i] = abs_sums.T
    return ExactInteractions(n, v, interactions, mean_abs, order_shapley)


def _by_gather(v: np.ndarray, n: int) -> ExactInteractions:
    """exact_interactions through _gathers(n): the differences _by_rows takes, all at once."""
    onehot_pairs, _, counts_pairs, counts_single = _order_sums(n)
    with_ij, with_j, with_i, alone, single_with, single_without, onehot_single = _gathers(n)
    i, j = all_pairs(n).T
    # (v(S+i+j) - v(S+j)) - (v(S+i) - v(S)): the row loop's subtractions, in its order.
    block = (v[with_ij] - v[with_j]) - (v[with_i] - v[alone])  # (pairs, 2^(n-2))
    sums = ((block @ onehot_pairs) / counts_pairs).T  # (n-1, pairs)
    abs_sums = ((np.abs(block) @ onehot_pairs) / counts_pairs).T
    interactions = np.zeros((n - 1, n, n))
    mean_abs = np.zeros((n - 1, n, n))
    interactions[:, i, j] = interactions[:, j, i] = sums
    mean_abs[:, i, j] = mean_abs[:, j, i] = abs_sums
    di = v[single_with] - v[single_without]  # (n, 2^(n-1)): player i's marginals
    order_shapley = np.ascontiguousarray(((di @ onehot_single) / counts_single).T)
    return ExactInteractions(n, v, interactions, mean_abs, order_shapley)


_Gathers = tuple[np.ndarray, ...]


@functools.cache
def _gathers(n: int) -> _Gathers:
    """Flat indices into the 2^n values (read-only), for n <= _GATHER_MAX_PLAYERS: per pair
    i < j (all_pairs' order) and per context S of the other n-2 players, the masks S+i+j, S+j,
    S+i and S; per player i and context S of the other n-1, S+i and S; and the one-hot of |S|
    over the contexts of n-1 players. S runs over its players' bits in ascending order, as the
    row loop's flattened axes do."""
    players = np.arange(n)

    def contexts(others: np.ndarray) -> np.ndarray:
        """Every subset of `others` as a bitmask, the k-th of them as bit k of its index."""
        index = np.arange(2**others.size, dtype=np.int64)
        bits = (index[:, None] >> np.arange(others.size)) & 1
        return (bits << others).sum(axis=1)

    pair_rows = []
    for i, j in all_pairs(n):
        s = contexts(players[(players != i) & (players != j)])
        pair_rows.append((s | (1 << i) | (1 << j), s | (1 << j), s | (1 << i), s))
    with_ij, with_j, with_i, alone = (np.stack(t) for t in zip(*pair_rows, strict=True))
    single = [contexts(players[players != i]) for i in range(n)]
    single_without = np.stack(single)
    single_with = single_without | (1 << players)[:, None]
    onehot_single = np.zeros((2 ** (n - 1), n))
    onehot_single[np.arange(2 ** (n - 1)), popcounts(n - 1)] = 1.0
    arrays = (with_ij, with_j, with_i, alone, single_with, single_without, onehot_single)
    for a in arrays:
        a.setflags(write=False)
    return arrays


def all_pairs(n: int) -> np.ndarray:
    """Every pair (i, j), i < j, sorted: (n(n-1)/2, 2) int64, read-only (kept for small n)."""
    return _small_all_pairs(n) if n <= 64 else _build_all_pairs(n)


def _build_all_pairs(n: int) -> np.ndarray:
    i, j = np.triu_indices(n, k=1)
    pairs = np.stack([i, j], axis=1).astype(np.int64)
    pairs.setflags(write=False)
    return pairs


_small_all_pairs = functools.lru_cache(maxsize=None)(_build_all_pairs)
