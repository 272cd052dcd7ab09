"""The one view the engine and the attacks have of a model: its batched forward pass."""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeAlias

import numpy as np

#: float32 inputs (B, *input_shape) -> float32 logits (B, K); the registry provides it.
Evaluator: TypeAlias = Callable[[np.ndarray], np.ndarray]
