"""Games: values v(S) for a boolean coalition matrix, from a model or from a table."""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import numpy as np

from interscope_server.analysis.baselines import Baseline
from interscope_server.analysis.players import Players, resolve_players
from interscope_server.analysis.values import ValueFunction, class_values
from interscope_server.cancel import CancelToken
from interscope_server.errors import InvalidArgument
from interscope_server.evaluator import Evaluator


class CountingEvaluator:
    """The model's forward pass, counting the rows it is asked for.

    A profile sends every forward through one of these (its games' and the predicted-class
    pass alike), so the `forwards` it reports is what the model actually ran.
    """

    def __init__(self, evaluate: Evaluator) -> None:
        self._evaluate = evaluate
        self.forwards = 0

    def __call__(self, x: np.ndarray) -> np.ndarray:
        out = self._evaluate(x)
        self.forwards += int(x.shape[0])
        return out


class Game(Protocol):
    """A cooperative game: coalitions (B, n) bool -> values (B,) float64, with a forward count."""

    @property
    def n_players(self) -> int: ...

    @property
    def forwards(self) -> int: ...

    def __call__(self, coalitions: np.ndarray) -> np.ndarray: ...


def _check_coalitions(coalitions: np.ndarray, n: int) -> np.ndarray:
    c = np.asarray(coalitions)
    if c.ndim != 2 or c.shape[1] != n:
        raise InvalidArgument(f"coalitions must be a (B, {n}) boolean matrix; got {c.shape}")
    return c.astype(bool, copy=False)


def bitmasks(coalitions: np.ndarray) -> np.ndarray:
    """Coalitions (B, n) bool -> int64 bitmasks with player k as bit k."""
    n = coalitions.shape[1]
    weights = np.left_shift(np.int64(1), np.arange(n, dtype=np.int64))
    return np.asarray(coalitions.astype(np.int64) @ weights, dtype=np.int64)


def coalitions_from_bitmasks(masks: np.ndarray, n: int) -> np.ndarray:
    """int bitmasks (B,) -> coalitions (B, n) bool with player k as bit k."""
    return (
        (np.asarray(masks, dtype=np.int64)[:, None] >> np.arange(n, dtype=np.int64)) & 1
    ).astype(bool)


class TabularGame:
    """A game given by its values on all 2^n coalitions, indexed by bitmask (player k = bit k)."""

    def __init__(self, values: np.ndarray) -> None:
        v = np.asarray(values, dtype=np.float64)
        n = round(float(np.log2(v.size))) if v.size else 0
        if v.ndim != 1 or v.size != 2**n or n < 2:
            raise InvalidArgument(
                f"a tabular game needs 2^n values (n >= 2) in a vector; got shape {v.shape}"
            )
        self._values = v
        self._n = n
        self._forwards = 0

    @staticmethod
    def from_function(n: int, fn: Callable[[np.ndarray], np.ndarray]) -> TabularGame:
        """Tabulate fn (coalitions (B, n) bool -> (B,)) over all 2^n coalitions."""
        return TabularGame(fn(coalitions_from_bitmasks(np.arange(2**n), n)))

    @property
    def n_players(self) -> int:
        return self._n

    @property
    def forwards(self) -> int:
        return self._forwards

    @property
    def values(self) -> np.ndarray:
        return self._values

    def __call__(self, coalitions: np.ndarray) -> np.ndarray:
        c = _check_coalitions(coalitions, self._n)
        self._forwards += c.shape[0]
        return self._values[bitmasks(c)]


class ModelGame:
    """v(S) of a model on x with the players outside S replaced by a baseline.

    Masked inputs are built chunk by chunk (at most `chunk_size` at once) into reused buffers, so
    memory stays bounded whatever the number of coalitions. `forwards` counts inputs sent to the
    model. The evaluator is called from this thread and must not keep the buffer it is given.

    class_index None means the model's predicted class at x. The prediction then rides on the
    first forward: x itself is sent as one more row of the first chunk, so finding the class
    costs one row, not a forward pass of its own (for a small game the pass it saves is most
    of the round trip). `predict=True` does the same with a given class, to learn the
    prediction (`prediction`) for the caller's report.
    """

    def __init__(
        self,
        evaluate: Evaluator,
        x: np.ndarray,
        players: Players,
        baseline: Baseline,
        value_fn: ValueFunction,
        class_index: int | None,
        *,
        chunk_size: int = 1024,
        cancel: CancelToken | None = None,
        predict: bool = False,
    ) -> None:
        x = np.asarray(x, dtype=np.float32)
        if not np.all(np.isfinite(x)):
            raise InvalidArgument("the input holds NaN or infinite values; all must be finite")
        if chunk_size < 1:
            raise InvalidArgument(f"chunk size {chunk_size} is not allowed: it must be >= 1")
        pmap, n = resolve_players(players, x.shape)
        base = baseline.build(x)
        self._evaluate = evaluate
        self._shape = x.shape
        self._n = n
        # Column n of the extended coalition matrix is always True: elements with id -1 index it.
        self._pmap = np.where(pmap.reshape(-1) < 0, n, pmap.reshape(-1)).astype(np.intp)
        self._x = x.reshape(-1)
        self._base = base.reshape(-1)
        self._value_fn = value_fn
        self._class = class_index
        self._predict = predict or class_index is None  # x rides on the first forward
        self._prediction: int | None = None
        self._chunk = chunk_size
        self._cancel = cancel
        self._forwards = 0
        self._ext: np.ndarray | None = None
        self._keep: np.ndarray | None = None
        self._inputs: np.ndarray | None = None

    @property
    def n_players(self) -> int:
        return self._n

    @property
    def forwards(self) -> int:
        return self._forwards

    @property
    def chunk_size(self) -> int:
        return self._chunk

    @property
    def prediction(self) -> int | None:
        """The model's predicted class at x, once a forward has run (when it was asked for)."""
        return self._prediction

    @property
    def class_index(self) -> int:
        """The class v reads: the given one, or the prediction once a forward has run."""
        if self._class is None:
            raise RuntimeError("the predicted class is known only after the first forward")
        return self._class

    def masked_inputs(self, coalitions: np.ndarray) -> np.ndarray:
        """Masked inputs (B, *input_shape) for <= chunk_size coalitions, in a reused buffer."""
        b = coalitions.shape[0]
        if self._ext is None or self._ext.shape[0] < b:
            rows = max(b, min(self._chunk, 1 << 16))
            self._ext = np.ones((rows, self._n + 1), dtype=bool)
            self._keep = np.empty((rows, self._pmap.size), dtype=bool)
            self._inputs = np.empty((rows, self._pmap.size), dtype=np.float32)
        assert self._keep is not None and self._inputs is not None
        ext, keep, inputs = self._ext[:b], self._keep[:b], self._inputs[:b]
        ext[:, : self._n] = coalitions
        np.take(ext, self._pmap, axis=1, out=keep)
        inputs[...] = self._base
        np.copyto(inputs, self._x, where=keep)
        return inputs.reshape((b, *self._shape))

    def __call__(self, coalitions: np.ndarray) -> np.ndarray:
        c = _check_coalitions(coalitions, self._n)
        out = np.empty(c.shape[0], dtype=np.float64)
        for start in range(0, c.shape[0], self._chunk):
            if self._cancel is not None:
                self._cancel.check()
            part = c[start : start + self._chunk]
            inputs = self.masked_inputs(part)
            extra = self._predict and self._prediction is None
            if extra:
                inputs = np.concatenate([inputs, self._x.reshape((1, *self._shape))])
            logits = np.asarray(self._evaluate(inputs))
            if logits.ndim != 2 or logits.shape[0] != inputs.shape[0]:
                raise InvalidArgument(
                    f"the model returned output of shape {logits.shape} for {inputs.shape[0]} "
                    "inputs; the engine needs logits of shape (B, K)"
                )
            self._forwards += inputs.shape[0]
            if extra:
                self._prediction = int(np.argmax(logits[-1]))
                if self._class is None:
                    self._class = self._prediction
                logits = logits[:-1]
            out[start : start + part.shape[0]] = class_values(
                logits, self.class_index, self._value_fn
            )
        return out
