"""Baselines: what a player is replaced by when it is absent from a coalition."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.ndimage import gaussian_filter

from interscope_server.errors import InvalidArgument


@dataclass(frozen=True)
class ZeroBaseline:
    """Absent players become 0 (the dataset mean when inputs are already normalised)."""

    def build(self, x: np.ndarray) -> np.ndarray:
        return np.zeros_like(x, dtype=np.float32)


@dataclass(frozen=True)
class ConstantBaseline:
    """Absent players become one constant (e.g. 0.5 for a [0,1] image)."""

    value: float

    def build(self, x: np.ndarray) -> np.ndarray:
        if not np.isfinite(self.value):
            raise InvalidArgument(
                f"constant baseline {self.value} is not allowed: it must be finite"
            )
        return np.full(x.shape, self.value, dtype=np.float32)


@dataclass(frozen=True)
class MeanBaseline:
    """Absent players become the per-channel mean (the paper's choice), given or computed.

    Channels are axis 0 of an image input (C,H,W); an (H,W) image or a vector has one channel.
    `from_reference` computes the means from a batch of reference inputs.
    """

    channel_means: tuple[float, ...]

    @staticmethod
    def from_reference(reference: np.ndarray) -> MeanBaseline:
        ref = np.asarray(reference, dtype=np.float64)
        if ref.ndim < 2 or ref.shape[0] == 0:
            raise InvalidArgument(
                f"reference inputs must be a non-empty batch (B, *input_shape); got {ref.shape}"
            )
        # (B, C, H, W): one mean per channel; anything else: one mean overall.
        means = ref.mean(axis=(0, 2, 3)) if ref.ndim == 4 else np.array([ref.mean()])
        return MeanBaseline(tuple(float(m) for m in means))

    def build(self, x: np.ndarray) -> np.ndarray:
        means = np.asarray(self.channel_means, dtype=np.float32)
        if means.size == 0 or not np.all(np.isfinite(means)):
            raise InvalidArgument("channel means must be a non-empty list of finite numbers")
        if means.size == 1:
            return np.full(x.shape, means[0], dtype=np.float32)
        if x.ndim != 3 or x.shape[0] != means.size:
            raise InvalidArgument(
                f"{means.size} channel means do not fit an input of shape {x.shape}; "
                "give one mean per channel of a (C, H, W) input, or a single mean"
            )
        return np.broadcast_to(means[:, None, None], x.shape).astype(np.float32)


@dataclass(frozen=True)
class BlurBaseline:
    """Absent players become a Gaussian-blurred copy of x (spatial axes only, sigma in pixels)."""

    sigma: float

    def build(self, x: np.ndarray) -> np.ndarray:
        if not (np.isfinite(self.sigma) and self.sigma > 0):
            raise InvalidArgument(f"blur sigma {self.sigma} is not allowed: it must be > 0")
        # Blur only the spatial axes: mixing channels would change colours, not remove detail.
        sigmas = [0.0] * (x.ndim - 2) + [self.sigma] * min(x.ndim, 2)
        return gaussian_filter(x.astype(np.float64), sigma=sigmas, mode="nearest").astype(
            np.float32
        )


@dataclass(frozen=True, eq=False)
class TensorBaseline:
    """Absent players become the matching elements of a user-supplied tensor of x's shape."""

    tensor: np.ndarray

    def build(self, x: np.ndarray) -> np.ndarray:
        t = np.asarray(self.tensor)
        if t.shape != x.shape:
            raise InvalidArgument(
                f"baseline tensor shape {t.shape} does not match the input shape {x.shape}"
            )
        if not np.all(np.isfinite(t)):
            raise InvalidArgument(
                "baseline tensor holds NaN or infinite values; all must be finite"
            )
        return t.astype(np.float32)


Baseline = ZeroBaseline | ConstantBaseline | MeanBaseline | BlurBaseline | TensorBaseline
