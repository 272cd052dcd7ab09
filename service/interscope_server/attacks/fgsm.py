"""Fast gradient sign method (Goodfellow et al.): one gradient step to the edge of the ball."""

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
from interscope_server.errors import InvalidArgument


class FGSM(WhiteBoxAttack):
    """FGSM from "Explaining and Harnessing Adversarial Examples" (Goodfellow et al., ICLR 2015,
    arXiv 1412.6572); the L2 variant is the fast gradient method (normalised gradient).

    Norm: L-inf (x + step_size * sign(grad)) or L2 (x + step_size * grad / ||grad||_2), then
    projection onto the eps ball and the value range.
    Defaults (AttackSpec): eps 8/255, one step, step_size eps, no random start (with
    random_start=True it is R+FGSM-style: the step starts from a random point in the ball).
    Loss: cross-entropy of the label, ascended (untargeted), or of the target, descended.
    Shapes: x (B, *input_shape) float32 in value_range; labels/targets (B,) int64; logits (B, K).
    """

    kind = "fgsm"
    default_steps = 1
    fixed_steps = True

    @classmethod
    def default_step_size(cls, spec: AttackSpec) -> float:
        return spec.eps

    @classmethod
    def check(cls, spec: AttackSpec) -> None:
        if spec.steps is not None and spec.steps != 1:
            raise InvalidArgument(
                f"fgsm takes exactly one step, got steps={spec.steps}; use pgd for more"
            )

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
        cancel.check()
        start = ball.random_start(generator) if spec.resolved_random_start else ball.x
        _, _, grad = forward_backward(model, start, goal)
        index = torch.arange(n, device=device)
        x_adv = ball.step(start, grad, spec.resolved_step_size, index)
        cancel.check()
        logits = forward(model, x_adv)
        return BatchOutcome(
            x_adv=x_adv,
            logits=logits,
            steps=torch.ones(n, dtype=torch.long, device=device),
            queries=torch.full((n,), 2, dtype=torch.long, device=device),
            done=goal.success(logits),
            score=goal.ce_objective(logits),
        )
