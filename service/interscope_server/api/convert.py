"""Domain results -> wire messages: the one module that builds the services' messages.

The servicers and their flows hand engine, attack and registry results here; nothing else in
the server constructs a `*_pb2` message (tests/server/api/test_structure.py holds it so).
"""

from __future__ import annotations

import functools
import json
import platform
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
from google.protobuf import json_format
from google.protobuf.message import Message

from interscope._diagnostics import ExampleChecks, Flag
from interscope._models import SampleResult
from interscope._specificity import CategorySpecificity
from interscope._summary import summarize
from interscope.codec import TensorError, from_tensor, to_tensor
from interscope.v1 import analysis_pb2, models_pb2, tensor_pb2
from interscope_server import __version__, attacks, errors
from interscope_server.analysis.results import (
    InteractionProfile,
    OrderEstimate,
    PerturbationProfile,
)
from interscope_server.models.config import ModelConfig
from interscope_server.models.registry import ModelState, ModelStatus

if TYPE_CHECKING:
    from interscope_server.models.backend import Backend

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


#: Specs up to this many serialized bytes have their JSON cached: callers repeat specs, and
#: protobuf's JSON printer costs about 0.1 ms of a 4-player Profile's ~2 ms on the server.
#: Larger specs (a baseline image, a mask) are printed each time and never held.
_SPEC_JSON_CACHE_BYTES = 4096


def spec_json(message: Message) -> str:
    """Canonical JSON of a spec message (defaults included) for provenance."""
    wire = message.SerializeToString(deterministic=True)
    if len(wire) > _SPEC_JSON_CACHE_BYTES:
        return _spec_json(message)
    key = (message.DESCRIPTOR.full_name, wire)
    text = _SPEC_JSON_CACHE.get(key)
    if text is None:
        text = _spec_json(message)
        if len(_SPEC_JSON_CACHE) >= _SPEC_JSON_CACHE_ENTRIES:
            _SPEC_JSON_CACHE.clear()  # callers repeat a handful of specs; no LRU needed
        _SPEC_JSON_CACHE[key] = text
    return text


_SPEC_JSON_CACHE_ENTRIES = 256
_SPEC_JSON_CACHE: dict[tuple[str, bytes], str] = {}


def _spec_json(message: Message) -> str:
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
        mean_stderr=_floats(profile.mean_stderr),
        mean_abs=_floats(profile.mean_abs),
        mean_abs_stderr=_floats(profile.mean_abs_stderr),
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
        if profile.pair_interactions_stderr is not None:
            message.interactions_stderr.CopyFrom(
                to_tensor(np.asarray(profile.pair_interactions_stderr, np.float64))
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
        delta_mean_stderr=_floats(result.delta_mean_stderr),
        utility_change=float(result.utility_change),
        baseline_term=float(result.baseline_term),
        first_order_term=float(result.first_order_term),
        order_terms=_floats(result.order_terms),
        residual=float(result.residual),
    )
    if result.delta_pair_interactions is not None:
        message.delta_mean_abs.extend(
            _floats(np.abs(np.asarray(result.delta_pair_interactions)).mean(axis=1))
        )
    # The per-order aggregates always go out (audit summaries and reports are built on them);
    # pairs and Shapley matrices only when the caller asked for full profiles.
    for target, profile, prediction in (
        (message.clean, result.clean, predictions[0]),
        (message.adversarial, result.adversarial, predictions[1]),
    ):
        target.CopyFrom(profile_to_proto(profile, input_index, prediction, return_pairs))
        if not return_profiles:
            target.ClearField("shapley_interaction")
            target.ClearField("shapley_values")
    return message


# -- calls' common parts ---------------------------------------------------------------------


def provenance(
    model: str,
    backend: Backend,
    spec_json: str,
    seed: int,
    wall_seconds: float,
    forwards: int,
    replica: str,
) -> analysis_pb2.Provenance:
    """What computed a result: the model and its hash, the spec, versions, forwards, where."""
    return analysis_pb2.Provenance(
        model=model,
        model_content_hash=f"sha256:{backend.content_hash}",
        spec_json=spec_json,
        seed=seed,
        versions=versions(),
        wall_seconds=wall_seconds,
        forwards=forwards,
        device=backend.device,
        replica=replica,
    )


def progress(
    stage: str, done: int, total: int, unit: str, input_index: int = 0
) -> analysis_pb2.Progress:
    return analysis_pb2.Progress(
        stage=stage, done=done, total=total, unit=unit, input_index=input_index
    )


# -- Profile ---------------------------------------------------------------------------------


def profile_event(**field: Any) -> analysis_pb2.ProfileEvent:
    """A ProfileEvent with its one field set: progress, partial, profile or result."""
    return analysis_pb2.ProfileEvent(**field)


def order_estimate(index: int, event: OrderEstimate) -> analysis_pb2.OrderEstimate:
    return analysis_pb2.OrderEstimate(
        input_index=index,
        order=event.order,
        ratio=event.ratio,
        mean=event.mean,
        mean_stderr=event.mean_stderr,
        mean_abs=event.mean_abs,
        mean_abs_stderr=event.mean_abs_stderr,
        disentanglement=0.0 if np.isnan(event.disentanglement) else event.disentanglement,
    )


def profile_result(
    profiles: list[analysis_pb2.InteractionProfile], provenance: analysis_pb2.Provenance
) -> analysis_pb2.ProfileResult:
    """Per-order means over inputs with standard errors across inputs."""
    result = analysis_pb2.ProfileResult(profiles=profiles, provenance=provenance)
    if not profiles:
        return result
    result.orders.extend(profiles[0].orders)
    for values_name, target, target_se in (
        ("mean", result.mean, result.mean_stderr),
        ("mean_abs", result.mean_abs, result.mean_abs_stderr),
    ):
        table = np.array([list(getattr(p, values_name)) for p in profiles], dtype=np.float64)
        target.extend(table.mean(axis=0).tolist())
        if len(profiles) > 1:
            target_se.extend((table.std(axis=0, ddof=1) / np.sqrt(len(profiles))).tolist())
        else:
            target_se.extend(list(getattr(profiles[0], f"{values_name}_stderr")))
    return result


# -- Attack ----------------------------------------------------------------------------------


def attack_event(**field: Any) -> analysis_pb2.AttackEvent:
    """An AttackEvent with its one field set: progress, example or summary."""
    return analysis_pb2.AttackEvent(**field)


def example_to_proto(
    event: attacks.ExampleResult, with_adversarial: bool
) -> analysis_pb2.ExampleResult:
    message = analysis_pb2.ExampleResult(
        input_index=event.index,
        success=event.success,
        label=event.label,
        target=-1 if event.target is None else event.target,
        clean_prediction=event.clean_prediction,
        adversarial_prediction=event.adversarial_prediction,
        clean_margin=event.clean_margin,
        adversarial_margin=event.adversarial_margin,
        linf=event.linf,
        l2=event.l2,
        steps=event.steps,
        queries=event.queries,
    )
    if event.checks is not None:
        message.checks.CopyFrom(checks_to_proto(event.checks))
    if with_adversarial:
        message.adversarial.CopyFrom(to_tensor(np.asarray(event.x_adv, dtype=np.float32)))
    return message


def checks_to_proto(checks: ExampleChecks) -> analysis_pb2.MaskingChecks:
    """One example's gradient-masking checks on the wire (unset: that check did not run)."""
    message = analysis_pb2.MaskingChecks(gradient_l1=checks.gradient_l1, loss_gain=checks.loss_gain)
    if checks.black_box_fooled is not None:
        message.black_box_fooled = checks.black_box_fooled
    if checks.more_steps_fooled is not None:
        message.more_steps_fooled = checks.more_steps_fooled
    return message


def flags_to_proto(flags: Sequence[Flag]) -> list[analysis_pb2.MaskingFlag]:
    return [
        analysis_pb2.MaskingFlag(
            code=f.code, meaning=f.meaning, advice=f.advice, numbers=dict(f.numbers)
        )
        for f in flags
    ]


def attack_summary(
    event: attacks.AttackSummary,
    deltas: Sequence[analysis_pb2.PerturbationProfile],
    provenance: analysis_pb2.Provenance,
) -> analysis_pb2.AttackSummary:
    """The attack's totals; with perturbation profiles, the mean change by order over examples."""
    summary = analysis_pb2.AttackSummary(
        n=event.n_examples,
        clean_accuracy=event.clean_accuracy,
        robust_accuracy=event.robust_accuracy,
        success_rate=event.success_rate,
        mean_linf=event.mean_linf,
        mean_l2=event.mean_l2,
        provenance=provenance,
        masking_flags=flags_to_proto(event.masking_flags),
    )
    if deltas:
        summary.orders.extend(deltas[0].clean.orders)
        summary.delta_mean.extend(np.mean([list(d.delta_mean) for d in deltas], axis=0).tolist())
    return summary


# -- Audit -----------------------------------------------------------------------------------


def audit_event(**field: Any) -> analysis_pb2.AuditEvent:
    """An AuditEvent with its one field set: accepted, sample or summary."""
    return analysis_pb2.AuditEvent(**field)


def audit_accepted(audit_id: str, n_players: int) -> analysis_pb2.AuditEvent:
    return audit_event(accepted=analysis_pb2.AuditAccepted(audit_id=audit_id, n_players=n_players))


def failed_sample(sample_id: str, label: int, code: str, message: str) -> analysis_pb2.SampleResult:
    """The result of a sample that could not be audited (the stream goes on)."""
    return analysis_pb2.SampleResult(
        id=sample_id, label=label, error=analysis_pb2.SampleError(code=code, message=message)
    )


def sample_result(
    sample_id: str,
    label: int,
    outcome: attacks.ExampleResult,
    forwards: int,
    perturbation: analysis_pb2.PerturbationProfile,
    with_adversarial: bool,
    sweep_robust: Sequence[bool] = (),
) -> analysis_pb2.SampleResult:
    """One audited sample: the attack's outcome and how it moved the interactions."""
    result = analysis_pb2.SampleResult(
        id=sample_id,
        label=label,
        clean_prediction=outcome.clean_prediction,
        adversarial_prediction=outcome.adversarial_prediction,
        clean_correct=outcome.clean_prediction == label,
        robust=outcome.adversarial_prediction == label,
        attack_success=outcome.success,
        linf=outcome.linf,
        l2=outcome.l2,
        clean_margin=outcome.clean_margin,
        adversarial_margin=outcome.adversarial_margin,
        forwards=forwards,
        perturbation=perturbation,
        sweep_robust=sweep_robust,
    )
    if outcome.checks is not None:
        result.checks.CopyFrom(checks_to_proto(outcome.checks))
    if with_adversarial:
        result.adversarial.CopyFrom(to_tensor(np.asarray(outcome.x_adv, dtype=np.float32)))
    return result


def audit_summary(
    results: Sequence[analysis_pb2.SampleResult],
    class_names: Sequence[str],
    provenance: analysis_pb2.Provenance,
    sweep_eps: Sequence[float] = (),
) -> analysis_pb2.AuditSummary:
    """The audit's summary over the samples that succeeded (failed ones are counted apart).

    Computed by the SDK's own `interscope._summary.summarize` over the samples as the SDK
    reads them off the wire: one computation, so a client recomputing the summary across
    replicas or from checkpoints gets exactly the server's numbers.
    """
    samples = [SampleResult.from_proto(r) for r in results]
    summary = summarize(samples, class_names, sweep_eps)
    message = analysis_pb2.AuditSummary(
        n_samples=summary.n_samples, n_failed=summary.n_failed, provenance=provenance
    )
    if not summary.n_samples:
        return message
    message.clean_accuracy = summary.clean_accuracy
    message.robust_accuracy = summary.robust_accuracy
    message.success_rate = summary.success_rate
    message.orders.extend(int(m) for m in summary.orders)
    message.ratios.extend(float(r) for r in summary.ratios)
    statistics = {
        "clean_mean_abs": summary.clean_mean_abs,
        "adversarial_mean_abs": summary.adversarial_mean_abs,
        "delta_mean": summary.delta_mean,
        "clean_disentanglement": summary.clean_disentanglement,
        "adversarial_disentanglement": summary.adversarial_disentanglement,
    }
    for name, statistic in statistics.items():
        if statistic is not None:
            getattr(message, name).CopyFrom(
                analysis_pb2.OrderStatistic(
                    mean=_floats(statistic.mean),
                    ci_low=_floats(statistic.ci_low),
                    ci_high=_floats(statistic.ci_high),
                )
            )
    message.masking_flags.extend(flags_to_proto(summary.masking_flags))
    if summary.robustness_curve is not None:
        message.robustness_curve.eps.extend(_floats(summary.robustness_curve.eps))
        message.robustness_curve.robust_accuracy.extend(
            _floats(summary.robustness_curve.robust_accuracy)
        )
    for name in ("clean_specificity", "adversarial_specificity"):
        specificity = getattr(summary, name)
        if specificity is not None:
            getattr(message, name).CopyFrom(specificity_to_proto(specificity))
    message.per_class.extend(
        analysis_pb2.ClassBreakdown(
            label=c.label,
            name=c.name,
            n=c.n,
            clean_accuracy=c.clean_accuracy,
            robust_accuracy=c.robust_accuracy,
        )
        for c in summary.per_class
    )
    return message


# -- ModelService ----------------------------------------------------------------------------

FORMAT_TO_PROTO = {
    "onnx": models_pb2.MODEL_FORMAT_ONNX,
    "torchscript": models_pb2.MODEL_FORMAT_TORCHSCRIPT,
    "oip": models_pb2.MODEL_FORMAT_OIP,
    "torch_export": models_pb2.MODEL_FORMAT_TORCH_EXPORT,
}
_STATE_TO_PROTO = {
    ModelState.LOADING: models_pb2.MODEL_STATE_LOADING,
    ModelState.READY: models_pb2.MODEL_STATE_READY,
    ModelState.FAILED: models_pb2.MODEL_STATE_FAILED,
    ModelState.UNLOADED: models_pb2.MODEL_STATE_UNLOADED,
}


def model_info(
    status: ModelStatus, config: ModelConfig | None, backend: Backend | None
) -> models_pb2.ModelInfo:
    """Metadata of one model: its state, its config if readable, its backend if loaded."""
    info = models_pb2.ModelInfo(
        name=status.name, state=_STATE_TO_PROTO[status.state], state_message=status.message
    )
    if config is not None:
        _describe_config(info, config)
    if backend is not None:
        info.content_hash = f"sha256:{backend.content_hash}"
        info.gradients_available = backend.gradients_available
        info.gradients_message = backend.gradient_note
        info.stochastic = backend.stochastic
        info.device = backend.device
    return info


def _describe_config(info: models_pb2.ModelInfo, config: ModelConfig) -> None:
    info.format = FORMAT_TO_PROTO[config.format]
    info.input.CopyFrom(
        models_pb2.TensorInfo(
            name=config.input.name,
            datatype=config.input.datatype or "",
            shape=config.input.shape,
            layout=config.layout if config.input.shape else "",
        )
    )
    info.output.CopyFrom(
        models_pb2.TensorInfo(name=config.output.name, datatype="FP32", shape=[len(config.classes)])
    )
    info.output_kind = config.output.kind or ""
    info.classes.extend(config.classes)
    if isinstance(config.value_range, list):
        info.value_ranges.extend(
            models_pb2.ValueRange(low=low, high=high) for low, high in config.value_range
        )
        info.value_range_low = min(low for low, _ in config.value_range)
        info.value_range_high = max(high for _, high in config.value_range)
    else:
        info.value_range_low, info.value_range_high = config.value_range
    info.feature_names.extend(config.feature_names or [])
    if config.normalization is not None:
        info.normalization.CopyFrom(
            models_pb2.Normalization(mean=config.normalization.mean, std=config.normalization.std)
        )
    info.max_batch_size = config.max_batch_size
    info.description = config.description


def list_models(infos: Sequence[models_pb2.ModelInfo]) -> models_pb2.ListModelsResponse:
    return models_pb2.ListModelsResponse(models=infos)


def load_model_response(info: models_pb2.ModelInfo) -> models_pb2.LoadModelResponse:
    return models_pb2.LoadModelResponse(model=info)


def unload_model_response() -> models_pb2.UnloadModelResponse:
    return models_pb2.UnloadModelResponse()


def specificity_to_proto(result: CategorySpecificity) -> analysis_pb2.CategorySpecificity:
    """An audit's category specificity (interscope._specificity) as its wire message."""
    return analysis_pb2.CategorySpecificity(
        eta_squared=_floats(result.eta_squared),
        adjusted=_floats(result.adjusted),
        adjusted_stderr=_floats(result.adjusted_stderr),
        chance=float(result.chance),
        n_samples=int(result.n_samples),
        classes=[int(c) for c in result.classes],
        class_counts=[int(c) for c in result.class_counts],
        pairs=to_tensor(np.asarray(result.pairs, dtype=np.int64)),
        class_means=to_tensor(np.asarray(result.class_means, dtype=np.float64)),
    )
