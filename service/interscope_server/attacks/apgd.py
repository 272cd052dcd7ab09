"""Auto-PGD with the cross-entropy or DLR loss (Croce and Hein), AutoAttack's step schedule."""

from __future__ import annotations

import torch

from interscope_server.attacks.base import (
    Ball,
    BatchOutcome,
    Goal,
    WhiteBoxAttack,
    forward,
    forward_backward,
)
from interscope_server.cancel import CancelToken

#: Momentum weight on the new projected step (AutoAttack's alpha).
MOMENTUM = 0.75
#: A checkpoint halves the step unless more than this fraction of its steps raised the loss.
RHO = 0.75


class APGD(WhiteBoxAttack):
    """APGD-CE from "Reliable evaluation of adversarial robustness with an ensemble of diverse
    parameter-free attacks" (Croce and Hein, ICML 2020, arXiv 2003.01690), as in AutoAttack.

    Norm: L-inf or L2. Step size starts at 2*eps per example. The first checkpoint falls after
    int(0.22 T) steps; each later interval is 0.03 T steps shorter, down to a floor of 0.06 T
    (AutoAttack's integer schedule). At a checkpoint an example's step is halved, and it
    restarts from its best point, if at most RHO of the steps since the last checkpoint raised
    its loss, or if its step was not reduced at the last checkpoint and its best loss has not
    improved since. Update with momentum 0.75:
        z = P(x_k + eta * dir(grad)),  x_{k+1} = P(x_k + 0.75 (z - x_k) + 0.25 (x_k - x_{k-1})).
    Defaults (AttackSpec): eps 8/255, 100 steps, random start on (a random direction scaled to
    the ball's boundary, as AutoAttack does), restarts 1; step_size may
    not be set.
    Loss (spec.loss): "ce" (default), cross-entropy of the label ascended (untargeted) or of
    the target descended (targeted); "dlr", the difference-of-logits ratio (`base.dlr`),
    untargeted or, with a target, targeted: APGD-DLR and AutoAttack's APGD-T.
    Early stop per example at the first successful iterate. An example never fooled returns its
    highest-loss point.
    Shapes: x (B, *input_shape) float32 in value_range; labels/targets (B,) int64; logits (B, K).
    """

    kind = "apgd"
    default_steps = 100
    default_random_start = True
    own_step_size = True
    losses = ("ce", "dlr")

    def single_run(
        self,
        model: torch.nn.Module,
        ball: Ball,
        goal: Goal,
        cancel: CancelToken,
        generator: torch.Generator,
    ) -> BatchOutcome:
        spec = self.spec
        loss_kind = spec.resolved_loss
        total = spec.resolved_steps
        n = ball.x.shape[0]
        device = ball.x.device
        first_check = max(int(0.22 * total), 1)
        min_interval = max(int(0.06 * total), 1)
        shrink = max(int(0.03 * total), 1)

        cancel.check()
        x_adv = self._start(ball, generator) if spec.resolved_random_start else ball.x.clone()
        logits_out, loss, grad = forward_backward(model, x_adv, goal, loss_kind)
        steps = torch.zeros(n, dtype=torch.long, device=device)
        queries = torch.ones(n, dtype=torch.long, device=device)
        done = goal.success(logits_out)
        x_best, loss_best, grad_best = x_adv.clone(), loss.clone(), grad.clone()
        x_prev = x_adv.clone()
        eta = torch.full((n,), 2 * spec.eps, device=device)
        # Loss per step, row 0 the start, for the oscillation count at checkpoints.
        history = torch.zeros((total + 1, n), device=device)
        history[0] = loss
        loss_best_at_check = loss_best.clone()
        reduced_at_check = torch.ones(n, dtype=torch.bool, device=device)
        interval, since_check = first_check, 0

        for i in range(total):
            active = (~done).nonzero()[:, 0]
            if active.numel() == 0:
                break
            cancel.check()
            x_k = x_adv[active]
            momentum = x_k - x_prev[active]
            x_prev[active] = x_k
            z = ball.step(x_k, grad[active], eta[active], active)
            if i == 0:
                x_next = z
            else:
                x_next = ball.project(
                    x_k + MOMENTUM * (z - x_k) + (1 - MOMENTUM) * momentum, active
                )
            sub_goal = goal.subset(active)
            logits, loss, new_grad = forward_backward(model, x_next, sub_goal, loss_kind)
            x_adv[active] = x_next
            grad[active] = new_grad
            logits_out[active] = logits
            steps[active] += 1
            queries[active] += 1
            history[i + 1, active] = loss
            done[active[sub_goal.success(logits)]] = True
            improved = loss > loss_best[active]
            rows = active[improved]
            x_best[rows] = x_next[improved]
            grad_best[rows] = new_grad[improved]
            loss_best[rows] = loss[improved]

            since_check += 1
            if since_check == interval:
                window = history[i + 1 - interval : i + 2]
                increases = (window[1:] > window[:-1]).sum(dim=0)
                oscillating = increases <= interval * RHO
                stalled = ~reduced_at_check & (loss_best_at_check >= loss_best)
                reduce = (oscillating | stalled) & ~done
                reduced_at_check = reduce
                loss_best_at_check = loss_best.clone()
                eta[reduce] /= 2
                x_adv[reduce] = x_best[reduce]
                grad[reduce] = grad_best[reduce]
                since_check = 0
                interval = max(interval - shrink, min_interval)

        # Examples not fooled return their highest-loss point, evaluated once more.
        failed = (~done).nonzero()[:, 0]
        if failed.numel() > 0:
            cancel.check()
            x_adv[failed] = x_best[failed]
            logits = forward(model, x_best[failed])
            logits_out[failed] = logits
            queries[failed] += 1
            sub_goal = goal.subset(failed)
            loss_best[failed] = sub_goal.objective(logits, loss_kind)
            done[failed] = sub_goal.success(logits)
        return BatchOutcome(x_adv, logits_out, steps, queries, done, loss_best)

    def _start(self, ball: Ball, generator: torch.Generator) -> torch.Tensor:
        # AutoAttack's start: a random direction scaled to the ball's boundary.
        shape = ball.x.shape
        view = (-1,) + (1,) * (len(shape) - 1)
        if ball.norm == "linf":
            t = torch.rand(shape, generator=generator) * 2 - 1
            t = t / t.flatten(1).abs().amax(dim=1).clamp_min(1e-12).view(view)
        else:
            t = torch.randn(shape, generator=generator)
            t = t / t.flatten(1).norm(dim=1).clamp_min(1e-12).view(view)
        return ball.project(ball.x + ball.eps * t.to(ball.x.device) * ball.unit)
