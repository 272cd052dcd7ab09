"""Input layouts: what the shape alone decides, and what config.json must then say."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from pydantic import ValidationError

from interscope_server.layout import infer_layout
from interscope_server.models.backend import normalization_arrays
from interscope_server.models.config import ModelConfig


@pytest.mark.parametrize(
    ("shape", "layout"),
    [
        ((7,), "features"),
        ((16, 16), "NCHW"),
        ((3, 32, 32), "NCHW"),
        ((1, 2, 2), "NCHW"),
        ((32, 32, 3), "NHWC"),
        ((28, 28, 1), "NHWC"),
        ((3, 3, 3), None),
        ((8, 4, 4), None),
        ((4, 4, 8), None),
        ((3, 8, 3), None),
        ((2, 3, 4, 5), "features"),
    ],
)
def test_layout_is_inferred_only_when_the_shape_is_unambiguous(
    shape: tuple[int, ...], layout: str | None
) -> None:
    assert infer_layout(shape) == layout


def _config(**fields: Any) -> ModelConfig:
    values: dict[str, Any] = {
        "name": "m",
        "format": "onnx",
        "file": "model.onnx",
        "input": {"name": "input", "shape": [3, 3, 3]},
        "classes": ["a", "b"],
    }
    values.update(fields)
    return ModelConfig.model_validate(values)


def test_an_ambiguous_shape_asks_for_the_layout_field() -> None:
    with pytest.raises(ValidationError, match=r"set input\.layout to NCHW or NHWC"):
        _config()
    assert _config(input={"name": "input", "shape": [3, 3, 3], "layout": "NHWC"}).layout == "NHWC"
    assert _config(input={"name": "input", "shape": [8, 8, 3]}).layout == "NHWC"
    with pytest.raises(ValidationError, match=r"NHWC needs a per-example shape \(H, W, C\)"):
        _config(input={"name": "input", "shape": [8, 8], "layout": "NHWC"})
    with pytest.raises(ValidationError, match="layout"):
        _config(input={"name": "input", "shape": [8, 8, 3], "layout": "NWHC"})


def test_per_feature_ranges_and_names_need_a_features_layout_of_matching_size() -> None:
    features = {"name": "input", "shape": [3]}
    config = _config(
        input=features,
        value_range=[[0, 1], [-5, 5], [0, 100]],
        feature_names=["a", "b", "c"],
    )
    assert config.layout == "features" and config.per_feature_range
    assert config.value_range == [(0.0, 1.0), (-5.0, 5.0), (0.0, 100.0)]
    assert not _config(input=features).per_feature_range
    with pytest.raises(ValidationError, match=r"one \[low, high\] per feature \(3\); got 2"):
        _config(input=features, value_range=[[0, 1], [0, 1]])
    with pytest.raises(ValidationError, match="low < high"):
        _config(input=features, value_range=[[0, 1], [2, 2], [0, 1]])
    with pytest.raises(ValidationError, match="layout features"):
        _config(input={"name": "input", "shape": [1, 4, 4]}, value_range=[[0, 1]] * 16)
    with pytest.raises(ValidationError, match="one name per feature"):
        _config(input=features, feature_names=["a", "b"])
    with pytest.raises(ValidationError, match="unique"):
        _config(input=features, feature_names=["a", "b", "a"])


def test_normalisation_follows_the_layout() -> None:
    norm = {"mean": [0.1, 0.2, 0.3], "std": [1.0, 2.0, 4.0]}
    nhwc = _config(input={"name": "input", "shape": [4, 5, 3]}, normalization=norm)
    nchw = _config(input={"name": "input", "shape": [3, 4, 5]}, normalization=norm)
    features = _config(input={"name": "input", "shape": [3]}, normalization=norm)
    x = np.random.default_rng(0).uniform(size=(2, 3, 4, 5)).astype(np.float32)
    for config, batch in ((nchw, x), (nhwc, np.moveaxis(x, 1, -1))):
        arrays = normalization_arrays(config)
        assert arrays is not None
        mean, std = arrays
        out = (batch - mean) / std
        if config.layout == "NHWC":
            out = np.moveaxis(out, -1, 1)
        expected = (x - np.array([0.1, 0.2, 0.3])[:, None, None]) / np.array([1, 2, 4.0])[
            :, None, None
        ]
        np.testing.assert_allclose(out, expected, rtol=1e-6)
    arrays = normalization_arrays(features)
    assert arrays is not None and arrays[0].shape == (3,)
    with pytest.raises(ValidationError, match=r"one entry per channel \(3 for layout NHWC\)"):
        _config(
            input={"name": "input", "shape": [3, 5, 3], "layout": "NHWC"},
            normalization={"mean": [0.0] * 5, "std": [1.0] * 5},
        )
