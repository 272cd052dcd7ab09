"""A profile's `forwards` is every row the model was asked for, the predicted-class pass
included, and its last ForwardProgress reaches exactly that; classes are checked against the
logits."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest

from interscope_server.analysis.players import GridPlayers
from interscope_server.analysis.profile import (
    EstimatorChoice,
    PairSelection,
    ProfileSpec,
    perturbation_events,
    profile_events,
)
from interscope_server.analysis.results import (
    ForwardProgress,
    InteractionProfile,
    PerturbationProfile,
)
from interscope_server.analysis.values import ClassChoice
from interscope_server.errors import InvalidArgument

Evaluate = Callable[[np.ndarray], np.ndarray]


class RowCounter:
    """Counts, outside the engine, the rows the model is asked for."""

    def __init__(self, evaluate: Evaluate) -> None:
        self.evaluate = evaluate
        self.rows = 0

    def __call__(self, x: np.ndarray) -> np.ndarray:
        self.rows += x.shape[0]
        return self.evaluate(x)


def _spec(choice: ClassChoice, estimator: EstimatorChoice) -> ProfileSpec:
    return ProfileSpec(
        players=GridPlayers(2, 3),
        class_choice=choice,
        estimator=estimator,
        pairs=PairSelection.NEIGHBORS,
        contexts_per_order=4,
        seed=1,
    )


@pytest.mark.parametrize("choice", [ClassChoice.LABEL, ClassChoice.PREDICTED])
@pytest.mark.parametrize("estimator", [EstimatorChoice.EXACT, EstimatorChoice.SAMPLED])
def test_profile_forwards_are_the_rows_the_model_ran(
    digits_evaluate: Evaluate,
    digit: tuple[np.ndarray, int],
    choice: ClassChoice,
    estimator: EstimatorChoice,
) -> None:
    x, y = digit
    counter = RowCounter(digits_evaluate)
    events = list(profile_events(counter, x, _spec(choice, estimator), y))
    final = events[-1]
    assert isinstance(final, InteractionProfile)
    assert final.forwards == counter.rows > 0
    last = [e for e in events if isinstance(e, ForwardProgress)][-1]
    assert last.forwards_done == last.forwards_planned == counter.rows


@pytest.mark.parametrize("choice", [ClassChoice.LABEL, ClassChoice.PREDICTED])
def test_perturbation_forwards_are_the_rows_the_model_ran(
    digits_evaluate: Evaluate, digit: tuple[np.ndarray, int], choice: ClassChoice
) -> None:
    x, y = digit
    counter = RowCounter(digits_evaluate)
    x_adv = np.clip(x + 0.1, 0.0, 1.0).astype(np.float32)
    spec = _spec(choice, EstimatorChoice.EXACT)
    events = list(perturbation_events(counter, x, x_adv, spec, y))
    final = events[-1]
    assert isinstance(final, PerturbationProfile)
    assert final.forwards == counter.rows
    last = [e for e in events if isinstance(e, ForwardProgress)][-1]
    assert last.forwards_done == last.forwards_planned == counter.rows


@pytest.mark.parametrize(("cls", "message"), [(-1, "classes start at 0"), (10, "0..9")])
def test_a_class_outside_the_models_is_refused(
    digits_evaluate: Evaluate, digit: tuple[np.ndarray, int], cls: int, message: str
) -> None:
    x, _ = digit
    spec = _spec(ClassChoice.LABEL, EstimatorChoice.EXACT)
    with pytest.raises(InvalidArgument, match=message):
        list(profile_events(digits_evaluate, x, spec, cls))
