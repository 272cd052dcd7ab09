"""Hypothesis fuzzing of every RPC: each answer is a documented status, in time, and the server
stays healthy and correct.

One module-scoped server with tight limits (few players, inputs, forwards) keeps every request
that gets through validation small, so the cases run fast and a DEADLINE_EXCEEDED can only mean
a hang. Examples are derandomized: CI tries the same cases on every run.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from interscope.codec import DATATYPES
from interscope.v1 import (
    analysis_pb2,
    analysis_pb2_grpc,
    models_pb2,
    models_pb2_grpc,
    tensor_pb2,
)
from interscope_server.server import BackgroundServer
from tests.server.api.conftest import server_settings, sine_onnx_model
from tests.server.reliability.conftest import (
    FORBIDDEN,
    Outcomes,
    copy_models,
    in_flight_total,
    profile_numbers,
    reference_request,
    wait_until,
)

C = grpc.StatusCode
#: Per-call deadline; every accepted request on this server needs well under a second.
DEADLINE_S = 5.0
#: How late an answer may arrive after its deadline (scheduling on a busy 2-core machine).
SLACK_S = 2.0
INPUT_SHAPE = (1, 16, 16)
REFERENCE_MODEL = "digits-cnn"
#: Names the model-service fuzz may load, upload and unload (never the reference model).
SCRATCH_NAMES = ["fz-a", "fz-b", "digits-cnn-ts"]

#: The statuses each RPC documents (proto comments and the design's error list). OK is allowed
#: wherever the request happens to be valid. DEADLINE_EXCEEDED is allowed only where the test
#: says the request was really big.
ANALYSIS_CODES = {
    C.OK,
    C.INVALID_ARGUMENT,
    C.NOT_FOUND,
    C.FAILED_PRECONDITION,
    C.RESOURCE_EXHAUSTED,
    C.UNAVAILABLE,
}
DOCUMENTED = {
    "Profile": ANALYSIS_CODES,
    "Attack": ANALYSIS_CODES,
    "Audit": ANALYSIS_CODES,
    "ListModels": {C.OK},
    "GetModel": {C.OK, C.NOT_FOUND},
    "LoadModel": {
        C.OK,
        C.INVALID_ARGUMENT,
        C.NOT_FOUND,
        C.ALREADY_EXISTS,
        C.RESOURCE_EXHAUSTED,
        C.UNAVAILABLE,
    },
    "UnloadModel": {C.OK, C.NOT_FOUND, C.INVALID_ARGUMENT},
}

FUZZ = settings(
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
        HealthCheck.function_scoped_fixture,
        HealthCheck.filter_too_much,
    ],
)


# -- the server ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def fuzz_server(demo_repository: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    repository = copy_models(
        demo_repository, tmp_path_factory.mktemp("fuzz-repo"), [REFERENCE_MODEL, "digits-cnn-ts"]
    )
    settings_ = server_settings(
        repository,
        metrics_port=None,
        worker_threads=4,
        max_players=12,
        max_exact_players=10,
        max_inputs_per_request=4,
        max_tensor_bytes=64 * 1024,
        max_forwards_per_request=8000,
        max_upload_bytes=8192,
        allow_uploads=True,
        # Sequential attacks (Square) make one small forward per query: no batching delay.
        max_batch_delay_ms=0.0,
    )
    with BackgroundServer(settings_) as srv:
        yield srv


@pytest.fixture(scope="module")
def channel(fuzz_server: BackgroundServer) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(fuzz_server.address) as ch:
        yield ch


@pytest.fixture(scope="module")
def reference(channel: grpc.Channel, demo_test_data: Any) -> np.ndarray:
    """The reference profile, computed before any fuzzing."""
    x, y = demo_test_data
    stub = analysis_pb2_grpc.AnalysisServiceStub(channel)
    events = list(stub.Profile(reference_request(x, y, REFERENCE_MODEL), timeout=30))
    return profile_numbers(events[-1].result)


def assert_healthy(
    srv: BackgroundServer, channel: grpc.Channel, reference: np.ndarray, data: Any
) -> None:
    """Serving, nothing left running, and a well-formed call gives the reference answer."""
    health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
    assert health.status == health_pb2.HealthCheckResponse.SERVING
    assert wait_until(lambda: in_flight_total(srv) == 0, timeout=5), "calls left in flight"
    x, y = data
    stub = analysis_pb2_grpc.AnalysisServiceStub(channel)
    events = list(stub.Profile(reference_request(x, y, REFERENCE_MODEL), timeout=30))
    np.testing.assert_allclose(profile_numbers(events[-1].result), reference, rtol=0, atol=1e-9)


class Caller:
    """Runs one fuzzed call, checks its status and timing, and records the outcome."""

    def __init__(self, outcomes: Outcomes) -> None:
        self.outcomes = outcomes

    def __call__(
        self, rpc: str, run: Callable[[], object], *, big: bool = False
    ) -> tuple[grpc.StatusCode, str, object]:
        started = time.monotonic()
        try:
            reply = run()
            code, details = C.OK, ""
        except grpc.RpcError as exc:
            reply = None
            code, details = exc.code(), exc.details() or ""
        elapsed = time.monotonic() - started
        self.outcomes.record(rpc, code)
        assert code not in FORBIDDEN, f"{rpc}: {code.name}: {details}"
        allowed = DOCUMENTED[rpc] | ({C.DEADLINE_EXCEEDED} if big else set())
        assert code in allowed, f"{rpc}: undocumented {code.name}: {details}"
        assert elapsed < DEADLINE_S + SLACK_S, f"{rpc}: answered after {elapsed:.1f} s"
        if code is not C.OK:
            assert details, f"{rpc}: {code.name} without a message"
        return code, details, reply


@pytest.fixture()
def caller(
    outcomes: Outcomes,
    fuzz_server: BackgroundServer,
    channel: grpc.Channel,
    reference: np.ndarray,
    demo_test_data: Any,
) -> Iterator[Caller]:
    """The caller for one fuzz test; after all its examples the server must be healthy."""
    yield Caller(outcomes)
    assert_healthy(fuzz_server, channel, reference, demo_test_data)


# -- strategies ----------------------------------------------------------------------------------
#
# Every request draws a wildness p (percent): each field is drawn from its "wild" strategy (out of
# range, malformed, unknown) with probability p, else from its valid one. p = 0 gives well-formed
# requests that must succeed or hit a documented limit; small p gives one or two faults in an
# otherwise valid request (the interesting case for validation order); p = 100 is noise.

WILDNESS = st.sampled_from([0, 0, 0, 5, 15, 40, 100])
UINT32_EDGES = st.sampled_from([0, 1, 2, 3, 17, 2**31, 2**32 - 1])
DOUBLES = st.one_of(
    st.sampled_from([0.0, -0.0, -1.0, 1e-3, 0.5, 1.0, 2.0, 1e300, math.nan, math.inf, -math.inf]),
    st.floats(allow_nan=True, allow_infinity=True),
)
SMALL_FLOATS = st.sampled_from([0.01, 0.03, 0.1, 0.3])


def pick(
    draw: st.DrawFn, p: int, valid: st.SearchStrategy[Any], wild: st.SearchStrategy[Any]
) -> Any:
    """A draw from `wild` with probability p percent, else from `valid`."""
    return draw(wild) if p and draw(st.integers(0, 99)) < p else draw(valid)


def unknown_enum(known: int) -> st.SearchStrategy[int]:
    """Values outside an enum's 0..known-1 (open proto3 enums carry them to the server)."""
    return st.sampled_from([known, known + 1, 99, -1, 2**31 - 1])


def _encode(array: np.ndarray, datatype: str) -> tensor_pb2.Tensor:
    data = np.ascontiguousarray(array, dtype=DATATYPES[datatype]).tobytes()
    return tensor_pb2.Tensor(datatype=datatype, shape=list(array.shape), raw_data=data)


VALID_TENSOR_KINDS = st.sampled_from(["fp32", "fp32", "fp32", "fp64", "fp16", "lower"])
WILD_TENSOR_KINDS = st.sampled_from(
    [
        *("int", "unknown", "short", "long", "nan", "inf", "empty", "scalar", "huge"),
        *("overflow", "negative", "wrong-shape", "missing"),
    ]
)


@st.composite
def tensors(
    draw: st.DrawFn, shape: tuple[int, ...], p: int, *, count: int | None = None
) -> tensor_pb2.Tensor:
    """A tensor of `shape` (a batch of `count` when given), well formed or broken in one way."""
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    full = shape if count is None else (count, *shape)
    values = rng.uniform(0.0, 1.0, full).astype(np.float32)
    kind = pick(draw, p, VALID_TENSOR_KINDS, WILD_TENSOR_KINDS)
    if kind in ("fp32", "fp64", "fp16"):
        return _encode(values, kind.upper())
    if kind == "lower":
        tensor = _encode(values, "FP32")
        tensor.datatype = "fp32"
        return tensor
    if kind == "int":
        name = draw(st.sampled_from(["INT64", "INT32", "INT16", "INT8", "UINT8", "BOOL"]))
        return _encode((values * 3).astype(np.int64), name)
    if kind == "unknown":
        tensor = _encode(values, "FP32")
        tensor.datatype = draw(
            st.one_of(
                st.sampled_from(["", "FLOAT", "F32", "BF16", "FP8", "COMPLEX64", "BYTES"]),
                st.text(max_size=6).filter(lambda t: t.upper() not in DATATYPES),
            )
        )
        return tensor
    if kind in ("short", "long"):
        tensor = _encode(values, "FP32")
        extra = draw(st.integers(1, 9))
        raw = tensor.raw_data
        tensor.raw_data = raw[: len(raw) - extra] if kind == "short" else raw + b"\0" * extra
        return tensor
    if kind in ("nan", "inf"):
        flat = values.reshape(-1)
        positions = draw(st.lists(st.integers(0, flat.size - 1), min_size=1, max_size=3))
        flat[positions] = np.nan if kind == "nan" else draw(st.sampled_from([np.inf, -np.inf]))
        return _encode(values, draw(st.sampled_from(["FP32", "FP64", "FP16"])))
    if kind == "empty":
        empty_shape = list(full)
        empty_shape[draw(st.integers(0, len(full) - 1))] = 0
        return tensor_pb2.Tensor(datatype="FP32", shape=empty_shape)
    if kind == "scalar":
        return tensor_pb2.Tensor(datatype="FP32", shape=[], raw_data=b"\0\0\x80?")
    if kind == "huge":
        big = list(full)
        big[draw(st.integers(0, len(big) - 1))] = draw(st.sampled_from([10**6, 2**31, 2**62]))
        return tensor_pb2.Tensor(datatype="FP32", shape=big, raw_data=b"\0" * 16)
    if kind == "overflow":
        # Dimensions whose product overflows int64: refused as too large, never wrapped around.
        return tensor_pb2.Tensor(datatype="FP32", shape=[2**62, 2**62, 4, 1])
    if kind == "negative":
        bad = list(full)
        bad[draw(st.integers(0, len(bad) - 1))] = draw(st.sampled_from([-1, -16, -(2**63)]))
        return tensor_pb2.Tensor(datatype="FP32", shape=bad, raw_data=values.tobytes())
    if kind == "wrong-shape":
        other = draw(
            st.lists(st.integers(1, 17), min_size=1, max_size=4).filter(
                lambda s: tuple(s) != full and math.prod(s) <= 4096
            )
        )
        return _encode(rng.uniform(0, 1, other).astype(np.float32), "FP32")
    return tensor_pb2.Tensor()  # missing


@st.composite
def player_specs(draw: st.DrawFn, p: int) -> analysis_pb2.PlayerSpec | None:
    kind = pick(draw, p, st.sampled_from(["grid", "grid", "grid", "mask"]), st.just("wild"))
    if kind == "wild":
        kind = draw(st.sampled_from(["grid", "features", "mask", "none"]))
        p = 100
    if kind == "none":
        return None
    if kind == "grid":
        rows = pick(draw, p, st.integers(1, 3), st.one_of(st.integers(0, 17), UINT32_EDGES))
        cols = pick(draw, p, st.integers(2, 4), st.one_of(st.integers(0, 17), UINT32_EDGES))
        return analysis_pb2.PlayerSpec(grid=analysis_pb2.GridPlayers(rows=rows, cols=cols))
    if kind == "features":
        count = draw(st.integers(2, 6))
        groups = [list(range(i * 40, i * 40 + draw(st.integers(1, 40)))) for i in range(count)]
        wild_groups = st.lists(
            st.lists(st.one_of(st.integers(0, 260), UINT32_EDGES), max_size=6),
            max_size=draw(st.sampled_from([0, 3, 14])),
        )
        groups = pick(draw, p, st.just(groups), wild_groups)
        return analysis_pb2.PlayerSpec(
            features=analysis_pb2.FeaturePlayers(
                groups=[
                    analysis_pb2.FeatureGroup(name=f"g{i}", indices=g) for i, g in enumerate(groups)
                ]
            )
        )
    # A mask: horizontal bands of cells numbered 0..k-1, then maybe broken.
    k = draw(st.integers(2, 12))
    mask = (np.arange(16 * 16).reshape(16, 16) * k // 256).astype(np.int64)
    breakage = pick(
        draw,
        p,
        st.just("none"),
        st.sampled_from(["gap", "below", "shape", "dtype", "float", "one", "many"]),
    )
    if breakage == "gap":
        mask[mask == 0] = k  # id 0 never appears
    elif breakage == "below":
        mask[0, 0] = -7
    elif breakage == "one":
        mask[:] = 0  # a single player
    elif breakage == "many":
        mask = np.arange(256).reshape(16, 16)  # more players than the server allows
    shape = draw(st.sampled_from([(16, 16), (1, 16, 16)])) if breakage != "shape" else (8, 32)
    if breakage == "float":
        return analysis_pb2.PlayerSpec(mask=_encode(mask.reshape(shape), "FP32"))
    datatype = "INT8" if breakage == "dtype" else draw(st.sampled_from(["INT32", "INT64"]))
    return analysis_pb2.PlayerSpec(mask=_encode(mask.reshape(shape), datatype))


@st.composite
def baseline_specs(draw: st.DrawFn, p: int) -> analysis_pb2.BaselineSpec | None:
    kind = draw(st.sampled_from(["none", "zero", "mean", "constant", "blur", "tensor"]))
    if kind == "none":
        return None
    if kind == "zero":
        return analysis_pb2.BaselineSpec(zero=draw(st.booleans()))
    if kind == "mean":
        values = pick(
            draw, p, st.sampled_from([[], [0.5]]), st.lists(DOUBLES, min_size=1, max_size=3)
        )
        return analysis_pb2.BaselineSpec(mean=analysis_pb2.ChannelMean(values=values))
    if kind == "constant":
        return analysis_pb2.BaselineSpec(constant=pick(draw, p, SMALL_FLOATS, DOUBLES))
    if kind == "blur":
        sigma = pick(draw, p, st.sampled_from([0.0, 0.5, 2.0]), DOUBLES)
        return analysis_pb2.BaselineSpec(blur=analysis_pb2.BlurBaseline(sigma=sigma))
    return analysis_pb2.BaselineSpec(tensor=draw(tensors(INPUT_SHAPE, p)))


@st.composite
def interaction_specs(draw: st.DrawFn, p: int) -> analysis_pb2.InteractionSpec:
    spec = analysis_pb2.InteractionSpec()
    players = draw(player_specs(p))
    if players is not None:
        spec.players.CopyFrom(players)
    baseline = draw(baseline_specs(p))
    if baseline is not None:
        spec.baseline.CopyFrom(baseline)
    spec.value = pick(draw, p, st.integers(0, 4), unknown_enum(5))
    spec.estimator = pick(draw, p, st.integers(0, 2), unknown_enum(3))
    which = pick(draw, p, st.sampled_from(["none", "orders", "ratios"]), st.just("both"))
    if which in ("orders", "both"):
        valid_orders = st.lists(st.integers(0, 1), min_size=1, max_size=2)
        spec.orders.orders.extend(
            pick(draw, p, valid_orders, st.lists(UINT32_EDGES, min_size=1, max_size=4))
        )
    if which in ("ratios", "both"):
        valid_ratios = st.lists(st.sampled_from([0.0, 0.25, 0.5, 1.0]), min_size=1, max_size=3)
        spec.orders.ratios.extend(
            pick(draw, p, valid_ratios, st.lists(DOUBLES, min_size=1, max_size=4))
        )
    spec.sampling.pair_mode = pick(draw, p, st.integers(0, 3), unknown_enum(4))
    spec.sampling.num_pairs = pick(draw, p, st.integers(0, 6), UINT32_EDGES)
    spec.sampling.neighbor_radius = pick(draw, p, st.integers(0, 2), UINT32_EDGES)
    spec.sampling.contexts_per_order = pick(draw, p, st.integers(2, 3), UINT32_EDGES)
    spec.seed = pick(draw, p, st.integers(0, 10), st.just(2**64 - 1))
    spec.return_pairs = draw(st.booleans())
    return spec


VALID_MODELS = st.sampled_from([REFERENCE_MODEL, REFERENCE_MODEL, "digits-cnn-ts"])
WILD_MODELS = st.one_of(
    st.sampled_from(["missing", "", "../digits-cnn", "digits-cnn\0", " ", "DIGITS-CNN"]),
    st.text(max_size=12),
)


def labels(p: int, count: int) -> st.SearchStrategy[list[int]]:
    valid = st.lists(st.integers(0, 9), min_size=count, max_size=count)
    wild = st.lists(
        st.one_of(st.integers(0, 9), st.sampled_from([-1, 10, 2**63 - 1, -(2**63)])), max_size=5
    )
    return st.one_of(valid, wild) if p else valid


@st.composite
def profile_requests(draw: st.DrawFn) -> analysis_pb2.ProfileRequest:
    p = draw(WILDNESS)
    count = draw(st.integers(1, 3))
    request = analysis_pb2.ProfileRequest(
        model=pick(draw, p, VALID_MODELS, WILD_MODELS),
        inputs=draw(tensors(INPUT_SHAPE, p, count=count)),
        class_choice=pick(draw, p, st.integers(0, 3), unknown_enum(4)),
    )
    request.labels.extend(pick(draw, p, labels(0, count), labels(100, count)))
    if pick(draw, p, st.just(True), st.booleans()):
        request.spec.CopyFrom(draw(interaction_specs(p)))
    return request


@st.composite
def attack_specs(draw: st.DrawFn, p: int) -> analysis_pb2.AttackSpec:
    spec = analysis_pb2.AttackSpec(
        kind=pick(draw, p, st.integers(1, 6), st.one_of(st.just(0), unknown_enum(7))),
        norm=pick(draw, p, st.integers(0, 2), unknown_enum(3)),
        eps=pick(draw, p, SMALL_FLOATS, DOUBLES),
        steps=pick(draw, p, st.integers(0, 3), st.sampled_from([10_001, 2**32 - 1])),
        step_size=pick(draw, p, st.sampled_from([0.0, 0.01]), DOUBLES),
        restarts=pick(draw, p, st.integers(0, 2), st.sampled_from([101, 2**32 - 1])),
        targeted=draw(st.booleans()),
        margin_threshold=pick(draw, p, st.sampled_from([0.0, 1.0]), DOUBLES),
        query_budget=pick(draw, p, st.sampled_from([1, 10, 30]), st.sampled_from([100_001])),
        seed=pick(draw, p, st.integers(0, 5), st.just(2**64 - 1)),
    )
    if draw(st.booleans()):
        spec.random_start = draw(st.booleans())
    return spec


@st.composite
def attack_requests(draw: st.DrawFn) -> analysis_pb2.AttackRequest:
    p = draw(WILDNESS)
    count = draw(st.integers(1, 3))
    request = analysis_pb2.AttackRequest(
        model=pick(draw, p, VALID_MODELS, WILD_MODELS),
        inputs=draw(tensors(INPUT_SHAPE, p, count=count)),
        omit_adversarial=draw(st.booleans()),
    )
    if pick(draw, p, st.just(True), st.booleans()):
        request.attack.CopyFrom(draw(attack_specs(p)))
    request.labels.extend(pick(draw, p, labels(0, count), labels(100, count)))
    if request.attack.targeted:
        request.targets.extend(pick(draw, p, labels(0, count), labels(100, count)))
    elif p:
        request.targets.extend(draw(st.one_of(st.just([]), labels(100, count))))
    if draw(st.integers(0, 3)) == 0:
        request.perturbation_profile.CopyFrom(draw(interaction_specs(p)))
    return request


@st.composite
def audit_streams(draw: st.DrawFn) -> list[analysis_pb2.AuditRequest]:
    p = draw(WILDNESS)
    config = analysis_pb2.AuditConfig(
        model=pick(draw, p, VALID_MODELS, WILD_MODELS),
        audit_id=draw(st.text(max_size=8)),
        return_adversarial=draw(st.booleans()),
        return_profiles=draw(st.booleans()),
    )
    if pick(draw, p, st.just(True), st.booleans()):
        config.attack.CopyFrom(draw(attack_specs(p)))
    if pick(draw, p, st.just(True), st.booleans()):
        config.profile.CopyFrom(draw(interaction_specs(p)))
    samples = []
    for index in range(draw(st.integers(0, 3))):
        shape = pick(
            draw,
            p,
            st.sampled_from([INPUT_SHAPE, (1, *INPUT_SHAPE)]),
            st.sampled_from([(2, 16, 16), (16, 16)]),
        )
        sample = analysis_pb2.AuditSample(
            id=pick(draw, p, st.just(f"s{index}"), st.sampled_from(["s0", "s1", ""])),
            input=draw(tensors(shape, p)),
            label=pick(draw, p, st.integers(0, 9), st.sampled_from([-1, 10, 2**63 - 1])),
            target=pick(draw, p, st.integers(0, 9), st.sampled_from([-1, 10])),
        )
        samples.append(analysis_pb2.AuditRequest(sample=sample))
    order = pick(
        draw,
        p,
        st.just("config-first"),
        st.sampled_from(["no-config", "config-last", "twice", "only-config"]),
    )
    head = analysis_pb2.AuditRequest(config=config)
    if order == "no-config":
        return samples
    if order == "config-last":
        return [*samples, head]
    if order == "twice":
        return [head, *samples[:1], head, *samples[1:]]
    if order == "only-config":
        return [head]
    return [head, *samples]


SINE_CONFIG = models_pb2.ModelConfig(
    format=models_pb2.MODEL_FORMAT_ONNX,
    input=models_pb2.TensorInfo(name="input", shape=[1, 2, 2]),
    classes=["a", "b", "c"],
)


@st.composite
def model_configs(draw: st.DrawFn, p: int) -> models_pb2.ModelConfig:
    config = models_pb2.ModelConfig()
    config.CopyFrom(SINE_CONFIG)
    config.format = pick(draw, p, st.sampled_from([1, 2]), st.one_of(st.just(0), unknown_enum(5)))
    config.output_name = pick(draw, p, st.sampled_from(["", "logits"]), st.just("nope"))
    config.value_range_low = pick(draw, p, st.just(0.0), st.sampled_from([2.0, math.nan, -1e38]))
    config.value_range_high = pick(draw, p, st.just(1.0), st.sampled_from([-1.0, math.nan, 1e38]))
    config.max_batch_size = pick(draw, p, st.sampled_from([0, 4]), UINT32_EDGES)
    config.description = draw(st.text(max_size=10))
    config.input.name = pick(draw, p, st.just("input"), st.sampled_from(["", "x"]))
    config.input.datatype = pick(
        draw, p, st.sampled_from(["", "FP32"]), st.sampled_from(["FP16", "INT8", "zzz"])
    )
    wild_shapes = st.one_of(st.lists(st.integers(-2, 5), max_size=4), st.just([2**40, 2**40]))
    shape = pick(draw, p, st.just([1, 2, 2]), wild_shapes)
    del config.input.shape[:]
    config.input.shape.extend(shape)
    wild_classes = st.lists(st.text(max_size=3), max_size=4)
    classes = pick(draw, p, st.just(["a", "b", "c"]), wild_classes)
    del config.classes[:]
    config.classes.extend(classes)
    if draw(st.booleans()):
        config.normalization.mean.extend(
            pick(draw, p, st.just([0.5]), st.lists(DOUBLES, max_size=2))
        )
        config.normalization.std.extend(
            pick(draw, p, st.just([0.5]), st.lists(DOUBLES, max_size=2))
        )
    return config


SINE = sine_onnx_model()
VALID_UPLOADS = st.just(SINE)
WILD_UPLOADS = st.one_of(
    st.just(b""),
    st.just(SINE[: len(SINE) // 2]),
    st.binary(max_size=64),
    st.binary(min_size=8193, max_size=8300),  # over this server's upload limit
    st.just(b"PK\x03\x04" + b"\0" * 60),  # the start of a zip (TorchScript) archive
)
SCRATCH = st.sampled_from(SCRATCH_NAMES)
BAD_NAMES = st.one_of(
    st.sampled_from(["", ".", "..", "../x", "a/b", "/etc", ".hidden", "-x", "x" * 129, "é", "a\0"]),
    st.text(max_size=10),
)


@st.composite
def model_calls(draw: st.DrawFn) -> tuple[str, Any]:
    p = draw(WILDNESS)
    rpc = draw(st.sampled_from(["ListModels", "GetModel", "LoadModel", "LoadModel", "UnloadModel"]))
    if rpc == "ListModels":
        return rpc, models_pb2.ListModelsRequest()
    if rpc == "GetModel":
        name = pick(draw, p, st.one_of(SCRATCH, st.just(REFERENCE_MODEL)), BAD_NAMES)
        return rpc, models_pb2.GetModelRequest(name=name)
    if rpc == "UnloadModel":
        return rpc, models_pb2.UnloadModelRequest(name=pick(draw, p, SCRATCH, BAD_NAMES))
    name = pick(draw, p, st.one_of(SCRATCH, st.just(REFERENCE_MODEL)), BAD_NAMES)
    request = models_pb2.LoadModelRequest(name=name)
    # The reference model may be named (ALREADY_EXISTS) but never replaced.
    request.replace = name != REFERENCE_MODEL and draw(st.booleans())
    source = pick(draw, p, st.sampled_from(["repository", "upload", "upload"]), st.just("none"))
    if source == "repository":
        request.repository.SetInParent()
    elif source == "upload":
        request.upload.CopyFrom(
            models_pb2.UploadSource(
                model=pick(draw, p, VALID_UPLOADS, WILD_UPLOADS), config=draw(model_configs(p))
            )
        )
    return rpc, request


# -- the fuzz tests -----------------------------------------------------------------------------


def _profile_ok(request: analysis_pb2.ProfileRequest, events: list[Any]) -> None:
    assert events[-1].WhichOneof("event") == "result"
    result = events[-1].result
    assert len(result.profiles) == request.inputs.shape[0]
    numbers = np.concatenate([list(result.mean), list(result.mean_abs)])
    assert np.isfinite(numbers).all(), "an accepted profile gave non-finite numbers"


@settings(FUZZ, max_examples=700)
@given(request=profile_requests())
def test_profile_requests(
    request: analysis_pb2.ProfileRequest, caller: Caller, channel: grpc.Channel, reference: Any
) -> None:
    stub = analysis_pb2_grpc.AnalysisServiceStub(channel)
    code, _, events = caller("Profile", lambda: list(stub.Profile(request, timeout=DEADLINE_S)))
    if code is C.OK:
        _profile_ok(request, events)  # type: ignore[arg-type]


def _attack_is_big(request: analysis_pb2.AttackRequest) -> bool:
    """Whether a valid attack could honestly need longer than the deadline on this server."""
    spec = request.attack
    work = max(1, spec.steps or 10) * max(1, spec.restarts or 1)
    if spec.kind == analysis_pb2.ATTACK_KIND_SQUARE:
        work = max(work, spec.query_budget or 1000)
    return work * max(1, request.inputs.shape[0] if request.inputs.shape else 1) > 50_000


@settings(FUZZ, max_examples=350)
@given(request=attack_requests())
def test_attack_requests(
    request: analysis_pb2.AttackRequest, caller: Caller, channel: grpc.Channel, reference: Any
) -> None:
    stub = analysis_pb2_grpc.AnalysisServiceStub(channel)
    code, _, events = caller(
        "Attack",
        lambda: list(stub.Attack(request, timeout=DEADLINE_S)),
        big=_attack_is_big(request),
    )
    if code is C.OK:
        assert events[-1].WhichOneof("event") == "summary"  # type: ignore[index]


@settings(FUZZ, max_examples=250)
@given(messages=audit_streams())
def test_audit_streams(
    messages: list[analysis_pb2.AuditRequest],
    caller: Caller,
    outcomes: Outcomes,
    channel: grpc.Channel,
    reference: Any,
) -> None:
    stub = analysis_pb2_grpc.AnalysisServiceStub(channel)
    code, _, events = caller("Audit", lambda: list(stub.Audit(iter(messages), timeout=DEADLINE_S)))
    if code is not C.OK:
        return
    assert isinstance(events, list)
    results = [e.sample for e in events if e.WhichOneof("event") == "sample"]
    sent = [m.sample.id for m in messages if m.WhichOneof("message") == "sample"]
    assert sorted(r.id for r in results) == sorted(sent), "every sample is answered exactly once"
    for result in results:
        code_name = result.error.code if result.HasField("error") else "OK"
        outcomes.record("Audit sample", code_name)
        assert code_name not in {c.name for c in FORBIDDEN}, result.error.message
    assert events[-1].WhichOneof("event") == "summary"


@settings(FUZZ, max_examples=400)
@given(call=model_calls())
def test_model_service_requests(
    call: tuple[str, Any], caller: Caller, channel: grpc.Channel
) -> None:
    rpc, request = call
    stub = models_pb2_grpc.ModelServiceStub(channel)
    code, _, reply = caller(rpc, lambda: getattr(stub, rpc)(request, timeout=DEADLINE_S))
    if rpc == "LoadModel" and code is C.OK:
        assert reply.model.state == models_pb2.MODEL_STATE_READY  # type: ignore[attr-defined]


def test_server_is_healthy_and_correct_after_fuzzing(
    fuzz_server: BackgroundServer,
    channel: grpc.Channel,
    reference: np.ndarray,
    demo_test_data: Any,
    outcomes: Outcomes,
) -> None:
    assert_healthy(fuzz_server, channel, reference, demo_test_data)
    # The reference model was never unloaded or replaced, and is still READY.
    info = models_pb2_grpc.ModelServiceStub(channel).GetModel(
        models_pb2.GetModelRequest(name=REFERENCE_MODEL), timeout=5
    )
    assert info.state == models_pb2.MODEL_STATE_READY
    fuzzed = sum(outcomes.total(rpc) for rpc in DOCUMENTED)
    assert fuzzed >= 1000 or fuzzed == 0, f"only {fuzzed} fuzzed calls"
