"""Entry points for the servicers: a spec in; progress, per-order partials and a result out."""

from __future__ import annotations

import enum
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np

from interscope_server.analysis.baselines import Baseline, ZeroBaseline
from interscope_server.analysis.exact import (
    ExactInteractions,
    all_pairs,
    exact_interactions,
    tabulate,
)
from interscope_server.analysis.game import CountingEvaluator, Evaluator, ModelGame
from interscope_server.analysis.players import GridPlayers, Players, resolve_players
from interscope_server.analysis.results import (
    InteractionProfile,
    OrderEstimate,
    PerturbationProfile,
    Progress,
)
from interscope_server.analysis.sampled import (
    DEFAULT_RATIOS,
    ContextSharing,
    OrderStats,
    SampledEstimator,
    SamplingPlan,
    TargetStatistic,
    check_orders,
    expected_sampled_forwards,
    independent_contexts,
    order_stats,
    orders_from_ratios,
    run_order,
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
    NEIGHBOURS = "neighbours"  # grid cells within neighbour_radius (Chebyshev distance)


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
    neighbour_radius: int = 1
    #: With NEIGHBOURS: draw this many of the neighbour pairs with the seed (the paper samples
    #: 200 neighbour pairs of a 16x16 grid); 0 keeps every neighbour pair.
    n_neighbour_pairs: int = 0
    contexts_per_order: int = 100  # expected contexts S per pair and order (sampled)
    context_sharing: ContextSharing = ContextSharing.AUTO  # shared or the paper's per-pair
    target_statistic: TargetStatistic = TargetStatistic.PAIRS  # what AUTO sharing optimises
    seed: int = 0
    return_pairs: bool = False
    max_exact_players: int = 20
    max_forwards: int = 5_000_000
    chunk_size: int = 1024


ProfileEvent = Progress | OrderEstimate | InteractionProfile
PerturbationEvent = Progress | OrderEstimate | PerturbationProfile


def select_pairs(spec: ProfileSpec, n: int) -> np.ndarray:
    """The (k, 2) pairs i < j the spec asks for, sorted."""
    if spec.pairs is PairSelection.ALL:
        return all_pairs(n)
    if spec.pairs is PairSelection.NEIGHBOURS:
        if not isinstance(spec.players, GridPlayers):
            raise InvalidArgument("neighbour pairs need grid players; use all or random pairs")
        pairs = spec.players.neighbour_pairs(spec.neighbour_radius)
        if pairs.shape[0] == 0:
            raise InvalidArgument("the grid has no neighbouring cells; use a larger grid")
        if not spec.n_neighbour_pairs:
            return pairs
        return _draw(pairs, spec.n_neighbour_pairs, spec.seed, "neighbour pairs")
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
    class_index: int
    pairs: np.ndarray
    orders: np.ndarray
    exact: bool
    sampling: SamplingPlan | None
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
) -> _Plan:
    _validate(spec)
    _, n = resolve_players(spec.players, np.asarray(x).shape)
    if spec.class_choice is ClassChoice.PREDICTED:
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
    per_input = (2**n) if exact else (sampling.forwards if sampling else 0) + 2 + extra_per_input
    needed = per_input * n_inputs
    if needed > spec.max_forwards:
        raise ResourceExhausted(
            f"this profile needs {needed} forward passes ({'exact' if exact else 'sampled'}, "
            f"{n} players); the limit is {spec.max_forwards}: use fewer players, orders, pairs "
            "or contexts"
        )
    return _Plan(n, cls, pairs, orders, exact, None if exact else sampling, per_input)


def _game(
    evaluate: Evaluator, x: np.ndarray, spec: ProfileSpec, cls: int, cancel: CancelToken | None
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
    )


def _ratios(orders: np.ndarray, n: int) -> np.ndarray:
    return np.asarray(orders / max(n - 2, 1), dtype=np.float64)


def _strength(mean_abs: np.ndarray, se: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """J^(m) = mean |I^(m)| over its mean across the orders used (NaN when all are zero)."""
    denom = float(np.nanmean(mean_abs)) if np.any(np.isfinite(mean_abs)) else 0.0
    if denom == 0.0 or not np.isfinite(denom):
        return np.full_like(mean_abs, np.nan), np.full_like(se, np.nan)
    return mean_abs / denom, se / denom


def _exact_order_values(
    e: ExactInteractions, orders: np.ndarray, pairs: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Per-pair I (L, k) and per-order mean, mean |I|, D over the pairs."""
    i, j = pairs[:, 0], pairs[:, 1]
    inter = e.interactions[orders][:, i, j]
    absdv = e.mean_abs_dv[orders][:, i, j]
    dis = np.full(len(orders), np.nan)
    for row in range(len(orders)):
        ok = absdv[row] > 0
        if ok.any():
            dis[row] = float((np.abs(inter[row, ok]) / absdv[row, ok]).mean())
    return inter, inter.mean(axis=1), np.abs(inter).mean(axis=1), dis


def exact_profile(
    e: ExactInteractions,
    orders: np.ndarray,
    pairs: np.ndarray,
    *,
    class_index: int = -1,
    value_function: str = "",
    return_pairs: bool = False,
    forwards: int = 0,
    seed: int | None = None,
    timings: dict[str, float] | None = None,
) -> InteractionProfile:
    """The InteractionProfile of an exact computation, aggregated over the given pairs."""
    n = e.n
    inter, mean, mean_abs, dis = _exact_order_values(e, orders, pairs)
    zeros = np.zeros(len(orders))
    strength, strength_se = _strength(mean_abs, zeros)
    return InteractionProfile(
        estimator="exact",
        n_players=n,
        class_index=class_index,
        value_function=value_function,
        orders=orders,
        ratios=_ratios(orders, n),
        mean=mean,
        mean_se=zeros.copy(),
        mean_abs=mean_abs,
        mean_abs_se=zeros.copy(),
        strength=strength,
        strength_se=strength_se,
        disentanglement=dis,
        disentanglement_se=zeros.copy(),
        samples_per_pair=np.array([float(np.round(_comb(n - 2, int(m)))) for m in orders]),
        value_full=e.value_full,
        value_empty=e.value_empty,
        pairs=pairs,
        pair_interactions=inter if return_pairs else None,
        pair_interactions_se=np.zeros_like(inter) if return_pairs else None,
        shapley_interaction=e.shapley_interaction,
        shapley_values=e.shapley_values,
        efficiency_residual=e.efficiency_residual(),
        shapley_efficiency_residual=e.value_full - e.value_empty - float(e.shapley_values.sum()),
        forwards=forwards,
        seed=seed,
        timings=dict(timings or {}),
    )


def _comb(n: int, k: int) -> float:
    from math import comb

    return float(comb(n, k))


def _sampled_profile(
    stats: list[OrderStats],
    plan: SamplingPlan,
    ends: np.ndarray,
    *,
    class_index: int,
    value_function: str,
    return_pairs: bool,
    forwards: int,
    timings: dict[str, float],
) -> InteractionProfile:
    n, orders = plan.n, plan.orders
    mean_abs = np.array([s.mean_abs for s in stats])
    mean_abs_se = np.array([s.mean_abs_se for s in stats])
    strength, strength_se = _strength(mean_abs, mean_abs_se)
    return InteractionProfile(
        estimator="sampled",
        context_sharing="independent" if plan.independent else "shared",
        n_players=n,
        class_index=class_index,
        value_function=value_function,
        orders=orders,
        ratios=_ratios(orders, n),
        mean=np.array([s.mean for s in stats]),
        mean_se=np.array([s.mean_se for s in stats]),
        mean_abs=mean_abs,
        mean_abs_se=mean_abs_se,
        strength=strength,
        strength_se=strength_se,
        disentanglement=np.array([s.disentanglement for s in stats]),
        disentanglement_se=np.array([s.disentanglement_se for s in stats]),
        samples_per_pair=np.array([float(s.counts.mean()) for s in stats]),
        value_full=float(ends[1]),
        value_empty=float(ends[0]),
        pairs=plan.pairs,
        pair_interactions=np.stack([s.pair_mean for s in stats]) if return_pairs else None,
        pair_interactions_se=np.stack([s.pair_se for s in stats]) if return_pairs else None,
        forwards=forwards,
        seed=plan.seed,
        timings=dict(timings),
    )


def _order_estimate(which: str, m: int, n: int, s: OrderStats) -> OrderEstimate:
    return OrderEstimate(
        which,
        m,
        m / max(n - 2, 1),
        s.mean,
        s.mean_abs,
        s.disentanglement,
        s.mean_se,
        s.mean_abs_se,
        s.disentanglement_se,
        float(s.counts.mean()),
    )


def _exact_estimates(which: str, p: InteractionProfile) -> Iterator[OrderEstimate]:
    for row, m in enumerate(p.orders):
        yield OrderEstimate(
            which,
            int(m),
            float(p.ratios[row]),
            float(p.mean[row]),
            float(p.mean_abs[row]),
            float(p.disentanglement[row]),
            0.0,
            0.0,
            0.0,
            float(p.samples_per_pair[row]),
        )


def _ends_and_singletons(game: ModelGame, with_singletons: bool) -> np.ndarray:
    """v(empty), v(N) and, if asked, v({i}) for every i."""
    n = game.n_players
    rows = [np.zeros(n, dtype=bool), np.ones(n, dtype=bool)]
    coalitions = np.stack(rows)
    if with_singletons:
        coalitions = np.concatenate([coalitions, np.eye(n, dtype=bool)])
    return game(coalitions)


def _prediction_forwards(spec: ProfileSpec) -> int:
    """Forwards spent finding the predicted class (one clean input), beyond the plan's own."""
    return 1 if spec.class_choice is ClassChoice.PREDICTED else 0


def profile_events(
    evaluate: Evaluator,
    x: np.ndarray,
    spec: ProfileSpec,
    class_index: int | None = None,
    cancel: CancelToken | None = None,
) -> Iterator[ProfileEvent]:
    """Profile one input x (*input_shape): Progress events, an OrderEstimate per order, then the
    InteractionProfile last. Raises InvalidArgument / ResourceExhausted before any heavy work."""
    t0 = time.perf_counter()
    x = np.asarray(x, dtype=np.float32)
    evaluate = counted = CountingEvaluator(evaluate)
    plan = _plan(evaluate, x, spec, class_index, n_inputs=1, extra_per_input=0)
    game = _game(evaluate, x, spec, plan.class_index, cancel)
    planned = plan.forwards_per_input + _prediction_forwards(spec)
    if plan.exact:
        values = np.empty(2**plan.n)
        for _ in tabulate(game, values, spec.chunk_size, cancel):
            yield Progress(counted.forwards, planned, "clean")
        t1 = time.perf_counter()
        e = exact_interactions(values, plan.n)
        prof = exact_profile(
            e,
            plan.orders,
            plan.pairs,
            class_index=plan.class_index,
            value_function=spec.value.value,
            return_pairs=spec.return_pairs,
            forwards=counted.forwards,
            seed=None,
            timings={"forwards_s": t1 - t0, "compute_s": time.perf_counter() - t1},
        )
        yield from _exact_estimates("clean", prof)
        prof.timings["total_s"] = time.perf_counter() - t0
        yield prof
        return
    sampling = plan.sampling
    assert sampling is not None
    ends = _ends_and_singletons(game, with_singletons=False)
    stats: list[OrderStats] = []
    for op in sampling.order_plans:
        for item in run_order(game, op, spec.chunk_size, cancel):
            if isinstance(item, int):
                yield Progress(counted.forwards, planned, "clean")
            else:
                s = order_stats(item, op.exhaustive)
                stats.append(s)
                yield _order_estimate("clean", op.order, plan.n, s)
    prof = _sampled_profile(
        stats,
        sampling,
        ends,
        class_index=plan.class_index,
        value_function=spec.value.value,
        return_pairs=spec.return_pairs,
        forwards=counted.forwards,
        timings={"total_s": time.perf_counter() - t0},
    )
    yield prof


def perturbation_events(
    evaluate: Evaluator,
    x: np.ndarray,
    x_adv: np.ndarray,
    spec: ProfileSpec,
    class_index: int | None = None,
    cancel: CancelToken | None = None,
) -> Iterator[PerturbationEvent]:
    """Profile x and x_adv on the same players, baseline, class and contexts: Progress events,
    OrderEstimates ("clean", "perturbed", "delta"), then the PerturbationProfile last.

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
    n = plan.n
    clean = _game(evaluate, x, spec, plan.class_index, cancel)
    adv = _game(evaluate, x_adv, spec, plan.class_index, cancel)
    planned = 2 * plan.forwards_per_input + _prediction_forwards(spec)
    cls, vf, rp = plan.class_index, spec.value.value, spec.return_pairs

    if plan.exact:
        tables = []
        for stage, game in (("clean", clean), ("perturbed", adv)):
            values = np.empty(2**n)
            for _ in tabulate(game, values, spec.chunk_size, cancel):
                yield Progress(counted.forwards, planned, stage)
            tables.append(values)
        t1 = time.perf_counter()
        ec, ea = exact_interactions(tables[0], n), exact_interactions(tables[1], n)
        pc = exact_profile(
            ec,
            plan.orders,
            plan.pairs,
            forwards=clean.forwards,
            class_index=cls,
            value_function=vf,
            return_pairs=rp,
        )
        pa = exact_profile(
            ea,
            plan.orders,
            plan.pairs,
            forwards=adv.forwards,
            class_index=cls,
            value_function=vf,
            return_pairs=rp,
        )
        yield from _exact_estimates("clean", pc)
        yield from _exact_estimates("perturbed", pa)
        delta_full = ec.interactions - ea.interactions
        i, j = plan.pairs[:, 0], plan.pairs[:, 1]
        delta_pairs = delta_full[plan.orders][:, i, j]
        delta_mean = delta_pairs.mean(axis=1)
        for row, m in enumerate(plan.orders):
            yield OrderEstimate(
                "delta",
                int(m),
                float(pc.ratios[row]),
                float(delta_mean[row]),
                float(np.abs(delta_pairs[row]).mean()),
                float("nan"),
                0.0,
                0.0,
                0.0,
                float(pc.samples_per_pair[row]),
            )
        all_orders = np.arange(n - 1)
        terms = ec.order_weights() * delta_full.sum(axis=(1, 2))
        gap = ec.value_full - ea.value_full
        empty = ec.value_empty - ea.value_empty
        single = float(ec.singletons.sum() - ea.singletons.sum())
        yield PerturbationProfile(
            clean=pc,
            perturbed=pa,
            orders=plan.orders,
            delta_mean=delta_mean,
            delta_mean_se=np.zeros_like(delta_mean),
            pairs=plan.pairs,
            delta_pair_interactions=delta_pairs if spec.return_pairs else None,
            delta_pair_interactions_se=np.zeros_like(delta_pairs) if spec.return_pairs else None,
            value_gap=gap,
            empty_term=empty,
            singleton_term=single,
            decomposition_orders=all_orders,
            order_terms=terms,
            order_terms_se=np.zeros_like(terms),
            decomposition_residual=gap - empty - single - float(terms.sum()),
            decomposition_complete=True,
            estimator="exact",
            forwards=counted.forwards,
            seed=None,
            timings={"forwards_s": t1 - t0, "total_s": time.perf_counter() - t0},
        )
        return

    sampling = plan.sampling
    assert sampling is not None
    ends_c = _ends_and_singletons(clean, with_singletons=True)
    ends_a = _ends_and_singletons(adv, with_singletons=True)
    stats_c: list[OrderStats] = []
    stats_a: list[OrderStats] = []
    stats_d: list[OrderStats] = []
    for op in sampling.order_plans:
        deltas: list[np.ndarray] = []
        for stage, game in (("clean", clean), ("perturbed", adv)):
            for item in run_order(game, op, spec.chunk_size, cancel):
                if isinstance(item, int):
                    yield Progress(counted.forwards, planned, stage)
                else:
                    deltas.append(item)
        sc, sa = order_stats(deltas[0], op.exhaustive), order_stats(deltas[1], op.exhaustive)
        sd = order_stats(
            deltas[0] - deltas[1], op.exhaustive
        )  # paired: the same contexts on both inputs
        stats_c.append(sc)
        stats_a.append(sa)
        stats_d.append(sd)
        yield _order_estimate("clean", op.order, n, sc)
        yield _order_estimate("perturbed", op.order, n, sa)
        yield _order_estimate("delta", op.order, n, sd)
    timings = {"total_s": time.perf_counter() - t0}
    pc = _sampled_profile(
        stats_c,
        sampling,
        ends_c,
        forwards=clean.forwards,
        timings=timings,
        class_index=cls,
        value_function=vf,
        return_pairs=rp,
    )
    pa = _sampled_profile(
        stats_a,
        sampling,
        ends_a,
        forwards=adv.forwards,
        timings=timings,
        class_index=cls,
        value_function=vf,
        return_pairs=rp,
    )
    delta_mean = np.array([s.mean for s in stats_d])
    delta_se = np.array([s.mean_se for s in stats_d])
    weights = (n - 1 - plan.orders).astype(np.float64)  # w_m * n(n-1): mean over pairs -> sum
    terms, terms_se = weights * delta_mean, weights * delta_se
    gap = float(ends_c[1] - ends_a[1])
    empty = float(ends_c[0] - ends_a[0])
    single = float((ends_c[2:] - ends_c[0]).sum() - (ends_a[2:] - ends_a[0]).sum())
    complete = spec.pairs is PairSelection.ALL and np.array_equal(plan.orders, np.arange(n - 1))
    residual = gap - empty - single - float(terms.sum()) if complete else float("nan")
    yield PerturbationProfile(
        clean=pc,
        perturbed=pa,
        orders=plan.orders,
        delta_mean=delta_mean,
        delta_mean_se=delta_se,
        pairs=plan.pairs,
        delta_pair_interactions=np.stack([s.pair_mean for s in stats_d])
        if spec.return_pairs
        else None,
        delta_pair_interactions_se=np.stack([s.pair_se for s in stats_d])
        if spec.return_pairs
        else None,
        value_gap=gap,
        empty_term=empty,
        singleton_term=single,
        decomposition_orders=plan.orders,
        order_terms=terms,
        order_terms_se=terms_se,
        decomposition_residual=residual,
        decomposition_complete=bool(complete),
        estimator="sampled",
        forwards=counted.forwards,
        seed=sampling.seed,
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
