"""FAB (Croce and Hein): minimum-norm attack stepping onto the linearised decision boundary."""

from __future__ import annotations

import torch
from torch import Tensor

from interscope_server.attacks.base import (
    AttackSpec,
    Ball,
    BatchOutcome,
    Goal,
    Norm,
    WhiteBoxAttack,
    forward,
)
from interscope_server.cancel import CancelToken

#: Largest weight of the step from the original input (FAB's alpha_max).
ALPHA_MAX = 0.1
#: Overshoot of each projection past the linearised boundary (FAB's eta).
ETA = 1.05
#: After an adversarial iterate, move back towards the input by this factor (FAB's beta).
BETA = 0.9
#: Bisection rounds of the box-constrained projection: float64 halves down to ~1e-15.
_BISECTIONS = 50
_TINY = 1e-12


class FAB(WhiteBoxAttack):
    """FAB from "Minimally distorted adversarial examples with a fast adaptive boundary attack"
    (Croce and Hein, ICML 2020, arXiv 1907.02044), the variant AutoAttack runs.

    Norm: L-inf or L2. Each step linearises the model at the iterate x_k: untargeted, towards
    the class j != y whose linearised boundary f_j - f_y = 0 is nearest (|f_j - f_y| over the
    dual norm of its gradient); targeted, towards the target. It projects both x_k and the
    input x onto that hyperplane inside the value range (exactly, see `project_onto_plane`),
    giving d_k and d_0, and moves to
        x_{k+1} = clip((1 - a)(x_k + eta d_k) + a (x + eta d_0)),  a = min(|d_k| / (|d_k| +
        |d_0|), alpha_max),
    so it stays near the input. An adversarial iterate is kept if it is the smallest so far
    and pulled back, x + beta (x_{k+1} - x). Constants: alpha_max 0.1, eta 1.05, beta 0.9.
    It runs every step (it keeps shrinking the perturbation once it has one). Success only
    within eps: the result is the smallest adversarial point found (the last iterate if none),
    projected onto the eps ball and checked there.
    Defaults (AttackSpec): 100 steps, no random start (random_start starts from a random point
    in the ball), restarts 1; step_size may not be set. Costs per step: one gradient pass
    targeted, K (one per class) untargeted, and one forward.
    Shapes: x (B, *input_shape) float32 in value_range; labels/targets (B,) int64; logits (B, K).
    """

    kind = "fab"
    default_steps = 100
    own_step_size = True

    @classmethod
    def passes_per_input(cls, spec: AttackSpec) -> tuple[int, int]:
        steps = spec.resolved_steps * max(1, spec.restarts)
        # Untargeted steps take a gradient per class; 100 bounds the classes admitted for it.
        per_step = 1 if spec.targeted else 100
        return steps + 2 * max(1, spec.restarts), steps * per_step

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
        x0 = ball.x
        x_k = ball.random_start(generator) if spec.resolved_random_start else x0.clone()
        shape = (-1,) + (1,) * (x0.dim() - 1)
        unit = ball.unit
        best = x0.clone()
        best_norm = torch.full((n,), float("inf"), dtype=torch.float64, device=device)
        found = torch.zeros(n, dtype=torch.bool, device=device)
        steps = torch.zeros(n, dtype=torch.long, device=device)
        queries = torch.zeros(n, dtype=torch.long, device=device)
        for _ in range(spec.resolved_steps):
            cancel.check()
            df, dg = _linearise(model, x_k, goal, ball.norm, unit)
            # In units of eps (u = x / unit) the plane is w . (u - u_k) = -df.
            w = (dg * unit).flatten(1).double()
            gap = (w * ((x_k - x0) / unit).flatten(1).double()).sum(dim=1)
            # Both projections in one batch: half the small tensor ops of the bisection.
            both = self._project(
                torch.cat([x_k, x0]),
                torch.cat([w, w]),
                torch.cat([-df.double(), -df.double() + gap]),
                ball,
            )
            d_k, d_0 = both[:n], both[n:]
            a_k = _norm((d_k / unit).flatten(1), ball.norm)
            a_0 = _norm((d_0 / unit).flatten(1), ball.norm)
            alpha = (a_k / (a_k + a_0 + _TINY)).clamp(0.0, ALPHA_MAX).float().view(shape)
            moved = (1 - alpha) * (x_k + ETA * d_k) + alpha * (x0 + ETA * d_0)
            x_k = _within(moved, ball)
            logits = forward(model, x_k)
            steps += 1
            queries += 2
            adv = goal.success(logits)
            dist = ball.norms(x_k - x0)
            better = adv & (dist < best_norm)
            best[better] = x_k[better]
            best_norm[better] = dist[better]
            found |= adv
            x_k[adv] = x0[adv] + BETA * (x_k[adv] - x0[adv])
        cancel.check()
        x_adv = ball.project(torch.where(found.view(shape), best, x_k))
        logits = forward(model, x_adv)
        queries += 1
        return BatchOutcome(
            x_adv, logits, steps, queries, goal.success(logits), -goal.margin_objective(logits)
        )

    @staticmethod
    def _project(z: Tensor, w: Tensor, c: Tensor, ball: Ball) -> Tensor:
        """The step from z onto {w . delta_u = c} inside the value range, in input units."""
        unit = ball.unit
        up = ((_as_tensor(ball.high, z) - z) / unit).clamp_min(0).flatten(1).double()
        down = ((z - _as_tensor(ball.low, z)) / unit).clamp_min(0).flatten(1).double()
        delta_u = project_onto_plane(w, c, up, down, ball.norm)
        return delta_u.float().view(z.shape) * unit


def project_onto_plane(w: Tensor, c: Tensor, up: Tensor, down: Tensor, norm: Norm) -> Tensor:
    """Per row, the delta of least `norm` with w . delta = c and -down <= delta <= up.

    w, up, down (B, D) with up, down >= 0; c (B,). Both optima move each coordinate towards
    sign(c w_i) until its room runs out: L-inf by a common radius r (|delta_i| = min(r, room_i)),
    L2 in proportion to |w_i| (|delta_i| = min(lam |w_i|, room_i), the KKT point). The reach
    w . delta grows monotonically with r or lam, so bisection finds the one that reaches |c|.
    When even the whole room falls short, the delta uses all of it (the nearest the box gets).
    """
    direction = torch.sign(w) * torch.sign(c)[:, None]
    room = torch.where(direction > 0, up, down)
    weight = w.abs()
    need = c.abs()

    def reach(scale: Tensor) -> tuple[Tensor, Tensor]:
        size = scale[:, None] if norm == "linf" else scale[:, None] * weight
        moved = torch.minimum(size, room)
        return (weight * moved).sum(dim=1), moved

    if norm == "linf":
        low = torch.zeros_like(need)
        high = room.amax(dim=1)
    else:
        # The unclipped optimum lam = |c| / |w|^2 reaches at most |c|; double until it reaches.
        low = need / (weight**2).sum(dim=1).clamp_min(_TINY)
        high = low.clone()
        full = (weight * room).sum(dim=1)
        for _ in range(64):
            short = (reach(high)[0] < need) & (reach(high)[0] < full)
            if not bool(short.any()):
                break
            high = torch.where(short, high * 2, high)
    for _ in range(_BISECTIONS):
        mid = (low + high) / 2
        enough = reach(mid)[0] >= need
        high = torch.where(enough, mid, high)
        low = torch.where(enough, low, mid)
    return direction * reach(high)[1]


def _linearise(
    model: torch.nn.Module, x: Tensor, goal: Goal, norm: Norm, unit: Tensor | float
) -> tuple[Tensor, Tensor]:
    """f_j - f_y (B,) and its gradient (B, *shape) for each row's chosen class j: the target,
    or untargeted the class whose linearised boundary is nearest in `norm`."""
    rows = torch.arange(x.shape[0], device=x.device)
    with torch.enable_grad():
        x_var = x.detach().requires_grad_(True)
        logits = model(x_var)
        own = logits[rows, goal.labels]
        if goal.targets is not None:
            diff = logits[rows, goal.targets] - own
            (grad,) = torch.autograd.grad(diff.sum(), x_var)
            return diff.detach(), grad.detach()
        k = logits.shape[1]
        grads = [
            torch.autograd.grad(logits[:, c].sum(), x_var, retain_graph=c < k - 1)[0]
            for c in range(k)
        ]
    jacobian = torch.stack(grads, dim=1)
    df = (logits - own[:, None]).detach()
    dg = jacobian - jacobian[rows, goal.labels][:, None]
    dual = _norm((dg * unit).flatten(2), "l2" if norm == "l2" else "l1")
    distance = df.abs() / (dual + _TINY)
    distance[rows, goal.labels] = float("inf")
    nearest = distance.argmin(dim=1)
    return df[rows, nearest], dg[rows, nearest]


def _norm(flat: Tensor, norm: str) -> Tensor:
    """Norm over the last axis: linf, l2 or l1."""
    if norm == "linf":
        return flat.abs().amax(dim=-1)
    if norm == "l1":
        return flat.abs().sum(dim=-1)
    return flat.norm(dim=-1)


def _as_tensor(bound: Tensor | float, like: Tensor) -> Tensor:
    return bound if isinstance(bound, Tensor) else torch.full_like(like, bound)


def _within(x: Tensor, ball: Ball) -> Tensor:
    """x clipped to the value range (FAB's iterates may leave the eps ball, not the range)."""
    return torch.maximum(torch.minimum(x, _as_tensor(ball.high, x)), _as_tensor(ball.low, x))
