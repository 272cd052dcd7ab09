"""The streaming entry point: event order, preconditions, input checks, seeds, cancellation."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch

from interscope_server.attacks import (
    WHITE_BOX_ATTACKS,
    AttackName,
    AttackSpec,
    AttackSummary,
    Evaluator,
    ExampleProgress,
    ExampleResult,
    attack_events,
    run_attack,
)
from interscope_server.cancel import CancelToken
from interscope_server.errors import (
    Cancelled,
    DeadlineExceeded,
    FailedPrecondition,
    InvalidArgument,
)


def _evaluator(model: torch.nn.Module) -> Evaluator:
    def evaluate(x: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            out: np.ndarray = model(torch.from_numpy(x)).numpy()
        return out

    return evaluate


class CancelAfter(torch.nn.Module):
    """Counts forward passes and cancels the token during the n-th, as a client would."""

    def __init__(self, inner: torch.nn.Module, token: CancelToken, n: int) -> None:
        super().__init__()
        self.inner, self.token, self.n, self.calls = inner, token, n, 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        if self.calls == self.n:
            self.token.cancel("client went away")
        out: torch.Tensor = self.inner(x)
        return out


def test_events_stream_results_then_progress_per_batch_and_summary_last(
    standard_model: torch.nn.Module, digits: tuple[np.ndarray, np.ndarray]
) -> None:
    x, y = digits[0][:10], digits[1][:10]
    spec = AttackSpec("pgd", eps=0.1, steps=5)
    events = list(attack_events(spec, x, y, standard_model, None, batch_size=4))
    letter = {ExampleResult: "E", ExampleProgress: "P", AttackSummary: "A"}
    kinds = [letter[type(e)] for e in events]
    assert "".join(kinds) == "EEEEP" + "EEEEP" + "EEP" + "A"
    progress = [e for e in events if isinstance(e, ExampleProgress)]
    assert [(p.examples_done, p.batches_done) for p in progress] == [(4, 1), (8, 2), (10, 3)]
    assert all(p.examples_total == 10 and p.batches_total == 3 for p in progress)
    results = [e for e in events if isinstance(e, ExampleResult)]
    assert [r.index for r in results] == list(range(10))
    summary = events[-1]
    assert isinstance(summary, AttackSummary)
    assert summary.n_examples == 10
    assert summary.n_clean_correct == sum(r.clean_prediction == r.label for r in results)
    assert summary.n_robust == sum(r.adversarial_prediction == r.label for r in results)
    assert summary.robust_accuracy == summary.n_robust / 10
    assert summary.n_attacked == sum(r.attacked for r in results)
    assert summary.total_queries == sum(r.queries for r in results)
    for r in results:
        if not r.attacked:  # already misclassified: returned unchanged and counted non-robust
            assert r.success and r.l0 == 0 and r.steps == 0
            np.testing.assert_array_equal(r.x_adv, x[r.index])


@pytest.mark.parametrize("name", WHITE_BOX_ATTACKS)
def test_white_box_without_gradients_is_a_failed_precondition_naming_square(
    name: AttackName, digits: tuple[np.ndarray, np.ndarray]
) -> None:
    x, y = digits
    with pytest.raises(FailedPrecondition, match=r"needs gradients.*square"):
        run_attack(AttackSpec(name), x, y, None, lambda a: a)


@pytest.mark.parametrize(
    ("spec", "x_change", "message"),
    [
        (AttackSpec("pgd"), 1.5, "outside value_range"),
        (AttackSpec("pgd"), float("nan"), "NaN"),
        (AttackSpec("pgd", targeted=True, target_classes=(1, 2)), None, "one per input"),
        (AttackSpec("pgd", targeted=True, target_classes=(42,)), None, "must be in 0..9"),
        (AttackSpec("square", norm="l2", eps=1.0), "vector", "image-shaped"),
    ],
)
def test_bad_inputs_are_invalid_arguments(
    spec: AttackSpec,
    x_change: object,
    message: str,
    standard_model: torch.nn.Module,
    digits: tuple[np.ndarray, np.ndarray],
) -> None:
    x, y = digits[0][:6].copy(), digits[1][:6]
    if isinstance(x_change, float):
        x[0, 0, 0, 0] = x_change
    elif x_change == "vector":
        x = x.reshape(6, -1)
    with pytest.raises(InvalidArgument, match=message):
        run_attack(spec, x, y, standard_model, _evaluator(standard_model))


def test_target_equal_to_label_is_rejected(
    standard_model: torch.nn.Module, digits: tuple[np.ndarray, np.ndarray]
) -> None:
    x, y = digits
    spec = AttackSpec("pgd", targeted=True, target_classes=(int(y[0]),))
    with pytest.raises(InvalidArgument, match="must differ from the label"):
        run_attack(spec, x, y, standard_model, None)


@pytest.mark.parametrize(
    "spec",
    [
        AttackSpec("pgd", eps=0.1, steps=6, restarts=2),
        AttackSpec("apgd", norm="l2", eps=1.0, steps=6),
        AttackSpec("square", eps=0.1, query_budget=40),
    ],
    ids=lambda s: f"{s.name}-{s.norm}",
)
def test_results_are_determined_by_the_seed(
    spec: AttackSpec, standard_model: torch.nn.Module, digits: tuple[np.ndarray, np.ndarray]
) -> None:
    x, y = digits[0][:12], digits[1][:12]
    evaluate = _evaluator(standard_model)
    first = run_attack(spec, x, y, standard_model, evaluate, batch_size=6)
    again = run_attack(spec, x, y, standard_model, evaluate, batch_size=6)
    np.testing.assert_array_equal(first.x_adv, again.x_adv)
    assert first.summary == again.summary
    other = AttackSpec(**{**spec.__dict__, "seed": 7})
    moved = run_attack(other, x, y, standard_model, evaluate, batch_size=6)
    assert not np.array_equal(first.x_adv, moved.x_adv)


@pytest.mark.parametrize("name", ["pgd", "apgd", "pgd_margin", "fgsm"])
def test_cancellation_stops_at_the_next_step(
    name: AttackName, standard_model: torch.nn.Module, digits: tuple[np.ndarray, np.ndarray]
) -> None:
    x, y = digits
    token = CancelToken()
    # Pass 1 is the clean evaluation; cancel arrives during the attack's first gradient pass.
    model = CancelAfter(standard_model, token, n=2)
    spec = AttackSpec(name, eps=0.3, steps=1 if name == "fgsm" else 50)
    with pytest.raises(Cancelled, match="client went away"):
        run_attack(spec, x, y, model, None, cancel=token, batch_size=len(x))
    assert model.calls == 2


def test_square_cancellation_stops_querying(digits: tuple[np.ndarray, np.ndarray]) -> None:
    x = digits[0]
    token = CancelToken()
    calls: list[int] = []

    def evaluate(batch: np.ndarray) -> np.ndarray:
        calls.append(len(batch))
        if len(calls) == 3:
            token.cancel()
        logits = np.zeros((len(batch), 10), dtype=np.float32)
        logits[np.arange(len(batch)), 0] = 1.0  # predicts 0: examples labelled 0 stay unfooled
        return logits

    spec = AttackSpec("square", query_budget=100)
    with pytest.raises(Cancelled):
        run_attack(spec, x, np.zeros(len(x), dtype=np.int64), None, evaluate, cancel=token)
    assert len(calls) == 3


def test_past_deadline_stops_before_any_forward_pass(
    standard_model: torch.nn.Module, digits: tuple[np.ndarray, np.ndarray]
) -> None:
    x, y = digits
    token = CancelToken(deadline=time.monotonic() - 1.0)
    model = CancelAfter(standard_model, CancelToken(), n=-1)
    with pytest.raises(DeadlineExceeded):
        run_attack(AttackSpec("pgd"), x, y, model, None, cancel=token)
    assert model.calls == 0


@pytest.mark.parametrize(("name", "batch"), [("pgd", 64), ("fgsm", 64), ("square", 256)])
def test_the_default_batch_is_the_attacks_own(
    standard_model: torch.nn.Module, digits: tuple[np.ndarray, np.ndarray], name: str, batch: int
) -> None:
    """White-box attacks work on 64 inputs at once; black-box ones on 256, since each of their
    queries is one forward of the batch through the model's batcher and host (a fixed cost per
    query that more inputs share). Counted here as the forwards the evaluator is called with."""
    n = 300
    x = np.concatenate([digits[0]] * (n // len(digits[0]) + 1))[:n]
    y = np.concatenate([digits[1]] * (n // len(digits[1]) + 1))[:n]
    extra = {"query_budget": 2} if name == "square" else {"steps": 1}
    spec = AttackSpec(name, eps=0.05, **extra)  # type: ignore[arg-type]
    calls: list[int] = []
    evaluate = _evaluator(standard_model)

    def counting(rows: np.ndarray) -> np.ndarray:
        calls.append(len(rows))
        return evaluate(rows)

    events = list(attack_events(spec, x, y, standard_model, counting))
    progress = [e for e in events if isinstance(e, ExampleProgress)]
    bounds = [*range(batch, n, batch), n]
    assert [p.examples_done for p in progress] == bounds
    if name == "square":  # the first forward of each batch is its clean pass, of all its inputs
        assert calls[0] == batch
