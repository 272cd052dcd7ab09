"""The attack spec, result types, epsilon-ball geometry and the base classes every attack shares."""

from __future__ import annotations

import math
import numbers
from abc import ABC, abstractmethod
from collections.abc import Generator
from dataclasses import dataclass
from types import MappingProxyType
from typing import ClassVar, Literal, NamedTuple, TypeAlias, cast, get_args

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from interscope._diagnostics import ExampleChecks, Flag
from interscope_server.cancel import CancelToken
from interscope_server.errors import InvalidArgument
from interscope_server.evaluator import Evaluator
from interscope_server.layout import LAYOUTS, Layout

Norm = Literal["linf", "l2"]
#: The objective a gradient attack ascends: cross-entropy, or Croce and Hein's DLR (see `dlr`).
Loss = Literal["ce", "dlr"]
#: An attack's kind: the `kind` its class declares (the proto's AttackKind name, lower case).
AttackName: TypeAlias = str
#: One (low, high) for every element, or one per feature in flattened order.
ValueRange: TypeAlias = tuple[float, float] | tuple[tuple[float, float], ...]

NORMS: tuple[Norm, ...] = get_args(Norm)
LOSSES: tuple[Loss, ...] = get_args(Loss)
#: The DLR denominator's guard against equal top logits (Croce and Hein's 1e-12).
DLR_GUARD = 1e-12

# Limits keep one request from occupying a worker for hours; the API layer may tighten them.
MAX_STEPS = 10_000
MAX_RESTARTS = 100
MAX_QUERIES = 100_000
MAX_SEED = 2**63 - 1
#: The black-box masking check's default query budget per example (attacks/masking.py): a
#: tenth of Square's own default, enough to find the easy examples a masked gradient hides,
#: and it runs only on the examples the white-box attack left robust.
DEFAULT_CHECK_QUERIES = 100
#: Examples per batch the more-steps masking check re-attacks with twice the steps.
DEFAULT_CHECK_RERUNS = 16
MAX_CHECK_RERUNS = 4096

# Filled once, as each attack module is imported (attacks/__init__.py imports them all), by
# Attack.__init_subclass__; read-only afterwards. Class creation is the one place that knows
# every attack, so nothing else has to list them.
_ATTACK_CLASSES: dict[AttackName, type[Attack]] = {}


def attack_classes() -> MappingProxyType[AttackName, type[Attack]]:
    """Every attack class by its kind, in kind order (the registry the runner and API use)."""
    return MappingProxyType(dict(sorted(_ATTACK_CLASSES.items())))


def attack_class(name: AttackName) -> type[Attack]:
    """The class of attack `name`; InvalidArgument naming the known kinds if there is none."""
    classes = attack_classes()
    if name not in classes:
        raise InvalidArgument(f"unknown attack {name!r}; allowed: {', '.join(classes)}")
    return classes[name]


def white_box_attacks() -> tuple[AttackName, ...]:
    """Kinds that need the model's gradients (a torch module)."""
    return tuple(k for k, c in attack_classes().items() if c.white_box)


def black_box_attacks() -> tuple[AttackName, ...]:
    """Kinds that only call the evaluator (forward passes), so they work on every backend."""
    return tuple(k for k, c in attack_classes().items() if not c.white_box)


def _finite(value: object) -> bool:
    # numbers.Real admits numpy scalars too; bool is an int, but never a sensible budget.
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


def _integer(value: object) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


@dataclass(frozen=True)
class AttackSpec:
    """What to run: one attack with its budget, validated on construction.

    Conventions: inputs live in `value_range` (raw range, the model normalises inside itself);
    eps is measured in that range under `norm`. With per-feature ranges (one (low_j, high_j) per
    feature) eps, step sizes and reported norms are in units of each feature's range width
    w_j = high_j - low_j, so one eps means the same for age and income: L-inf allows
    |x'_j - x_j| <= eps * w_j, L2 allows sqrt(sum_j ((x'_j - x_j) / w_j)^2) <= eps. Fields left
    as None take the attack's default (see `resolved_steps`, `resolved_step_size`,
    `resolved_random_start`).

    Fields:
        name: an attack's kind (see `attack_classes`).
        norm: "linf" or "l2".
        eps: radius of the perturbation ball, > 0.
        steps: gradient steps per restart (white-box); fgsm allows only 1. Square ignores it.
        step_size: absolute step size; default pgd 2.5*eps/steps (Madry et al.), fgsm eps,
            pgd_margin eps/16 (the paper's 2/255 at eps 32/255), simba eps (linf) or eps/2
            (l2) per coordinate. apgd and square set their own and reject an explicit one.
        random_start: start from a random point in the ball (default: pgd, apgd yes; fgsm,
            pgd_margin no).
        restarts: independent runs (white-box only; square takes 1); each later run attacks
            only the examples not yet done, and the best run per example is kept.
        targeted: aim at `target_classes` instead of away from the label.
        target_classes: one class for every example, or one per example (in input order);
            required when targeted, forbidden otherwise.
        margin_threshold: pgd_margin stops an example once max_{c!=y} z_c - z_y >= this.
        margin_tolerance: pgd_margin rejects (and halves the step of) any step that overshoots
            the threshold by more than this, so kept examples end in [threshold, threshold+tol].
        query_budget: square's and simba's per-example forward-pass budget, including the
            first query.
        p_init: square's initial fraction of the input changed by one square.
        seed: makes every random choice reproducible.
        value_range: (low, high) valid input range, or one (low, high) per feature (flattened
            order); every result lies inside it.
        integer_inputs: the model reads its inputs rounded to integers (UINT8): the attack
            runs in float, then each adversarial example is moved onto the integer grid inside
            the ball (see `attacks.runner.on_integer_grid`) and its scores re-checked there.
        layout: how one example's axes are laid out (NCHW, NHWC, features); square's windows
            follow it.
        check_queries: white-box attacks only: the query budget of the black-box (Square)
            gradient-masking check on each example left robust; 0 turns that check off.
        check_reruns: white-box attacks only: how many examples left robust, per batch, the
            more-steps check re-attacks with twice the steps; 0 turns it off.
        loss: the objective of attacks that offer a choice (apgd: "ce" or "dlr"); None takes
            the attack's default (apgd: ce). DLR needs 3 classes, targeted DLR 4.
    """

    name: AttackName
    norm: Norm = "linf"
    eps: float = 8 / 255
    steps: int | None = None
    step_size: float | None = None
    random_start: bool | None = None
    restarts: int = 1
    targeted: bool = False
    target_classes: tuple[int, ...] = ()
    margin_threshold: float = 8.0
    margin_tolerance: float = 0.5
    query_budget: int = 1000
    p_init: float = 0.8
    seed: int = 0
    value_range: ValueRange = (0.0, 1.0)
    integer_inputs: bool = False
    layout: Layout = "NCHW"
    check_queries: int = DEFAULT_CHECK_QUERIES
    check_reruns: int = DEFAULT_CHECK_RERUNS
    loss: Loss | None = None

    @property
    def per_feature(self) -> bool:
        """Whether value_range gives one (low, high) per feature."""
        return len(self.value_range) > 0 and not isinstance(self.value_range[0], numbers.Real)

    def _check_range(self) -> float:
        """Validate value_range; the largest L-inf eps it allows."""
        pairs = cast(
            tuple[tuple[float, float], ...],
            self.value_range if self.per_feature else (self.value_range,),
        )
        for pair in pairs:
            if not isinstance(pair, tuple | list) or len(pair) != 2:
                raise InvalidArgument(
                    f"value_range must be (low, high) or one (low, high) per feature, got "
                    f"{self.value_range!r}"
                )
            if not all(_finite(v) for v in pair):
                raise InvalidArgument(
                    f"value_range must be two finite numbers (low, high), got {pair!r}"
                )
            low, high = pair
            if not low < high:
                raise InvalidArgument(f"value_range needs low < high, got ({low}, {high})")
        if self.per_feature:
            return 1.0  # eps is in units of each feature's range width
        low, high = scalar_range(self.value_range)
        return float(high - low)

    def __post_init__(self) -> None:
        attack = attack_class(self.name)
        self._check_ball()
        self._check_budget()
        self._check_goal()
        self._check_for(attack)

    def _check_ball(self) -> None:
        """Norm, layout, value range and eps: the feasible set every attack searches."""
        if self.norm not in NORMS:
            raise InvalidArgument(f"unknown norm {self.norm!r}; allowed: {', '.join(NORMS)}")
        if self.layout not in LAYOUTS:
            raise InvalidArgument(f"unknown layout {self.layout!r}; allowed: {', '.join(LAYOUTS)}")
        if len(self.value_range) == 0:
            raise InvalidArgument("value_range is empty; give (low, high) or one per feature")
        width = self._check_range()
        if self.integer_inputs and self.per_feature:
            raise InvalidArgument(
                "integer (UINT8) inputs take one value_range for every element, not one per feature"
            )
        if not _finite(self.eps) or self.eps <= 0:
            raise InvalidArgument(f"eps must be a finite number > 0, got {self.eps!r}")
        if self.norm == "linf" and self.eps > width:
            allowed = (
                "0 < eps <= 1 (eps is in units of each feature's range width)"
                if self.per_feature
                else "0 < eps <= high - low"
            )
            raise InvalidArgument(
                f"linf eps {self.eps} exceeds the width of value_range ({width}); "
                f"allowed: {allowed}"
            )

    def _check_budget(self) -> None:
        """Steps, step size, restarts, queries, p_init and seed: how much work and which."""
        if self.steps is not None:
            if not _integer(self.steps):
                raise InvalidArgument(f"steps must be an integer, got {self.steps!r}")
            if not 1 <= self.steps <= MAX_STEPS:
                raise InvalidArgument(f"steps must be in 1..{MAX_STEPS}, got {self.steps}")
        if self.step_size is not None and (not _finite(self.step_size) or self.step_size <= 0):
            raise InvalidArgument(f"step_size must be a finite number > 0, got {self.step_size!r}")
        if not _integer(self.restarts):
            raise InvalidArgument(f"restarts must be an integer, got {self.restarts!r}")
        if not 1 <= self.restarts <= MAX_RESTARTS:
            raise InvalidArgument(f"restarts must be in 1..{MAX_RESTARTS}, got {self.restarts}")
        if not _integer(self.query_budget):
            raise InvalidArgument(f"query_budget must be an integer, got {self.query_budget!r}")
        if not 1 <= self.query_budget <= MAX_QUERIES:
            raise InvalidArgument(
                f"query_budget must be in 1..{MAX_QUERIES}, got {self.query_budget}"
            )
        if not _finite(self.p_init) or not 0 < self.p_init <= 1:
            raise InvalidArgument(f"p_init must be in (0, 1], got {self.p_init!r}")
        if not _integer(self.check_queries) or not 0 <= self.check_queries <= MAX_QUERIES:
            raise InvalidArgument(
                f"check_queries must be an integer in 0..{MAX_QUERIES}, got {self.check_queries!r}"
            )
        if not _integer(self.check_reruns) or not 0 <= self.check_reruns <= MAX_CHECK_RERUNS:
            raise InvalidArgument(
                f"check_reruns must be an integer in 0..{MAX_CHECK_RERUNS}, "
                f"got {self.check_reruns!r}"
            )
        if not _integer(self.seed):
            raise InvalidArgument(f"seed must be an integer, got {self.seed!r}")
        if not 0 <= self.seed <= MAX_SEED:
            raise InvalidArgument(f"seed must be in 0..{MAX_SEED}, got {self.seed}")

    def _check_goal(self) -> None:
        """Targets and margin_threshold/-tolerance: what counts as done."""
        if self.targeted:
            if not self.target_classes:
                raise InvalidArgument(
                    "a targeted attack needs target_classes: one class for all examples "
                    "or one per example"
                )
        elif self.target_classes:
            raise InvalidArgument("target_classes given but targeted is false; set targeted")
        if any(not _integer(t) or t < 0 for t in self.target_classes):
            raise InvalidArgument(
                f"target_classes must be non-negative integers, got {self.target_classes!r}"
            )
        if not _finite(self.margin_threshold) or self.margin_threshold <= 0:
            raise InvalidArgument(
                f"margin_threshold must be a finite number > 0, got {self.margin_threshold!r}"
            )
        if not _finite(self.margin_tolerance) or self.margin_tolerance <= 0:
            raise InvalidArgument(
                f"margin_tolerance must be a finite number > 0, got {self.margin_tolerance!r}"
            )

    def _check_for(self, attack: type[Attack]) -> None:
        """What the attack's class declares: its norms, its own step size, its own checks."""
        if self.norm not in attack.norms:
            raise InvalidArgument(
                f"{self.name} does not support norm {self.norm!r}; allowed: "
                f"{', '.join(attack.norms)}"
            )
        if self.step_size is not None and attack.own_step_size:
            allowed = [k for k, c in attack_classes().items() if not c.own_step_size]
            raise InvalidArgument(
                f"{self.name} sets its own step size; leave step_size unset "
                f"(allowed with {', '.join(allowed)})"
            )
        if self.loss is not None:
            if self.loss not in LOSSES:
                raise InvalidArgument(f"unknown loss {self.loss!r}; allowed: {', '.join(LOSSES)}")
            if self.loss not in attack.losses:
                allowed = [k for k, c in attack_classes().items() if self.loss in c.losses]
                raise InvalidArgument(
                    f"{self.name} does not take a loss choice; leave loss unset "
                    f"(loss {self.loss!r} is allowed with {', '.join(allowed)})"
                )
        attack.check(self)

    @property
    def resolved_loss(self) -> Loss:
        """The loss the attack ascends: the spec's, or the attack's default."""
        return self.loss if self.loss is not None else attack_class(self.name).default_loss

    @property
    def white_box(self) -> bool:
        """Whether the attack needs gradients (a torch module) rather than forward passes."""
        return attack_class(self.name).white_box

    @property
    def resolved_steps(self) -> int:
        return self.steps if self.steps is not None else attack_class(self.name).default_steps

    @property
    def resolved_step_size(self) -> float:
        if self.step_size is not None:
            return self.step_size
        return attack_class(self.name).default_step_size(self)

    @property
    def resolved_random_start(self) -> bool:
        if self.random_start is not None:
            return self.random_start
        return attack_class(self.name).default_random_start


@dataclass(frozen=True)
class ExampleResult:
    """The outcome for one input.

    Conventions: margins are classification margins of the label, z_y - max_{c!=y} z_c
    (positive: classified correctly), for both clean and adversarial inputs, targeted or not.
    Success: untargeted, adversarial_prediction != label; targeted, adversarial_prediction ==
    target. Examples the attack had nothing to do for (untargeted and already misclassified, or
    targeted and already at the target) are returned unchanged with attacked=False, steps=0
    (pgd_margin attacks them all). Norms are of x_adv - x, computed in float64. steps: gradient
    steps (white-box) or iterations (square); queries: model forward passes the attack spent on this
    example (white-box: one forward-backward per step plus any final evaluation; square: every
    evaluator call row). checks: the gradient-masking checks (white-box attacks, examples attacked
    and not fooled; see attacks/masking.py), else None; check_queries: forward passes those checks
    spent.
    """

    index: int
    x_adv: np.ndarray
    label: int
    target: int | None
    success: bool
    attacked: bool
    clean_prediction: int
    adversarial_prediction: int
    clean_margin: float
    adversarial_margin: float
    linf: float
    l2: float
    l0: int
    steps: int
    queries: int
    checks: ExampleChecks | None = None
    check_queries: int = 0


@dataclass(frozen=True)
class ExampleProgress:
    """Emitted after each batch finishes."""

    examples_done: int
    examples_total: int
    batches_done: int
    batches_total: int


@dataclass(frozen=True)
class StageProgress:
    """Emitted by an attack made of stages (AUTOATTACK) as each stage starts on a batch: a
    batch of such an attack can run for minutes, longer than a progress bar may sit still."""

    stage: str  # e.g. "apgd-t target 3"
    stages_done: int  # stages already run on this batch
    stages_total: int  # stages this batch may run (it stops early once every example falls)
    first_example: int  # the batch's first input index
    examples_left: int  # the batch's examples every earlier stage failed on


#: What a staged attack yields while it runs: (stage, stages done, stages total, examples left).
Stage: TypeAlias = tuple[str, int, int, int]


@dataclass(frozen=True)
class AttackSummary:
    """Aggregates over all examples, emitted last.

    robust_accuracy counts an example as robust only if its adversarial input is still
    classified as its label, so clean-misclassified examples are never robust (AutoAttack's
    convention). success_rate = successes / attacked examples (0.0 when none were attacked).
    Mean norms are over attacked examples (0.0 when none).
    """

    n_examples: int
    n_clean_correct: int
    n_robust: int
    n_attacked: int
    n_success: int
    clean_accuracy: float
    robust_accuracy: float
    success_rate: float
    mean_linf: float
    mean_l2: float
    mean_l0: float
    total_steps: int
    total_queries: int
    #: Gradient-masking flags raised over the examples' checks (interscope._diagnostics).
    masking_flags: tuple[Flag, ...] = ()
    #: Forward passes the masking checks spent (not in total_queries).
    check_queries: int = 0


AttackEvent: TypeAlias = ExampleProgress | StageProgress | ExampleResult | AttackSummary


def dlr(logits: Tensor, labels: Tensor, targets: Tensor | None = None) -> Tensor:
    """(B,) Croce and Hein's difference-of-logits-ratio loss, to ascend (arXiv 2003.01690).

    With z sorted descending as z_pi1 >= z_pi2 >= ..., untargeted:
        -(z_y - max_{i != y} z_i) / (z_pi1 - z_pi3 + 1e-12),
    targeted at t:
        -(z_y - z_t) / (z_pi1 - (z_pi3 + z_pi4) / 2 + 1e-12).
    The ratio does not change when the logits are shifted or scaled, so a saturated softmax
    cannot flatten it the way it flattens cross-entropy. Needs K >= 3 (targeted K >= 4).
    """
    top = logits.topk(3 if targets is None else 4, dim=1).values
    own = logits.gather(1, labels[:, None])[:, 0]
    if targets is None:
        return -label_margin(logits, labels) / (top[:, 0] - top[:, 2] + DLR_GUARD)
    other = logits.gather(1, targets[:, None])[:, 0]
    return -(own - other) / (top[:, 0] - (top[:, 2] + top[:, 3]) / 2 + DLR_GUARD)


def min_classes(loss: Loss, targeted: bool) -> int:
    """The fewest classes `loss` is defined for: DLR reads the 3rd (targeted: 4th) logit."""
    if loss == "dlr":
        return 4 if targeted else 3
    return 2


def label_margin(logits: Tensor, labels: Tensor) -> Tensor:
    """z_y - max_{c != y} z_c per row (B,), the label's classification margin."""
    own = logits.gather(1, labels[:, None])[:, 0]
    others = logits.scatter(1, labels[:, None], float("-inf")).amax(dim=1)
    return own - others


@dataclass(frozen=True)
class Goal:
    """What counts as success for a batch: labels (B,) and, when targeted, targets (B,)."""

    labels: Tensor
    targets: Tensor | None
    #: Targets only steer the loss: any wrong class counts as success (AutoAttack's APGD-T and
    #: FAB-T, whose targets are a search strategy for an untargeted goal).
    any_wrong_class: bool = False

    def subset(self, index: Tensor) -> Goal:
        targets = None if self.targets is None else self.targets[index]
        return Goal(self.labels[index], targets, self.any_wrong_class)

    def success(self, logits: Tensor) -> Tensor:
        """(B,) bool: untargeted, argmax != label; targeted, argmax == target."""
        pred = logits.argmax(dim=1)
        if self.targets is None or self.any_wrong_class:
            return pred != self.labels
        return pred == self.targets

    def objective(self, logits: Tensor, loss: Loss) -> Tensor:
        """(B,) loss to ascend: `ce_objective` or DLR (targeted DLR when there are targets)."""
        if loss == "dlr":
            return dlr(logits, self.labels, self.targets)
        return self.ce_objective(logits)

    def ce_objective(self, logits: Tensor) -> Tensor:
        """(B,) loss to ascend: CE of the label (untargeted) or minus CE of the target."""
        if self.targets is None:
            return F.cross_entropy(logits, self.labels, reduction="none")
        return -F.cross_entropy(logits, self.targets, reduction="none")

    def margin_objective(self, logits: Tensor) -> Tensor:
        """(B,) margin to descend: z_y - max_other, or max_{c!=t} z_c - z_t when targeted."""
        if self.targets is None:
            return label_margin(logits, self.labels)
        return -label_margin(logits, self.targets)


def _round_inward(value: float, up: bool) -> float:
    """The float32 nearest `value` on its inner side, so a float32 clamp never leaves the range."""
    v32 = np.float32(value)
    if up and float(v32) < value:
        v32 = np.nextafter(v32, np.float32(np.inf))
    if not up and float(v32) > value:
        v32 = np.nextafter(v32, np.float32(-np.inf))
    return float(v32)


def scalar_range(value_range: ValueRange) -> tuple[float, float]:
    """The (low, high) of a range that is not per feature."""
    return cast(tuple[float, float], value_range)


def _clamp(t: Tensor, low: Tensor | float | None, high: Tensor | float | None) -> Tensor:
    # torch.clamp takes scalars or tensors, but its stubs want both bounds of one kind.
    if low is not None:
        t = torch.maximum(t, low) if isinstance(low, Tensor) else t.clamp_min(low)
    if high is not None:
        t = torch.minimum(t, high) if isinstance(high, Tensor) else t.clamp_max(high)
    return t


class Ball:
    """The feasible set {x': ||x' - x|| <= eps, low <= x' <= high} around a float32 batch x.

    `value_range` is one (low, high) for every element or one per feature (flattened order).
    With per-feature ranges the norm is measured in units of each feature's range width w
    (`scale`): L-inf |x'_j - x_j| <= eps * w_j, L2 ||(x' - x) / w||_2 <= eps.

    Projections hold in exact arithmetic: checking the result in float64 (where differences of
    float32 numbers are exact) finds no entry outside the range and no norm above eps. Rounding
    in float32 would otherwise leave x' - x a few ulps past eps, hence the directed rounding.
    """

    def __init__(self, x: Tensor, norm: Norm, eps: float, value_range: ValueRange) -> None:
        self.x = x
        self.norm = norm
        self.eps = eps
        #: float64 per-element range widths (per-feature ranges), else None (raw units).
        self.scale: Tensor | None = None
        self.low: Tensor | float
        self.high: Tensor | float
        if len(value_range) > 0 and not isinstance(value_range[0], numbers.Real):
            shape = tuple(x.shape[1:])
            pairs = np.asarray(value_range, dtype=np.float64)
            if pairs.shape != (math.prod(shape), 2):
                raise InvalidArgument(
                    f"{len(value_range)} per-feature ranges do not fit inputs of shape "
                    f"{list(shape)} ({math.prod(shape)} features)"
                )
            lows = np.array([_round_inward(v, up=True) for v in pairs[:, 0]], dtype=np.float32)
            highs = np.array([_round_inward(v, up=False) for v in pairs[:, 1]], dtype=np.float32)
            self.low = torch.from_numpy(lows.reshape(shape)).to(x.device)
            self.high = torch.from_numpy(highs.reshape(shape)).to(x.device)
            self.scale = torch.from_numpy((pairs[:, 1] - pairs[:, 0]).reshape(shape)).to(x.device)
        else:
            low, high = scalar_range(value_range)
            self.low = _round_inward(float(low), up=True)
            self.high = _round_inward(float(high), up=False)
        if norm == "linf":
            x64 = x.double()
            radius = eps if self.scale is None else eps * self.scale
            lo = (x64 - radius).float()
            lo = torch.where(lo.double() - x64 < -radius, torch.nextafter(lo, lo + 1), lo)
            hi = (x64 + radius).float()
            hi = torch.where(hi.double() - x64 > radius, torch.nextafter(hi, hi - 1), hi)
            self.lo = _clamp(lo, self.low, None)
            self.hi = _clamp(hi, None, self.high)

    @property
    def unit(self) -> Tensor | float:
        """float32 per-element size of one eps unit: the range widths, or 1.0 (raw units)."""
        return 1.0 if self.scale is None else self.scale.float()

    def subset(self, index: Tensor) -> Ball:
        """The same ball restricted to rows `index` (bounds are sliced, not recomputed)."""
        sub = Ball.__new__(Ball)
        sub.x, sub.norm, sub.eps, sub.low, sub.high, sub.scale = (
            self.x[index],
            self.norm,
            self.eps,
            self.low,
            self.high,
            self.scale,
        )
        if self.norm == "linf":
            sub.lo, sub.hi = self.lo[index], self.hi[index]
        return sub

    def norms(self, delta: Tensor) -> Tensor:
        """float64 per-row norm of `delta` under the ball's norm, in eps units."""
        d = delta.double()
        if self.scale is not None:
            d = d / self.scale
        flat = d.flatten(1)
        return flat.abs().amax(dim=1) if self.norm == "linf" else flat.norm(dim=1)

    def project(self, x_adv: Tensor, index: Tensor | None = None) -> Tensor:
        """Nearest-ish feasible point to x_adv (rows of self.x picked by index, default all)."""
        x = self.x if index is None else self.x[index]
        if self.norm == "linf":
            lo = self.lo if index is None else self.lo[index]
            hi = self.hi if index is None else self.hi[index]
            return torch.maximum(torch.minimum(x_adv, hi), lo)
        delta = x_adv - x
        norms = self.norms(delta)
        scale = torch.where(norms > self.eps, self.eps / norms.clamp_min(1e-30), 1.0)
        return self._fit_l2(x, delta, scale)

    def _fit_l2(self, x: Tensor, delta: Tensor, scale: Tensor) -> Tensor:
        # Clamping to the range moves every entry towards x (x is in range), so it only shrinks
        # the norm; float32 rounding can still add ~1e-7 relative, so shrink until it verifies.
        shape = (-1,) + (1,) * (x.dim() - 1)
        out = x
        for attempt in range(8):
            moved = x + delta * scale.float().view(shape)
            out = _clamp(moved, self.low, self.high)
            over = self.norms(out.double() - x.double()) > self.eps
            if not bool(over.any()):
                return out
            scale = torch.where(over, scale * (1 - 1e-6 * 4**attempt), scale)
        # Unreachable in practice; the clean input is always feasible.
        return torch.where(over.view(shape), x, out)

    def random_start(self, generator: torch.Generator) -> Tensor:
        """A random feasible point: uniform in the linf cube, or random direction and radius."""
        shape = self.x.shape
        if self.norm == "linf":
            noise = torch.rand(shape, generator=generator).mul_(2).sub_(1).mul_(self.eps)
            return self.project(self.x + noise.to(self.x.device) * self.unit)
        direction = torch.randn(shape, generator=generator)
        norms = direction.flatten(1).norm(dim=1).clamp_min(1e-12)
        radius = torch.rand(shape[0], generator=generator) * self.eps
        noise = direction * (radius / norms).view((-1,) + (1,) * (len(shape) - 1))
        return self.project(self.x + noise.to(self.x.device) * self.unit)

    def step(self, x_adv: Tensor, grad: Tensor, size: Tensor | float, index: Tensor) -> Tensor:
        """Ascent step of `size` (scalar or per row) in eps units: sign(grad) (linf) or the
        steepest direction of unit norm (l2), scaled per feature by the range widths."""
        shape = (-1,) + (1,) * (x_adv.dim() - 1)
        size_t = size.view(shape) if isinstance(size, Tensor) else size
        unit = self.unit
        if self.norm == "linf":
            direction = grad.sign() * unit
        else:
            # In the unit coordinates u = x / w the gradient is g * w; a unit step there is w
            # times that step in x.
            g = grad * unit
            direction = g / g.flatten(1).norm(dim=1).clamp_min(1e-12).view(shape) * unit
        return self.project(x_adv + size_t * direction, index)


class BatchOutcome(NamedTuple):
    """One batch's result: adversarial inputs (B, *shape), their logits (B, K), steps and
    forward passes per example (B,), done flags (B,) and a score where higher is a better attack
    (used to keep the best restart among examples not done)."""

    x_adv: Tensor
    logits: Tensor
    steps: Tensor
    queries: Tensor
    done: Tensor
    score: Tensor


class Attack(ABC):
    """Common base: holds the validated spec. Subclasses are WhiteBoxAttack or BlackBoxAttack.

    A concrete attack declares itself: `kind` (its AttackKind name in lower case, e.g. "pgd"
    for ATTACK_KIND_PGD), the `norms` it supports, its defaults and its own spec checks
    (`check`). Declaring `kind` registers the class; the runner, the API's enum table and the
    white-/black-box lists are all read from that registry.
    """

    #: The attack's name in AttackSpec and, upper-cased after "ATTACK_KIND_", in the proto.
    kind: ClassVar[AttackName]
    white_box: ClassVar[bool]
    #: Norms the attack supports.
    norms: ClassVar[tuple[Norm, ...]] = NORMS
    #: Steps per restart when the spec leaves `steps` unset (0: the attack does not step).
    default_steps: ClassVar[int] = 0
    #: Whether the step count is the attack's own (fgsm: one), so the wire's `steps` is ignored.
    fixed_steps: ClassVar[bool] = False
    #: Whether the gradient-masking checks may add their black-box and more-steps runs
    #: (attacks/masking.py); an ensemble that holds a black-box attack already opts out.
    extra_checks: ClassVar[bool] = True
    #: Whether to start from a random point when the spec leaves `random_start` unset.
    default_random_start: ClassVar[bool] = False
    #: Whether the attack sets its own step size (schedule or search), so the spec may not.
    own_step_size: ClassVar[bool] = False
    #: The query budget the wire's query_budget 0 stands for.
    default_queries: ClassVar[int] = 1000
    #: Losses the spec may choose between (empty: the attack has its own objective).
    losses: ClassVar[tuple[Loss, ...]] = ()
    #: The loss when the spec leaves it unset.
    default_loss: ClassVar[Loss] = "ce"
    #: Whether examples that already meet the goal are attacked too (pgd_margin's stop is a
    #: margin, not success); otherwise the runner passes on only examples still to fool.
    attacks_all: ClassVar[bool] = False
    #: Examples the runner attacks together (its default batch): each step or query of an
    #: attack is one pass over the whole batch, so this sets how many passes a call makes.
    batch_size: ClassVar[int] = 64

    def __init_subclass__(cls, **kwargs: object) -> None:
        super().__init_subclass__(**kwargs)
        # Only classes that name themselves register; WhiteBoxAttack and BlackBoxAttack do not.
        if "kind" in cls.__dict__:
            if cls.kind in _ATTACK_CLASSES:
                raise TypeError(f"two attack classes declare kind {cls.kind!r}")
            _ATTACK_CLASSES[cls.kind] = cls

    def __init__(self, spec: AttackSpec) -> None:
        self.spec = spec

    @classmethod
    def default_step_size(cls, spec: AttackSpec) -> float:
        """The step size when the spec leaves it unset; attacks with a schedule ignore it."""
        return 2 * spec.eps

    @classmethod  # noqa: B027 - optional hook
    def check(cls, spec: AttackSpec) -> None:
        """The attack's own checks on a spec that passed the common ones (InvalidArgument)."""

    def prepare(self, input_shape: tuple[int, ...]) -> None:  # noqa: B027 - optional hook
        """Check the input shape suits the attack; raise InvalidArgument if not."""

    def check_classes(self, n_classes: int) -> None:
        """Check the model's class count suits the attack's loss; InvalidArgument if not."""
        loss = self.spec.resolved_loss
        need = min_classes(loss, self.spec.targeted)
        if n_classes < need:
            kind = "targeted " if self.spec.targeted else ""
            raise InvalidArgument(
                f"{self.spec.name} with the {kind}{loss} loss needs a model with at least "
                f"{need} classes, this one has {n_classes}; use loss ce"
            )

    @classmethod
    def passes_per_input(cls, spec: AttackSpec) -> tuple[int, int]:
        """Upper bound of (forward passes, input-gradient passes) the attack spends per input."""
        if cls.white_box:
            restarts = max(1, spec.restarts)
            # A clean prediction, a check per restart and the final prediction per input.
            return restarts + 2, spec.resolved_steps * restarts
        return spec.query_budget, 0


class WhiteBoxAttack(Attack):
    """An attack that follows gradients of a torch module; restarts are handled here."""

    white_box = True

    @abstractmethod
    def single_run(
        self,
        model: torch.nn.Module,
        ball: Ball,
        goal: Goal,
        cancel: CancelToken,
        generator: torch.Generator,
    ) -> BatchOutcome:
        """One run over the batch in `ball`; `done` marks examples the attack is finished with."""

    def perturb(
        self,
        model: torch.nn.Module,
        ball: Ball,
        goal: Goal,
        cancel: CancelToken,
        generator: torch.Generator,
    ) -> BatchOutcome:
        """Run `restarts` times; later runs see only examples not done; keep the best per row."""
        best = self.single_run(model, ball, goal, cancel, generator)
        for _ in range(1, self.spec.restarts):
            todo = (~best.done).nonzero()[:, 0]
            if todo.numel() == 0:
                break
            sub_ball = ball.subset(todo)
            run = self.single_run(model, sub_ball, goal.subset(todo), cancel, generator)
            better = run.done | (run.score > best.score[todo])
            rows = todo[better]
            x_adv, logits = best.x_adv.clone(), best.logits.clone()
            done, score = best.done.clone(), best.score.clone()
            x_adv[rows] = run.x_adv[better]
            logits[rows] = run.logits[better]
            done[rows] = run.done[better]
            score[rows] = run.score[better]
            steps, queries = best.steps.clone(), best.queries.clone()
            steps[todo] += run.steps
            queries[todo] += run.queries
            best = BatchOutcome(x_adv, logits, steps, queries, done, score)
        return best

    def perturb_in_stages(
        self,
        model: torch.nn.Module,
        ball: Ball,
        goal: Goal,
        cancel: CancelToken,
        generator: torch.Generator,
    ) -> Generator[Stage, None, BatchOutcome]:
        """`perturb`, yielding each stage as it starts; an attack of one stage yields none."""
        return self.perturb(model, ball, goal, cancel, generator)
        yield  # makes this a generator; an attack of one stage has nothing to yield


class BlackBoxAttack(Attack):
    """An attack that only calls the evaluator (forward passes), so any backend will do.

    It spends its whole query budget in one run, so it takes no restarts.
    """

    white_box = False
    #: A black-box attack's iteration is one forward of the batch through the model's batcher
    #: (and host process): a fixed cost per iteration that a larger batch shares among more
    #: examples. At 64, Square on 100 inputs made two sequential runs of query_budget forwards
    #: each, twice the round trips of a peer running all 100 at once.
    batch_size = 256

    @classmethod
    def check(cls, spec: AttackSpec) -> None:
        if spec.restarts != 1:
            raise InvalidArgument(
                f"{spec.name} spends its whole query budget in one run; restarts must be 1 "
                "(raise query_budget instead)"
            )

    @abstractmethod
    def perturb(
        self,
        evaluate: Evaluator,
        ball: Ball,
        goal: Goal,
        cancel: CancelToken,
        generator: torch.Generator,
    ) -> BatchOutcome:
        """Attack the batch in `ball` (a CPU tensor) with forward passes only."""


def forward_backward(
    model: torch.nn.Module, x_adv: Tensor, goal: Goal, loss: Loss = "ce"
) -> tuple[Tensor, Tensor, Tensor]:
    """Logits (B, K), per-example objective (B,) and its gradient wrt x_adv, in one pass.

    The objective is summed, not averaged, so each row's gradient does not depend on how many
    rows share the batch.
    """
    with torch.enable_grad():
        x_var = x_adv.detach().requires_grad_(True)
        logits = model(x_var)
        objective = goal.objective(logits, loss)
        (grad,) = torch.autograd.grad(objective.sum(), x_var)
    return logits.detach(), objective.detach(), grad.detach()


def forward(model: torch.nn.Module, x: Tensor) -> Tensor:
    """Logits without building a graph."""
    with torch.no_grad():
        return model(x).detach()
