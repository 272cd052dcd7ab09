"""AutoAttack, standard version (Croce and Hein): APGD-CE, APGD-T, FAB-T and Square in turn."""

from __future__ import annotations

from collections.abc import Callable, Generator, Iterator

import numpy as np
import torch
from torch import Tensor

from interscope_server.attacks.apgd import APGD
from interscope_server.attacks.base import (
    AttackSpec,
    Ball,
    BatchOutcome,
    Goal,
    Stage,
    WhiteBoxAttack,
    forward,
)
from interscope_server.attacks.fab import FAB
from interscope_server.attacks.square import Square
from interscope_server.cancel import CancelToken
from interscope_server.errors import InvalidArgument

#: Target classes of APGD-T and FAB-T: the most likely classes other than the label.
N_TARGETS = 9
#: Square's query budget in the standard version.
SQUARE_QUERIES = 5000
#: The targeted DLR loss reads the 4th largest logit.
MIN_CLASSES = 4

#: One attack run on the still-robust rows: their ball and goal, and their indices in the batch.
_Run = Callable[[Ball, Goal, Tensor], BatchOutcome]
#: A stage's name and its run.
_Stage = tuple[str, _Run]


class AutoAttack(WhiteBoxAttack):
    """AutoAttack from "Reliable evaluation of adversarial robustness with an ensemble of
    diverse parameter-free attacks" (Croce and Hein, ICML 2020, arXiv 2003.01690), standard
    version.

    Runs, in order, each on the examples every earlier attack failed on: APGD-CE (`APGD`,
    cross-entropy, 1 restart); APGD-T (`APGD` with the targeted DLR loss) once per target, the
    N_TARGETS = 9 most likely classes other than the label at the clean input (K - 1 when the
    model has fewer); FAB-T (`FAB` targeted) over the same targets; Square (`Square`, margin
    loss, p_init 0.8) with query_budget queries. Targets only steer the loss: any wrong class
    counts. An example is robust only if all of them fail; it returns the first successful
    attack's point, or APGD-CE's highest-loss point. Steps and queries are summed over the
    attacks that ran on the example.
    Norm: L-inf or L2. Defaults (AttackSpec): 100 steps per APGD and FAB run, random start for
    APGD, query_budget from the spec (the wire's default for this kind is 5000), seed shared.
    Untargeted; restarts 1; step_size and loss may not be set. Needs K >= 4 classes.
    Shapes: x (B, *input_shape) float32 in value_range; labels (B,) int64; logits (B, K).
    """

    kind = "autoattack"
    # Its Square stage already is the black-box check, and a second, longer ensemble run per
    # batch would cost more than the evaluation itself: only the gradient checks apply.
    extra_checks = False
    default_steps = 100
    default_queries = SQUARE_QUERIES
    default_random_start = True
    own_step_size = True

    @classmethod
    def check(cls, spec: AttackSpec) -> None:
        if spec.targeted:
            raise InvalidArgument(
                "autoattack is untargeted: it picks its own targets (the 9 most likely other "
                "classes); leave targeted unset, or run apgd with loss dlr or fab, targeted"
            )
        if spec.restarts != 1:
            raise InvalidArgument(
                f"autoattack's standard version runs each attack once; restarts must be 1, "
                f"got {spec.restarts}"
            )

    def check_classes(self, n_classes: int) -> None:
        if n_classes < MIN_CLASSES:
            raise InvalidArgument(
                f"autoattack needs a model with at least {MIN_CLASSES} classes (APGD-T's "
                f"targeted DLR loss reads the 4th largest logit), this one has {n_classes}; "
                "use apgd or square"
            )

    @classmethod
    def passes_per_input(cls, spec: AttackSpec) -> tuple[int, int]:
        steps = spec.resolved_steps
        # APGD-CE, then APGD-T and FAB-T once per target; FAB adds a forward per step.
        gradients = steps * (1 + 2 * N_TARGETS)
        forwards = 1 + 2 * (1 + N_TARGETS) + N_TARGETS * (2 * steps + 1) + spec.query_budget
        return forwards, gradients

    def prepare(self, input_shape: tuple[int, ...]) -> None:
        self._square().prepare(input_shape)

    def _sub_spec(self, name: str, **fields: object) -> AttackSpec:
        spec = self.spec
        return AttackSpec(
            name=name,
            norm=spec.norm,
            eps=spec.eps,
            seed=spec.seed,
            value_range=spec.value_range,
            layout=spec.layout,
            **fields,  # type: ignore[arg-type]
        )

    def _square(self) -> Square:
        return Square(self._sub_spec("square", query_budget=self.spec.query_budget))

    def stages(
        self, model: torch.nn.Module, clean: Tensor, cancel: CancelToken, gen: torch.Generator
    ) -> Iterator[_Stage]:
        """The attacks in order; `clean` (B, K) ranks each example's targets."""
        spec = self.spec
        steps = spec.resolved_steps
        apgd_ce = APGD(
            self._sub_spec("apgd", steps=steps, random_start=spec.random_start, loss="ce")
        )
        yield "apgd-ce", lambda ball, goal, _: apgd_ce.perturb(model, ball, goal, cancel, gen)
        apgd_t = APGD(
            self._sub_spec("apgd", steps=steps, random_start=spec.random_start, loss="dlr")
        )
        fab_t = FAB(self._sub_spec("fab", steps=steps))
        ranked = _ranked_targets(clean)
        for name, attack in (("apgd-t", apgd_t), ("fab-t", fab_t)):
            for i in range(ranked.shape[1]):
                yield (
                    f"{name} target {i + 1}",
                    _targeted(attack, model, ranked[:, i], cancel, gen),
                )
        square = self._square()
        device = clean.device

        def run_square(ball: Ball, goal: Goal, _: Tensor) -> BatchOutcome:
            # Square queries on CPU through an evaluator made from the same module.
            def evaluate(batch: np.ndarray) -> np.ndarray:
                return forward(model, torch.from_numpy(batch).to(device)).cpu().numpy()

            cpu_ball = Ball(ball.x.cpu(), spec.norm, spec.eps, spec.value_range)
            cpu_goal = Goal(goal.labels.cpu(), None)
            out = square.perturb(evaluate, cpu_ball, cpu_goal, cancel, gen)
            return BatchOutcome(*(t.to(device) for t in out))

        yield "square", run_square

    def single_run(
        self,
        model: torch.nn.Module,
        ball: Ball,
        goal: Goal,
        cancel: CancelToken,
        generator: torch.Generator,
    ) -> BatchOutcome:
        stages = self.perturb_in_stages(model, ball, goal, cancel, generator)
        while True:
            try:
                next(stages)
            except StopIteration as done:
                return done.value

    def perturb_in_stages(
        self,
        model: torch.nn.Module,
        ball: Ball,
        goal: Goal,
        cancel: CancelToken,
        generator: torch.Generator,
    ) -> Generator[Stage, None, BatchOutcome]:
        """The ensemble on one batch (restarts are 1), yielding each stage as it starts."""
        cancel.check()
        clean = forward(model, ball.x)
        n = ball.x.shape[0]
        device = ball.x.device
        state = BatchOutcome(
            x_adv=ball.x.clone(),
            logits=clean.clone(),
            steps=torch.zeros(n, dtype=torch.long, device=device),
            queries=torch.ones(n, dtype=torch.long, device=device),
            done=goal.success(clean),
            score=torch.full((n,), float("-inf"), device=device),
        )
        total = 2 + 2 * min(N_TARGETS, clean.shape[1] - 1)  # APGD-CE, the targeted, Square
        for i, (name, run) in enumerate(self.stages(model, clean, cancel, generator)):
            todo = (~state.done).nonzero()[:, 0]
            if todo.numel() == 0:
                break
            yield name, i, total, int(todo.numel())
            out = run(ball.subset(todo), goal.subset(todo), todo)
            state.steps[todo] += out.steps
            state.queries[todo] += out.queries
            # The first attack's point stands for examples no attack fools.
            keep = out.done if i > 0 else torch.ones_like(out.done)
            rows = todo[keep]
            state.x_adv[rows] = out.x_adv[keep]
            state.logits[rows] = out.logits[keep]
            state.score[rows] = out.score[keep].float()
            state.done[todo[out.done]] = True
        return state


def _ranked_targets(clean: Tensor) -> Tensor:
    """(B, min(N_TARGETS, K - 1)) the most likely classes other than the top one, in order."""
    k = clean.shape[1]
    order = clean.argsort(dim=1, descending=True)
    return order[:, 1 : 1 + min(N_TARGETS, k - 1)]


def _targeted(
    attack: WhiteBoxAttack,
    model: torch.nn.Module,
    targets: Tensor,
    cancel: CancelToken,
    gen: torch.Generator,
) -> _Run:
    """A stage aiming each row at its own target (`targets` (B,) over the whole batch),
    counting any wrong class as success."""

    def run(ball: Ball, goal: Goal, rows: Tensor) -> BatchOutcome:
        aimed = Goal(goal.labels, targets[rows], any_wrong_class=True)
        return attack.perturb(model, ball, aimed, cancel, gen)

    return run
