"""Baselines and value functions: shapes, numerics and validation."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.special import softmax

from interscope_server.analysis.baselines import (
    BlurBaseline,
    ConstantBaseline,
    MeanBaseline,
    TensorBaseline,
    ZeroBaseline,
)
from interscope_server.analysis.values import (
    ClassChoice,
    ValueFunction,
    class_values,
    resolve_class,
)
from interscope_server.errors import InvalidArgument


def test_baselines() -> None:
    rng = np.random.default_rng(0)
    x = rng.random((2, 6, 6)).astype(np.float32)
    assert not ZeroBaseline().build(x).any()
    assert np.all(ConstantBaseline(0.5).build(x) == 0.5)
    ref = rng.random((5, 2, 6, 6))
    mean = MeanBaseline.from_reference(ref)
    built = mean.build(x)
    assert np.allclose(built[0], ref[:, 0].mean()) and np.allclose(built[1], ref[:, 1].mean())
    blurred = BlurBaseline(1.0).build(x)
    assert blurred.shape == x.shape and blurred.std() < x.std()
    # Channels are not mixed by the blur.
    assert np.allclose(BlurBaseline(1.0).build(np.stack([x[0], 0 * x[0]]))[1], 0)
    t = rng.random(x.shape).astype(np.float32)
    assert np.array_equal(TensorBaseline(t).build(x), t)


@pytest.mark.parametrize(
    ("baseline", "needle"),
    [
        (ConstantBaseline(float("nan")), "finite"),
        (MeanBaseline((0.1, 0.2, 0.3)), "channel means"),
        (BlurBaseline(0.0), "sigma"),
        (TensorBaseline(np.zeros((2, 5, 5))), "does not match"),
    ],
)
def test_baseline_validation(baseline: object, needle: str) -> None:
    with pytest.raises(InvalidArgument, match=needle):
        baseline.build(np.zeros((2, 6, 6), dtype=np.float32))  # type: ignore[attr-defined]


def test_value_functions_agree_with_direct_formulas() -> None:
    rng = np.random.default_rng(1)
    z = rng.normal(size=(7, 5)).astype(np.float32)
    p = softmax(z.astype(np.float64), axis=1)[:, 2]
    assert np.allclose(class_values(z, 2, ValueFunction.PROB), p)
    assert np.allclose(class_values(z, 2, ValueFunction.LOG_PROB), np.log(p))
    assert np.allclose(class_values(z, 2, ValueFunction.LOG_ODDS), np.log(p / (1 - p)))
    assert np.array_equal(class_values(z, 2, ValueFunction.LOGIT), z[:, 2].astype(np.float64))


def test_log_odds_is_stable_for_confident_logits() -> None:
    z = np.array([[200.0, 0.0, -5.0], [-300.0, 0.0, 1.0]], dtype=np.float32)
    v = class_values(z, 0, ValueFunction.LOG_ODDS)
    assert np.all(np.isfinite(v))
    assert v[0] == pytest.approx(200.0 - np.logaddexp(0.0, -5.0))
    assert np.isfinite(class_values(z, 0, ValueFunction.LOG_PROB)).all()


def test_value_and_class_validation() -> None:
    with pytest.raises(InvalidArgument, match="allowed: log_prob"):
        ValueFunction.parse("logprob")
    assert ValueFunction.parse("log_odds") is ValueFunction.LOG_ODDS
    with pytest.raises(InvalidArgument, match=r"0\.\.4"):
        class_values(np.zeros((1, 5)), 5, ValueFunction.LOGIT)
    with pytest.raises(InvalidArgument, match="needs a class index"):
        resolve_class(ClassChoice.LABEL, None, np.zeros((1, 3)))
    assert resolve_class(ClassChoice.PREDICTED, None, np.array([[0.0, 3.0, 1.0]])) == 1
