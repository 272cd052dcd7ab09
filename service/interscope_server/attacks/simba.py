"""SimBA (Guo et al.): score-based random search over single coordinates, forward passes only."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from interscope_server.attacks.base import (
    AttackSpec,
    Ball,
    BatchOutcome,
    BlackBoxAttack,
    Evaluator,
    Goal,
)
from interscope_server.attacks.square import first_query, keep_improvements
from interscope_server.cancel import CancelToken


class SimBA(BlackBoxAttack):
    """SimBA from "Simple Black-box Adversarial Attacks" (Guo, Gardner, You, Wilson and
    Weinberger, ICML 2019, arXiv 1905.07121), in its pixel/coordinate basis.

    Each example walks through its coordinates (features, or pixels and channels of an image)
    in its own random order; for coordinate q it tries x_best + s e_q and, if that does not
    lower the loss, x_best - s e_q, keeping the first that lowers it or fools the model. After
    every coordinate has been tried the walk starts again with a fresh order. Every candidate
    is projected into the ball, so it respects per-feature ranges exactly; a candidate that the
    projection leaves equal to the current point is skipped without a query. This suits
    tabular models and trees, whose few features each matter.
    Norm: L-inf (default step s = eps, so a coordinate jumps to a face of the eps box) or L2
    (default s = eps / 2; the projection keeps the total inside the eps ball). With per-feature
    ranges s is in units of each feature's range width.
    Loss: the logit margin z_y - max_{c!=y} z_c (targeted: max_{c!=t} z_c - z_t), minimised.
    Defaults (AttackSpec): query_budget 1000 per example including a first query at x itself,
    restarts 1; step_size overrides s. Shapes: inputs (B, *input_shape) float32 in value_range
    (any layout); the evaluator returns logits (B, K).
    """

    kind = "simba"

    @classmethod
    def default_step_size(cls, spec: AttackSpec) -> float:
        return spec.eps if spec.norm == "linf" else spec.eps / 2

    def perturb(
        self,
        evaluate: Evaluator,
        ball: Ball,
        goal: Goal,
        cancel: CancelToken,
        generator: torch.Generator,
    ) -> BatchOutcome:
        input_shape = tuple(ball.x.shape[1:])
        n, n_coords = ball.x.shape[0], math.prod(input_shape)
        step = self.spec.resolved_step_size
        unit = ball.unit
        unit_flat = unit.reshape(-1) if isinstance(unit, Tensor) else None
        best = first_query(evaluate, ball.x.clone(), goal, input_shape)
        orders = torch.stack([torch.randperm(n_coords, generator=generator) for _ in range(n)])
        position = torch.zeros(n, dtype=torch.long)
        # A whole pass without a query (every coordinate pinned by the ball) would repeat
        # forever unchanged, so such an example stops.
        pass_start = best.queries.clone()
        stalled = torch.zeros(n, dtype=torch.bool)
        budget = self.spec.query_budget
        while True:
            active = (~best.done & ~stalled & (best.queries < budget)).nonzero()[:, 0]
            if active.numel() == 0:
                break
            cancel.check()
            coord = orders[active, position[active]]
            size = torch.full((active.numel(),), step)
            if unit_flat is not None:
                size = size * unit_flat[coord].float()
            improved = torch.zeros(active.numel(), dtype=torch.bool)
            for sign in (1.0, -1.0):
                # Only examples not yet improved at this coordinate, with budget left, try it.
                trying = ~improved & (best.queries[active] < budget)
                rows = active[trying]
                if rows.numel() == 0:
                    break
                flat = best.x_adv[rows].reshape(rows.numel(), -1).clone()
                picked = torch.arange(rows.numel())
                flat[picked, coord[trying]] += sign * size[trying]
                candidate = ball.project(flat.reshape((-1, *input_shape)), rows)
                moved = (candidate != best.x_adv[rows]).flatten(1).any(dim=1)
                if not bool(moved.any()):
                    continue
                query_rows, candidate = rows[moved], candidate[moved]
                kept = keep_improvements(evaluate, best, goal, query_rows, candidate, input_shape)
                # Map the kept rows back to their place in `active`.
                hit = torch.zeros(n, dtype=torch.bool)
                hit[kept] = True
                improved |= hit[active]
            best.steps[active] += 1
            position[active] += 1
            wrapped = active[position[active] >= n_coords]
            for row in wrapped.tolist():
                orders[row] = torch.randperm(n_coords, generator=generator)
            position[wrapped] = 0
            stalled[wrapped] = best.queries[wrapped] == pass_start[wrapped]
            pass_start[wrapped] = best.queries[wrapped]
        return best._replace(score=-best.score)
