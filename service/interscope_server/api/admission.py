"""Cost admission before work starts: forwards, gradient passes and result bytes per request.

Every estimate is an upper bound computed from the validated spec alone, so a request over a
limit is refused with RESOURCE_EXHAUSTED naming the limit before any model runs, instead of
holding worker threads for minutes or computing a result that cannot be sent.
"""

from __future__ import annotations

from interscope_server import errors
from interscope_server.analysis.players import GridPlayers
from interscope_server.analysis.profile import (
    EstimatorChoice,
    PairSelection,
    ProfileSpec,
    resolve_orders,
)
from interscope_server.analysis.sampled import expected_sampled_forwards, independent_contexts
from interscope_server.attacks.base import AttackSpec, attack_class
from interscope_server.config import Settings

#: Protobuf framing and the scalar fields of one profile or example message, generously.
_MESSAGE_OVERHEAD = 4096
#: Bytes of one double on the wire (packed repeated / FP64 tensor).
_F64 = 8


def attack_cost(spec: AttackSpec, n_inputs: int) -> tuple[int, int]:
    """(forward passes, input-gradient passes) an attack on `n_inputs` inputs may spend."""
    forwards, gradients = attack_class(spec.name).passes_per_input(spec)
    return n_inputs * forwards, n_inputs * gradients


#: Scheduling weights: a gradient pass costs about a forward and a backward (3 forwards), and
#: each sequential step of an attack costs about as much as this many rows of a large batch
#: (small batches are dominated by per-pass overhead), so 100,000 Square queries on 2 inputs
#: count as long although they are only 200,000 rows.
_GRADIENT_WEIGHT = 3
_STEP_ROWS = 64


def attack_schedule_cost(spec: AttackSpec, n_inputs: int) -> int:
    """An attack's cost in forward-equivalents, for scheduling (WorkerLanes), not admission."""
    forwards, gradients = attack_cost(spec, n_inputs)
    # Passes per input run one after another, as the batch's sequential steps.
    kind = attack_class(spec.name)
    per_batch = sum(kind.passes_per_input(spec))
    # The runner attacks `kind.batch_size` inputs at once (64 white-box, 256 black-box).
    steps = per_batch * -(-n_inputs // kind.batch_size)
    return forwards + _GRADIENT_WEIGHT * gradients + _STEP_ROWS * steps


def admit_attack(spec: AttackSpec, n_inputs: int, settings: Settings) -> None:
    """Refuse an attack whose planned forwards or gradient passes exceed the server's limits."""
    forwards, gradients = attack_cost(spec, n_inputs)
    if forwards > settings.max_attack_forwards_per_request:
        raise errors.ResourceExhausted(
            f"{spec.name} on {n_inputs} input(s) plans up to {forwards} forward passes, over "
            f"this server's limit of {settings.max_attack_forwards_per_request} "
            "(max_attack_forwards_per_request); lower query_budget or send fewer inputs"
        )
    if gradients > settings.max_attack_gradients_per_request:
        raise errors.ResourceExhausted(
            f"{spec.name} on {n_inputs} input(s) plans {gradients} gradient passes "
            f"(inputs x steps x restarts), over this server's limit of "
            f"{settings.max_attack_gradients_per_request} (max_attack_gradients_per_request); "
            "lower steps or restarts, or send fewer inputs"
        )


def pair_count(spec: ProfileSpec, n_players: int) -> int:
    """The number of pairs the engine's `select_pairs` profiles (an upper bound only for a
    request it will refuse): the cost, and whether AUTO shares contexts, follow from it."""
    every = n_players * (n_players - 1) // 2
    if spec.pairs is PairSelection.ALL:
        return every
    if spec.pairs is PairSelection.NEIGHBORS:
        if isinstance(spec.players, GridPlayers) and spec.neighbor_radius >= 1:
            neighbors = spec.players.neighbor_pair_count(spec.neighbor_radius)
        else:  # refused by the engine; each cell has at most (2r+1)^2 - 1 neighbors
            neighbors = n_players * ((2 * max(spec.neighbor_radius, 1) + 1) ** 2 - 1) // 2
        return min(neighbors, spec.n_neighbor_pairs) if spec.n_neighbor_pairs else neighbors
    return min(every, spec.n_random_pairs)


def profile_cost(spec: ProfileSpec, n_players: int, n_inputs: int) -> int:
    """About how many forward passes a profile of `n_inputs` inputs plans (for scheduling).

    The engine decides exact against sampled per input; this takes the cheaper of the two where
    the engine may choose, so a call counts as long only when either way is long.
    """
    exact = 2 ** min(n_players, 62)
    if spec.estimator is EstimatorChoice.EXACT:
        per_input = exact
    else:
        orders = resolve_orders(spec, n_players)
        pairs = pair_count(spec, n_players)
        sampled = expected_sampled_forwards(
            n_players,
            orders,
            pairs,
            spec.contexts_per_order,
            independent_contexts(spec.context_sharing, spec.target_statistic, pairs),
        )
        # Each context's own row, the empty and full coalitions and the clean prediction.
        per_input = int(sampled) + n_players + 3
        if spec.estimator is not EstimatorChoice.SAMPLED and n_players <= spec.max_exact_players:
            per_input = min(per_input, exact)
    return per_input * n_inputs


def profile_message_bytes(spec: ProfileSpec, n_players: int) -> int:
    """Upper bound of one InteractionProfile message's size for `spec` over `n_players`."""
    orders = len(resolve_orders(spec, n_players))
    size = _MESSAGE_OVERHEAD + 8 * orders * _F64  # the per-order arrays
    if spec.return_pairs:
        pairs = pair_count(spec, n_players)
        # (k, 2) int64 pairs, (orders, k) interactions and their standard errors.
        size += pairs * 2 * 8 + 2 * orders * pairs * _F64
        if n_players <= spec.max_exact_players:  # exact may run: it adds the Shapley tables
            size += (n_players * n_players + n_players) * _F64  # Shapley matrix and values
    return size


def admit_result_bytes(what: str, size: int, settings: Settings) -> None:
    """Refuse up front a message that would be larger than the server may send."""
    if size > settings.max_message_bytes:
        raise errors.ResourceExhausted(
            f"{what} would be about {size} bytes, over the largest message this server sends "
            f"({settings.max_message_bytes} bytes, max_message_bytes); send fewer inputs or "
            "set return_pairs to false"
        )
