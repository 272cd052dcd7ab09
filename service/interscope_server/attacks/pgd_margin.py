"""The paper's margin-stopped PGD: attack each example to the same logit margin, no further."""

from __future__ import annotations

import torch

from interscope_server.attacks.base import (
    AttackSpec,
    Ball,
    BatchOutcome,
    Goal,
    WhiteBoxAttack,
    forward_backward,
    label_margin,
)
from interscope_server.cancel import CancelToken
from interscope_server.errors import InvalidArgument


class MarginPGD(WhiteBoxAttack):
    """Margin-stopped PGD as used by Ren et al., "A Unified Game-Theoretic Interpretation of
    Adversarial Robustness" (NeurIPS 2021, arXiv 2103.07364); see PAPER.md.

    Untargeted PGD on the cross-entropy of the label that stops an example once its attack margin
    m(x') = max_{c!=y} z_c(x') - z_y(x') (the adversarial class's logit over the label's; PAPER.md
    writes it z_pred - z_y) reaches `margin_threshold`. A step that would overshoot past
    threshold + `margin_tolerance` is rejected and that example's step size halved, so every
    example that reaches the threshold ("kept", done=True) ends with m in [threshold,
    threshold + tolerance]: the same attack strength across examples, which is what comparing
    interactions of x and x_adv needs. Examples whose clean margin is already past the
    threshold are left as they are (done, zero steps).
    Norm: L-inf (paper) or L2. Defaults (AttackSpec): eps 8/255 (the paper: 32/255), step_size
    eps/16 (the paper: 2/255), up to 100 steps (rejected steps count), threshold 8.0, tolerance
    0.5, no random start.
    Every example is attacked, including ones misclassified from the start: the stop is the
    margin, not misclassification. Restarts keep a run that reached the threshold, else the run
    with the larger margin.
    Shapes: x (B, *input_shape) float32 in value_range; labels (B,) int64; logits (B, K).
    """

    kind = "pgd_margin"
    default_steps = 100
    attacks_all = True

    @classmethod
    def default_step_size(cls, spec: AttackSpec) -> float:
        return spec.eps / 16

    @classmethod
    def check(cls, spec: AttackSpec) -> None:
        if spec.targeted:
            raise InvalidArgument(
                "pgd_margin is untargeted (as in the paper); use pgd or apgd for targeted"
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
        threshold, ceiling = spec.margin_threshold, spec.margin_threshold + spec.margin_tolerance
        n = ball.x.shape[0]
        device = ball.x.device
        cancel.check()
        x_cur = ball.random_start(generator) if spec.resolved_random_start else ball.x.clone()
        logits_out, _, grad = forward_backward(model, x_cur, goal)
        margin = -label_margin(logits_out, goal.labels)
        steps = torch.zeros(n, dtype=torch.long, device=device)
        queries = torch.ones(n, dtype=torch.long, device=device)
        alpha = torch.full((n,), spec.resolved_step_size, device=device)
        done = margin >= threshold
        active = (~done).nonzero()[:, 0]
        for _ in range(spec.resolved_steps):
            if active.numel() == 0:
                break
            cancel.check()
            x_new = ball.step(x_cur[active], grad[active], alpha[active], active)
            logits, _, new_grad = forward_backward(model, x_new, goal.subset(active))
            steps[active] += 1
            queries[active] += 1
            new_margin = -label_margin(logits, goal.labels[active])
            accept = new_margin <= ceiling
            rows = active[accept]
            x_cur[rows] = x_new[accept]
            grad[rows] = new_grad[accept]
            logits_out[rows] = logits[accept]
            margin[rows] = new_margin[accept]
            # Overshoot: stay put and retry with half the step from the same point and gradient.
            alpha[active[~accept]] /= 2
            reached = accept & (new_margin >= threshold)
            done[active[reached]] = True
            active = active[~reached]
        return BatchOutcome(x_cur, logits_out, steps, queries, done, margin)
