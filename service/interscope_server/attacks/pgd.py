"""Projected gradient descent (Madry et al.) under L-inf or L2, with per-example early stop."""

from __future__ import annotations

import torch

from interscope_server.attacks.base import (
    AttackSpec,
    Ball,
    BatchOutcome,
    Goal,
    WhiteBoxAttack,
    forward,
    forward_backward,
)
from interscope_server.cancel import CancelToken


class PGD(WhiteBoxAttack):
    """PGD from "Towards Deep Learning Models Resistant to Adversarial Attacks" (Madry et al.,
    ICLR 2018, arXiv 1706.06083).

    Norm: L-inf (steps along sign(grad)) or L2 (steps along grad / ||grad||_2), each followed by
    projection onto the eps ball intersected with the value range.
    Defaults (AttackSpec): eps 8/255, steps 10, step_size 2.5*eps/steps, random start on
    (uniform in the L-inf cube; random direction and radius for L2), restarts 1.
    Loss: cross-entropy of the label, ascended (untargeted), or of the target, descended.
    Early stop: an example leaves the batch at the first iterate that succeeds, so it keeps the
    smallest successful perturbation along its path and costs no further passes.
    Restarts: later runs attack only examples not yet fooled; among failures the run with the
    higher final loss is kept.
    Shapes: x (B, *input_shape) float32 in value_range; labels/targets (B,) int64; the model
    returns logits (B, K).
    """

    kind = "pgd"
    default_steps = 10
    default_random_start = True

    @classmethod
    def default_step_size(cls, spec: AttackSpec) -> float:
        return 2.5 * spec.eps / spec.resolved_steps

    def single_run(
        self,
        model: torch.nn.Module,
        ball: Ball,
        goal: Goal,
        cancel: CancelToken,
        generator: torch.Generator,
    ) -> BatchOutcome:
        spec = self.spec
        n = ball.x.shape[0]
        device = ball.x.device
        x_adv = ball.random_start(generator) if spec.resolved_random_start else ball.x.clone()
        steps = torch.zeros(n, dtype=torch.long, device=device)
        queries = torch.zeros(n, dtype=torch.long, device=device)
        done = torch.zeros(n, dtype=torch.bool, device=device)
        score = torch.full((n,), float("-inf"), device=device)
        logits_out: torch.Tensor | None = None
        active = torch.arange(n, device=device)
        alpha = spec.resolved_step_size
        for _ in range(spec.resolved_steps):
            cancel.check()
            sub_goal = goal if active.numel() == n else goal.subset(active)
            logits, objective, grad = forward_backward(model, x_adv[active], sub_goal)
            if logits_out is None:
                logits_out = torch.empty((n, logits.shape[1]), device=device)
            queries[active] += 1
            logits_out[active] = logits
            score[active] = objective
            fooled = sub_goal.success(logits)
            done[active[fooled]] = True
            keep = ~fooled
            active, grad = active[keep], grad[keep]
            if active.numel() == 0:
                break
            x_adv[active] = ball.step(x_adv[active], grad, alpha, active)
            steps[active] += 1
        if active.numel() > 0:
            # The last step's iterate has not been evaluated yet.
            cancel.check()
            sub_goal = goal.subset(active)
            logits = forward(model, x_adv[active])
            if logits_out is None:
                logits_out = torch.empty((n, logits.shape[1]), device=device)
            queries[active] += 1
            logits_out[active] = logits
            score[active] = sub_goal.ce_objective(logits)
            done[active] = sub_goal.success(logits)
        assert logits_out is not None
        return BatchOutcome(x_adv, logits_out, steps, queries, done, score)
