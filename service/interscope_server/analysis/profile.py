"""Entry points for the servicers: a spec in; progress, per-order partials and a result out."""

from __future__ import annotations

import enum
import time
from collections.abc import Generator, Iterator
from dataclasses import dataclass, field

import numpy as np

from interscope_server.analysis.baselines import Baseline, ZeroBaseline
from interscope_server.analysis.estimators import (
    Estimator,
    ExactEstimator,
    GameMeasure,
    Measured,
    SampledPlanEstimator,
    Tick,
)
from interscope_server.analysis.exact import all_pairs
from interscope_server.analysis.game import CountingEvaluator, Evaluator, ModelGame
from interscope_server.analysis.players import GridPlayers, Players, resolve_players
from interscope_server.analysis.results import (
    ForwardProgress,
    InteractionProfile,
    OrderEstimate,
    PerturbationProfile,
)
from interscope_server.analysis.sampled import (
    DEFAULT_RATIOS,
    ContextSharing,
    SampledEstimator,
    SamplingPlan,
    TargetStatistic,
    check_orders,
    expected_sampled_forwards,
    independent_contexts,
    orders_from_ratios,
)
from interscope_server.analysis.values import ClassChoice, ValueFunction, resolve_class
from interscope_server.cancel import CancelToken
from interscope_server.errors import InvalidArgument, ResourceExhausted


class EstimatorChoice(enum.Enum):
    AUTO = "auto"  # exact when 2^n <= the sampled plan's forwards and n <= max_exact_players
    EXACT = "exact"
    SAMPLED = "sampled"


class PairSelection(enum.Enum):
    ALL = "all"
    RANDOM = "random"  # n_random_pairs distinct pairs drawn with the seed
    NEIGHBORS = "neighbors"  # grid cells within neighbor_radius (Chebyshev distance)


@dataclass(frozen=True)
class ProfileSpec:
    """What to compute for one input (validated by the entry points; limits applied there)."""

    players: Players
    baseline: Baseline = field(default_factory=ZeroBaseline)
    value: ValueFunction = ValueFunction.LOG_PROB
    class_choice: ClassChoice = ClassChoice.LABEL
    orders: tuple[int, ...] | None = None  # explicit orders m; when None, `ratios` are used
    ratios: tuple[float, ...] = DEFAULT_RATIOS
    estimator: EstimatorChoice = EstimatorChoice.AUTO
    pairs: PairSelection = PairSelection.ALL
    n_random_pairs: int = 200
    neighbor_radius: int = 1
    #: With NEIGHBORS: draw this many of the neighbor pairs with the seed (the paper samples
    #: 200 neighbor pairs of a 16x16 grid); 0 keeps every neighbor pair.
    n_neighbor_pairs: int = 0
    contexts_per_order: int = 100  # expected contexts S per pair and order (sampled)
    context_sharing: ContextSharing = ContextSharing.AUTO  # shared or the paper's per-pair
    target_statistic: TargetStatistic = TargetStatistic.PAIRS  # what AUTO sharing optimises
    seed: int = 0
    return_pairs: bool = False
    max_exact_players: int = 20
    max_forwards: int = 5_000_000
    chunk_size: int = 1024


ProfileEvent = ForwardProgress | OrderEstimate | InteractionProfile
PerturbationEvent = ForwardProgress | OrderEstimate | PerturbationProfile


def select_pairs(spec: ProfileSpec, n: int) -> np.ndarray:
    """The (k, 2) pairs i < j the spec asks for, sorted."""
    if spec.pairs is PairSelection.ALL:
        return all_pairs(n)
    if spec.pairs is PairSelection.NEIGHBORS:
        if not isinstance(spec.players, GridPlayers):
            raise InvalidArgument("neighbor pairs need grid players; use all or random pairs")
        pairs = spec.players.neighbor_pairs(spec.neighbor_radius)
        if pairs.shape[0] == 0:
            raise InvalidArgument("the grid has no neighboring cells; use a larger grid")
        if not spec.n_neighbor_pairs:
            return pairs
        return _draw(pairs, spec.n_neighbor_pairs, spec.seed, "neighbor pairs")
    return _draw(all_pairs(n), spec.n_random_pairs, spec.seed, f"random pairs for {n} players")


def _draw(pairs: np.ndarray, k: int, seed: int, what: str) -> np.ndarray:
    """k of the (sorted) pairs, drawn without replacement with the seed, kept sorted."""
    if not 1 <= k <= pairs.shape[0]:
        raise InvalidArgument(f"{k} {what} is not allowed: give 1..{pairs.shape[0]}")
    rng = np.random.default_rng(np.random.SeedSequence([seed, 0]))
    return pairs[np.sort(rng.choice(pairs.shape[0], size=k, replace=False))]


def resolve_orders(spec: ProfileSpec, n: int) -> np.ndarray:
    if spec.orders is not None:
        return check_orders(spec.orders, n)
    return orders_from_ratios(spec.ratios, n)


@dataclass(frozen=True)
class _Plan:
    n: int
    class_index: int | None  # None: the prediction, found by the game (defer_prediction)
    estimator: Estimator
    forwards_per_input: int


def _validate(spec: ProfileSpec) -> None:
    if spec.chunk_size < 1:
        raise InvalidArgument(f"chunk size {spec.chunk_size} is not allowed: it must be >= 1")
    if spec.max_exact_players < 2:
        raise InvalidArgument("max_exact_players must be >= 2")
    if spec.contexts_per_order < 2:
        raise InvalidArgument(
            f"contexts per order {spec.contexts_per_order} is not allowed: give at least 2"
        )


def _plan(
    evaluate: Evaluator,
    x: np.ndarray,
    spec: ProfileSpec,
    class_index: int | None,
    n_inputs: int,
    extra_per_input: int,
    defer_prediction: bool = False,
) -> _Plan:
    """The estimator and class for x. With `defer_prediction` a predicted class is left None
    for the game to find on its first forward (see ModelGame)."""
    _validate(spec)
    _, n = resolve_players(spec.players, np.asarray(x).shape)
    cls: int | None
    if spec.class_choice is ClassChoice.PREDICTED and defer_prediction:
        cls = None
    elif spec.class_choice is ClassChoice.PREDICTED:
        clean_logits = np.asarray(evaluate(np.asarray(x, dtype=np.float32)[None]))
        cls = resolve_class(spec.class_choice, class_index, clean_logits)
    elif class_index is None:
        raise InvalidArgument(
            f"class choice {spec.class_choice.value!r} needs a class index; none was given"
        )
    elif class_index < 0:
        raise InvalidArgument(f"class {class_index} is out of range; classes start at 0")
    else:
        # The upper end needs the model's class count: class_values checks it on the first
        # forward, against the logits themselves.
        cls = int(class_index)
    pairs = select_pairs(spec, n)
    orders = resolve_orders(spec, n)
    # Decide and check limits on the expected cost first: a sampling plan's arrays grow with
    # contexts x pairs, so materialising one that will be refused could take gigabytes.
    independent = independent_contexts(spec.context_sharing, spec.target_statistic, len(pairs))
    expected = expected_sampled_forwards(
        n, orders, len(pairs), spec.contexts_per_order, independent
    )
    estimator = SampledEstimator(pairs, orders, spec.contexts_per_order, spec.seed, independent)
    sampling: SamplingPlan | None = None
    if spec.estimator is EstimatorChoice.EXACT:
        if n > spec.max_exact_players:
            raise ResourceExhausted(
                f"the exact estimator needs 2^{n} forwards for {n} players; at most "
                f"{spec.max_exact_players} players are allowed (use the sampled estimator)"
            )
        exact = True
    elif spec.estimator is EstimatorChoice.SAMPLED or n > spec.max_exact_players:
        exact = False
    elif 2**n <= expected + 2 + extra_per_input:
        exact = True  # cheaper than even the sampled plan's pair rows alone
    else:
        # Close call on a small game (expected < 2^n <= 2^max_exact_players): the real plan is
        # small enough to draw, and its exact cost decides.
        sampling = estimator.plan(n)
        exact = 2**n <= sampling.forwards + 2 + extra_per_input
    if not exact and 0.9 * expected * n_inputs > spec.max_forwards:  # margin: expected vs drawn
        raise ResourceExhausted(
            f"this profile needs about {int(expected) * n_inputs} forward passes (sampled, "
            f"{n} players); the limit is {spec.max_forwards}: use fewer players, orders, pairs "
            "or contexts"
        )
    if not exact and sampling is None:
        sampling = estimator.plan(n)
    chosen: Estimator
    if exact:
        chosen = ExactEstimator(n, pairs, orders, spec.chunk_size)
    else:
        assert sampling is not None
        chosen = SampledPlanEstimator(sampling, spec.chunk_size)
    per_input = chosen.forwards_per_game + (0 if exact else extra_per_input)
    needed = per_input * n_inputs
    if needed > spec.max_forwards:
        raise ResourceExhausted(
            f"this profile needs {needed} forward passes ({'exact' if exact else 'sampled'}, "
            f"{n} players); the limit is {spec.max_forwards}: use fewer players, orders, pairs "
            "or contexts"
        )
    return _Plan(n, cls, chosen, per_input)


def _game(
    evaluate: Evaluator,
    x: np.ndarray,
    spec: ProfileSpec,
    cls: int | None,
    cancel: CancelToken | None,
    predict: bool = False,
) -> ModelGame:
    return ModelGame(
        evaluate,
        x,
        spec.players,
        spec.baseline,
        spec.value,
        cls,
        chunk_size=spec.chunk_size,
        cancel=cancel,
        predict=predict,
    )


def _strength(mean_abs: np.ndarray, se: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """J^(m) = mean |I^(m)| over its mean across the orders used (NaN when all are zero)."""
    kept = mean_abs[~np.isnan(mean_abs)]  # nanmean's, without its overhead on a few orders
    denom = float(kept.mean()) if np.isfinite(kept).any() else 0.0
    if denom == 0.0 or not np.isfinite(denom):
        return np.full_like(mean_abs, np.nan), np.full_like(se, np.nan)
    return mean_abs / denom, se / denom


def _interaction_profile(
    estimator: Estimator,
    measure: GameMeasure,
    spec: ProfileSpec,
    class_index: int,
    timings: dict[str, float],
    forwards: int,
    prediction: int | None = None,
) -> InteractionProfile:
    """The InteractionProfile of one measured game (the one place it is built)."""
    table, e = measure.table, measure.exact
    shapley_values: np.ndarray | None = None
    shapley_residual: float | None = None
    if e is not None:
        shapley_values = e.shapley_values
        shapley_residual = e.value_full - e.value_empty - float(shapley_values.sum())
    strength, strength_stderr = _strength(table.mean_abs, table.mean_abs_stderr)
    pairs = spec.return_pairs
    return InteractionProfile(
        estimator=estimator.name,
        context_sharing=estimator.context_sharing,
        n_players=table.n,
        class_index=class_index,
        value_function=spec.value.value,
        orders=table.orders,
        ratios=table.ratios,
        mean=table.mean,
        mean_stderr=table.mean_stderr,
        mean_abs=table.mean_abs,
        mean_abs_stderr=table.mean_abs_stderr,
        strength=strength,
        strength_stderr=strength_stderr,
        disentanglement=table.disentanglement,
        disentanglement_stderr=table.disentanglement_stderr,
        samples_per_pair=table.samples_per_pair,
        value_full=measure.value_full,
        value_empty=measure.value_empty,
        pairs=estimator.pairs,
        pair_interactions=table.pair_mean if pairs else None,
        pair_interactions_stderr=table.pair_se if pairs else None,
        shapley_interaction=None if e is None else e.shapley_interaction,
        shapley_values=shapley_values,
        efficiency_residual=None if e is None else e.efficiency_residual(),
        shapley_efficiency_residual=shapley_residual,
        forwards=forwards,
        seed=estimator.seed,
        timings=dict(timings),
        prediction=prediction,
    )


def _prediction_forwards(spec: ProfileSpec, predict: bool = False) -> int:
    """Forwards spent finding the predicted class (one clean input), beyond the plan's own."""
    return 1 if predict or spec.class_choice is ClassChoice.PREDICTED else 0


def _progress(
    ticks: Generator[Tick, None, Measured], counted: CountingEvaluator, planned: int
) -> Generator[ForwardProgress | OrderEstimate, None, Measured]:
    """The estimator's ticks as ForwardProgress of the forwards counted so far, partials as they
    are; returns what the estimator measured."""
    while True:
        try:
            tick = next(ticks)
        except StopIteration as done:
            return done.value
        yield ForwardProgress(counted.forwards, planned, tick) if isinstance(tick, str) else tick


def profile_events(
    evaluate: Evaluator,
    x: np.ndarray,
    spec: ProfileSpec,
    class_index: int | None = None,
    cancel: CancelToken | None = None,
    *,
    predict: bool = False,
) -> Iterator[ProfileEvent]:
    """Profile one input x (*input_shape): ForwardProgress events, an OrderEstimate per order, then
    the InteractionProfile last. Raises InvalidArgument / ResourceExhausted before any heavy
    work.

    The predicted class, when the spec asks for it, costs one row on the first forward (not a
    pass of its own); `predict` spends that row with a given class too, to report the model's
    prediction (`InteractionProfile.prediction`)."""
    t0 = time.perf_counter()
    x = np.asarray(x, dtype=np.float32)
    evaluate = counted = CountingEvaluator(evaluate)
    plan = _plan(
        evaluate, x, spec, class_index, n_inputs=1, extra_per_input=0, defer_prediction=True
    )
    game = _game(evaluate, x, spec, plan.class_index, cancel, predict)
    planned = plan.forwards_per_input + _prediction_forwards(spec, predict)
    measured = yield from _progress(
        plan.estimator.measure([("clean", game)], False, cancel), counted, planned
    )
    timings = {"total_s": time.perf_counter() - t0}
    (measure,) = measured.games
    # The profile counts every forward it caused, the predicted-class row included.
    yield _interaction_profile(
        plan.estimator, measure, spec, game.class_index, timings, counted.forwards, game.prediction
    )


def perturbation_events(
    evaluate: Evaluator,
    x: np.ndarray,
    x_adv: np.ndarray,
    spec: ProfileSpec,
    class_index: int | None = None,
    cancel: CancelToken | None = None,
) -> Iterator[PerturbationEvent]:
    """Profile x and x_adv on the same players, baseline, class and contexts: ForwardProgress
    events, OrderEstimates ("clean", "adversarial", "delta"), then the PerturbationProfile last.

    With the predicted-class choice, the class is the prediction on the clean x."""
    t0 = time.perf_counter()
    x = np.asarray(x, dtype=np.float32)
    x_adv = np.asarray(x_adv, dtype=np.float32)
    if x.shape != x_adv.shape:
        raise InvalidArgument(
            f"the perturbed input's shape {x_adv.shape} differs from the clean one's {x.shape}"
        )
    n_guess = resolve_players(spec.players, x.shape)[1]
    evaluate = counted = CountingEvaluator(evaluate)
    plan = _plan(evaluate, x, spec, class_index, n_inputs=2, extra_per_input=n_guess)
    clean = _game(evaluate, x, spec, plan.class_index, cancel)
    adv = _game(evaluate, x_adv, spec, plan.class_index, cancel)
    planned = 2 * plan.forwards_per_input + _prediction_forwards(spec)
    games = [("clean", clean), ("adversarial", adv)]
    measured = yield from _progress(plan.estimator.measure(games, True, cancel), counted, planned)
    timings = {"total_s": time.perf_counter() - t0}
    yield _perturbation_profile(plan, spec, measured, counted.forwards, timings)


def _perturbation_profile(
    plan: _Plan,
    spec: ProfileSpec,
    measured: Measured,
    forwards: int,
    timings: dict[str, float],
) -> PerturbationProfile:
    """How the perturbation moved the interactions, and the decomposition of its value gap."""
    estimator, (clean, perturbed), delta = plan.estimator, measured.games, measured.delta
    assert delta is not None and plan.class_index is not None  # never deferred here
    pc, pa = (
        _interaction_profile(estimator, m, spec, plan.class_index, timings, m.forwards)
        for m in measured.games
    )
    parts = estimator.decompose(measured, spec.pairs is PairSelection.ALL)
    gap = clean.value_full - perturbed.value_full
    empty = clean.value_empty - perturbed.value_empty
    single = clean.first_order_term - perturbed.first_order_term
    residual = gap - empty - single - float(parts.terms.sum()) if parts.complete else np.nan
    return PerturbationProfile(
        clean=pc,
        adversarial=pa,
        orders=delta.orders,
        delta_mean=delta.mean,
        delta_mean_stderr=delta.mean_stderr,
        pairs=estimator.pairs,
        delta_pair_interactions=delta.pair_mean if spec.return_pairs else None,
        delta_pair_interactions_stderr=delta.pair_se if spec.return_pairs else None,
        utility_change=gap,
        baseline_term=empty,
        first_order_term=single,
        decomposition_orders=parts.orders,
        order_terms=parts.terms,
        order_terms_stderr=parts.terms_se,
        residual=float(residual),
        decomposition_complete=parts.complete,
        estimator=estimator.name,
        forwards=forwards,
        seed=estimator.seed,
        timings=timings,
    )


def run_profile(
    evaluate: Evaluator,
    x: np.ndarray,
    spec: ProfileSpec,
    class_index: int | None = None,
    cancel: CancelToken | None = None,
) -> InteractionProfile:
    """profile_events, keeping only the final result."""
    last: ProfileEvent | None = None
    for event in profile_events(evaluate, x, spec, class_index, cancel):
        last = event
    assert isinstance(last, InteractionProfile)
    return last


def run_perturbation(
    evaluate: Evaluator,
    x: np.ndarray,
    x_adv: np.ndarray,
    spec: ProfileSpec,
    class_index: int | None = None,
    cancel: CancelToken | None = None,
) -> PerturbationProfile:
    """perturbation_events, keeping only the final result."""
    last: PerturbationEvent | None = None
    for event in perturbation_events(evaluate, x, x_adv, spec, class_index, cancel):
        last = event
    assert isinstance(last, PerturbationProfile)
    return last
