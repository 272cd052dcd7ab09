"""Baselines: what a player is replaced by when it is absent from a coalition."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.ndimage import gaussian_filter

from interscope_server.errors import InvalidArgument
from interscope_server.layout import Layout, channel_axis, spatial_axes


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
    """Absent players become a mean: per channel for images (the paper's choice), per feature
    for a features layout, or one value for every element; given or computed.

    Channels are axis 0 of an NCHW input (C,H,W) and the last axis of an NHWC one (H,W,C); an
    (H,W) image has one channel. A features layout takes one mean per feature in flattened
    order. `from_reference` computes the means from a batch of reference inputs.
    """

    channel_means: tuple[float, ...]
    layout: Layout = "NCHW"

    @staticmethod
    def from_reference(reference: np.ndarray, layout: Layout = "NCHW") -> MeanBaseline:
        ref = np.asarray(reference, dtype=np.float64)
        if ref.ndim < 2 or ref.shape[0] == 0:
            raise InvalidArgument(
                f"reference inputs must be a non-empty batch (B, *input_shape); got {ref.shape}"
            )
        if not np.all(np.isfinite(ref)):
            raise InvalidArgument(
                "reference inputs hold NaN or infinite values; all must be finite"
            )
        if layout == "features":
            # Each feature has its own scale (age, income): one mean per feature over the batch.
            means = ref.reshape(ref.shape[0], -1).mean(axis=0)
        else:
            axis = channel_axis(layout, ref.ndim - 1)
            if axis is None:
                means = np.array([ref.mean()])
            else:
                others = tuple(a for a in range(ref.ndim) if a != axis + 1)
                means = ref.mean(axis=others)
        return MeanBaseline(tuple(float(m) for m in means), layout)

    def build(self, x: np.ndarray) -> np.ndarray:
        means = np.asarray(self.channel_means, dtype=np.float32)
        if means.size == 0 or not np.all(np.isfinite(means)):
            raise InvalidArgument("channel means must be a non-empty list of finite numbers")
        if means.size == 1:
            return np.full(x.shape, means[0], dtype=np.float32)
        if self.layout == "features":
            if means.size != x.size:
                raise InvalidArgument(
                    f"{means.size} feature means do not fit an input of {x.size} features; "
                    "give one mean per feature, or a single mean"
                )
            return means.reshape(x.shape).copy()
        axis = channel_axis(self.layout, x.ndim)
        if axis is None or x.shape[axis] != means.size:
            raise InvalidArgument(
                f"{means.size} channel means do not fit an input of shape {x.shape} "
                f"(layout {self.layout}); give one mean per channel, or a single mean"
            )
        shape = tuple(means.size if a == axis else 1 for a in range(x.ndim))
        return np.broadcast_to(means.reshape(shape), x.shape).astype(np.float32)


@dataclass(frozen=True)
class BlurBaseline:
    """Absent players become a Gaussian-blurred copy of x (spatial axes only, sigma in pixels).

    The spatial axes follow the layout: the last two for NCHW, the two before the channels for
    NHWC; a features input has none, so it is refused.
    """

    sigma: float
    layout: Layout = "NCHW"

    def build(self, x: np.ndarray) -> np.ndarray:
        if not (np.isfinite(self.sigma) and self.sigma > 0):
            raise InvalidArgument(f"blur sigma {self.sigma} is not allowed: it must be > 0")
        if self.layout == "features":
            raise InvalidArgument(
                "a blur baseline needs an image input (layout NCHW or NHWC); this model's "
                "layout is features: use a mean, zero, constant or tensor baseline"
            )
        # Blur only the spatial axes: mixing channels would change colours, not remove detail.
        sigmas = [0.0] * x.ndim
        for axis in spatial_axes(self.layout, x.ndim) if x.ndim >= 2 else (x.ndim - 1,):
            sigmas[axis] = self.sigma
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
