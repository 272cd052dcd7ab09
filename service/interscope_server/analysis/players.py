"""Players: how an input is split into the n players of the game (grid, features, mask)."""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np

from interscope_server.errors import InvalidArgument
from interscope_server.layout import Layout, image_hw

# A per-element player-id map: same shape as one input, int64, -1 for elements that belong to no
# player (always kept from x).
PlayerMap = np.ndarray


def _check_shape(input_shape: tuple[int, ...]) -> None:
    if len(input_shape) == 0 or any(int(d) <= 0 for d in input_shape):
        raise InvalidArgument(
            f"input shape {tuple(input_shape)} is not allowed: it needs at least one dimension "
            "and every dimension must be positive"
        )


@dataclass(frozen=True)
class GridPlayers:
    """An R x C grid over an image (C,H,W), (H,W) or, with layout NHWC, (H,W,C); cell (r, c) is
    player r*C + c and holds every channel of its pixels.

    Cell (r, c) covers rows floor(r*H/R) .. floor((r+1)*H/R)-1 and likewise columns, so every
    pixel belongs to exactly one cell even when R does not divide H.
    """

    rows: int
    cols: int
    layout: Layout = "NCHW"

    @property
    def n_players(self) -> int:
        return self.rows * self.cols

    def player_map(self, input_shape: tuple[int, ...]) -> PlayerMap:
        input_shape = tuple(int(d) for d in input_shape)
        _check_shape(input_shape)
        if self.layout == "features":
            raise InvalidArgument(
                "grid players need an image input (layout NCHW or NHWC); this model's layout "
                "is features: use feature players or a mask"
            )
        if len(input_shape) not in ((3,) if self.layout == "NHWC" else (2, 3)):
            raise InvalidArgument(
                f"grid players need an image input of shape (C, H, W) or (H, W) (NCHW) or "
                f"(H, W, C) (NHWC); got {input_shape} for layout {self.layout}"
            )
        height, width = image_hw(self.layout, input_shape)
        if self.rows < 1 or self.cols < 1:
            raise InvalidArgument(
                f"grid {self.rows}x{self.cols} is not allowed: rows and cols must be >= 1"
            )
        if self.rows > height or self.cols > width:
            raise InvalidArgument(
                f"grid {self.rows}x{self.cols} is larger than the image ({height}x{width}); "
                f"rows must be <= {height} and cols <= {width}"
            )
        # Cell r starts at floor(r*H/R); a pixel belongs to the last cell starting at or before it.
        # (y*R)//H is not the same thing when R does not divide H.
        row_starts = (np.arange(self.rows) * height) // self.rows
        col_starts = (np.arange(self.cols) * width) // self.cols
        row_of = np.searchsorted(row_starts, np.arange(height), side="right") - 1
        col_of = np.searchsorted(col_starts, np.arange(width), side="right") - 1
        cell = row_of[:, None] * self.cols + col_of[None, :]
        if self.layout == "NHWC":
            cell = cell[:, :, None]  # every channel of a pixel belongs to the pixel's cell
        return np.broadcast_to(cell, input_shape).astype(np.int64)

    def neighbor_pair_count(self, radius: int = 1) -> int:
        """len(neighbor_pairs(radius)) without building them: each offset (dr, dc) with
        Chebyshev length 1..radius fits (rows - |dr|) * (cols - |dc|) times; a pair is two
        opposite offsets."""
        if radius < 1:
            raise InvalidArgument(f"neighbor radius {radius} is not allowed: it must be >= 1")
        total = 0
        for dr in range(-radius, radius + 1):
            for dc in range(-radius, radius + 1):
                if dr or dc:
                    total += max(0, self.rows - abs(dr)) * max(0, self.cols - abs(dc))
        return total // 2

    def neighbor_pairs(self, radius: int = 1) -> np.ndarray:
        """Pairs (i, j), i < j, of cells at Chebyshev distance 1..radius (1: 8 neighbors)."""
        if radius < 1:
            raise InvalidArgument(f"neighbor radius {radius} is not allowed: it must be >= 1")
        r, c = np.divmod(np.arange(self.n_players), self.cols)
        dist = np.maximum(np.abs(r[:, None] - r[None, :]), np.abs(c[:, None] - c[None, :]))
        i, j = np.nonzero(np.triu((dist >= 1) & (dist <= radius), k=1))
        return np.stack([i, j], axis=1).astype(np.int64)


@dataclass(frozen=True)
class FeaturePlayers:
    """Players over features: one per feature (groups None) or one per group of features.

    A feature is one element of the input in flattened (row-major) order, so a features-layout
    input of any rank works; features in no group are not players and are always kept.
    """

    groups: tuple[tuple[int, ...], ...] | None = None

    @staticmethod
    def from_groups(groups: list[list[int]] | None) -> FeaturePlayers:
        return FeaturePlayers(None if groups is None else tuple(tuple(g) for g in groups))

    def player_map(self, input_shape: tuple[int, ...]) -> PlayerMap:
        input_shape = tuple(int(d) for d in input_shape)
        _check_shape(input_shape)
        n_features = int(np.prod(input_shape))
        if self.groups is None:
            return np.arange(n_features, dtype=np.int64).reshape(input_shape)
        if len(self.groups) == 0:
            raise InvalidArgument("feature groups are empty: give at least one group")
        pmap = np.full(n_features, -1, dtype=np.int64)
        for g, members in enumerate(self.groups):
            if len(members) == 0:
                raise InvalidArgument(f"feature group {g} is empty: every group needs a feature")
            idx = np.asarray(members, dtype=np.int64)
            if idx.min() < 0 or idx.max() >= n_features:
                raise InvalidArgument(
                    f"feature group {g} names a feature outside 0..{n_features - 1}"
                )
            if np.any(pmap[idx] >= 0) or len(np.unique(idx)) != len(idx):
                raise InvalidArgument(
                    f"feature group {g} overlaps another group or repeats a feature; "
                    "groups must be disjoint"
                )
            pmap[idx] = g
        return pmap.reshape(input_shape)


@dataclass(frozen=True, eq=False)
class MaskPlayers:
    """An integer tensor of player ids (0..n-1) in the input's shape; -1 = always kept."""

    mask: np.ndarray

    def player_map(self, input_shape: tuple[int, ...]) -> PlayerMap:
        input_shape = tuple(int(d) for d in input_shape)
        _check_shape(input_shape)
        mask = np.asarray(self.mask)
        if not np.issubdtype(mask.dtype, np.integer):
            raise InvalidArgument(
                f"player mask must hold integers (player ids, -1 = not a player); got {mask.dtype}"
            )
        if mask.shape != input_shape:
            raise InvalidArgument(
                f"player mask shape {mask.shape} does not match the input shape {input_shape}"
            )
        if mask.size and mask.min() < -1:
            raise InvalidArgument(
                f"player mask holds id {int(mask.min())}; ids must be -1 (not a player) or 0..n-1"
            )
        ids = np.unique(mask[mask >= 0])
        if len(ids) == 0:
            raise InvalidArgument("player mask names no player: give ids 0..n-1 (n >= 1)")
        if ids[-1] != len(ids) - 1:
            missing = sorted(set(range(int(ids[-1]) + 1)) - set(ids.tolist()))
            raise InvalidArgument(
                f"player ids in the mask must be exactly 0..n-1 with every id used; "
                f"missing {missing[:10]}"
            )
        return mask.astype(np.int64)


Players = GridPlayers | FeaturePlayers | MaskPlayers


def resolve_players(players: Players, input_shape: tuple[int, ...]) -> tuple[PlayerMap, int]:
    """The per-element player-id map for this input shape (read-only) and the number of players n.

    A call resolves its players several times (checking the request, planning, building the
    game), so grid and feature players, which are values, are resolved once per (players,
    shape); a mask is an array that could change under its wrapper and is resolved each time.
    """
    shape = tuple(int(d) for d in input_shape)
    if isinstance(players, MaskPlayers):
        return _resolve(players, shape)
    return _resolve_value(players, shape)


def _resolve(players: Players, shape: tuple[int, ...]) -> tuple[PlayerMap, int]:
    pmap = players.player_map(shape)
    n = int(pmap.max()) + 1 if pmap.size else 0
    if n < 2:
        raise InvalidArgument(f"the game needs at least 2 players for pair interactions; got {n}")
    pmap.setflags(write=False)  # shared between calls: nobody may change it in place
    return pmap, n


#: A few entries: a player map holds one int64 per input element (1.2 MB for 3x224x224).
_resolve_value = functools.lru_cache(maxsize=16)(_resolve)
