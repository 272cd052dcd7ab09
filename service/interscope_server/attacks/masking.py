"""The gradient-masking checks a white-box attack's runner makes on the examples it left robust.

Per batch, on the examples the attack attacked and did not fool (see `interscope._diagnostics`
for the flags decided from them):
- the CE gradient at the clean input (one forward-backward each): zero or non-finite means
  the attack had nothing to follow;
- the loss gain CE(x_adv) - CE(x), from logits the runner already has (no forward);
- a black-box check: Square with `spec.check_queries` queries (0: off) through the same torch
  module, so its forwards are the attack's to count;
- a more-steps check on up to `spec.check_reruns` of them (0: off): the same attack once more
  with twice the steps and a fresh seed. Robust accuracy that falls under that re-run means
  the reported one had not converged. With early stop and best-of-restarts a run's robust set
  can only shrink with more steps, so a fresh, longer run is the cheap way to see whether it
  would; the subsample bounds its cost at 2 * steps * check_reruns passes per batch.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import NamedTuple

import numpy as np
import torch
from torch import Tensor

from interscope._diagnostics import ExampleChecks
from interscope_server.attacks.base import (
    MAX_STEPS,
    AttackSpec,
    Ball,
    Evaluator,
    Goal,
    WhiteBoxAttack,
    attack_class,
    forward,
    forward_backward,
)
from interscope_server.attacks.square import Square
from interscope_server.cancel import CancelToken
from interscope_server.errors import InvalidArgument


@dataclass(frozen=True)
class BatchChecks:
    """The checks for the rows of one batch (None for rows not checked) and the forward passes
    they spent per row."""

    checks: tuple[ExampleChecks | None, ...]
    queries: np.ndarray


def _evaluator(model: torch.nn.Module, device: torch.device) -> Evaluator:
    """The torch module as an evaluator, so Square's passes are white-box forwards we count."""

    def evaluate(batch: np.ndarray) -> np.ndarray:
        return forward(model, torch.from_numpy(batch).to(device)).float().cpu().numpy()

    return evaluate


def check_batch(
    spec: AttackSpec,
    model: torch.nn.Module,
    x: Tensor,
    clean: Tensor,
    adv: Tensor,
    goal: Goal,
    attacked: Tensor,
    cancel: CancelToken,
    generator: torch.Generator,
) -> BatchChecks:
    """The checks on one batch's rows that were attacked and not fooled (see the module doc).

    x (B, *shape) clean inputs on the model's device; clean, adv (B, K) their logits before and
    after the attack; attacked (B,) bool (CPU).
    """
    n = x.shape[0]
    queries = np.zeros(n, dtype=np.int64)
    robust = (attacked.to(x.device) & ~goal.success(adv)).nonzero()[:, 0]
    if robust.numel() == 0:
        return BatchChecks((None,) * n, queries)
    rows = robust.cpu().numpy()
    sub_goal = goal.subset(robust)
    cancel.check()
    _, _, grad = forward_backward(model, x[robust], sub_goal)
    queries[rows] += 1
    grad64 = grad.double().flatten(1)
    finite = torch.isfinite(grad64).all(dim=1)
    l1 = torch.where(finite, grad64.abs().sum(dim=1), torch.nan).cpu().numpy()
    gain = (sub_goal.ce_objective(adv[robust]) - sub_goal.ce_objective(clean[robust])).double()
    gain_np = gain.cpu().numpy()

    extra = attack_class(spec.name).extra_checks
    black_box: list[bool | None] = [None] * len(rows)
    if spec.check_queries > 0 and extra:
        black_box = _black_box(spec, model, x[robust], sub_goal, queries, rows, cancel, generator)
    more_steps: list[bool | None] = [None] * len(rows)
    if spec.check_reruns > 0 and extra and not attack_class(spec.name).fixed_steps:
        picked = _spread(len(rows), spec.check_reruns)
        index = robust[torch.from_numpy(picked).to(robust.device)]
        fooled = _more_steps(spec, model, x[index], goal.subset(index), cancel, generator)
        queries[rows[picked]] += fooled.queries
        for k, p in enumerate(picked):
            more_steps[int(p)] = bool(fooled.fooled[k])

    checks: list[ExampleChecks | None] = [None] * n
    for k, row in enumerate(rows):
        checks[int(row)] = ExampleChecks(
            gradient_l1=float(l1[k]),
            loss_gain=float(gain_np[k]),
            black_box_fooled=black_box[k],
            more_steps_fooled=more_steps[k],
        )
    return BatchChecks(tuple(checks), queries)


def _black_box(
    spec: AttackSpec,
    model: torch.nn.Module,
    x: Tensor,
    goal: Goal,
    queries: np.ndarray,
    rows: np.ndarray,
    cancel: CancelToken,
    generator: torch.Generator,
) -> list[bool | None]:
    """Square with the check's budget on x; adds its passes to queries[rows]. None for every
    row when Square cannot window these inputs."""
    square = Square(
        replace(
            spec,
            name="square",
            steps=None,
            step_size=None,
            random_start=None,
            restarts=1,
            query_budget=spec.check_queries,
            loss=None,  # Square has its own margin objective
        )
    )
    try:
        square.prepare(tuple(x.shape[1:]))
    except InvalidArgument:
        return [None] * len(rows)
    ball = Ball(x.cpu(), spec.norm, spec.eps, spec.value_range)
    out = square.perturb(_evaluator(model, x.device), ball, _cpu(goal), cancel, generator)
    scores, spent = _settled(spec, model, x, out.x_adv.to(x.device), out.logits.to(x.device))
    queries[rows] += out.queries.cpu().numpy() + spent
    return [bool(v) for v in goal.success(scores).cpu().numpy()]


class _Rerun(NamedTuple):
    fooled: np.ndarray
    queries: np.ndarray


def _more_steps(
    spec: AttackSpec,
    model: torch.nn.Module,
    x: Tensor,
    goal: Goal,
    cancel: CancelToken,
    generator: torch.Generator,
) -> _Rerun:
    """The same attack on x with twice the steps, one run, from this check's own stream."""
    attack = attack_class(spec.name)(
        replace(spec, steps=min(2 * spec.resolved_steps, MAX_STEPS), restarts=1)
    )
    assert isinstance(attack, WhiteBoxAttack)
    ball = Ball(x, spec.norm, spec.eps, spec.value_range)
    out = attack.perturb(model, ball, goal, cancel, generator)
    logits, spent = _settled(spec, model, x, out.x_adv, out.logits)
    return _Rerun(goal.success(logits).cpu().numpy(), out.queries.cpu().numpy() + spent)


def _settled(
    spec: AttackSpec, model: torch.nn.Module, x: Tensor, x_adv: Tensor, logits: Tensor
) -> tuple[Tensor, int]:
    """The logits that count and the extra passes per row: with integer inputs, those of the
    example moved onto the grid (as the runner does for the attack itself)."""
    if not spec.integer_inputs:
        return logits, 0
    from interscope_server.attacks.runner import on_integer_grid  # the runner imports us

    return forward(model, on_integer_grid(x, x_adv, spec)), 1


def _cpu(goal: Goal) -> Goal:
    targets = None if goal.targets is None else goal.targets.cpu()
    return Goal(goal.labels.cpu(), targets)


def _spread(n: int, k: int) -> np.ndarray:
    """Up to k indices in 0..n-1, evenly spread (all of them when n <= k)."""
    if n <= k:
        return np.arange(n)
    return np.unique(np.linspace(0, n - 1, k).round().astype(np.int64))


#: Most eps values one audit sweeps: each costs one more attack per sample.
MAX_EPS_SWEEP = 16


def sweep_specs(spec: AttackSpec, eps_values: Sequence[float]) -> tuple[AttackSpec, ...]:
    """The attack at each sweep eps, ascending, without the masking checks (robust accuracy is
    all a sweep reports); InvalidArgument for an eps the attack would refuse, a repeat, or
    more than MAX_EPS_SWEEP values."""
    values = [float(e) for e in eps_values]
    if len(values) > MAX_EPS_SWEEP:
        raise InvalidArgument(
            f"eps_sweep has {len(values)} values; allowed: at most {MAX_EPS_SWEEP}"
        )
    if len(set(values)) != len(values):
        raise InvalidArgument(f"eps_sweep repeats a value: {values}; give distinct eps")
    specs = []
    for eps in sorted(values):
        try:
            specs.append(replace(spec, eps=eps, check_queries=0, check_reruns=0))
        except InvalidArgument as exc:
            raise InvalidArgument(f"eps_sweep value {eps}: {exc}") from exc
    return tuple(specs)
