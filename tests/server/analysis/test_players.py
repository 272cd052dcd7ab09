"""Players: grid numbering and boundaries, feature groups, masks, neighbors, validation."""

from __future__ import annotations

import numpy as np
import pytest

from interscope_server.analysis.players import (
    FeaturePlayers,
    GridPlayers,
    MaskPlayers,
    resolve_players,
)
from interscope_server.errors import InvalidArgument


def test_grid_is_row_major_with_floor_boundaries() -> None:
    pmap = GridPlayers(3, 2).player_map((2, 7, 5))
    h, w, rows, cols = 7, 5, 3, 2
    for y in range(h):
        for x in range(w):
            r = next(r for r in range(rows) if r * h // rows <= y < (r + 1) * h // rows)
            c = next(c for c in range(cols) if c * w // cols <= x < (c + 1) * w // cols)
            assert pmap[0, y, x] == pmap[1, y, x] == r * cols + c
    assert resolve_players(GridPlayers(3, 2), (7, 5))[1] == 6


def test_resolved_maps_are_shared_read_only_and_a_changed_mask_is_seen() -> None:
    # Grid and feature players are resolved once per (players, shape) and shared between calls:
    # nobody may write into the shared map.
    first, n = resolve_players(GridPlayers(2, 2), [1, 8, 8])  # any sequence of ints
    again, _ = resolve_players(GridPlayers(2, 2), (1, 8, 8))
    assert n == 4 and again is first
    with pytest.raises(ValueError, match="read-only"):
        first[0, 0, 0] = 3
    features, _ = resolve_players(FeaturePlayers(), (6,))
    assert not features.flags.writeable
    # A mask wraps an array its owner may change: it is resolved again on every call.
    mask = np.array([0, 0, 1, 1, -1, -1])
    players = MaskPlayers(mask)
    assert resolve_players(players, (6,))[1] == 2
    mask[4:] = 2
    pmap, n = resolve_players(players, (6,))
    assert n == 3 and pmap.tolist() == [0, 0, 1, 1, 2, 2]


@pytest.mark.parametrize(
    ("grid", "shape", "needle"),
    [
        (GridPlayers(9, 2), (1, 8, 8), "larger than the image"),
        (GridPlayers(0, 2), (8, 8), "must be >= 1"),
        (GridPlayers(2, 2), (8,), "(C, H, W) or (H, W)"),
        (GridPlayers(1, 1), (8, 8), "at least 2 players"),
    ],
)
def test_grid_validation(grid: GridPlayers, shape: tuple[int, ...], needle: str) -> None:
    with pytest.raises(InvalidArgument, match=needle.replace("(", r"\(").replace(")", r"\)")):
        resolve_players(grid, shape)


def test_neighbors_within_radius() -> None:
    pairs = GridPlayers(3, 3).neighbor_pairs(1)
    # A 3x3 grid has 12 edge-adjacent and 8 diagonal pairs.
    assert len(pairs) == 20
    assert np.all(pairs[:, 0] < pairs[:, 1])
    assert [0, 4] in pairs.tolist() and [0, 2] not in pairs.tolist()
    assert len(GridPlayers(3, 3).neighbor_pairs(2)) == 36
    with pytest.raises(InvalidArgument, match="radius"):
        GridPlayers(3, 3).neighbor_pairs(0)


@pytest.mark.parametrize("rows, cols", [(1, 1), (1, 5), (3, 3), (4, 7), (16, 16)])
@pytest.mark.parametrize("radius", [1, 2, 5])
def test_neighbor_pair_count_is_the_number_of_neighbor_pairs(rows, cols, radius) -> None:
    grid = GridPlayers(rows, cols)
    assert grid.neighbor_pair_count(radius) == len(grid.neighbor_pairs(radius))


def test_feature_players() -> None:
    assert FeaturePlayers().player_map((4,)).tolist() == [0, 1, 2, 3]
    pmap = FeaturePlayers.from_groups([[0, 2], [3]]).player_map((5,))
    assert pmap.tolist() == [0, -1, 0, 1, -1]
    with pytest.raises(InvalidArgument, match="empty"):
        FeaturePlayers.from_groups([[0], []]).player_map((5,))
    with pytest.raises(InvalidArgument, match=r"outside 0\.\.4"):
        FeaturePlayers.from_groups([[0, 5]]).player_map((5,))
    with pytest.raises(InvalidArgument, match="disjoint"):
        FeaturePlayers.from_groups([[0, 1], [1]]).player_map((5,))
    # A features input of any rank: features are its elements in flattened (row-major) order.
    assert FeaturePlayers().player_map((2, 2)).tolist() == [[0, 1], [2, 3]]
    grouped = FeaturePlayers.from_groups([[0, 3], [1]]).player_map((2, 2))
    assert grouped.tolist() == [[0, 1], [-1, 0]]


def test_mask_players() -> None:
    mask = np.array([[0, 0, -1], [1, 2, 2]])
    assert MaskPlayers(mask).player_map((2, 3)).tolist() == mask.tolist()
    with pytest.raises(InvalidArgument, match="missing"):
        MaskPlayers(np.array([0, 2, 2])).player_map((3,))
    with pytest.raises(InvalidArgument, match="does not match"):
        MaskPlayers(mask).player_map((3, 2))
    with pytest.raises(InvalidArgument, match="integers"):
        MaskPlayers(mask.astype(float)).player_map((2, 3))
    with pytest.raises(InvalidArgument, match="-1"):
        MaskPlayers(np.array([0, 1, -2])).player_map((3,))
