"""The Square attack (Andriushchenko et al.): random-search, score-based, forward passes only."""

from __future__ import annotations

import math
from collections.abc import Callable
from functools import partial

import numpy as np
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
from interscope_server.cancel import CancelToken
from interscope_server.errors import InvalidArgument
from interscope_server.layout import Layout, image_hw


def evaluate_tensor(evaluate: Evaluator, x: Tensor, input_shape: tuple[int, ...]) -> Tensor:
    """Run the evaluator on a CPU batch and check it answered one row of logits per input."""
    batch = np.ascontiguousarray(x.reshape((-1, *input_shape)).numpy(), dtype=np.float32)
    logits = np.asarray(evaluate(batch))
    if logits.ndim != 2 or logits.shape[0] != batch.shape[0]:
        raise RuntimeError(
            f"evaluator returned shape {logits.shape} for {batch.shape[0]} inputs; "
            "expected (B, K) logits"
        )
    return torch.from_numpy(logits.astype(np.float32, copy=False))


def keep_improvements(
    evaluate: Evaluator,
    best: BatchOutcome,
    goal: Goal,
    rows: Tensor,
    candidate: Tensor,
    input_shape: tuple[int, ...],
) -> Tensor:
    """Query `candidate` (one per row of `rows`, indices into `best`), count the queries, and
    keep each candidate that lowers its margin objective or fools the model; a fooled row is
    done. Returns the rows whose candidate was kept. Shared by the score-based attacks."""
    out = evaluate_tensor(evaluate, candidate, input_shape)
    best.queries[rows] += 1
    sub_goal = goal.subset(rows)
    loss = sub_goal.margin_objective(out)
    fooled = sub_goal.success(out)
    better = (loss < best.score[rows]) | fooled
    kept = rows[better]
    best.x_adv[kept] = candidate[better]
    best.logits[kept] = out[better]
    best.score[kept] = loss[better]
    best.done[rows[fooled]] = True
    return kept


#: A batch (n, *input_shape) -> the attack's working view of it, and back.
_View = Callable[[Tensor], Tensor]


def image_views(layout: Layout, input_shape: tuple[int, ...]) -> tuple[_View, _View]:
    """Maps between a batch in the model's layout and (n, C, H, W), and back."""
    if layout == "NHWC":
        return (
            lambda t: t.permute(0, 3, 1, 2),
            lambda t: t.permute(0, 2, 3, 1).contiguous(),
        )
    chw = input_shape if len(input_shape) == 3 else (1, *input_shape)
    return (lambda t: t.reshape((-1, *chw)), lambda t: t.reshape((-1, *input_shape)))


class Square(BlackBoxAttack):
    """Square attack from "Square Attack: a query-efficient black-box adversarial attack via
    random search" (Andriushchenko, Croce, Flammarion and Hein, ECCV 2020, arXiv 1912.00049).

    Norm: L-inf (each iteration sets one random square window per example to +-eps per
    channel) or L2 (moves mass between two windows of one shared position per iteration,
    keeping the perturbation on the eps sphere). The window side shrinks on the paper's
    schedule of p (the fraction of pixels changed), rescaled to the query budget.
    On a features layout the windows are runs of p*F consecutive features (flattened order),
    each feature with its own random sign, and eps is per feature in units of its range width
    when the model has per-feature ranges (see AttackSpec).
    Loss: the logit margin z_y - max_{c!=y} z_c (targeted: max_{c!=t} z_c - z_t), minimised;
    a candidate is kept when it lowers the loss or succeeds.
    Defaults (AttackSpec): eps 8/255, query_budget 1000 per example (the first query, at the
    initial stripes or tiles, included), p_init 0.8, restarts 1. steps and step_size do not
    apply. Every forward pass goes through the evaluator, one row per example per query, so it
    works on any backend; an example stops querying once it is fooled.
    Shapes: inputs (B, C, H, W), (B, H, W) or, layout NHWC, (B, H, W, C), float32 in value_range
    (L2 needs H, W >= 5); a features layout takes any shape; the evaluator returns logits (B, K).
    """

    kind = "square"
    own_step_size = True

    def prepare(self, input_shape: tuple[int, ...]) -> None:
        layout = self.spec.layout
        if layout == "features":
            return
        if len(input_shape) not in ((3,) if layout == "NHWC" else (2, 3)):
            raise InvalidArgument(
                f"square needs image-shaped inputs (C, H, W) or (H, W) for layout NCHW, "
                f"(H, W, C) for NHWC, or a features layout; got {input_shape} ({layout})"
            )
        if self.spec.norm == "l2" and min(image_hw(layout, input_shape)) < 5:
            raise InvalidArgument(
                f"square l2 needs height and width >= 5, got {input_shape}; use linf"
            )

    def perturb(
        self,
        evaluate: Evaluator,
        ball: Ball,
        goal: Goal,
        cancel: CancelToken,
        generator: torch.Generator,
    ) -> BatchOutcome:
        input_shape = tuple(ball.x.shape[1:])
        to_work: _View
        from_work: _View
        if self.spec.layout == "features":
            n_features = math.prod(input_shape)
            unit = ball.unit
            unit_flat = unit.reshape(1, -1) if isinstance(unit, Tensor) else unit

            to_work = partial(torch.reshape, shape=(-1, n_features))
            from_work = partial(torch.reshape, shape=(-1, *input_shape))

            def candidate(x: Tensor, x_best: Tensor, p: float) -> Tensor:
                if self.spec.norm == "linf":
                    return self._linf_vector(x_best, p, unit_flat, generator)
                return x + self._l2_vector(x, x_best, p, unit_flat, generator)

            start_delta = self._vector_start(ball.x.shape[0], n_features, unit_flat, generator)
        else:
            to_work, from_work = image_views(self.spec.layout, input_shape)

            def candidate(x: Tensor, x_best: Tensor, p: float) -> Tensor:
                if self.spec.norm == "linf":
                    return self._linf_candidate(x_best, p, generator)
                return x + self._l2_delta(x, x_best, p, generator)

            c, h, w = to_work(ball.x[:1]).shape[1:]
            start_delta = _image_start(self.spec, ball.x.shape[0], (c, h, w), generator)
        x_start = ball.project(ball.x + from_work(start_delta))
        best = first_query(evaluate, x_start, goal, input_shape)
        for i_iter in range(self.spec.query_budget - 1):
            active = (~best.done).nonzero()[:, 0]
            if active.numel() == 0:
                break
            cancel.check()
            x = to_work(ball.x[active])
            x_best = to_work(best.x_adv[active])
            x_new = ball.project(from_work(candidate(x, x_best, self._p(i_iter))), active)
            best.steps[active] += 1
            keep_improvements(evaluate, best, goal, active, x_new, input_shape)
        # Higher score means a better attack elsewhere; here the margin was minimised.
        return best._replace(score=-best.score)

    def _p(self, i_iter: int) -> float:
        """The paper's schedule for p, with iterations rescaled to a 10,000-query budget."""
        it = int(i_iter / self.spec.query_budget * 10_000)
        for bound, divisor in (
            (10, 1), (50, 2), (200, 4), (500, 8), (1000, 16),
            (2000, 32), (4000, 64), (6000, 128), (8000, 256),
        ):  # fmt: skip
            if it <= bound:
                return self.spec.p_init / divisor
        return self.spec.p_init / 512

    def _linf_candidate(self, x_best: Tensor, p: float, generator: torch.Generator) -> Tensor:
        n, c, h, w = x_best.shape
        side = min(max(round(math.sqrt(p * h * w)), 1), h, w)
        top = torch.randint(0, h - side + 1, (n,), generator=generator)
        left = torch.randint(0, w - side + 1, (n,), generator=generator)
        rows, cols = torch.arange(h), torch.arange(w)
        in_rows = (rows >= top[:, None]) & (rows < (top + side)[:, None])
        in_cols = (cols >= left[:, None]) & (cols < (left + side)[:, None])
        window = in_rows[:, None, :, None] & in_cols[:, None, None, :]
        signs = _random_signs((n, c, 1, 1), generator)
        # +-2 eps from the current best; the projection lands the window on x +- eps.
        return x_best + window * (2 * self.spec.eps) * signs

    def _l2_delta(self, x: Tensor, x_best: Tensor, p: float, generator: torch.Generator) -> Tensor:
        eps = self.spec.eps
        n, c, h, w = x.shape
        delta = x_best - x
        side = max(round(math.sqrt(p * h * w)), 3)
        side = min(side + (side % 2 == 0), min(h, w))
        side -= side % 2 == 0
        vh, vw, vh2, vw2 = (
            int(torch.randint(0, size - side + 1, (1,), generator=generator))
            for size in (h, w, h, w)
        )
        win1 = (slice(None), slice(None), slice(vh, vh + side), slice(vw, vw + side))
        win2 = (slice(None), slice(None), slice(vh2, vh2 + side), slice(vw2, vw2 + side))
        mask = torch.zeros_like(x)
        mask[win1] = 1.0
        mask[win2] = 1.0
        norm_window1 = _norm(delta[win1], dims=(-2, -1))
        norm_image = _norm(delta, dims=(1, 2, 3))
        norm_windows = _norm(delta * mask, dims=(1, 2, 3))
        new = _eta(side, generator).view(1, 1, side, side) * _random_signs((n, c, 1, 1), generator)
        new = new + delta[win1] / (1e-12 + norm_window1)
        budget = (torch.clamp(eps**2 - norm_image**2, min=0.0) / c + norm_windows**2).sqrt()
        new = new / (1e-12 + _norm(new, dims=(-2, -1))) * budget
        delta[win2] = 0.0
        delta[win1] = new
        return delta / (1e-12 + _norm(delta, dims=(1, 2, 3))) * eps

    def _vector_start(
        self, n: int, n_features: int, unit: Tensor | float, generator: torch.Generator
    ) -> Tensor:
        """The first query on features: every feature at +-eps (L-inf) or a random sign
        vector on the eps sphere (L2), in units of the range widths."""
        signs = _random_signs((n, n_features), generator)
        if self.spec.norm == "linf":
            return self.spec.eps * signs * unit
        return self.spec.eps * signs / math.sqrt(n_features) * unit

    def _window(self, n: int, n_features: int, p: float, generator: torch.Generator) -> Tensor:
        """(n, F) bool: one run of about p*F consecutive features per example."""
        side = min(max(round(p * n_features), 1), n_features)
        first = torch.randint(0, n_features - side + 1, (n,), generator=generator)
        index = torch.arange(n_features)
        return (index >= first[:, None]) & (index < (first + side)[:, None])

    def _linf_vector(
        self, x_best: Tensor, p: float, unit: Tensor | float, generator: torch.Generator
    ) -> Tensor:
        n, n_features = x_best.shape
        window = self._window(n, n_features, p, generator)
        signs = _random_signs((n, n_features), generator)
        # +-2 eps from the current best; the projection lands each feature on x_j +- eps w_j.
        return x_best + window * (2 * self.spec.eps) * signs * unit

    def _l2_vector(
        self,
        x: Tensor,
        x_best: Tensor,
        p: float,
        unit: Tensor | float,
        generator: torch.Generator,
    ) -> Tensor:
        """Move the mass of two windows (and any unused budget) into the first, with new
        random signs, keeping the perturbation on the eps sphere in unit coordinates."""
        eps = self.spec.eps
        n, n_features = x.shape
        delta = (x_best - x) / unit
        first = self._window(n, n_features, p, generator)
        second = self._window(n, n_features, p, generator) & ~first
        both = first | second
        spare = torch.clamp(eps**2 - (delta**2).sum(dim=1), min=0.0)
        mass = ((delta * both) ** 2).sum(dim=1) + spare
        new = _random_signs((n, n_features), generator) * first
        new = new / (1e-12 + new.norm(dim=1, keepdim=True)) * mass.sqrt()[:, None]
        return torch.where(both, new, delta) * unit


def _image_start(
    spec: AttackSpec, n: int, chw: tuple[int, int, int], generator: torch.Generator
) -> Tensor:
    """The first query's delta (n, C, H, W): vertical stripes of +-eps (L-inf) or tiles (L2)."""
    eps = spec.eps
    c, h, w = chw
    if spec.norm == "linf":
        return eps * _random_signs((n, c, 1, w), generator).expand(n, c, h, w)
    tiles = torch.zeros((n, c, h, w))
    side = min(h, w) // 5
    for top in _tile_starts(h, side):
        for left in _tile_starts(w, side):
            tiles[:, :, top : top + side, left : left + side] += _eta(side, generator).view(
                1, 1, side, side
            ) * _random_signs((n, c, 1, 1), generator)
    return tiles / (1e-12 + _norm(tiles, dims=(1, 2, 3))) * eps


def first_query(
    evaluate: Evaluator, x_adv: Tensor, goal: Goal, input_shape: tuple[int, ...]
) -> BatchOutcome:
    """A score-based attack's state after its first query, at the starting points `x_adv`."""
    n = x_adv.shape[0]
    logits = evaluate_tensor(evaluate, x_adv, input_shape)
    return BatchOutcome(
        x_adv=x_adv,
        logits=logits,
        steps=torch.zeros(n, dtype=torch.long),
        queries=torch.ones(n, dtype=torch.long),
        done=goal.success(logits),
        score=goal.margin_objective(logits),
    )


def _tile_starts(size: int, side: int) -> range:
    count = size // side
    offset = (size - side * count) // 2
    return range(offset, offset + side * count, side)


def _random_signs(shape: tuple[int, ...], generator: torch.Generator) -> Tensor:
    return torch.randint(0, 2, shape, generator=generator).mul(2).sub(1).float()


def _norm(t: Tensor, dims: tuple[int, ...]) -> Tensor:
    return (t**2).sum(dim=dims, keepdim=True).sqrt()


def _eta_half(rows: int, cols: int) -> Tensor:
    """Nested rectangles with weights 1/(k+1)^2 around the centre, unit L2 norm."""
    delta = torch.zeros((rows, cols))
    cr, cc = rows // 2, cols // 2
    for k in range(max(rows // 2 + 1, cols // 2 + 1)):
        r0, c0 = max(cr - k, 0), max(cc - k, 0)
        delta[r0 : min(cr - k + 2 * k + 1, rows), c0 : min(cc - k + 2 * k + 1, cols)] += (
            1.0 / (k + 1) ** 2
        )
    return delta / delta.norm()


def _eta(side: int, generator: torch.Generator) -> Tensor:
    """The L2 Square attack's window pattern: two halves of opposite sign, unit L2 norm."""
    delta = torch.zeros((side, side))
    delta[: side // 2] = _eta_half(side // 2, side)
    delta[side // 2 :] = -_eta_half(side - side // 2, side)
    delta = delta / delta.norm()
    if bool(torch.rand(1, generator=generator) < 0.5):
        delta = delta.t()
    return delta
