"""Value functions: the scalar v(S) read from a model's logits for one class, in float64."""

from __future__ import annotations

import enum

import numpy as np

from interscope_server.errors import FailedPrecondition, InvalidArgument


class ValueFunction(enum.Enum):
    """Which scalar of the logits is the game's value. Results under different ones differ."""

    LOG_PROB = "log_prob"  # log softmax of the class: the paper's choice
    LOG_ODDS = "log_odds"  # z_y - logsumexp_{c != y} z_c = log p / (1 - p)
    LOGIT = "logit"  # raw z_y
    PROB = "prob"  # softmax probability of the class

    @classmethod
    def parse(cls, name: str | ValueFunction) -> ValueFunction:
        if isinstance(name, ValueFunction):
            return name
        try:
            return cls(name)
        except ValueError:
            allowed = ", ".join(v.value for v in cls)
            raise InvalidArgument(
                f"value function {name!r} is not known; allowed: {allowed}"
            ) from None


def check_defined(value: ValueFunction, output_kind: str, model: str) -> None:
    """Refuse a value function the model's output kind does not define.

    Backends hand the engine canonical scores (logits, or log p for probability models), on
    which log-prob, log-odds and prob equal the model's own; the raw logit z_y of a model that
    emits probabilities is not recoverable (any per-row shift gives the same p), so it is an
    error rather than log p passed off as a logit.
    """
    if value is ValueFunction.LOGIT and output_kind != "logits":
        raise FailedPrecondition(
            f"value function 'logit' needs a model that outputs logits; model {model!r} outputs "
            f"{output_kind.replace('_', '-')}, whose raw logits are not defined: use log_prob, "
            "log_odds or prob"
        )


def check_deterministic(stochastic: bool, model: str, what: str) -> None:
    """Refuse an interaction profile (`what`) of a model whose outputs are random.

    v(S) is the model's score with the players outside S masked; when two forwards of one
    input differ (noise inside the model, found at load), v(S) is a random number and every
    interaction, a difference of such numbers, mostly measures the noise. Averaging draws
    would estimate a different quantity (the smoothed model's), so nothing is computed.
    """
    if stochastic:
        raise FailedPrecondition(
            f"{what} needs a deterministic model; model {model!r} is stochastic (two forward "
            "passes of the same input gave different outputs at load, e.g. noise added to its "
            "input), so v(S) and every interaction would be random numbers: load a "
            "deterministic version of the model (noise off, eval mode, dropout off); attacks "
            "still run on this one"
        )


class ClassChoice(enum.Enum):
    """Which class the value function reads: a given label, a given target, or the prediction."""

    LABEL = "label"
    TARGET = "target"
    PREDICTED = "predicted"  # argmax of the logits on the clean input


def _logsumexp(z: np.ndarray) -> np.ndarray:
    """Row-wise log-sum-exp; plain numpy because scipy's costs ~1 ms a call in overhead."""
    top = z.max(axis=1)
    return np.asarray(top + np.log(np.exp(z - top[:, None]).sum(axis=1)), dtype=np.float64)


def class_values(logits: np.ndarray, class_index: int, value: ValueFunction) -> np.ndarray:
    """v for each row of logits (B, K) -> float64 (B,), computed stably."""
    z = np.asarray(logits, dtype=np.float64)
    if z.ndim != 2:
        raise InvalidArgument(f"model output must be logits of shape (B, K); got {z.shape}")
    k = z.shape[1]
    if not 0 <= class_index < k:
        raise InvalidArgument(
            f"class {class_index} is out of range; the model has classes 0..{k - 1}"
        )
    zy = z[:, class_index]
    if value is ValueFunction.LOGIT:
        return zy.copy()
    if value is ValueFunction.LOG_ODDS:
        if k < 2:
            raise InvalidArgument("log-odds needs at least 2 classes; the model has 1")
        others = np.delete(z, class_index, axis=1)
        return np.asarray(zy - _logsumexp(others), dtype=np.float64)
    log_p = zy - _logsumexp(z)
    if value is ValueFunction.LOG_PROB:
        return np.asarray(log_p, dtype=np.float64)
    return np.asarray(np.exp(log_p), dtype=np.float64)


def resolve_class(choice: ClassChoice, class_index: int | None, clean_logits: np.ndarray) -> int:
    """The class index the value function reads, from the choice and the clean logits (1, K)."""
    k = int(np.asarray(clean_logits).shape[-1])
    if choice is ClassChoice.PREDICTED:
        return int(np.argmax(np.asarray(clean_logits).reshape(-1, k)[0]))
    if class_index is None:
        raise InvalidArgument(
            f"class choice {choice.value!r} needs a class index (0..{k - 1}); none was given"
        )
    if not 0 <= class_index < k:
        raise InvalidArgument(
            f"class {class_index} is out of range; the model has classes 0..{k - 1}"
        )
    return int(class_index)
