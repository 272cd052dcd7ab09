"""Wire specs (InteractionSpec, AttackSpec) -> the engine's and the attacks' domain specs."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, TypeVar

import numpy as np

from interscope.codec import from_tensor
from interscope.v1 import analysis_pb2
from interscope_server import errors
from interscope_server.analysis.baselines import (
    BlurBaseline,
    ConstantBaseline,
    MeanBaseline,
    TensorBaseline,
    ZeroBaseline,
)
from interscope_server.analysis.players import (
    FeaturePlayers,
    GridPlayers,
    MaskPlayers,
    resolve_players,
)
from interscope_server.analysis.profile import (
    EstimatorChoice,
    PairSelection,
    ProfileSpec,
)
from interscope_server.analysis.sampled import DEFAULT_RATIOS, ContextSharing, TargetStatistic
from interscope_server.analysis.values import ClassChoice, ValueFunction
from interscope_server.attacks import attack_class, attack_classes
from interscope_server.attacks.base import (
    DEFAULT_CHECK_QUERIES,
    DEFAULT_CHECK_RERUNS,
    AttackName,
    AttackSpec,
    Loss,
    Norm,
    ValueRange,
)
from interscope_server.config import Settings
from interscope_server.layout import Layout
from interscope_server.models.config import ModelConfig

VALUE_FUNCTIONS = {
    analysis_pb2.VALUE_FUNCTION_UNSPECIFIED: ValueFunction.LOG_PROB,
    analysis_pb2.VALUE_FUNCTION_LOG_PROB: ValueFunction.LOG_PROB,
    analysis_pb2.VALUE_FUNCTION_LOG_ODDS: ValueFunction.LOG_ODDS,
    analysis_pb2.VALUE_FUNCTION_LOGIT: ValueFunction.LOGIT,
    analysis_pb2.VALUE_FUNCTION_PROB: ValueFunction.PROB,
}
CLASS_CHOICES = {
    analysis_pb2.CLASS_CHOICE_UNSPECIFIED: ClassChoice.LABEL,
    analysis_pb2.CLASS_CHOICE_LABEL: ClassChoice.LABEL,
    analysis_pb2.CLASS_CHOICE_TARGET: ClassChoice.TARGET,
    analysis_pb2.CLASS_CHOICE_PREDICTED: ClassChoice.PREDICTED,
}
ESTIMATORS = {
    analysis_pb2.ESTIMATOR_KIND_AUTO: EstimatorChoice.AUTO,
    analysis_pb2.ESTIMATOR_KIND_EXACT: EstimatorChoice.EXACT,
    analysis_pb2.ESTIMATOR_KIND_SAMPLED: EstimatorChoice.SAMPLED,
}
CONTEXT_SHARINGS = {
    analysis_pb2.CONTEXT_SHARING_AUTO: ContextSharing.AUTO,
    analysis_pb2.CONTEXT_SHARING_SHARED: ContextSharing.SHARED,
    analysis_pb2.CONTEXT_SHARING_INDEPENDENT: ContextSharing.INDEPENDENT,
}
TARGET_STATISTICS = {
    analysis_pb2.TARGET_STATISTIC_UNSPECIFIED: TargetStatistic.PAIRS,
    analysis_pb2.TARGET_STATISTIC_PAIRS: TargetStatistic.PAIRS,
    analysis_pb2.TARGET_STATISTIC_STRENGTH: TargetStatistic.STRENGTH,
    analysis_pb2.TARGET_STATISTIC_SIGNED_MEAN: TargetStatistic.SIGNED_MEAN,
}
PAIR_MODES = {
    analysis_pb2.PAIR_MODE_ALL: PairSelection.ALL,
    analysis_pb2.PAIR_MODE_RANDOM: PairSelection.RANDOM,
    analysis_pb2.PAIR_MODE_NEIGHBORS: PairSelection.NEIGHBORS,
}
T = TypeVar("T")

#: AttackKind -> the attack's kind, from the classes: each declares the enum name it answers to.
#: A class whose kind has no enum value fails here, at import, not on a request.
ATTACK_NAMES: dict[int, AttackName] = {
    analysis_pb2.AttackKind.Value(f"ATTACK_KIND_{kind.upper()}"): kind for kind in attack_classes()
}
NORMS: dict[int, Norm] = {
    analysis_pb2.NORM_UNSPECIFIED: "linf",
    analysis_pb2.NORM_LINF: "linf",
    analysis_pb2.NORM_L2: "l2",
}

#: Loss -> the attacks' loss name (LOSS_CE -> "ce"); unspecified is the attack's default.
LOSSES: dict[int, Loss | None] = {
    analysis_pb2.LOSS_UNSPECIFIED: None,
    analysis_pb2.LOSS_CE: "ce",
    analysis_pb2.LOSS_DLR: "dlr",
}


def _enum(table: Mapping[Any, T], value: int, what: str, enum_type: Any) -> T:
    if value not in table:
        names = [enum_type.Name(k) for k in table]
        raise errors.InvalidArgument(f"{what} {value} is not known; allowed: {', '.join(names)}")
    return table[value]


def class_choice(value: int) -> ClassChoice:
    return _enum(CLASS_CHOICES, value, "class_choice", analysis_pb2.ClassChoice)


def _players(
    spec: analysis_pb2.PlayerSpec, settings: Settings, layout: Layout
) -> GridPlayers | FeaturePlayers | MaskPlayers:
    kind = spec.WhichOneof("kind")
    if kind == "grid":
        if spec.grid.rows < 1 or spec.grid.cols < 1:
            raise errors.InvalidArgument(
                f"grid {spec.grid.rows}x{spec.grid.cols} is not allowed: rows and cols must be >= 1"
            )
        return GridPlayers(int(spec.grid.rows), int(spec.grid.cols), layout)
    if kind == "features":
        groups = [list(g.indices) for g in spec.features.groups]
        return FeaturePlayers.from_groups(groups or None)
    if kind == "mask":
        mask = from_tensor(
            spec.mask,
            what="players.mask",
            allowed=("INT32", "INT64"),
            max_bytes=settings.max_tensor_bytes,
        )
        return MaskPlayers(mask.astype(np.int64))
    raise errors.InvalidArgument("spec.players is required: give grid, features or mask")


def _baseline(
    spec: analysis_pb2.BaselineSpec, inputs: np.ndarray, settings: Settings, layout: Layout
) -> ZeroBaseline | ConstantBaseline | MeanBaseline | BlurBaseline | TensorBaseline:
    kind = spec.WhichOneof("kind")
    if kind in (None, "zero"):
        return ZeroBaseline()
    if kind == "constant":
        return ConstantBaseline(float(spec.constant))
    if kind == "mean":
        if spec.mean.values and spec.mean.HasField("reference"):
            raise errors.InvalidArgument("baseline.mean takes values or a reference set, not both")
        if spec.mean.values:
            return MeanBaseline(tuple(float(v) for v in spec.mean.values), layout)
        if spec.mean.HasField("reference"):
            reference = from_tensor(
                spec.mean.reference,
                what="baseline.mean.reference",
                allowed=("FP32", "FP64"),
                max_bytes=settings.max_tensor_bytes,
                finite=True,
            )
            if reference.ndim != inputs.ndim or reference.shape[1:] != inputs.shape[1:]:
                raise errors.InvalidArgument(
                    f"baseline.mean.reference has shape {list(reference.shape)}; it must be a "
                    f"batch (N, {', '.join(map(str, inputs.shape[1:]))}) of reference inputs"
                )
            return MeanBaseline.from_reference(reference, layout)
        return MeanBaseline.from_reference(inputs, layout)
    if kind == "blur":
        return BlurBaseline(float(spec.blur.sigma) or 2.0, layout)
    tensor = from_tensor(
        spec.tensor,
        what="baseline.tensor",
        allowed=("FP32", "FP64", "FP16"),
        max_bytes=settings.max_tensor_bytes,
        finite=True,
    )
    if tensor.shape != inputs.shape[1:]:
        raise errors.InvalidArgument(
            f"baseline.tensor has shape {list(tensor.shape)}; it must match the input shape "
            f"{list(inputs.shape[1:])}"
        )
    return TensorBaseline(tensor.astype(np.float32))


def profile_spec(
    spec: analysis_pb2.InteractionSpec,
    choice: ClassChoice,
    inputs: np.ndarray,
    settings: Settings,
    *,
    n_evaluations: int,
    layout: Layout = "NCHW",
) -> tuple[ProfileSpec, int]:
    """The engine's ProfileSpec and the number of players, with the server's limits applied.

    `n_evaluations` is how many profiles the request runs (inputs, or 2 per perturbation), so
    the per-request forward-pass limit is shared between them. `layout` is the model's: grid
    players, the mean and blur baselines and a two-dimensional mask follow it.
    """
    if not spec.HasField("players"):
        raise errors.InvalidArgument("spec.players is required: give grid, features or mask")
    players = _players(spec.players, settings, layout)
    input_shape = tuple(inputs.shape[1:])
    if isinstance(players, MaskPlayers) and players.mask.ndim == 2 and len(input_shape) == 3:
        # analysis.proto allows a mask over the image's (H, W): every channel shares it.
        if layout == "NHWC" and players.mask.shape == input_shape[:2]:
            players = MaskPlayers(np.broadcast_to(players.mask[..., None], input_shape).copy())
        elif layout == "NCHW" and players.mask.shape == input_shape[-2:]:
            players = MaskPlayers(np.broadcast_to(players.mask, input_shape).copy())
    _, n = resolve_players(players, input_shape)
    if n < 2:
        raise errors.InvalidArgument(f"the players spec gives {n} player; at least 2 are needed")
    if n > settings.max_players:
        raise errors.ResourceExhausted(
            f"{n} players is more than this server allows ({settings.max_players})"
        )
    estimator = _enum(ESTIMATORS, spec.estimator, "estimator", analysis_pb2.EstimatorKind)
    orders_spec = spec.orders
    if orders_spec.orders and orders_spec.ratios:
        raise errors.InvalidArgument("give orders.orders or orders.ratios, not both")
    orders: tuple[int, ...] | None = tuple(int(m) for m in orders_spec.orders) or None
    ratios = tuple(float(r) for r in orders_spec.ratios)
    bad = [r for r in ratios if not 0.0 <= r <= 1.0]
    if bad:
        raise errors.InvalidArgument(f"order ratio {bad[0]} is out of range; ratios are in [0, 1]")
    if orders is not None and max(orders) > n - 2:
        raise errors.InvalidArgument(
            f"order {max(orders)} is out of range for {n} players; orders are 0..{n - 2}"
        )
    if orders is None and not ratios and estimator is EstimatorChoice.EXACT:
        orders = tuple(range(n - 1))  # exact costs the same for every order: return them all
    sampling = spec.sampling
    if sampling.pair_mode == analysis_pb2.PAIR_MODE_UNSPECIFIED:
        if isinstance(players, GridPlayers):
            pairs = PairSelection.NEIGHBORS
        else:  # a pair count alone asks for that many random pairs
            pairs = PairSelection.RANDOM if sampling.num_pairs else PairSelection.ALL
    else:
        pairs = _enum(PAIR_MODES, sampling.pair_mode, "sampling.pair_mode", analysis_pb2.PairMode)
    if sampling.num_pairs and pairs is PairSelection.ALL:
        raise errors.InvalidArgument(
            "sampling.num_pairs applies to random and neighbor pairs; pair mode all takes "
            "every pair (leave num_pairs 0, or choose PAIR_MODE_RANDOM)"
        )
    if estimator is EstimatorChoice.EXACT:
        pairs = PairSelection.ALL
    limit = max(1, settings.max_forwards_per_request // max(1, n_evaluations))
    domain = ProfileSpec(
        players=players,
        baseline=_baseline(spec.baseline, inputs, settings, layout),
        value=_enum(VALUE_FUNCTIONS, spec.value, "value", analysis_pb2.ValueFunction),
        class_choice=choice,
        orders=orders,
        estimator=estimator,
        pairs=pairs,
        # The documented default, 200, capped by the pairs there are (n < 21 has fewer).
        n_random_pairs=int(sampling.num_pairs or min(200, n * (n - 1) // 2)),
        neighbor_radius=int(sampling.neighbor_radius or 1),
        n_neighbor_pairs=int(sampling.num_pairs) if pairs is PairSelection.NEIGHBORS else 0,
        contexts_per_order=int(sampling.contexts_per_order or 100),
        context_sharing=_enum(
            CONTEXT_SHARINGS,
            sampling.context_sharing,
            "sampling.context_sharing",
            analysis_pb2.ContextSharing,
        ),
        target_statistic=_enum(
            TARGET_STATISTICS,
            sampling.target_statistic,
            "sampling.target_statistic",
            analysis_pb2.TargetStatistic,
        ),
        seed=int(spec.seed),
        return_pairs=bool(spec.return_pairs),
        max_exact_players=settings.max_exact_players,
        max_forwards=limit,
        ratios=ratios or DEFAULT_RATIOS,
    )
    return domain, n


def attack_spec(
    spec: analysis_pb2.AttackSpec, targets: list[int], model: ModelConfig
) -> AttackSpec:
    """The attacks' AttackSpec for `model` (its value ranges and layout); zero-valued fields
    take the documented defaults."""
    value_range: ValueRange = (
        tuple((float(low), float(high)) for low, high in model.value_range)
        if isinstance(model.value_range, list)
        else (float(model.value_range[0]), float(model.value_range[1]))
    )
    name = _enum(ATTACK_NAMES, spec.kind, "attack.kind", analysis_pb2.AttackKind)
    norm = _enum(NORMS, spec.norm, "attack.norm", analysis_pb2.Norm)
    loss = _enum(LOSSES, spec.loss, "attack.loss", analysis_pb2.Loss)
    if spec.seed > 2**63 - 1:
        raise errors.InvalidArgument("attack.seed must be below 2^63")
    return AttackSpec(
        name=name,
        norm=norm,
        eps=float(spec.eps),
        steps=int(spec.steps) if spec.steps and not attack_class(name).fixed_steps else None,
        step_size=float(spec.step_size) if spec.step_size else None,
        random_start=spec.random_start if spec.HasField("random_start") else None,
        restarts=int(spec.restarts or 1),
        targeted=bool(spec.targeted),
        target_classes=tuple(int(t) for t in targets) if spec.targeted else (),
        margin_threshold=float(spec.margin_threshold or 8.0),
        query_budget=int(spec.query_budget or attack_class(name).default_queries),
        seed=int(spec.seed),
        value_range=value_range,
        layout=model.layout,
        check_queries=(
            int(spec.check_queries) if spec.HasField("check_queries") else DEFAULT_CHECK_QUERIES
        ),
        check_reruns=(
            int(spec.check_reruns) if spec.HasField("check_reruns") else DEFAULT_CHECK_RERUNS
        ),
        loss=loss,
    )
