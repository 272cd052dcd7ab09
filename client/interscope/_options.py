"""Profile and attack options as plain dataclasses, checked locally and turned into specs."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from interscope.codec import to_tensor
from interscope.v1 import analysis_pb2

_VALUES = {
    "log-prob": analysis_pb2.VALUE_FUNCTION_LOG_PROB,
    "log-odds": analysis_pb2.VALUE_FUNCTION_LOG_ODDS,
    "logit": analysis_pb2.VALUE_FUNCTION_LOGIT,
    "prob": analysis_pb2.VALUE_FUNCTION_PROB,
}
_CLASS_CHOICES = {
    "label": analysis_pb2.CLASS_CHOICE_LABEL,
    "target": analysis_pb2.CLASS_CHOICE_TARGET,
    "predicted": analysis_pb2.CLASS_CHOICE_PREDICTED,
}
_ESTIMATORS = {
    "auto": analysis_pb2.ESTIMATOR_KIND_AUTO,
    "exact": analysis_pb2.ESTIMATOR_KIND_EXACT,
    "sampled": analysis_pb2.ESTIMATOR_KIND_SAMPLED,
}
_PAIR_MODES = {
    "all": analysis_pb2.PAIR_MODE_ALL,
    "random": analysis_pb2.PAIR_MODE_RANDOM,
    "neighbors": analysis_pb2.PAIR_MODE_NEIGHBORS,
}
_CONTEXT_SHARINGS = {
    "auto": analysis_pb2.CONTEXT_SHARING_AUTO,
    "shared": analysis_pb2.CONTEXT_SHARING_SHARED,
    "independent": analysis_pb2.CONTEXT_SHARING_INDEPENDENT,
}
_TARGET_STATISTICS = {
    "pairs": analysis_pb2.TARGET_STATISTIC_PAIRS,
    "strength": analysis_pb2.TARGET_STATISTIC_STRENGTH,
    "signed-mean": analysis_pb2.TARGET_STATISTIC_SIGNED_MEAN,
}
# From the proto enum, so a new AttackKind reaches the SDK and the CLI's choices by itself:
# ATTACK_KIND_PGD_MARGIN -> "pgd-margin".
_ATTACKS = {
    name.removeprefix("ATTACK_KIND_").lower().replace("_", "-"): value
    for name, value in analysis_pb2.AttackKind.items()
    if value != analysis_pb2.ATTACK_KIND_UNSPECIFIED
}
_NORMS = {"linf": analysis_pb2.NORM_LINF, "l2": analysis_pb2.NORM_L2}
# From the proto enum too: LOSS_DLR -> "dlr".
_LOSSES = {
    name.removeprefix("LOSS_").lower(): value
    for name, value in analysis_pb2.Loss.items()
    if value != analysis_pb2.LOSS_UNSPECIFIED
}

#: Names accepted by the options, for CLI choices and error messages.
VALUE_FUNCTIONS = tuple(_VALUES)
CLASS_CHOICES = tuple(_CLASS_CHOICES)
ESTIMATORS = tuple(_ESTIMATORS)
PAIR_MODES = tuple(_PAIR_MODES)
CONTEXT_SHARINGS = tuple(_CONTEXT_SHARINGS)
TARGET_STATISTICS = tuple(_TARGET_STATISTICS)
ATTACKS = tuple(_ATTACKS)
NORMS = tuple(_NORMS)
LOSSES = tuple(_LOSSES)
BASELINES = ("zero", "mean", "blur")


def _pick(table: Mapping[str, Any], value: str, what: str) -> Any:
    key = value.lower().replace("_", "-")
    if key not in table:
        raise ValueError(f"unknown {what} {value!r}; use one of {', '.join(table)}")
    return table[key]


@dataclass(frozen=True)
class ProfileOptions:
    """Everything that defines an interaction profile besides the model and the inputs.

    Players: exactly one of `grid` (rows, cols), `features` (a list of index groups, or an
    empty list for one player per feature) and `mask` (integer array of player ids, -1 never
    masked). `baseline` is "zero", "mean", "blur", a float constant or an FP32 array; with
    "mean", `baseline_reference` (N, *input_shape) is the reference set whose per-channel (per
    feature, for a features layout) means are used instead of the request's inputs.
    """

    grid: tuple[int, int] | None = None
    features: Sequence[Sequence[int]] | None = None
    mask: np.ndarray | None = None
    baseline: str | float | np.ndarray = "zero"
    baseline_reference: np.ndarray | None = None
    value: str = "log-prob"
    orders: Sequence[int] | None = None
    ratios: Sequence[float] | None = None
    estimator: str = "auto"
    pairs: str | None = None
    num_pairs: int = 0
    neighbor_radius: int = 0
    contexts_per_order: int = 0
    context_sharing: str = "auto"
    target_statistic: str = "pairs"
    seed: int = 0
    return_pairs: bool = False

    @classmethod
    def coerce(cls, value: ProfileOptions | Mapping[str, Any]) -> ProfileOptions:
        """Accept the options or a dict of their fields (unknown keys: ValueError)."""
        if isinstance(value, ProfileOptions):
            return value
        return _from_mapping(cls, value)

    def to_proto(self) -> analysis_pb2.InteractionSpec:
        """The wire spec; ValueError names a bad option and what is allowed."""
        given = [k for k in ("grid", "features", "mask") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError("give exactly one of grid=(rows, cols), features= or mask=")
        players = analysis_pb2.PlayerSpec()
        if self.grid is not None:
            rows, cols = self.grid
            players.grid.rows, players.grid.cols = int(rows), int(cols)
        elif self.features is not None:
            players.features.SetInParent()
            for n, group in enumerate(self.features):
                players.features.groups.add(name=str(n), indices=[int(i) for i in group])
        else:
            mask = np.asarray(self.mask)
            if mask.dtype.kind not in "iu":
                raise ValueError("mask must be an integer array of player ids (-1: never masked)")
            players.mask.CopyFrom(to_tensor(mask.astype(np.int64)))
        if self.orders is not None and self.ratios is not None:
            raise ValueError("give orders= or ratios=, not both")
        spec = analysis_pb2.InteractionSpec(
            players=players,
            value=_pick(_VALUES, self.value, "value function"),
            estimator=_pick(_ESTIMATORS, self.estimator, "estimator"),
            sampling=analysis_pb2.SamplingSpec(
                pair_mode=(
                    _pick(_PAIR_MODES, self.pairs, "pair mode")
                    if self.pairs is not None
                    else analysis_pb2.PAIR_MODE_UNSPECIFIED
                ),
                num_pairs=int(self.num_pairs),
                neighbor_radius=int(self.neighbor_radius),
                contexts_per_order=int(self.contexts_per_order),
                context_sharing=_pick(_CONTEXT_SHARINGS, self.context_sharing, "context sharing"),
                target_statistic=_pick(
                    _TARGET_STATISTICS, self.target_statistic, "target statistic"
                ),
            ),
            seed=int(self.seed),
            return_pairs=bool(self.return_pairs),
        )
        if self.orders is not None:
            spec.orders.orders.extend(int(m) for m in self.orders)
        if self.ratios is not None:
            spec.orders.ratios.extend(float(r) for r in self.ratios)
        baseline = self.baseline
        if self.baseline_reference is not None and not (
            isinstance(baseline, str) and baseline == "mean"
        ):
            raise ValueError('baseline_reference needs baseline="mean"')
        if isinstance(baseline, str):
            if baseline == "zero":
                spec.baseline.zero = True
            elif baseline == "mean":
                spec.baseline.mean.SetInParent()
                if self.baseline_reference is not None:
                    reference = np.asarray(self.baseline_reference, dtype=np.float32)
                    spec.baseline.mean.reference.CopyFrom(to_tensor(reference))
            elif baseline == "blur":
                spec.baseline.blur.SetInParent()
            else:
                raise ValueError(
                    f"unknown baseline {baseline!r}; use zero, mean, blur, a number or an array"
                )
        elif isinstance(baseline, (int, float)):
            spec.baseline.constant = float(baseline)
        else:
            spec.baseline.tensor.CopyFrom(to_tensor(np.asarray(baseline, dtype=np.float32)))
        return spec


@dataclass(frozen=True)
class AttackOptions:
    """An adversarial attack: kind (`attack`, one of ATTACKS: the proto's AttackKind names in
    lower case with dashes, e.g. "pgd", "pgd-margin", "square"), norm, budget.

    Zeros mean the server's defaults (steps 10, step size 2.5 * eps / steps, one restart,
    margin threshold 8, query budget 1000, autoattack's 5000); random_start None means the
    attack's own default (PGD and APGD start at a random point, FGSM and PGD-margin at the
    input); loss None means the attack's own objective (LOSSES: "ce", "dlr"; apgd only).
    """

    attack: str = "pgd"
    norm: str = "linf"
    eps: float = 8 / 255
    steps: int = 0
    step_size: float = 0.0
    random_start: bool | None = None
    restarts: int = 0
    targeted: bool = False
    margin_threshold: float = 0.0
    query_budget: int = 0
    seed: int = 0
    #: Gradient-masking checks of white-box attacks: Square queries per example left robust
    #: and examples per batch re-run with twice the steps; 0 turns one off, None: the server's
    #: default (100 and 16).
    check_queries: int | None = None
    check_reruns: int | None = None
    loss: str | None = None

    @classmethod
    def coerce(cls, value: AttackOptions | Mapping[str, Any]) -> AttackOptions:
        """Accept the options or a dict of their fields (unknown keys: ValueError)."""
        if isinstance(value, AttackOptions):
            return value
        return _from_mapping(cls, value)

    def to_proto(self) -> analysis_pb2.AttackSpec:
        if not self.eps > 0:
            raise ValueError(f"eps must be > 0, got {self.eps}")
        spec = analysis_pb2.AttackSpec(
            kind=_pick(_ATTACKS, self.attack, "attack"),
            norm=_pick(_NORMS, self.norm, "norm"),
            eps=float(self.eps),
            steps=int(self.steps),
            step_size=float(self.step_size),
            restarts=int(self.restarts),
            targeted=bool(self.targeted),
            margin_threshold=float(self.margin_threshold),
            query_budget=int(self.query_budget),
            seed=int(self.seed),
        )
        if self.random_start is not None:
            spec.random_start = bool(self.random_start)
        if self.check_queries is not None:
            spec.check_queries = int(self.check_queries)
        if self.check_reruns is not None:
            spec.check_reruns = int(self.check_reruns)
        if self.loss is not None:
            spec.loss = _pick(_LOSSES, self.loss, "loss")
        return spec


def _from_mapping(cls: Any, value: Mapping[str, Any]) -> Any:
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(value) - names)
    if unknown:
        raise ValueError(f"unknown {cls.__name__} fields {unknown}; allowed: {sorted(names)}")
    return cls(**dict(value))
