"""Result types of the interaction engine: plain dataclasses holding numpy arrays."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass(frozen=True)
class ForwardProgress:
    """Forward passes done so far and planned in total for the request."""

    forwards_done: int
    forwards_planned: int
    stage: str  # "clean", "adversarial", ...


@dataclass(frozen=True)
class OrderEstimate:
    """A partial result: the aggregates of one order m as soon as it is known.

    `input` says which game it describes: "clean", "adversarial" or "delta" (clean - adversarial).
    Standard errors are 0 for exact results.
    """

    input: str
    order: int
    ratio: float  # m / (n - 2)
    mean: float  # signed mean over pairs of I^(m)(i,j)
    mean_abs: float  # mean over pairs of |I^(m)(i,j)|
    disentanglement: float  # mean over pairs of |E_S dv| / E_S |dv|
    mean_stderr: float
    mean_abs_stderr: float
    disentanglement_stderr: float
    samples_per_pair: float  # contexts S averaged per pair (exact: C(n-2, m))


@dataclass(frozen=True)
class InteractionProfile:
    """Multi-order interactions of one input; arrays are indexed by position in `orders`.

    strength[l] = mean_abs[l] / mean(mean_abs) over the orders reported (J^(m) of PAPER.md).
    pairs (k, 2) with i < j; pair_interactions (len(orders), k) when requested.
    shapley_interaction (n, n) has a zero diagonal; shapley_values and the residuals are exact
    only (None for the sampled estimator).
    efficiency_residual: v(N) - v(0) - sum_i mu_i - sum_{i != j} sum_m w_m I^(m)(i,j) (identity 2).
    """

    estimator: str  # "exact" or "sampled"
    n_players: int
    class_index: int
    value_function: str
    orders: np.ndarray  # int64 (L,)
    ratios: np.ndarray  # float64 (L,)
    mean: np.ndarray
    mean_stderr: np.ndarray
    mean_abs: np.ndarray
    mean_abs_stderr: np.ndarray
    strength: np.ndarray
    strength_stderr: np.ndarray
    disentanglement: np.ndarray
    disentanglement_stderr: np.ndarray
    samples_per_pair: np.ndarray  # float64 (L,)
    value_full: float  # v(N)
    value_empty: float  # v(empty)
    pairs: np.ndarray  # int64 (k, 2)
    pair_interactions: np.ndarray | None = None
    pair_interactions_stderr: np.ndarray | None = None
    shapley_interaction: np.ndarray | None = None
    shapley_values: np.ndarray | None = None
    efficiency_residual: float | None = None
    shapley_efficiency_residual: float | None = None
    forwards: int = 0
    seed: int | None = None
    context_sharing: str = ""  # sampled: "shared" or "independent" (ContextSharing)
    timings: dict[str, float] = field(default_factory=dict)
    prediction: int | None = None  # the model's class at x, when the profile was asked for it


@dataclass(frozen=True)
class PerturbationProfile:
    """How a perturbation x -> x_adv moved interactions, on the same players, baseline, contexts.

    delta_* = clean - adversarial. The utility decomposition (PAPER.md):
        utility_change = v(N|x) - v(N|x_adv)
                       = baseline_term + first_order_term + sum(order_terms) + residual
    with order_terms[l] = sum over ordered pairs (n-1-m)/(n(n-1)) Delta I^(m)(i,j) for m =
    decomposition_orders[l]. Exact: all orders 0..n-2, the residual is rounding only. Sampled:
    the orders sampled, scaled from the sampled pairs to all pairs; the residual is only
    meaningful when `decomposition_complete` (all orders and all pairs), else NaN.
    """

    clean: InteractionProfile
    adversarial: InteractionProfile
    orders: np.ndarray
    delta_mean: np.ndarray
    delta_mean_stderr: np.ndarray
    pairs: np.ndarray
    delta_pair_interactions: np.ndarray | None
    delta_pair_interactions_stderr: np.ndarray | None
    utility_change: float
    baseline_term: float
    first_order_term: float
    decomposition_orders: np.ndarray
    order_terms: np.ndarray
    order_terms_stderr: np.ndarray
    residual: float
    decomposition_complete: bool
    estimator: str
    forwards: int
    seed: int | None = None
    timings: dict[str, float] = field(default_factory=dict)
