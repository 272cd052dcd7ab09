"""Grid players and the mean and blur baselines follow the input layout."""

from __future__ import annotations

import numpy as np
import pytest

from interscope_server.analysis.baselines import BlurBaseline, MeanBaseline
from interscope_server.analysis.players import GridPlayers
from interscope_server.errors import InvalidArgument


def test_channels_last_grid_is_the_transposed_channels_first_grid() -> None:
    nchw = GridPlayers(3, 2).player_map((4, 7, 5))
    nhwc = GridPlayers(3, 2, "NHWC").player_map((7, 5, 4))
    np.testing.assert_array_equal(np.moveaxis(nchw, 0, -1), nhwc)
    with pytest.raises(InvalidArgument, match="layout is features"):
        GridPlayers(2, 2, "features").player_map((16,))


def test_mean_and_blur_baselines_follow_the_layout() -> None:
    rng = np.random.default_rng(0)
    ref = rng.uniform(size=(5, 3, 6, 7))
    x = ref[0].astype(np.float32)
    nchw = MeanBaseline.from_reference(ref).build(x)
    nhwc = MeanBaseline.from_reference(np.moveaxis(ref, 1, -1), "NHWC")
    np.testing.assert_allclose(np.moveaxis(nchw, 0, -1), nhwc.build(np.moveaxis(x, 0, -1)))
    np.testing.assert_allclose(nchw[:, 0, 0], ref.mean(axis=(0, 2, 3)), rtol=1e-6)
    blur = BlurBaseline(1.5).build(x)
    blur_last = BlurBaseline(1.5, "NHWC").build(np.moveaxis(x, 0, -1))
    np.testing.assert_allclose(np.moveaxis(blur, 0, -1), blur_last, rtol=1e-6)
    with pytest.raises(InvalidArgument, match="layout is features"):
        BlurBaseline(1.0, "features").build(x.reshape(-1))


def test_the_features_mean_is_one_value_per_feature() -> None:
    ref = np.array([[0.0, 100.0, -1.0], [2.0, 300.0, -3.0]])
    baseline = MeanBaseline.from_reference(ref, "features")
    assert baseline.channel_means == (1.0, 200.0, -2.0)
    assert baseline.build(np.zeros(3, dtype=np.float32)).tolist() == [1.0, 200.0, -2.0]
    # Without the layout, a vector batch has one mean overall, as before.
    assert MeanBaseline.from_reference(ref).channel_means == (pytest.approx(398 / 6),)
    with pytest.raises(InvalidArgument, match="3 feature means do not fit"):
        baseline.build(np.zeros(4, dtype=np.float32))
    with pytest.raises(InvalidArgument, match="finite"):
        MeanBaseline.from_reference(np.array([[np.nan, 1.0]]), "features")
