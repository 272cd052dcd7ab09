"""Runs one attack over many inputs in batches, streaming progress, results and a summary."""

from __future__ import annotations

import itertools
import math
from collections.abc import Generator, Iterator
from dataclasses import dataclass, replace

import numpy as np
import torch
from torch import Tensor

from interscope._diagnostics import ExampleChecks, diagnose
from interscope_server.attacks.base import (
    Attack,
    AttackEvent,
    AttackSpec,
    AttackSummary,
    Ball,
    BatchOutcome,
    BlackBoxAttack,
    Evaluator,
    ExampleProgress,
    ExampleResult,
    Goal,
    Stage,
    StageProgress,
    WhiteBoxAttack,
    attack_class,
    black_box_attacks,
    forward,
    label_margin,
    scalar_range,
)
from interscope_server.attacks.masking import BatchChecks, check_batch
from interscope_server.attacks.square import evaluate_tensor
from interscope_server.cancel import CancelToken
from interscope_server.errors import FailedPrecondition, InvalidArgument

MAX_BATCH_SIZE = 4096
#: Mixed into a batch's seed for the masking checks' random stream.
_CHECK_SALT = 0x5EED_C4EC


def build_attack(spec: AttackSpec) -> Attack:
    """The attack object for a validated spec: an instance of the class that declares its kind."""
    return attack_class(spec.name)(spec)


@dataclass(frozen=True)
class AttackReport:
    """Everything `run_attack` produced: per-example results in input order and the summary."""

    results: tuple[ExampleResult, ...]
    summary: AttackSummary

    @property
    def x_adv(self) -> np.ndarray:
        """Adversarial inputs stacked, (B, *input_shape) float32."""
        return np.stack([r.x_adv for r in self.results])


def run_attack(
    spec: AttackSpec,
    x: np.ndarray,
    y: np.ndarray,
    model: torch.nn.Module | None,
    evaluate: Evaluator | None,
    cancel: CancelToken | None = None,
    batch_size: int | None = None,
) -> AttackReport:
    """One-shot form of `attack_events`: run to the end and collect the results."""
    results: list[ExampleResult] = []
    summary: AttackSummary | None = None
    for event in attack_events(spec, x, y, model, evaluate, cancel, batch_size):
        if isinstance(event, ExampleResult):
            results.append(event)
        elif isinstance(event, AttackSummary):
            summary = event
    assert summary is not None
    return AttackReport(tuple(results), summary)


def attack_events(
    spec: AttackSpec,
    x: np.ndarray,
    y: np.ndarray,
    model: torch.nn.Module | None,
    evaluate: Evaluator | None,
    cancel: CancelToken | None = None,
    batch_size: int | None = None,
) -> Iterator[AttackEvent]:
    """Attack x (B, *input_shape) with labels y (B,), batch by batch.

    Yields, per batch, a StageProgress as each stage of a staged attack (AUTOATTACK) starts, one
    ExampleResult per input (in input order) and then an ExampleProgress; the
    AttackSummary comes last. White-box attacks use `model` (a torch module in eval mode mapping
    raw-range inputs to logits; None when the backend has no gradients); black-box attacks use
    only `evaluate`. Clean predictions come from the same model the attack uses; that clean
    pass is not counted in `queries`. Meant to run on a worker thread: it blocks on the model,
    and `cancel.check()` runs before every forward pass, so a cancelled request stops at the
    next step. Deterministic given spec.seed and batch_size (None: the attack's own,
    `Attack.batch_size`: 64 white-box, 256 black-box).
    """
    token = cancel if cancel is not None else CancelToken()
    if batch_size is None:
        batch_size = attack_class(spec.name).batch_size
    x32, labels, targets = _validate(spec, x, y, batch_size)
    attack = build_attack(spec)
    if isinstance(attack, WhiteBoxAttack) and model is None:
        raise FailedPrecondition(
            f"attack {spec.name!r} needs gradients, but this model's backend provides none; "
            f"attacks that need only forward passes work: {', '.join(black_box_attacks())}"
        )
    if isinstance(attack, BlackBoxAttack) and evaluate is None:
        raise FailedPrecondition(f"attack {spec.name!r} needs the model's evaluator")
    attack.prepare(tuple(x32.shape[1:]))
    device = _device(model) if isinstance(attack, WhiteBoxAttack) else torch.device("cpu")

    n = x32.shape[0]
    batches = (n + batch_size - 1) // batch_size
    totals = _Totals()
    for b in range(batches):
        token.check()
        lo, hi = b * batch_size, min((b + 1) * batch_size, n)
        xb = torch.from_numpy(x32[lo:hi]).to(device)
        goal = Goal(
            torch.from_numpy(labels[lo:hi]).to(device),
            None if targets is None else torch.from_numpy(targets[lo:hi]).to(device),
        )
        if isinstance(attack, WhiteBoxAttack):
            assert model is not None
            clean = forward(model, xb)
        else:
            assert evaluate is not None
            clean = evaluate_tensor(evaluate, xb, tuple(xb.shape[1:]))
        if b == 0:
            _check_classes(clean.shape[1], labels, targets)
            attack.check_classes(clean.shape[1])
        todo = (
            torch.arange(hi - lo, device=device)
            if attack.attacks_all
            else (~goal.success(clean)).nonzero()[:, 0]
        )
        x_adv, adv = xb.clone(), clean.clone()
        steps = torch.zeros(hi - lo, dtype=torch.long)
        queries = torch.zeros(hi - lo, dtype=torch.long)
        if todo.numel() > 0:
            ball = Ball(xb[todo], spec.norm, spec.eps, spec.value_range)
            generator = torch.Generator().manual_seed(_batch_seed(spec.seed, b))
            if isinstance(attack, WhiteBoxAttack):
                assert model is not None
                stages = attack.perturb_in_stages(model, ball, goal.subset(todo), token, generator)
                out = yield from _stage_progress(stages, lo)
            else:
                assert isinstance(attack, BlackBoxAttack) and evaluate is not None
                out = attack.perturb(evaluate, ball, goal.subset(todo), token, generator)
            found, scores, spent = out.x_adv, out.logits, out.queries.cpu()
            if spec.integer_inputs:
                # The model sees rounded inputs: what counts is the example on the grid.
                found = on_integer_grid(xb[todo], found, spec)
                if isinstance(attack, WhiteBoxAttack):
                    assert model is not None
                    scores = forward(model, found)
                else:
                    assert evaluate is not None
                    scores = evaluate_tensor(evaluate, found, tuple(xb.shape[1:]))
                spent = spent + 1
            x_adv[todo] = found
            adv[todo] = scores
            steps[todo.cpu()] = out.steps.cpu()
            queries[todo.cpu()] = spent
        attacked = torch.zeros(hi - lo, dtype=torch.bool)
        attacked[todo.cpu()] = True
        checks: BatchChecks | None = None
        if isinstance(attack, WhiteBoxAttack) and todo.numel() > 0:
            assert model is not None
            # A stream of its own, so the checks leave the attack's results as they were.
            generator = torch.Generator().manual_seed(_batch_seed(spec.seed, b) ^ _CHECK_SALT)
            checks = check_batch(spec, model, xb, clean, adv, goal, attacked, token, generator)
        unit = ball_unit(spec)
        for i, result in enumerate(
            _results(lo, xb, x_adv, clean, adv, goal, attacked, steps, queries, unit)
        ):
            if checks is not None:
                result = replace(
                    result, checks=checks.checks[i], check_queries=int(checks.queries[i])
                )
            totals.add(result)
            yield result
        yield ExampleProgress(hi, n, b + 1, batches)
    yield totals.summary()


def _stage_progress(
    stages: Generator[Stage, None, BatchOutcome], first_example: int
) -> Generator[StageProgress, None, BatchOutcome]:
    """A staged attack's stages as StageProgress events; returns what the attack returned."""
    while True:
        try:
            name, done, total, left = next(stages)
        except StopIteration as finished:
            return finished.value
        yield StageProgress(name, done, total, first_example, left)


def on_integer_grid(x: Tensor, x_adv: Tensor, spec: AttackSpec) -> Tensor:
    """x_adv moved onto the integer grid without leaving the eps-ball or the value range.

    L-inf: each coordinate rounds to the nearest integer, clipped to [ceil(x - eps),
    floor(x + eps)] (x is itself on the grid, so the interval holds an integer). L2: each
    coordinate of delta rounds toward zero, which can only shrink the norm.
    """
    low, high = scalar_range(spec.value_range)
    if spec.norm == "linf":
        lo = torch.clamp(torch.ceil(x - spec.eps), min=math.ceil(low))
        hi = torch.clamp(torch.floor(x + spec.eps), max=math.floor(high))
        return torch.minimum(torch.maximum(torch.round(x_adv), lo), hi)
    grid = x + torch.trunc(x_adv - x)
    return torch.clamp(grid, math.ceil(low), math.floor(high))


def _validate(
    spec: AttackSpec, x: np.ndarray, y: np.ndarray, batch_size: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    if isinstance(batch_size, bool) or not isinstance(batch_size, int):
        raise InvalidArgument(f"batch_size must be an integer, got {batch_size!r}")
    if not 1 <= batch_size <= MAX_BATCH_SIZE:
        raise InvalidArgument(f"batch_size must be in 1..{MAX_BATCH_SIZE}, got {batch_size}")
    x = np.asarray(x)
    y = np.asarray(y)
    if x.dtype.kind != "f" or x.ndim < 2 or x.shape[0] == 0:
        raise InvalidArgument(
            f"inputs must be a non-empty float array (B, *input_shape), got {x.dtype} {x.shape}"
        )
    if y.dtype.kind not in "iu" or y.shape != (x.shape[0],):
        raise InvalidArgument(
            f"labels must be integers of shape ({x.shape[0]},), got {y.dtype} {y.shape}"
        )
    x32 = np.ascontiguousarray(x, dtype=np.float32)
    if not np.isfinite(x32).all():
        raise InvalidArgument("inputs contain NaN or infinity; allowed: finite values")
    if spec.per_feature:
        pairs = np.asarray(spec.value_range, dtype=np.float64)
        flat = x32.reshape(x32.shape[0], -1)
        if pairs.shape[0] != flat.shape[1]:
            raise InvalidArgument(
                f"{pairs.shape[0]} per-feature value ranges for inputs of {flat.shape[1]} features"
            )
        outside = np.flatnonzero(((flat < pairs[:, 0]) | (flat > pairs[:, 1])).any(axis=0))
        if outside.size:
            j = int(outside[0])
            raise InvalidArgument(
                f"feature {j} of the inputs spans [{flat[:, j].min()}, {flat[:, j].max()}], "
                f"outside its value range [{pairs[j, 0]}, {pairs[j, 1]}]"
            )
    else:
        low, high = scalar_range(spec.value_range)
        x_min, x_max = float(x32.min()), float(x32.max())
        if x_min < low or x_max > high:
            raise InvalidArgument(
                f"inputs span [{x_min}, {x_max}] (as float32), outside value_range [{low}, {high}]"
            )
    if spec.integer_inputs and not np.array_equal(x32, np.rint(x32)):
        raise InvalidArgument(
            "this model takes integer (UINT8) inputs: send inputs whose values are integers"
        )
    labels = y.astype(np.int64)
    if (labels < 0).any():
        raise InvalidArgument("labels must be non-negative class indices")
    targets: np.ndarray | None = None
    if spec.targeted:
        if len(spec.target_classes) == 1:
            targets = np.full(x.shape[0], spec.target_classes[0], dtype=np.int64)
        elif len(spec.target_classes) == x.shape[0]:
            targets = np.asarray(spec.target_classes, dtype=np.int64)
        else:
            raise InvalidArgument(
                f"target_classes has {len(spec.target_classes)} entries for {x.shape[0]} "
                "inputs; allowed: 1 (same target for all) or one per input"
            )
        same = np.flatnonzero(targets == labels)
        if same.size:
            raise InvalidArgument(
                f"target class equals the label for input(s) {same[:10].tolist()}; "
                "a target must differ from the label"
            )
    return x32, labels, targets


def _check_classes(k: int, labels: np.ndarray, targets: np.ndarray | None) -> None:
    if int(labels.max()) >= k:
        raise InvalidArgument(f"labels must be in 0..{k - 1} (the model has {k} classes)")
    if targets is not None and int(targets.max()) >= k:
        raise InvalidArgument(f"target_classes must be in 0..{k - 1} (the model has {k} classes)")


def _device(model: torch.nn.Module | None) -> torch.device:
    if model is None:
        return torch.device("cpu")
    # Parameters first; a module with only buffers (a pure normalisation) still has a device.
    for tensor in itertools.chain(model.parameters(), model.buffers()):
        return tensor.device
    return torch.device("cpu")


def ball_unit(spec: AttackSpec) -> np.ndarray | None:
    """float64 per-feature range widths (flattened) when eps is per feature, else None."""
    if not spec.per_feature:
        return None
    pairs = np.asarray(spec.value_range, dtype=np.float64)
    return pairs[:, 1] - pairs[:, 0]


def _batch_seed(seed: int, batch: int) -> int:
    # Independent, reproducible streams per batch, whatever order batches were to run in.
    state = np.random.SeedSequence([seed, batch]).generate_state(2, dtype=np.uint32)
    return (int(state[0]) << 31) | (int(state[1]) >> 1)


def _results(
    offset: int,
    x: Tensor,
    x_adv: Tensor,
    clean: Tensor,
    adv: Tensor,
    goal: Goal,
    attacked: Tensor,
    steps: Tensor,
    queries: Tensor,
    unit: np.ndarray | None,
) -> Iterator[ExampleResult]:
    success = goal.success(adv).cpu().numpy()
    clean_prediction = clean.argmax(dim=1).cpu().numpy()
    adversarial_prediction = adv.argmax(dim=1).cpu().numpy()
    clean_margin = label_margin(clean, goal.labels).double().cpu().numpy()
    adversarial_margin = label_margin(adv, goal.labels).double().cpu().numpy()
    x_adv_np = x_adv.cpu().numpy()
    # float64 differences of float32 numbers are exact, so these norms are what a checker sees.
    delta = (x_adv_np.astype(np.float64) - x.cpu().numpy().astype(np.float64)).reshape(
        x_adv_np.shape[0], -1
    )
    l0 = (delta != 0).sum(axis=1)
    if unit is not None:
        delta = delta / unit  # norms in the units eps is measured in
    linf = np.abs(delta).max(axis=1)
    l2 = np.sqrt((delta**2).sum(axis=1))
    labels = goal.labels.cpu().numpy()
    targets = None if goal.targets is None else goal.targets.cpu().numpy()
    for i in range(x_adv_np.shape[0]):
        yield ExampleResult(
            index=offset + i,
            x_adv=x_adv_np[i].copy(),
            label=int(labels[i]),
            target=None if targets is None else int(targets[i]),
            success=bool(success[i]),
            attacked=bool(attacked[i]),
            clean_prediction=int(clean_prediction[i]),
            adversarial_prediction=int(adversarial_prediction[i]),
            clean_margin=float(clean_margin[i]),
            adversarial_margin=float(adversarial_margin[i]),
            linf=float(linf[i]),
            l2=float(l2[i]),
            l0=int(l0[i]),
            steps=int(steps[i]),
            queries=int(queries[i]),
        )


class _Totals:
    """Running sums for the summary (per request, never shared)."""

    def __init__(self) -> None:
        self.n = self.clean_correct = self.robust = self.attacked = self.success = 0
        self.linf = self.l2 = self.l0 = 0.0
        self.steps = self.queries = self.check_queries = 0
        self.checks: list[ExampleChecks] = []

    def add(self, r: ExampleResult) -> None:
        self.n += 1
        self.check_queries += r.check_queries
        if r.checks is not None:
            self.checks.append(r.checks)
        self.clean_correct += r.clean_prediction == r.label
        self.robust += r.adversarial_prediction == r.label
        self.steps += r.steps
        self.queries += r.queries
        if r.attacked:
            self.attacked += 1
            self.success += r.success
            self.linf += r.linf
            self.l2 += r.l2
            self.l0 += r.l0

    def summary(self) -> AttackSummary:
        per_attacked = 1.0 / self.attacked if self.attacked else 0.0
        return AttackSummary(
            n_examples=self.n,
            n_clean_correct=self.clean_correct,
            n_robust=self.robust,
            n_attacked=self.attacked,
            n_success=self.success,
            clean_accuracy=self.clean_correct / self.n,
            robust_accuracy=self.robust / self.n,
            success_rate=self.success * per_attacked,
            mean_linf=self.linf * per_attacked,
            mean_l2=self.l2 * per_attacked,
            mean_l0=self.l0 * per_attacked,
            total_steps=self.steps,
            total_queries=self.queries,
            masking_flags=tuple(diagnose(self.checks)),
            check_queries=self.check_queries,
        )


def robust_at(
    specs: tuple[AttackSpec, ...],
    x: np.ndarray,
    y: np.ndarray,
    model: torch.nn.Module | None,
    evaluate: Evaluator | None,
    cancel: CancelToken | None = None,
) -> tuple[np.ndarray, int]:
    """Whether each input stays robust (prediction == label) under each spec: bool (len(specs),
    B); and the white-box forward passes spent (black-box ones go through `evaluate`)."""
    robust = np.zeros((len(specs), len(y)), dtype=bool)
    spent = 0
    for i, spec in enumerate(specs):
        report = run_attack(spec, x, y, model, evaluate, cancel)
        robust[i] = [r.adversarial_prediction == r.label for r in report.results]
        if spec.white_box:
            spent += report.summary.total_queries + report.summary.check_queries
    return robust, spent
