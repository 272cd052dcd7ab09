"""The backend interface every model format implements, plus what the formats share."""

from __future__ import annotations

import hashlib
import logging
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from pydantic import ValidationError

from interscope_server.cancel import CancelToken
from interscope_server.errors import InvalidArgument
from interscope_server.layout import channel_axis
from interscope_server.models.config import InputDatatype, ModelConfig, OutputKind
from interscope_server.models.repository import config_error_message

logger = logging.getLogger(__name__)

#: Probabilities below this (only exact zeros and float32 denormals) are raised to it before
#: the log, so a class a tree gives p = 0 scores log(1.18e-38) = -87.3 rather than -inf.
PROBABILITY_FLOOR = float(np.finfo(np.float32).tiny)
#: Rows of a "probabilities" output must sum to 1 within this to be trusted as probabilities.
_SUM_TOLERANCE = 1e-3
#: numpy dtypes the backends feed for each input datatype.
INPUT_DTYPES: dict[str, np.dtype[Any]] = {
    "FP32": np.dtype(np.float32),
    "FP16": np.dtype(np.float16),
    "UINT8": np.dtype(np.uint8),
}


@dataclass(frozen=True)
class BackendOptions:
    """How backends place and run models; the server fills it from its Settings."""

    #: auto: CUDA when available (logged fallback to CPU); cpu; cuda (still falls back, logged).
    device: Literal["auto", "cpu", "cuda"] = "auto"
    #: TorchScript models in FP16 on CUDA (ignored on CPU, where FP16 is slow).
    half_precision: bool = False
    #: Threads inside one forward pass (onnxruntime intra-op); 0 is the runtime's default.
    intra_op_threads: int = 0
    #: Threads across independent graph branches (onnxruntime inter-op); 0 is the default.
    inter_op_threads: int = 0
    #: Whether idle runtime threads spin-wait (onnxruntime's allow_spinning; torch's OpenMP
    #: wait policy, which only a fresh process can set: model hosts get it at spawn).
    spinning: bool = False
    #: Use TensorRT ahead of CUDA where onnxruntime offers it.
    tensorrt: bool = True


def file_sha256(path: Path) -> str:
    """Hex sha256 of a file's bytes, read in blocks so large models do not double in memory."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def value_bounds(config: ModelConfig) -> tuple[np.ndarray, np.ndarray]:
    """float64 low and high per element of one example (per-feature ranges or one pair)."""
    shape = tuple(config.input.shape)
    if isinstance(config.value_range, list):
        pairs = np.asarray(config.value_range, dtype=np.float64)
        return pairs[:, 0].reshape(shape), pairs[:, 1].reshape(shape)
    low, high = config.value_range
    return np.full(shape, low, dtype=np.float64), np.full(shape, high, dtype=np.float64)


def blank_input(config: ModelConfig, shape: Sequence[int]) -> np.ndarray:
    """One float32 example (1, *shape) at the low end of the declared range (0 when none is
    declared: the blank a model's signature is read with, before its config is resolved)."""
    if "value_range" not in config.model_fields_set:
        return np.zeros((1, *shape), dtype=np.float32)
    if isinstance(config.value_range, list):
        lows = np.asarray([low for low, _ in config.value_range], dtype=np.float32)
        return lows.reshape(1, *shape)
    return np.full((1, *shape), config.value_range[0], dtype=np.float32)


def normalization_arrays(config: ModelConfig) -> tuple[np.ndarray, np.ndarray] | None:
    """Mean and std shaped to broadcast over a batch (B, *input_shape) in the model's layout.

    Entries are per channel (axis 0 for NCHW, the last axis for NHWC) or, for a features
    layout, per feature in flattened order; a single entry applies to every element.
    """
    if config.normalization is None:
        return None
    shape = tuple(config.input.shape)
    mean = np.asarray(config.normalization.mean, dtype=np.float32)
    std = np.asarray(config.normalization.std, dtype=np.float32)
    if mean.size == 1:
        target: tuple[int, ...] = (1,) * len(shape)
    elif config.layout == "features":
        target = shape
    else:
        axis = channel_axis(config.layout, len(shape))
        target = tuple(d if i == axis else 1 for i, d in enumerate(shape))
    return mean.reshape(target), std.reshape(target)


def scores_from_output(out: np.ndarray, kind: OutputKind) -> np.ndarray:
    """A model output of `kind` as canonical float32 scores: softmax(scores) = the model's p.

    logits and log-probabilities are already such scores; probabilities become log p, floored
    at PROBABILITY_FLOOR (documented in the README), so cross-entropy, margins and every value
    function read the same numbers whatever the model emits.
    """
    out = np.asarray(out, dtype=np.float32)
    if kind == "probabilities":
        return np.log(np.maximum(out, PROBABILITY_FLOOR))
    return out


def torch_scores(out: torch.Tensor, kind: OutputKind) -> torch.Tensor:
    """`scores_from_output` for a differentiable torch output (float64 stays float64: the
    load-time gradient check runs a float64 copy)."""
    if out.dtype != torch.float64:
        out = out.float()
    if kind == "probabilities":
        return torch.log(torch.clamp(out, min=PROBABILITY_FLOOR))
    return out


def select_output(out: object, name: str) -> torch.Tensor:
    """The output called `name` from what a torch model returned: a tensor, tuple or dict.

    A tuple's elements are named by their index ("0", "1", ...), a dict's by their keys.
    """
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, (tuple, list)) and name.isdigit() and int(name) < len(out):
        chosen = out[int(name)]
    elif isinstance(out, dict) and name in out:
        chosen = out[name]
    else:
        raise InvalidArgument(f"the model returns {describe_outputs(out)}; no output {name!r}")
    if not isinstance(chosen, torch.Tensor):
        raise InvalidArgument(f"output {name!r} is a {type(chosen).__name__}, not a tensor")
    return chosen


def describe_outputs(out: object) -> str:
    """What a torch model returned, with the names `select_output` accepts."""
    if isinstance(out, (tuple, list)):
        return f"a tuple of {len(out)} (output.name: one of {[str(i) for i in range(len(out))]})"
    if isinstance(out, dict):
        return f"a dict (output.name: one of {sorted(map(str, out))})"
    return type(out).__name__


class NormalizedModule(torch.nn.Module):
    """Raw-range input -> (x - mean) / std -> inner network -> float32 canonical scores.

    Casts the normalised input to `dtype` (FP16 models), picks the configured output of a
    model returning a tuple or dict, turns the output kind into canonical scores (see
    `scores_from_output`) and feeds at most `batch` rows at a time (padding the last chunk) to
    a model with a fixed batch dimension, so attacks always see float32 scores of any batch.
    `max_batch` only caps the rows per call (a declared max_batch_size): no padding, since
    padding every call up to a maximum would multiply the work of small batches.
    """

    def __init__(
        self,
        inner: torch.nn.Module,
        config: ModelConfig,
        dtype: torch.dtype = torch.float32,
        *,
        fixed_batch: int | None = None,
        max_batch: int | None = None,
    ) -> None:
        super().__init__()
        self.inner = inner
        self.max_batch = max_batch
        self.dtype = dtype
        self.output_name = config.output.name
        self.kind: OutputKind = config.output.kind or "logits"
        self.fixed_batch = fixed_batch
        norm = normalization_arrays(config)
        self.normalize = norm is not None
        mean, std = norm if norm is not None else (np.zeros(1), np.ones(1))
        self.register_buffer("mean", torch.from_numpy(np.asarray(mean, dtype=np.float32)))
        self.register_buffer("std", torch.from_numpy(np.asarray(std, dtype=np.float32)))

    def _run(self, x: torch.Tensor) -> torch.Tensor:
        return torch_scores(select_output(self.inner(x), self.output_name), self.kind)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.normalize:
            mean: torch.Tensor = self.mean  # type: ignore[assignment]  # buffers type as Module
            std: torch.Tensor = self.std  # type: ignore[assignment]
            x = (x - mean) / std
        if x.dtype != torch.float64:  # a float64 input stays float64 end to end
            x = x.to(self.dtype)
        if self.fixed_batch is None:
            if self.max_batch is None or x.shape[0] <= self.max_batch:
                return self._run(x)
            step = self.max_batch
            return torch.cat([self._run(x[i : i + step]) for i in range(0, x.shape[0], step)])
        size = self.fixed_batch
        parts = []
        for start in range(0, x.shape[0], size):
            chunk = x[start : start + size]
            rows = chunk.shape[0]
            if rows < size:  # the graph takes exactly `size` rows: repeat the last one
                chunk = torch.cat([chunk, chunk[-1:].expand(size - rows, *chunk.shape[1:])])
            parts.append(self._run(chunk)[:rows])
        return torch.cat(parts)


@dataclass(frozen=True)
class ModelSignature:
    """What a model file says about itself; empty or None where the file does not say."""

    input_name: str = ""
    #: Per-example dims, None where the file leaves one free.
    input_shape: tuple[int | None, ...] | None = None
    input_datatype: InputDatatype | None = None
    #: The batch dimension when the file fixes it (e.g. an export with batch 1).
    fixed_batch: int | None = None
    #: The output chosen (the config's, or the file's only classifier output).
    output_name: str = ""
    num_classes: int | None = None
    #: Class labels the file records (ai.onnx.ml classifiers, ZipMap).
    classes: tuple[str, ...] = ()
    #: The output kind inferred from the file, and how (logged), or None if it cannot be.
    kind: OutputKind | None = None
    kind_reason: str = ""


def resolve_config(config: ModelConfig, found: ModelSignature) -> ModelConfig:
    """`config` with every field it left out read from the model file; InvalidArgument naming
    the field where the two disagree, or where neither says and a guess would be needed."""
    name = config.name
    fields = config.model_fields_set

    def refuse(message: str) -> InvalidArgument:
        return InvalidArgument(f"model {name!r}: {message}")

    spec = config.input
    if spec.name and found.input_name and spec.name != found.input_name:
        raise refuse(
            f"config input.name {spec.name!r} but the model's input is {found.input_name!r}"
        )
    input_name = spec.name or found.input_name
    shape = list(spec.shape)
    if found.input_shape is not None:
        graph = list(found.input_shape)
        shown = ["?" if g is None else g for g in graph]
        if shape and (
            len(shape) != len(graph)
            or any(g is not None and g != c for g, c in zip(graph, shape, strict=True))
        ):
            raise refuse(
                f"config input.shape {shape} does not match the model's per-example shape {shown}"
            )
        if not shape:
            if any(g is None for g in graph):
                raise refuse(
                    f"the model's per-example input shape {shown} has free dimensions; set "
                    "input.shape in config.json"
                )
            shape = [int(g) for g in graph if g is not None]
    if not shape:
        raise refuse("the model file does not record its input shape; set input.shape")
    datatype = spec.datatype or found.input_datatype or "FP32"
    if spec.datatype and found.input_datatype and spec.datatype != found.input_datatype:
        raise refuse(
            f"config input.datatype {spec.datatype} but the model takes {found.input_datatype}"
        )
    batch = config.max_batch_size
    if found.fixed_batch is not None:
        if "max_batch_size" in fields and batch > found.fixed_batch:
            raise refuse(
                f"config max_batch_size {batch} but the model's batch dimension is fixed at "
                f"{found.fixed_batch}; set max_batch_size <= {found.fixed_batch} or leave it out"
            )
        batch = min(batch, found.fixed_batch)
    classes = list(config.classes)
    k = found.num_classes
    if classes and k is not None and len(classes) != k:
        raise refuse(f"config classes has {len(classes)} labels but the model outputs {k} scores")
    if not classes:
        if k is None:
            raise refuse("the number of classes cannot be read from the model; set classes")
        classes = list(found.classes) if len(found.classes) == k else [str(c) for c in range(k)]
    kind = config.output.kind or found.kind
    if kind is None:
        raise refuse(
            f"cannot tell whether output {found.output_name!r} is logits or probabilities "
            f"({found.kind_reason}); set output.kind to logits, probabilities or "
            "log_probabilities"
        )
    if config.output.kind is None:
        logger.info(
            "model %s: output %r read as %s (%s)", name, found.output_name, kind, found.kind_reason
        )
    value_range = config.value_range
    if datatype == "UINT8":
        if "value_range" not in fields:
            value_range = (0.0, 255.0)
        if config.normalization is not None:
            raise refuse(
                "normalization cannot be applied before a UINT8 input (the model would get "
                "rounded floats); normalise inside the model and drop normalization"
            )
    data = config.model_dump()
    data.update(
        input={**data["input"], "name": input_name, "shape": shape, "datatype": datatype},
        output={"name": found.output_name or config.output.name, "kind": kind},
        classes=classes,
        max_batch_size=batch,
        value_range=value_range,
    )
    try:
        return ModelConfig.model_validate(data)
    except ValidationError as exc:
        raise InvalidArgument(config_error_message(name, exc)) from None


def check_output_kind(config: ModelConfig, out: np.ndarray, *, inferred: bool) -> None:
    """Refuse a load whose raw probe outputs contradict the output kind.

    Declared or inferred probabilities must be rows in [0, 1] summing to 1, log-probabilities
    rows whose exp sums to 1; an inferred "logits" whose rows look exactly like probabilities
    is ambiguous (a softmax hidden in a custom op), so it asks for output.kind.
    """
    kind = config.output.kind
    rows = np.asarray(out, dtype=np.float64)
    if not np.isfinite(rows).all():
        raise InvalidArgument(
            f"model {config.name!r}: output {config.output.name!r} holds NaN or infinity on a "
            "probe batch in the value range"
        )
    as_prob = (rows >= -1e-6).all() and (rows <= 1 + 1e-6).all()
    sums_to_one = bool(np.allclose(rows.sum(axis=1), 1.0, atol=_SUM_TOLERANCE))
    field = "set output.kind" if inferred else "check output.kind"
    if kind == "probabilities" and not (as_prob and sums_to_one):
        raise InvalidArgument(
            f"model {config.name!r}: output {config.output.name!r} is taken as probabilities "
            f"but its rows do not lie in [0, 1] summing to 1 (row sums "
            f"{np.round(rows.sum(axis=1)[:4], 4).tolist()}); {field} (logits?)"
        )
    if kind == "log_probabilities" and not (
        (rows <= 1e-6).all() and np.allclose(np.exp(rows).sum(axis=1), 1.0, atol=_SUM_TOLERANCE)
    ):
        raise InvalidArgument(
            f"model {config.name!r}: output {config.output.name!r} is taken as "
            f"log-probabilities but exp of its rows does not sum to 1; {field}"
        )
    if kind == "logits" and inferred and as_prob and sums_to_one:
        raise InvalidArgument(
            f"model {config.name!r}: output {config.output.name!r} has no Softmax in the graph "
            "but its rows are probabilities summing to 1; set output.kind to probabilities "
            "(or logits if they are not)"
        )


def probe_inputs(config: ModelConfig, rows: int = 4) -> np.ndarray:
    """Float32 inputs spread over the value range (the first all-low), on the model's grid."""
    low, high = value_bounds(config)
    rng = np.random.default_rng(0)
    probe = rng.uniform(low, high, size=(rows, *low.shape)).astype(np.float32)
    probe[0] = low
    if config.input.datatype == "UINT8":
        probe = np.rint(probe)
    return probe


def cast_input(x: np.ndarray, datatype: str) -> np.ndarray:
    """Float32 raw inputs in the dtype the model takes; UINT8 rounds to the nearest integer."""
    if datatype == "UINT8":
        return np.ascontiguousarray(np.clip(np.rint(x), 0, 255).astype(np.uint8))
    return np.ascontiguousarray(x.astype(INPUT_DTYPES[datatype], copy=False))


def outputs_are_random(backend: Backend) -> bool:
    """Whether two forward passes of one probe input differ beyond float round-off.

    A model with noise inside (a randomised defence: noise added to its input, dropout left
    on) answers the same input differently each time; a deterministic one repeats itself to
    the last bit, or nearly (a GPU kernel may sum in another order). The tolerance sits far
    above that and far below what any noise worth the name moves the scores by. Through
    `forward`, so every format is asked the same way (an ONNX graph's RandomNormalLike too).
    """
    x = probe_inputs(backend.config, rows=2)[1:]  # one row: a batch any model takes
    first, second = backend.forward(x), backend.forward(x)
    scale = 1.0 + float(np.abs(first).max(initial=0.0))
    return not np.allclose(first, second, rtol=1e-4, atol=1e-4 * scale, equal_nan=True)


class Backend(ABC):
    """One loaded model file: forward passes on raw inputs, optionally a differentiable module.

    `forward` is thread-safe: the batcher's worker calls it, and so may tests and benchmarks.
    """

    #: Whether the model's outputs are random (`outputs_are_random`): the registry finds out
    #: at load. Attacks run on such a model; interaction profiles, which would be random
    #: numbers, are refused.
    stochastic: bool = False
    #: Whether `forward_until` honours its CancelToken by itself: a model host kills a forward
    #: that runs `grace` past its caller's deadline or cancel. The batcher lets a lone caller
    #: run such a forward on its own thread; any other forward runs on the batcher's thread,
    #: which a cancelled caller can walk away from.
    stops_on_cancel: bool = False

    def __init__(self, config: ModelConfig, path: Path, *, content_hash: str | None = None) -> None:
        self.config = config
        self.path = path
        #: sha256 of the model file bytes (or, for a remote model without a file, of what
        #: identifies it); reported in metadata and in result provenance.
        self.content_hash = file_sha256(path) if content_hash is None else content_hash
        #: Why gradients are unavailable ("" when they are); shown in model metadata.
        self.gradient_note = ""

    @property
    @abstractmethod
    def format(self) -> str:
        """ "onnx", "torchscript" or "oip"."""

    @property
    @abstractmethod
    def device(self) -> str:
        """Where forward passes run: "cpu", "cuda", or "remote:host:port" for format oip."""

    @property
    @abstractmethod
    def gradients_available(self) -> bool:
        """Whether `torch_module()` returns a module (white-box attacks need it)."""

    @abstractmethod
    def _forward(self, x: np.ndarray) -> np.ndarray:
        """Canonical scores (see `scores_from_output`) for a checked float32 raw-range batch."""

    @abstractmethod
    def torch_module(self) -> torch.nn.Module | None:
        """Differentiable float32 raw input -> canonical scores (normalisation included, eval
        mode), or None."""

    @property
    def output_kind(self) -> OutputKind:
        """What the model's output means; forwards return canonical scores of it."""
        return self.config.output.kind or "logits"

    @property
    def integer_inputs(self) -> bool:
        """Whether inputs are rounded to integers for the model (UINT8): attacks re-check."""
        return self.config.input.datatype == "UINT8"

    @property
    def torch_device(self) -> torch.device:
        """Device of `torch_module()`'s parameters; attacks put their tensors there."""
        return torch.device("cpu")

    @property
    def num_classes(self) -> int:
        return len(self.config.classes)

    def forward(self, x: np.ndarray) -> np.ndarray:
        """float32 (B, *input_shape) raw-range inputs -> float32 scores (B, num_classes).

        Scores are canonical: logits, or log p for a probability model (see
        `scores_from_output`), so softmax(scores) is always the model's probability.
        """
        return self.forward_checked(check_batch(x, self.config))

    def forward_checked(self, x: np.ndarray) -> np.ndarray:
        """`forward` of a batch that `check_batch` has passed already: the batcher's, whose rows
        `LoadedModel.evaluate` checked before merging them (not checked a second time)."""
        out = self._forward(x)
        if out.shape != (x.shape[0], self.num_classes):
            raise InvalidArgument(
                f"model {self.config.name!r} returned scores of shape {list(out.shape)}; its "
                f"config promises (batch, {self.num_classes}) for {self.num_classes} classes"
            )
        return out

    def forward_until(self, x: np.ndarray, cancel: CancelToken | None) -> np.ndarray:
        """`forward_checked` that gives up when `cancel` fires, where `stops_on_cancel`; the
        base class cannot stop a forward and ignores the token."""
        return self.forward_checked(x)

    def abandon_forward(self) -> None:  # noqa: B027 - optional hook; most cannot stop one
        """Every caller of the forward pass now running has left (deadline, cancel).

        The batcher calls this from the departing caller's thread. A model host kills a forward
        that still runs `grace` later; in-process backends cannot stop one and ignore it.
        """

    def close(self) -> None:  # noqa: B027 - optional hook; most backends hold nothing to free
        """Free what the backend holds (sessions, GPU memory)."""


class TorchBackend(Backend):
    """A backend whose model is a torch module (TorchScript, torch.export): subclasses set
    `_device`, `_module` (a NormalizedModule) and `gradient_note` ("" when gradients work)."""

    _device: torch.device
    _module: torch.nn.Module

    @property
    def device(self) -> str:
        return self._device.type

    @property
    def gradients_available(self) -> bool:
        return not self.gradient_note

    @property
    def torch_device(self) -> torch.device:
        return self._device

    def torch_module(self) -> torch.nn.Module | None:
        return None if self.gradient_note else self._module


def check_batch(x: np.ndarray, config: ModelConfig) -> np.ndarray:
    """`x` as a C-contiguous float32 batch of the model's input shape, or InvalidArgument."""
    if not isinstance(x, np.ndarray):
        raise InvalidArgument(f"inputs must be a numpy array, got {type(x).__name__}")
    expected = tuple(config.input.shape)
    if x.ndim != len(expected) + 1 or tuple(x.shape[1:]) != expected:
        raise InvalidArgument(
            f"model {config.name!r} takes inputs of shape (batch, {', '.join(map(str, expected))})"
            f", got {list(x.shape)}"
        )
    if x.dtype != np.float32:
        if not np.issubdtype(x.dtype, np.floating):
            raise InvalidArgument(
                f"model {config.name!r} takes FP32 inputs (any float dtype is converted), "
                f"got {x.dtype}"
            )
        x = x.astype(np.float32)
    return np.ascontiguousarray(x)
