"""Converters between analysis/attack wire messages and the engine's domain types."""

from __future__ import annotations

import functools
import json
import platform
from typing import Any

import numpy as np
from google.protobuf import json_format
from google.protobuf.message import Message

from interscope.codec import TensorError, from_tensor, to_tensor
from interscope.v1 import analysis_pb2, tensor_pb2
from interscope_server import __version__, errors
from interscope_server.analysis.results import InteractionProfile, PerturbationProfile

FLOAT_TYPES = ("FP32", "FP64", "FP16")


def decode_inputs(
    tensor: tensor_pb2.Tensor,
    input_shape: tuple[int, ...],
    *,
    what: str,
    max_bytes: int,
    max_inputs: int,
    batched: bool = True,
) -> np.ndarray:
    """A float32 batch (N, *input_shape) from the wire, with every problem named."""
    if not tensor.datatype and not tensor.shape:
        raise errors.InvalidArgument(
            f"{what} is missing: send an FP32 tensor of shape "
            f"(N, {', '.join(map(str, input_shape))})"
        )
    array = from_tensor(tensor, what=what, max_bytes=max_bytes, allowed=FLOAT_TYPES, finite=True)
    if not batched:
        if array.shape == (1, *input_shape):
            array = array[0]
        if array.shape != input_shape:
            raise TensorError(
                f"{what} has shape {list(array.shape)}; the model takes "
                f"{list(input_shape)} (a leading batch dimension of 1 is accepted)"
            )
        return array.astype(np.float32)
    if array.ndim != len(input_shape) + 1 or array.shape[1:] != input_shape:
        raise TensorError(
            f"{what} has shape {list(array.shape)}; the model takes (N, "
            f"{', '.join(map(str, input_shape))})"
        )
    if array.shape[0] == 0:
        raise TensorError(f"{what} is empty: send at least one input")
    if array.shape[0] > max_inputs:
        raise errors.ResourceExhausted(
            f"{what} holds {array.shape[0]} inputs; at most {max_inputs} per request are allowed"
        )
    return array.astype(np.float32)


def check_classes(values: list[int] | Any, count: int, n_classes: int, what: str) -> np.ndarray:
    """One class index per input, each in 0..n_classes-1."""
    array = np.asarray(list(values), dtype=np.int64)
    if array.shape != (count,):
        raise errors.InvalidArgument(
            f"{what}: expected {count} values (one per input), got {array.shape[0]}"
        )
    bad = array[(array < 0) | (array >= n_classes)]
    if bad.size:
        raise errors.InvalidArgument(
            f"{what}: class {int(bad[0])} is out of range; the model has classes 0..{n_classes - 1}"
        )
    return array


def spec_json(message: Message) -> str:
    """Canonical JSON of a spec message (defaults included) for provenance."""
    return json.dumps(
        json_format.MessageToDict(
            message, always_print_fields_with_no_presence=True, preserving_proto_field_name=True
        ),
        sort_keys=True,
    )


@functools.cache
def versions() -> dict[str, str]:
    """Versions of what computed a result, for provenance (fixed for the process's life)."""
    found = {
        "interscope": __version__,
        "python": platform.python_version(),
        "numpy": np.__version__,
    }
    try:
        import torch

        found["torch"] = str(torch.__version__)
    except ImportError:  # pragma: no cover
        pass
    try:
        import onnxruntime

        found["onnxruntime"] = str(onnxruntime.__version__)
    except ImportError:  # pragma: no cover
        pass
    return found


def _floats(values: np.ndarray | None) -> list[float]:
    return [] if values is None else [float(v) for v in np.asarray(values).ravel()]


def profile_to_proto(
    profile: InteractionProfile, input_index: int, prediction: int, return_pairs: bool
) -> analysis_pb2.InteractionProfile:
    """One input's InteractionProfile message."""
    message = analysis_pb2.InteractionProfile(
        input_index=input_index,
        n_players=profile.n_players,
        orders=[int(m) for m in profile.orders],
        ratios=_floats(profile.ratios),
        mean=_floats(profile.mean),
        mean_stderr=_floats(profile.mean_se),
        mean_abs=_floats(profile.mean_abs),
        mean_abs_stderr=_floats(profile.mean_abs_se),
        strength=_floats(profile.strength),
        disentanglement=_floats(profile.disentanglement),
        value_full=float(profile.value_full),
        value_empty=float(profile.value_empty),
        class_index=int(profile.class_index),
        prediction=int(prediction),
        estimator=profile.estimator,
        context_sharing=profile.context_sharing,
        forwards=int(profile.forwards),
    )
    if return_pairs and profile.pair_interactions is not None:
        message.pairs.CopyFrom(to_tensor(np.asarray(profile.pairs, dtype=np.int64)))
        message.interactions.CopyFrom(to_tensor(np.asarray(profile.pair_interactions, np.float64)))
        if profile.pair_interactions_se is not None:
            message.interactions_stderr.CopyFrom(
                to_tensor(np.asarray(profile.pair_interactions_se, np.float64))
            )
    if profile.shapley_interaction is not None:
        message.shapley_interaction.CopyFrom(
            to_tensor(np.asarray(profile.shapley_interaction, np.float64))
        )
    if profile.shapley_values is not None:
        message.shapley_values.CopyFrom(to_tensor(np.asarray(profile.shapley_values, np.float64)))
    if profile.efficiency_residual is not None:
        message.efficiency_residual = float(profile.efficiency_residual)
    return message


def perturbation_to_proto(
    result: PerturbationProfile,
    input_index: int,
    predictions: tuple[int, int],
    return_profiles: bool,
    return_pairs: bool,
) -> analysis_pb2.PerturbationProfile:
    """How an attack moved one input's interactions."""
    message = analysis_pb2.PerturbationProfile(
        delta_mean=_floats(result.delta_mean),
        delta_mean_stderr=_floats(result.delta_mean_se),
        utility_change=float(result.value_gap),
        baseline_term=float(result.empty_term),
        first_order_term=float(result.singleton_term),
        order_terms=_floats(result.order_terms),
        residual=float(result.decomposition_residual),
    )
    if result.delta_pair_interactions is not None:
        message.delta_mean_abs.extend(
            _floats(np.abs(np.asarray(result.delta_pair_interactions)).mean(axis=1))
        )
    # The per-order aggregates always go out (audit summaries and reports are built on them);
    # pairs and Shapley matrices only when the caller asked for full profiles.
    for target, profile, prediction in (
        (message.clean, result.clean, predictions[0]),
        (message.adversarial, result.perturbed, predictions[1]),
    ):
        target.CopyFrom(
            profile_to_proto(profile, input_index, prediction, return_pairs and return_profiles)
        )
        if not return_profiles:
            target.ClearField("shapley_interaction")
            target.ClearField("shapley_values")
    return message
