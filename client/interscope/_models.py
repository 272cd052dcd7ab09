"""Typed results (dataclasses with numpy arrays and `to_dict()`) built from the wire messages."""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from interscope._diagnostics import ExampleChecks, Flag
from interscope._specificity import CategorySpecificity
from interscope.codec import from_tensor
from interscope.v1 import analysis_pb2, models_pb2, tensor_pb2


def _jsonable(value: Any) -> Any:
    """Plain JSON types for dataclasses, numpy arrays and scalars (NaN becomes None)."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _jsonable(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, np.ndarray):
        return _jsonable(value.tolist())
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.generic):
        return _jsonable(value.item())
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


class _DictMixin:
    """`to_dict()` for result dataclasses: arrays as nested lists, ready for json.dumps."""

    def to_dict(self) -> dict[str, Any]:
        out = _jsonable(self)
        assert isinstance(out, dict)
        return out


def _tensor(message: Any, field_name: str, what: str) -> np.ndarray | None:
    if not message.HasField(field_name):
        return None
    tensor: tensor_pb2.Tensor = getattr(message, field_name)
    return from_tensor(tensor, what=what)


def _f64(values: Sequence[float]) -> np.ndarray:
    return np.asarray(list(values), dtype=np.float64)


def _i64(values: Sequence[int]) -> np.ndarray:
    return np.asarray(list(values), dtype=np.int64)


# -- models ----------------------------------------------------------------------------------

_FORMATS = {
    models_pb2.MODEL_FORMAT_ONNX: "onnx",
    models_pb2.MODEL_FORMAT_TORCHSCRIPT: "torchscript",
    models_pb2.MODEL_FORMAT_OIP: "oip",
    models_pb2.MODEL_FORMAT_TORCH_EXPORT: "torch_export",
}
_STATES = {
    models_pb2.MODEL_STATE_LOADING: "loading",
    models_pb2.MODEL_STATE_READY: "ready",
    models_pb2.MODEL_STATE_FAILED: "failed",
    models_pb2.MODEL_STATE_UNLOADED: "unloaded",
}


@dataclass(frozen=True)
class TensorInfo(_DictMixin):
    """Name, datatype and per-example shape (no batch dimension) of a model input or output;
    inputs also say their layout ("NCHW", "NHWC" or "features")."""

    name: str
    datatype: str
    shape: tuple[int, ...]
    layout: str = ""

    @classmethod
    def from_proto(cls, message: models_pb2.TensorInfo) -> TensorInfo:
        return cls(
            message.name, message.datatype, tuple(int(d) for d in message.shape), message.layout
        )


@dataclass(frozen=True)
class ModelInfo(_DictMixin):
    """What a replica knows about one model: how to call it and what it returns."""

    name: str
    format: str
    state: str
    state_message: str
    input: TensorInfo
    output: TensorInfo
    classes: list[str]
    value_range: tuple[float, float]
    normalization: dict[str, list[float]] | None
    content_hash: str
    gradients_available: bool
    gradients_message: str
    max_batch_size: int
    device: str
    description: str
    #: "logits", "probabilities" or "log_probabilities"; "logit" values need "logits".
    output_kind: str = ""
    #: One (low, high) per feature when the model's config gives them; empty otherwise.
    value_ranges: list[tuple[float, float]] = field(default_factory=list)
    #: Feature names from the model's config; empty when it gives none.
    feature_names: list[str] = field(default_factory=list)
    #: Whether the model's outputs are random (two forwards of one input differed at load):
    #: attacks run on it, interaction profiles are refused (FAILED_PRECONDITION).
    stochastic: bool = False

    @classmethod
    def from_proto(cls, m: models_pb2.ModelInfo) -> ModelInfo:
        norm = (
            {"mean": list(m.normalization.mean), "std": list(m.normalization.std)}
            if m.HasField("normalization")
            else None
        )
        return cls(
            name=m.name,
            format=_FORMATS.get(m.format, "unspecified"),
            state=_STATES.get(m.state, "unspecified"),
            state_message=m.state_message,
            input=TensorInfo.from_proto(m.input),
            output=TensorInfo.from_proto(m.output),
            classes=list(m.classes),
            value_range=(float(m.value_range_low), float(m.value_range_high)),
            normalization=norm,
            content_hash=m.content_hash,
            gradients_available=m.gradients_available,
            gradients_message=m.gradients_message,
            max_batch_size=m.max_batch_size,
            device=m.device,
            description=m.description,
            output_kind=m.output_kind,
            value_ranges=[(float(r.low), float(r.high)) for r in m.value_ranges],
            feature_names=list(m.feature_names),
            stochastic=m.stochastic,
        )


# -- shared ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Provenance(_DictMixin):
    """Where a result came from: model and hash, the spec as the server read it, seed, versions."""

    model: str
    model_content_hash: str
    spec: dict[str, Any]
    seed: int
    versions: dict[str, str]
    wall_seconds: float
    forwards: int
    device: str
    replica: str

    @classmethod
    def from_proto(cls, p: analysis_pb2.Provenance) -> Provenance:
        try:
            spec = json.loads(p.spec_json) if p.spec_json else {}
        except json.JSONDecodeError:
            spec = {"raw": p.spec_json}
        return cls(
            model=p.model,
            model_content_hash=p.model_content_hash,
            spec=spec if isinstance(spec, dict) else {"value": spec},
            seed=int(p.seed),
            versions=dict(p.versions),
            wall_seconds=float(p.wall_seconds),
            forwards=int(p.forwards),
            device=p.device,
            replica=p.replica,
        )


@dataclass(frozen=True)
class Progress(_DictMixin):
    """Progress of a long call: `done` of `total` `unit`s in `stage`."""

    stage: str
    done: int
    total: int
    unit: str
    input_index: int
    sample_id: str

    @classmethod
    def from_proto(cls, p: analysis_pb2.Progress) -> Progress:
        return cls(p.stage, int(p.done), int(p.total), p.unit, p.input_index, p.sample_id)


@dataclass(frozen=True)
class OrderEstimate(_DictMixin):
    """One order of one input's profile, streamed as soon as it is complete."""

    input_index: int
    order: int
    ratio: float
    mean: float
    mean_stderr: float
    mean_abs: float
    mean_abs_stderr: float
    disentanglement: float

    @classmethod
    def from_proto(cls, o: analysis_pb2.OrderEstimate) -> OrderEstimate:
        return cls(
            o.input_index,
            o.order,
            o.ratio,
            o.mean,
            o.mean_stderr,
            o.mean_abs,
            o.mean_abs_stderr,
            o.disentanglement,
        )


@dataclass(frozen=True)
class InteractionProfile(_DictMixin):
    """The interaction profile of one input; arrays indexed by order follow `orders`."""

    input_index: int
    n_players: int
    orders: np.ndarray
    ratios: np.ndarray
    mean: np.ndarray
    mean_stderr: np.ndarray
    mean_abs: np.ndarray
    mean_abs_stderr: np.ndarray
    strength: np.ndarray
    disentanglement: np.ndarray
    #: (k, 2) player pairs with i < j, and (len(orders), k) I^(m)(i,j); with return_pairs=True.
    pairs: np.ndarray | None
    interactions: np.ndarray | None
    interactions_stderr: np.ndarray | None
    #: Exact estimator only: (n, n) Shapley interaction index and (n,) Shapley values.
    shapley_interaction: np.ndarray | None
    shapley_values: np.ndarray | None
    efficiency_residual: float
    value_full: float
    value_empty: float
    class_index: int
    prediction: int
    estimator: str
    forwards: int

    @classmethod
    def from_proto(cls, p: analysis_pb2.InteractionProfile) -> InteractionProfile:
        return cls(
            input_index=p.input_index,
            n_players=p.n_players,
            orders=_i64(p.orders),
            ratios=_f64(p.ratios),
            mean=_f64(p.mean),
            mean_stderr=_f64(p.mean_stderr),
            mean_abs=_f64(p.mean_abs),
            mean_abs_stderr=_f64(p.mean_abs_stderr),
            strength=_f64(p.strength),
            disentanglement=_f64(p.disentanglement),
            pairs=_tensor(p, "pairs", "pairs"),
            interactions=_tensor(p, "interactions", "interactions"),
            interactions_stderr=_tensor(p, "interactions_stderr", "interactions_stderr"),
            shapley_interaction=_tensor(p, "shapley_interaction", "shapley_interaction"),
            shapley_values=_tensor(p, "shapley_values", "shapley_values"),
            efficiency_residual=p.efficiency_residual,
            value_full=p.value_full,
            value_empty=p.value_empty,
            class_index=int(p.class_index),
            prediction=int(p.prediction),
            estimator=p.estimator,
            forwards=int(p.forwards),
        )


@dataclass(frozen=True)
class ProfileResult(_DictMixin):
    """The final result of `profile`: per-input profiles and their means over inputs."""

    profiles: list[InteractionProfile]
    orders: np.ndarray
    mean: np.ndarray
    mean_stderr: np.ndarray
    mean_abs: np.ndarray
    mean_abs_stderr: np.ndarray
    provenance: Provenance | None

    @property
    def n_players(self) -> int:
        return self.profiles[0].n_players if self.profiles else 0

    @property
    def pairs(self) -> np.ndarray | None:
        """(k, 2) pairs (i < j) shared by every input's profile; None without return_pairs=True."""
        return self.profiles[0].pairs if self.profiles else None

    @property
    def interactions(self) -> np.ndarray | None:
        """(len(orders), k) I^(m)(i,j) averaged over inputs (the input's own for one input)."""
        per_input = [p.interactions for p in self.profiles]
        if not per_input or any(a is None for a in per_input):
            return None
        pairs = [p.pairs for p in self.profiles]
        first = pairs[0]
        if any(p is None or first is None or not np.array_equal(p, first) for p in pairs):
            return None  # different pairs per input: see each profile's own
        return np.mean(np.stack([a for a in per_input if a is not None]), axis=0)

    @property
    def shapley_interaction(self) -> np.ndarray | None:
        """(n, n) Shapley interaction index averaged over inputs (exact estimator only)."""
        mats = [p.shapley_interaction for p in self.profiles]
        if not mats or any(m is None for m in mats):
            return None
        return np.mean(np.stack([m for m in mats if m is not None]), axis=0)

    @classmethod
    def from_proto(cls, r: analysis_pb2.ProfileResult) -> ProfileResult:
        return cls(
            profiles=[InteractionProfile.from_proto(p) for p in r.profiles],
            orders=_i64(r.orders),
            mean=_f64(r.mean),
            mean_stderr=_f64(r.mean_stderr),
            mean_abs=_f64(r.mean_abs),
            mean_abs_stderr=_f64(r.mean_abs_stderr),
            provenance=Provenance.from_proto(r.provenance) if r.HasField("provenance") else None,
        )

    def to_dict(self) -> dict[str, Any]:
        out = super().to_dict()
        out["n_players"] = self.n_players
        out["pairs"] = _jsonable(self.pairs)
        out["interactions"] = _jsonable(self.interactions)
        out["shapley_interaction"] = _jsonable(self.shapley_interaction)
        return out


# -- attacks ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class PerturbationProfile(_DictMixin):
    """How x_adv = x + delta moved the interactions, by order (indexed like `orders`)."""

    orders: np.ndarray
    clean: InteractionProfile | None
    adversarial: InteractionProfile | None
    delta_mean: np.ndarray
    delta_mean_stderr: np.ndarray
    delta_mean_abs: np.ndarray
    utility_change: float
    baseline_term: float
    first_order_term: float
    order_terms: np.ndarray
    residual: float

    @classmethod
    def from_proto(cls, p: analysis_pb2.PerturbationProfile) -> PerturbationProfile:
        clean = InteractionProfile.from_proto(p.clean) if p.HasField("clean") else None
        adv = InteractionProfile.from_proto(p.adversarial) if p.HasField("adversarial") else None
        return cls(
            orders=clean.orders if clean is not None else _i64([]),
            clean=clean,
            adversarial=adv,
            delta_mean=_f64(p.delta_mean),
            delta_mean_stderr=_f64(p.delta_mean_stderr),
            delta_mean_abs=_f64(p.delta_mean_abs),
            utility_change=p.utility_change,
            baseline_term=p.baseline_term,
            first_order_term=p.first_order_term,
            order_terms=_f64(p.order_terms),
            residual=p.residual,
        )


def checks_from_proto(message: Any, field_name: str = "checks") -> ExampleChecks | None:
    """The gradient-masking checks of an ExampleResult or SampleResult, None when absent."""
    if not message.HasField(field_name):
        return None
    c = getattr(message, field_name)
    return ExampleChecks(
        gradient_l1=c.gradient_l1,
        loss_gain=c.loss_gain,
        black_box_fooled=c.black_box_fooled if c.HasField("black_box_fooled") else None,
        more_steps_fooled=c.more_steps_fooled if c.HasField("more_steps_fooled") else None,
    )


def flags_from_proto(flags: Sequence[analysis_pb2.MaskingFlag]) -> list[Flag]:
    return [Flag(f.code, f.meaning, f.advice, dict(f.numbers)) for f in flags]


@dataclass(frozen=True)
class RobustnessCurve(_DictMixin):
    """Robust accuracy at each eps of an audit's eps sweep (ascending)."""

    eps: np.ndarray
    robust_accuracy: np.ndarray


@dataclass(frozen=True)
class ExampleResult(_DictMixin):
    """The attack's outcome on one input."""

    input_index: int
    success: bool
    label: int
    target: int
    clean_prediction: int
    adversarial_prediction: int
    clean_margin: float
    adversarial_margin: float
    linf: float
    l2: float
    steps: int
    queries: int
    adversarial: np.ndarray | None
    perturbation: PerturbationProfile | None
    #: Gradient-masking checks (white-box attacks, examples not fooled), else None.
    checks: ExampleChecks | None = None

    @classmethod
    def from_proto(cls, e: analysis_pb2.ExampleResult) -> ExampleResult:
        return cls(
            input_index=e.input_index,
            success=e.success,
            label=int(e.label),
            target=int(e.target),
            clean_prediction=int(e.clean_prediction),
            adversarial_prediction=int(e.adversarial_prediction),
            clean_margin=e.clean_margin,
            adversarial_margin=e.adversarial_margin,
            linf=e.linf,
            l2=e.l2,
            steps=e.steps,
            queries=int(e.queries),
            adversarial=_tensor(e, "adversarial", "adversarial"),
            perturbation=(
                PerturbationProfile.from_proto(e.perturbation)
                if e.HasField("perturbation")
                else None
            ),
            checks=checks_from_proto(e),
        )


@dataclass(frozen=True)
class AttackSummary(_DictMixin):
    """The server's summary of an attack over a batch."""

    n: int
    clean_accuracy: float
    robust_accuracy: float
    success_rate: float
    mean_linf: float
    mean_l2: float
    orders: np.ndarray
    delta_mean: np.ndarray
    provenance: Provenance | None
    #: Gradient-masking flags raised (interscope._diagnostics); empty when none.
    masking_flags: list[Flag] = field(default_factory=list)

    @classmethod
    def from_proto(cls, s: analysis_pb2.AttackSummary) -> AttackSummary:
        return cls(
            n=s.n,
            clean_accuracy=s.clean_accuracy,
            robust_accuracy=s.robust_accuracy,
            success_rate=s.success_rate,
            mean_linf=s.mean_linf,
            mean_l2=s.mean_l2,
            orders=_i64(s.orders),
            delta_mean=_f64(s.delta_mean),
            provenance=Provenance.from_proto(s.provenance) if s.HasField("provenance") else None,
            masking_flags=flags_from_proto(s.masking_flags),
        )


@dataclass(frozen=True)
class AttackResult(_DictMixin):
    """The final result of `attack`: per-example results (input order) and the summary."""

    examples: list[ExampleResult]
    summary: AttackSummary

    @property
    def clean_accuracy(self) -> float:
        return self.summary.clean_accuracy

    @property
    def robust_accuracy(self) -> float:
        return self.summary.robust_accuracy

    @property
    def success_rate(self) -> float:
        return self.summary.success_rate

    @property
    def success(self) -> np.ndarray:
        """Per-example success, bool (N,)."""
        return np.asarray([e.success for e in self.examples], dtype=bool)

    @property
    def adversarial(self) -> np.ndarray | None:
        """Adversarial inputs (N, *input_shape); None when they were omitted."""
        arrays = [e.adversarial for e in self.examples]
        if not arrays or any(a is None for a in arrays):
            return None
        return np.stack([a for a in arrays if a is not None])

    def to_dict(self) -> dict[str, Any]:
        out = super().to_dict()
        out.update(
            clean_accuracy=self.clean_accuracy,
            robust_accuracy=self.robust_accuracy,
            success_rate=self.success_rate,
        )
        return out


# -- audits ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class SampleError(_DictMixin):
    """Why one audit sample failed: status code name and message."""

    code: str
    message: str


@dataclass(frozen=True)
class SampleResult(_DictMixin):
    """One audited sample: attack outcome and its perturbation profile (or an error)."""

    id: str
    label: int
    clean_prediction: int
    adversarial_prediction: int
    clean_correct: bool
    robust: bool
    attack_success: bool
    linf: float
    l2: float
    forwards: int
    perturbation: PerturbationProfile | None
    adversarial: np.ndarray | None
    error: SampleError | None
    #: z_label - max_{c != label} z_c, clean and adversarial (NaN from servers before these).
    clean_margin: float = math.nan
    adversarial_margin: float = math.nan
    #: Gradient-masking checks when the attack failed on it (white-box), else None.
    checks: ExampleChecks | None = None
    #: With an eps sweep: robust at each sweep eps, ascending.
    sweep_robust: tuple[bool, ...] = ()

    @classmethod
    def from_proto(cls, s: analysis_pb2.SampleResult) -> SampleResult:
        return cls(
            id=s.id,
            label=int(s.label),
            clean_prediction=int(s.clean_prediction),
            adversarial_prediction=int(s.adversarial_prediction),
            clean_correct=s.clean_correct,
            robust=s.robust,
            attack_success=s.attack_success,
            linf=s.linf,
            l2=s.l2,
            forwards=int(s.forwards),
            perturbation=(
                PerturbationProfile.from_proto(s.perturbation)
                if s.HasField("perturbation")
                else None
            ),
            adversarial=_tensor(s, "adversarial", "adversarial"),
            error=SampleError(s.error.code, s.error.message) if s.HasField("error") else None,
            clean_margin=s.clean_margin,
            adversarial_margin=s.adversarial_margin,
            checks=checks_from_proto(s),
            sweep_robust=tuple(s.sweep_robust),
        )

    def to_dict(self) -> dict[str, Any]:
        """Compact: per-order means only (the full profiles stay in the checkpoint)."""
        out: dict[str, Any] = {
            f.name: _jsonable(getattr(self, f.name))
            for f in dataclasses.fields(self)
            if f.name not in ("perturbation", "adversarial")
        }
        p = self.perturbation
        if p is not None:
            out["orders"] = _jsonable(p.orders)
            out["clean_mean_abs"] = _jsonable(p.clean.mean_abs if p.clean else None)
            out["adversarial_mean_abs"] = _jsonable(
                p.adversarial.mean_abs if p.adversarial else None
            )
            out["delta_mean"] = _jsonable(p.delta_mean)
            out["utility_change"] = _jsonable(p.utility_change)
            # The order-weighted contributions (n-1-m)/(n(n-1)) * Delta I^(m) the report plots.
            out["order_terms"] = _jsonable(p.order_terms)
        return out


@dataclass(frozen=True)
class OrderStatistic(_DictMixin):
    """Per-order mean over samples with a 95% confidence interval."""

    mean: np.ndarray
    ci_low: np.ndarray
    ci_high: np.ndarray

    @classmethod
    def from_proto(cls, s: analysis_pb2.OrderStatistic) -> OrderStatistic:
        return cls(_f64(s.mean), _f64(s.ci_low), _f64(s.ci_high))


@dataclass(frozen=True)
class ClassBreakdown(_DictMixin):
    """Accuracies of the samples of one class."""

    label: int
    name: str
    n: int
    clean_accuracy: float
    robust_accuracy: float

    @classmethod
    def from_proto(cls, c: analysis_pb2.ClassBreakdown) -> ClassBreakdown:
        return cls(int(c.label), c.name, c.n, c.clean_accuracy, c.robust_accuracy)


@dataclass(frozen=True)
class AuditSummary(_DictMixin):
    """Accuracies, per-order interaction statistics and per-class breakdown of an audit."""

    n_samples: int
    n_failed: int
    clean_accuracy: float
    robust_accuracy: float
    success_rate: float
    orders: np.ndarray
    ratios: np.ndarray
    clean_mean_abs: OrderStatistic
    adversarial_mean_abs: OrderStatistic
    delta_mean: OrderStatistic
    per_class: list[ClassBreakdown]
    provenance: Provenance | None = None
    #: Gradient-masking flags over the samples' checks and the eps sweep.
    masking_flags: list[Flag] = field(default_factory=list)
    #: With an eps sweep: robust accuracy per eps.
    robustness_curve: RobustnessCurve | None = None
    #: Disentanglement D^(m) over samples, clean and adversarial (None from older servers).
    clean_disentanglement: OrderStatistic | None = None
    adversarial_disentanglement: OrderStatistic | None = None
    #: Category specificity of the per-pair I^(m) by order (docs/interactions.md).
    clean_specificity: CategorySpecificity | None = None
    adversarial_specificity: CategorySpecificity | None = None

    @classmethod
    def from_proto(cls, s: analysis_pb2.AuditSummary) -> AuditSummary:
        return cls(
            n_samples=s.n_samples,
            n_failed=s.n_failed,
            clean_accuracy=s.clean_accuracy,
            robust_accuracy=s.robust_accuracy,
            success_rate=s.success_rate,
            orders=_i64(s.orders),
            ratios=_f64(s.ratios),
            clean_mean_abs=OrderStatistic.from_proto(s.clean_mean_abs),
            adversarial_mean_abs=OrderStatistic.from_proto(s.adversarial_mean_abs),
            delta_mean=OrderStatistic.from_proto(s.delta_mean),
            per_class=[ClassBreakdown.from_proto(c) for c in s.per_class],
            provenance=Provenance.from_proto(s.provenance) if s.HasField("provenance") else None,
            masking_flags=flags_from_proto(s.masking_flags),
            robustness_curve=(
                RobustnessCurve(
                    _f64(s.robustness_curve.eps), _f64(s.robustness_curve.robust_accuracy)
                )
                if s.HasField("robustness_curve")
                else None
            ),
            clean_disentanglement=_statistic_or_none(s, "clean_disentanglement"),
            adversarial_disentanglement=_statistic_or_none(s, "adversarial_disentanglement"),
            clean_specificity=_specificity_or_none(s, "clean_specificity"),
            adversarial_specificity=_specificity_or_none(s, "adversarial_specificity"),
        )


def _statistic_or_none(message: Any, name: str) -> OrderStatistic | None:
    return OrderStatistic.from_proto(getattr(message, name)) if message.HasField(name) else None


def _specificity_or_none(message: Any, name: str) -> CategorySpecificity | None:
    if not message.HasField(name):
        return None
    c = getattr(message, name)
    pairs = _tensor(c, "pairs", f"{name}.pairs")
    means = _tensor(c, "class_means", f"{name}.class_means")
    return CategorySpecificity(
        eta_squared=_f64(c.eta_squared),
        adjusted=_f64(c.adjusted),
        adjusted_stderr=_f64(c.adjusted_stderr),
        chance=c.chance,
        n_samples=c.n_samples,
        classes=_i64(c.classes),
        class_counts=_i64(c.class_counts),
        pairs=pairs if pairs is not None else np.zeros((0, 2), np.int64),
        class_means=means if means is not None else np.zeros((0, 0, 0)),
    )


@dataclass(frozen=True)
class AuditReport(_DictMixin):
    """A finished audit: every sample once (input order) and a summary computed from them all.

    The summary is computed client-side from the sample results, so it is the same whether the
    audit ran on one replica or many, in one go or resumed; `server_summaries` keeps what each
    stream's replica reported for the samples it saw.
    """

    model: str
    model_content_hash: str
    fingerprint: str
    config: dict[str, Any]
    n_players: int
    samples: list[SampleResult]
    summary: AuditSummary
    resumed_samples: int = 0
    server_summaries: list[AuditSummary] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """The report.json layout: headline numbers, `profile` by order, per-class, samples."""
        s = self.summary
        return {
            "model": self.model,
            "model_content_hash": self.model_content_hash,
            "fingerprint": self.fingerprint,
            "config": _jsonable(self.config),
            "n_players": self.n_players,
            "n_samples": s.n_samples,
            "n_failed": s.n_failed,
            "clean_accuracy": s.clean_accuracy,
            "robust_accuracy": s.robust_accuracy,
            "success_rate": s.success_rate,
            "resumed_samples": self.resumed_samples,
            "profile": {
                "orders": _jsonable(s.orders),
                "ratios": _jsonable(s.ratios),
                "clean_mean_abs": _jsonable(s.clean_mean_abs.mean),
                "clean_mean_abs_ci": [
                    _jsonable(s.clean_mean_abs.ci_low),
                    _jsonable(s.clean_mean_abs.ci_high),
                ],
                "adversarial_mean_abs": _jsonable(s.adversarial_mean_abs.mean),
                "adversarial_mean_abs_ci": [
                    _jsonable(s.adversarial_mean_abs.ci_low),
                    _jsonable(s.adversarial_mean_abs.ci_high),
                ],
                "delta_mean": _jsonable(s.delta_mean.mean),
                "delta_mean_ci": [_jsonable(s.delta_mean.ci_low), _jsonable(s.delta_mean.ci_high)],
                **_statistic_dict("clean_disentanglement", s.clean_disentanglement),
                **_statistic_dict("adversarial_disentanglement", s.adversarial_disentanglement),
            },
            "specificity": {
                "clean": _specificity_dict(s.clean_specificity),
                "adversarial": _specificity_dict(s.adversarial_specificity),
            },
            "per_class": _jsonable(s.per_class),
            "masking_flags": _jsonable(s.masking_flags),
            "robustness_curve": _jsonable(s.robustness_curve),
            "samples": [sample.to_dict() for sample in self.samples],
            "server_summaries": [
                {k: v for k, v in summary.to_dict().items() if k not in _PER_STREAM_LEFT_OUT}
                for summary in self.server_summaries
            ],
        }


#: What report.json leaves out of each stream's own summary (the audit's summary has them).
_PER_STREAM_LEFT_OUT = frozenset({"per_class", "clean_specificity", "adversarial_specificity"})


def _statistic_dict(key: str, statistic: OrderStatistic | None) -> dict[str, Any]:
    if statistic is None:
        return {}
    ci = [_jsonable(statistic.ci_low), _jsonable(statistic.ci_high)]
    return {key: _jsonable(statistic.mean), f"{key}_ci": ci}


def _specificity_dict(result: CategorySpecificity | None) -> dict[str, Any] | None:
    """The report.json form: scores by order, and the class patterns at the lowest order only
    (the full (classes, orders, pairs) means stay in the AuditSummary)."""
    if result is None:
        return None
    lowest = result.class_means[:, 0, :] if result.class_means.ndim == 3 else None
    return {
        "eta_squared": _jsonable(result.eta_squared),
        "adjusted": _jsonable(result.adjusted),
        "adjusted_stderr": _jsonable(result.adjusted_stderr),
        "chance": _jsonable(result.chance),
        "n_samples": result.n_samples,
        "classes": _jsonable(result.classes),
        "class_counts": _jsonable(result.class_counts),
        "pairs": _jsonable(result.pairs),
        "lowest_order_class_means": _jsonable(lowest)
        if lowest is not None and lowest.size
        else None,
    }
