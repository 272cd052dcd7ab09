"""The backend interface every model format implements, plus what the formats share."""

from __future__ import annotations

import hashlib
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from interscope_server.errors import InvalidArgument
from interscope_server.layout import channel_axis
from interscope_server.models.config import ModelConfig


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


class NormalizedModule(torch.nn.Module):
    """Raw-range input -> (x - mean) / std -> inner network -> float32 logits.

    Casts the normalised input to `dtype` (FP16 models) and the logits back to float32, so
    attacks always work in FP32 raw space whatever the model runs in. A float64 input stays
    float64 end to end: the load-time gradient check runs a float64 copy.
    """

    def __init__(
        self, inner: torch.nn.Module, config: ModelConfig, dtype: torch.dtype = torch.float32
    ) -> None:
        super().__init__()
        self.inner = inner
        self.dtype = dtype
        norm = normalization_arrays(config)
        self.normalize = norm is not None
        mean, std = norm if norm is not None else (np.zeros(1), np.ones(1))
        self.register_buffer("mean", torch.from_numpy(np.asarray(mean, dtype=np.float32)))
        self.register_buffer("std", torch.from_numpy(np.asarray(std, dtype=np.float32)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.normalize:
            mean: torch.Tensor = self.mean  # type: ignore[assignment]  # buffers type as Module
            std: torch.Tensor = self.std  # type: ignore[assignment]
            x = (x - mean) / std
        if x.dtype == torch.float64:
            return self.inner(x).double()
        out: torch.Tensor = self.inner(x.to(self.dtype))
        return out.float()


class Backend(ABC):
    """One loaded model file: forward passes on raw inputs, optionally a differentiable module.

    `forward` is thread-safe: the batcher's worker calls it, and so may tests and benchmarks.
    """

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
        """Logits for a checked float32 batch in the raw range."""

    @abstractmethod
    def torch_module(self) -> torch.nn.Module | None:
        """Differentiable raw input -> logits (normalisation included, eval mode), or None."""

    @property
    def torch_device(self) -> torch.device:
        """Device of `torch_module()`'s parameters; attacks put their tensors there."""
        return torch.device("cpu")

    @property
    def num_classes(self) -> int:
        return len(self.config.classes)

    def forward(self, x: np.ndarray) -> np.ndarray:
        """float32 (B, *input_shape) raw-range inputs -> float32 logits (B, num_classes)."""
        x = check_batch(x, self.config)
        out = self._forward(x)
        if out.shape != (x.shape[0], self.num_classes):
            raise InvalidArgument(
                f"model {self.config.name!r} returned logits of shape {list(out.shape)}; its "
                f"config promises (batch, {self.num_classes}) for {self.num_classes} classes"
            )
        return out

    def close(self) -> None:  # noqa: B027 - optional hook; most backends hold nothing to free
        """Free what the backend holds (sessions, GPU memory)."""


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
