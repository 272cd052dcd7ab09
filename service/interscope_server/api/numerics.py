"""Refuses non-finite model numbers: NaN or Inf in outputs or gradients fail the request.

A model that returns NaN for some inputs used to give OK results full of NaN (profiles, every
attack, audits). These checks sit where the input a number belongs to is known, so the error
names the model and that input; what is not finite is never averaged into a result.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from interscope_server import attacks, errors
from interscope_server.evaluator import Evaluator


class NonFiniteOutput(errors.FailedPrecondition):
    """The model produced NaN or infinity for an input (FAILED_PRECONDITION)."""


def non_finite(model: str, index: int | str, where: str) -> NonFiniteOutput:
    label = f"input {index}" if isinstance(index, int) else f"sample {index!r}"
    return NonFiniteOutput(
        f"model {model!r} returned NaN or infinity in its {where} for {label}; its numbers "
        "cannot be trusted, so the request fails instead of averaging them"
    )


def finite_evaluator(evaluate: Evaluator, model: str, index: int | str) -> Evaluator:
    """`evaluate` for the batches of one input, raising NonFiniteOutput on NaN or Inf."""

    def checked(batch: np.ndarray) -> np.ndarray:
        values = evaluate(batch)
        if not np.isfinite(values).all():
            raise non_finite(model, index, "outputs")
        return values

    return checked


def check_example(event: attacks.ExampleResult, model: str, index: int | str) -> None:
    """An attack's result for one input: NaN logits or gradients leave NaN margins or x_adv."""
    numbers = (event.clean_margin, event.adversarial_margin, event.linf, event.l2)
    if not all(math.isfinite(v) for v in numbers) or not np.isfinite(event.x_adv).all():
        raise non_finite(model, index, "outputs or gradients during the attack")


class ShapeCheckedModule(torch.nn.Module):
    """A differentiable model whose output must be (batch, classes) for every batch size.

    White-box attacks call the module directly, with batches of any size; a model whose output
    shape changes with the batch would otherwise fail deep inside an attack as INTERNAL.
    """

    def __init__(self, inner: torch.nn.Module, name: str, n_classes: int) -> None:
        super().__init__()
        self.inner = inner
        self._name = name
        self._n_classes = n_classes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.inner(x)
        if tuple(out.shape) != (x.shape[0], self._n_classes):
            raise errors.FailedPrecondition(
                f"model {self._name!r} returned an output of shape {list(out.shape)} for a "
                f"batch of {x.shape[0]}; it must return (batch, {self._n_classes}) for every "
                "batch size"
            )
        return out
