"""Every RPC against a real server on port 0: results, streaming shape and error statuses."""

from __future__ import annotations

import io
import json
import threading
import warnings

import grpc
import numpy as np
import pytest
import torch
from grpc import RpcError, StatusCode
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from interscope.codec import from_tensor, to_tensor
from interscope.v1 import (
    analysis_pb2,
    analysis_pb2_grpc,
    models_pb2,
    models_pb2_grpc,
    tensor_pb2,
)
from interscope_server.analysis.players import GridPlayers
from interscope_server.analysis.profile import EstimatorChoice, ProfileSpec, run_profile
from interscope_server.analysis.results import ForwardProgress
from interscope_server.api import profile_flow
from interscope_server.demo import DEMO_MODEL_NAMES
from interscope_server.server import BackgroundServer
from tests.server.api.conftest import grid, server_settings, sine_onnx_model


def status_of(call: object) -> tuple[StatusCode, str]:
    with pytest.raises(RpcError) as info:
        if hasattr(call, "__iter__"):
            list(call)  # type: ignore[call-overload]
    return info.value.code(), info.value.details()


def test_health_is_serving_overall_and_per_model(channel) -> None:
    health = health_pb2_grpc.HealthStub(channel)
    for service in ("", *DEMO_MODEL_NAMES):
        reply = health.Check(health_pb2.HealthCheckRequest(service=service))
        assert reply.status == health_pb2.HealthCheckResponse.SERVING, service


def test_reflection_lists_the_services(channel) -> None:
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)
    request = reflection_pb2.ServerReflectionRequest(list_services="")
    reply = next(stub.ServerReflectionInfo(iter([request])))
    names = {s.name for s in reply.list_services_response.service}
    assert {
        "interscope.v1.AnalysisService",
        "interscope.v1.ModelService",
        "grpc.health.v1.Health",
    } <= names


def test_list_models_returns_the_four_demo_models(models) -> None:
    infos = {m.name: m for m in models.ListModels(models_pb2.ListModelsRequest()).models}
    assert set(DEMO_MODEL_NAMES) <= set(infos)
    for name in DEMO_MODEL_NAMES:
        info = infos[name]
        assert info.state == models_pb2.MODEL_STATE_READY
        assert list(info.input.shape) == [1, 16, 16]
        assert len(info.classes) == 10
        assert info.content_hash.startswith("sha256:") and len(info.content_hash) == 71
        assert info.gradients_available
    assert infos["digits-cnn"].format == models_pb2.MODEL_FORMAT_ONNX
    assert infos["digits-cnn-ts"].format == models_pb2.MODEL_FORMAT_TORCHSCRIPT


def test_get_unknown_model_is_not_found(models) -> None:
    with pytest.raises(RpcError) as info:
        models.GetModel(models_pb2.GetModelRequest(name="no-such-model"))
    assert info.value.code() == StatusCode.NOT_FOUND
    assert "no-such-model" in info.value.details()


def test_sampled_profile_streams_one_partial_per_order_before_its_profile(
    analysis, demo_test_data
) -> None:
    x, y = demo_test_data
    spec = grid(
        4,
        4,
        estimator=analysis_pb2.ESTIMATOR_KIND_SAMPLED,
        orders=analysis_pb2.OrderSpec(orders=[1, 5, 9]),
        sampling=analysis_pb2.SamplingSpec(contexts_per_order=4),
    )
    request = analysis_pb2.ProfileRequest(
        model="digits-cnn", inputs=to_tensor(x[:1]), labels=[int(y[0])], spec=spec
    )
    events = [e for e in analysis.Profile(request) if e.WhichOneof("event") != "progress"]
    assert [e.WhichOneof("event") for e in events] == ["partial"] * 3 + ["profile", "result"]
    profile = events[3].profile
    assert [e.partial.order for e in events[:3]] == list(profile.orders) == [1, 5, 9]
    np.testing.assert_allclose([e.partial.mean_abs for e in events[:3]], profile.mean_abs)


def test_profile_progress_counts_the_whole_call_and_is_thinned_before_the_event_loop(
    analysis, demo_test_data, monkeypatch
) -> None:
    x, y = demo_test_data
    request = analysis_pb2.ProfileRequest(
        model="digits-cnn",
        inputs=to_tensor(x[:3]),
        labels=y[:3].tolist(),
        spec=grid(2, 3, estimator=analysis_pb2.ESTIMATOR_KIND_EXACT),
    )
    per_input = 2**6 + 1  # every coalition of 6 players, and the prediction's row
    # Every progress event let through: the counts run over the whole call, input by input.
    monkeypatch.setattr(profile_flow, "PROGRESS_INTERVAL_S", 0.0)
    progress = [
        e.progress for e in analysis.Profile(request) if e.WhichOneof("event") == "progress"
    ]
    assert [(p.input_index, p.done, p.total) for p in progress] == [
        (i, (i + 1) * per_input, 3 * per_input) for i in range(3)
    ]
    # None let through: the worker thread keeps them, so none wakes the event loop.
    monkeypatch.setattr(profile_flow, "PROGRESS_INTERVAL_S", 1e9)
    handed_over: list[object] = []
    events_of = profile_flow._events

    def watched(job, call):  # type: ignore[no-untyped-def]
        for item in events_of(job, call):
            handed_over.append(item[1])
            yield item

    monkeypatch.setattr(profile_flow, "_events", watched)
    kinds = [e.WhichOneof("event") for e in analysis.Profile(request)]
    assert kinds == ["profile"] * 3 + ["result"]
    assert handed_over and not any(isinstance(e, ForwardProgress) for e in handed_over)


def test_exact_profile_streams_each_profile_then_matches_the_in_process_engine(
    analysis, server: BackgroundServer, demo_test_data
) -> None:
    x, y = demo_test_data
    request = analysis_pb2.ProfileRequest(
        model="digits-cnn",
        inputs=to_tensor(x[:2]),
        labels=y[:2].tolist(),
        spec=grid(3, 3, estimator=analysis_pb2.ESTIMATOR_KIND_EXACT, return_pairs=True),
    )
    events = list(analysis.Profile(request))
    kinds = [e.WhichOneof("event") for e in events]
    # Exact: no partials (each input's orders all arrive in its profile); progress only if the
    # call outlasted the first progress interval.
    assert [k for k in kinds if k != "progress"] == ["profile", "profile", "result"]
    result = events[-1].result
    assert list(result.orders) == list(range(8))  # exact with no orders: all of 0..n-2
    assert server.server is not None
    model = server.server.registry.get("digits-cnn")
    expected = run_profile(
        model.evaluate,
        x[0],
        ProfileSpec(
            players=GridPlayers(3, 3), estimator=EstimatorChoice.EXACT, orders=tuple(range(8))
        ),
        int(y[0]),
    )
    first = result.profiles[0]
    np.testing.assert_allclose(first.mean_abs, expected.mean_abs, rtol=1e-6, atol=1e-9)
    assert abs(first.efficiency_residual) < 1e-9
    pairs = from_tensor(first.pairs)
    assert pairs.shape == (36, 2) and (pairs[:, 0] < pairs[:, 1]).all()
    assert from_tensor(first.interactions).shape == (8, 36)
    sii = from_tensor(first.shapley_interaction)
    np.testing.assert_allclose(sii, sii.T, atol=1e-12)
    provenance = result.provenance
    assert provenance.model == "digits-cnn" and provenance.model_content_hash.startswith("sha256:")
    assert provenance.forwards >= 2 * 2**9 and "torch" in provenance.versions


def test_independent_contexts_cost_four_forwards_per_sample(analysis, demo_test_data) -> None:
    x, y = demo_test_data
    spec = grid(
        4,
        4,
        estimator=analysis_pb2.ESTIMATOR_KIND_SAMPLED,
        orders=analysis_pb2.OrderSpec(orders=[3, 7]),
        sampling=analysis_pb2.SamplingSpec(
            pair_mode=analysis_pb2.PAIR_MODE_RANDOM, num_pairs=5, contexts_per_order=6
        ),
    )
    request = analysis_pb2.ProfileRequest(
        model="digits-cnn", inputs=to_tensor(x[:1]), labels=[int(y[0])], spec=spec
    )
    shared = list(analysis.Profile(request))[-1].result.profiles[0]
    request.spec.sampling.context_sharing = analysis_pb2.CONTEXT_SHARING_INDEPENDENT
    independent = list(analysis.Profile(request))[-1].result.profiles[0]
    # 2 orders x 5 pairs x 6 contexts x 4 rows, plus v(N) and v(empty), plus the clean input
    # whose prediction the profile reports (one row on the first forward).
    assert independent.forwards == 2 * 5 * 6 * 4 + 2 + 1
    assert shared.forwards < independent.forwards
    assert np.isfinite(independent.mean).all() and len(independent.mean) == 2
    assert (shared.context_sharing, independent.context_sharing) == ("shared", "independent")


def test_auto_context_sharing_follows_the_target_statistic_and_the_pair_count(
    analysis, demo_test_data
) -> None:
    """AUTO shares contexts unless the caller's statistic is an average over more pairs than
    the measured crossover (SHARED_MAX_PAIRS); the profile says which way it went."""
    x, y = demo_test_data

    def sharing(target: int, num_pairs: int) -> tuple[str, int]:
        spec = grid(
            8,
            8,
            estimator=analysis_pb2.ESTIMATOR_KIND_SAMPLED,
            orders=analysis_pb2.OrderSpec(orders=[5]),
            sampling=analysis_pb2.SamplingSpec(
                pair_mode=analysis_pb2.PAIR_MODE_NEIGHBORS,
                num_pairs=num_pairs,
                contexts_per_order=2,
                target_statistic=target,
            ),
        )
        request = analysis_pb2.ProfileRequest(
            model="digits-cnn", inputs=to_tensor(x[:1]), labels=[int(y[0])], spec=spec
        )
        profile = list(analysis.Profile(request))[-1].result.profiles[0]
        return profile.context_sharing, profile.forwards

    signed = analysis_pb2.TARGET_STATISTIC_SIGNED_MEAN
    strength = analysis_pb2.TARGET_STATISTIC_STRENGTH
    assert sharing(signed, 40)[0] == "shared"
    # Independent: 41 pairs x 2 contexts x 4 rows, plus v(N), v(empty) and the prediction row.
    assert sharing(signed, 41) == ("independent", 41 * 2 * 4 + 2 + 1)
    assert sharing(strength, 80)[0] == "shared"
    assert sharing(strength, 81)[0] == "independent"
    assert sharing(analysis_pb2.TARGET_STATISTIC_PAIRS, 210)[0] == "shared"
    assert sharing(analysis_pb2.TARGET_STATISTIC_UNSPECIFIED, 210)[0] == "shared"


def test_num_pairs_draws_that_many_neighbor_pairs_and_is_refused_with_all(
    analysis, demo_test_data
) -> None:
    """The paper samples 200 of a grid's neighbor pairs: num_pairs with neighbor pairs draws
    that many of them with the seed (it used to be ignored); with pair mode all it is refused."""
    x, y = demo_test_data

    def pairs(mode: int, num_pairs: int, seed: int = 0) -> set[tuple[int, int]]:
        spec = grid(
            4,
            4,
            estimator=analysis_pb2.ESTIMATOR_KIND_SAMPLED,
            orders=analysis_pb2.OrderSpec(orders=[2]),
            sampling=analysis_pb2.SamplingSpec(
                pair_mode=mode, num_pairs=num_pairs, contexts_per_order=2
            ),
            return_pairs=True,
            seed=seed,
        )
        request = analysis_pb2.ProfileRequest(
            model="digits-cnn", inputs=to_tensor(x[:1]), labels=[int(y[0])], spec=spec
        )
        profile = list(analysis.Profile(request))[-1].result.profiles[0]
        return {tuple(p) for p in from_tensor(profile.pairs).tolist()}

    every = pairs(analysis_pb2.PAIR_MODE_NEIGHBORS, 0)
    assert len(every) == 42  # a 4x4 grid's 8-neighbor pairs
    drawn = pairs(analysis_pb2.PAIR_MODE_NEIGHBORS, 10)
    assert len(drawn) == 10 and drawn < every
    assert pairs(analysis_pb2.PAIR_MODE_NEIGHBORS, 10) == drawn  # the seed decides
    assert pairs(analysis_pb2.PAIR_MODE_NEIGHBORS, 10, seed=1) != drawn
    assert pairs(analysis_pb2.PAIR_MODE_UNSPECIFIED, 10) == drawn  # grids default to neighbors
    for mode, count, phrase in (
        (analysis_pb2.PAIR_MODE_NEIGHBORS, 43, "43 neighbor pairs is not allowed: give 1..42"),
        (analysis_pb2.PAIR_MODE_ALL, 10, "num_pairs applies to random and neighbor pairs"),
    ):
        with pytest.raises(RpcError) as error:
            pairs(mode, count)
        assert error.value.code() == StatusCode.INVALID_ARGUMENT
        assert phrase in (error.value.details() or "")


@pytest.mark.parametrize(
    ("mutate", "code", "phrase"),
    [
        (lambda r: r.ClearField("spec"), StatusCode.INVALID_ARGUMENT, "players"),
        (lambda r: setattr(r, "model", "nope"), StatusCode.NOT_FOUND, "nope"),
        (lambda r: r.labels.__setitem__(0, 99), StatusCode.INVALID_ARGUMENT, "out of range"),
        (lambda r: r.labels.pop(), StatusCode.INVALID_ARGUMENT, "one per input"),
        (
            lambda r: setattr(r, "class_choice", analysis_pb2.CLASS_CHOICE_PREDICTED),
            StatusCode.INVALID_ARGUMENT,
            "PREDICTED",
        ),
        (
            lambda r: r.inputs.CopyFrom(tensor_pb2.Tensor(datatype="FP32", shape=[1, 1, 16, 16])),
            StatusCode.INVALID_ARGUMENT,
            "raw_data",
        ),
        (
            lambda r: r.inputs.CopyFrom(to_tensor(np.full((1, 1, 16, 16), np.nan, np.float32))),
            StatusCode.INVALID_ARGUMENT,
            "NaN",
        ),
        (
            lambda r: r.inputs.CopyFrom(to_tensor(np.zeros((1, 1, 8, 8), np.float32))),
            StatusCode.INVALID_ARGUMENT,
            "shape",
        ),
        (
            lambda r: r.inputs.CopyFrom(tensor_pb2.Tensor(datatype="FP32", shape=[2**40, 256])),
            StatusCode.RESOURCE_EXHAUSTED,
            "limit",
        ),
        (
            lambda r: r.spec.CopyFrom(grid(6, 6, estimator=analysis_pb2.ESTIMATOR_KIND_EXACT)),
            StatusCode.RESOURCE_EXHAUSTED,
            "exact",
        ),
        (
            lambda r: setattr(r.spec.sampling, "context_sharing", 9),
            StatusCode.INVALID_ARGUMENT,
            "context_sharing",
        ),
        (
            lambda r: setattr(r.spec.sampling, "target_statistic", 9),
            StatusCode.INVALID_ARGUMENT,
            "target_statistic",
        ),
        (
            lambda r: r.spec.orders.ratios.append(1.5),
            StatusCode.INVALID_ARGUMENT,
            "ratio",
        ),
        (
            lambda r: r.spec.players.grid.__setattr__("rows", 40),
            StatusCode.INVALID_ARGUMENT,
            "grid",
        ),
        (lambda r: setattr(r.spec, "value", 42), StatusCode.INVALID_ARGUMENT, "value"),
    ],
)
def test_profile_rejects_bad_requests_with_clear_statuses(
    analysis, demo_test_data, mutate, code, phrase
) -> None:
    x, y = demo_test_data
    request = analysis_pb2.ProfileRequest(
        model="digits-cnn", inputs=to_tensor(x[:1]), labels=[int(y[0])], spec=grid(2, 2)
    )
    mutate(request)
    got, details = status_of(analysis.Profile(request))
    assert got == code, details
    assert phrase.lower() in details.lower()


def test_attack_streams_examples_and_summary_with_perturbation_profiles(
    analysis, demo_test_data
) -> None:
    x, y = demo_test_data
    request = analysis_pb2.AttackRequest(
        model="digits-cnn",
        inputs=to_tensor(x[:6]),
        labels=y[:6].tolist(),
        attack=analysis_pb2.AttackSpec(kind=analysis_pb2.ATTACK_KIND_PGD, eps=0.15, steps=10),
        perturbation_profile=grid(2, 3),
    )
    events = list(analysis.Attack(request))
    examples = [e.example for e in events if e.WhichOneof("event") == "example"]
    summary = events[-1].summary
    assert events[-1].WhichOneof("event") == "summary" and len(examples) == 6
    assert summary.n == 6 and summary.robust_accuracy < summary.clean_accuracy
    for example in examples:
        adversarial = from_tensor(example.adversarial)
        delta = adversarial - x[example.input_index]
        assert np.abs(delta).max() <= 0.15 + 1e-6
        assert adversarial.min() >= 0.0 and adversarial.max() <= 1.0
        # Exact 6-player profiles: the utility decomposition closes.
        assert abs(example.perturbation.residual) < 1e-6
        assert len(example.perturbation.order_terms) == 5
    assert list(summary.orders) == list(examples[0].perturbation.clean.orders)


def test_white_box_attack_without_gradients_fails_precondition(tmp_path) -> None:
    # A server of its own: the upload must not land in the shared demo repository.
    with (
        BackgroundServer(server_settings(tmp_path, metrics_port=None, allow_uploads=True)) as srv,
        grpc.insecure_channel(srv.address) as channel,
    ):
        _check_upload_and_black_box_fallback(
            models_pb2_grpc.ModelServiceStub(channel),
            analysis_pb2_grpc.AnalysisServiceStub(channel),
            health_pb2_grpc.HealthStub(channel),
        )


def _check_upload_and_black_box_fallback(models, analysis, health) -> None:
    config = models_pb2.ModelConfig(
        format=models_pb2.MODEL_FORMAT_ONNX,
        input=models_pb2.TensorInfo(name="input", shape=[1, 2, 2]),
        classes=["a", "b", "c"],
    )
    reply = models.LoadModel(
        models_pb2.LoadModelRequest(
            name="sine", upload=models_pb2.UploadSource(model=sine_onnx_model(), config=config)
        )
    )
    assert reply.model.state == models_pb2.MODEL_STATE_READY
    assert not reply.model.gradients_available and reply.model.gradients_message
    x = np.random.default_rng(0).uniform(0, 1, (3, 1, 2, 2)).astype(np.float32)
    request = analysis_pb2.AttackRequest(
        model="sine",
        inputs=to_tensor(x),
        labels=[0, 1, 2],
        attack=analysis_pb2.AttackSpec(kind=analysis_pb2.ATTACK_KIND_PGD, eps=0.1),
    )
    code, details = status_of(analysis.Attack(request))
    assert code == StatusCode.FAILED_PRECONDITION and "square" in details
    request.attack.kind = analysis_pb2.ATTACK_KIND_SQUARE
    request.attack.query_budget = 50
    summary = list(analysis.Attack(request))[-1].summary
    assert summary.n == 3
    serving = health.Check(health_pb2.HealthCheckRequest(service="sine")).status
    assert serving == health_pb2.HealthCheckResponse.SERVING
    models.UnloadModel(models_pb2.UnloadModelRequest(name="sine"))
    serving = health.Check(health_pb2.HealthCheckRequest(service="sine")).status
    assert serving == health_pb2.HealthCheckResponse.NOT_SERVING
    info = models.GetModel(models_pb2.GetModelRequest(name="sine"))
    assert info.state == models_pb2.MODEL_STATE_UNLOADED
    code, details = status_of(analysis.Attack(request))
    assert code == StatusCode.NOT_FOUND


def test_load_model_twice_without_replace_already_exists(models) -> None:
    with pytest.raises(RpcError) as info:
        models.LoadModel(
            models_pb2.LoadModelRequest(name="digits-cnn", repository=models_pb2.RepositorySource())
        )
    assert info.value.code() == StatusCode.ALREADY_EXISTS
    for bad_name in ("../etc", "a/b", ""):
        with pytest.raises(RpcError) as info:
            models.LoadModel(
                models_pb2.LoadModelRequest(name=bad_name, repository=models_pb2.RepositorySource())
            )
        assert info.value.code() == StatusCode.INVALID_ARGUMENT


def _audit_requests(x: np.ndarray, y: np.ndarray, extra: list[analysis_pb2.AuditRequest]):
    yield analysis_pb2.AuditRequest(
        config=analysis_pb2.AuditConfig(
            model="digits-cnn-adv",
            audit_id="test",
            attack=analysis_pb2.AttackSpec(kind=analysis_pb2.ATTACK_KIND_PGD, eps=0.1, steps=5),
            profile=grid(
                4,
                4,
                estimator=analysis_pb2.ESTIMATOR_KIND_SAMPLED,
                sampling=analysis_pb2.SamplingSpec(contexts_per_order=8),
                orders=analysis_pb2.OrderSpec(ratios=[0.1, 0.5, 0.9]),
            ),
        )
    )
    for i in range(len(x)):
        sample = analysis_pb2.AuditSample(id=f"s{i}", input=to_tensor(x[i]), label=int(y[i]))
        yield analysis_pb2.AuditRequest(sample=sample)
    yield from extra


def test_audit_answers_every_sample_once_and_reports_bad_ones(analysis, demo_test_data) -> None:
    x, y = demo_test_data
    bad = [
        analysis_pb2.AuditRequest(
            sample=analysis_pb2.AuditSample(id="wrong-shape", input=to_tensor(x[0][:, :4]))
        ),
        analysis_pb2.AuditRequest(
            sample=analysis_pb2.AuditSample(id="s0", input=to_tensor(x[0]), label=int(y[0]))
        ),
    ]
    events = list(analysis.Audit(_audit_requests(x[:5], y[:5], bad)))
    assert events[0].WhichOneof("event") == "accepted" and events[0].accepted.n_players == 16
    samples = [e.sample for e in events if e.WhichOneof("event") == "sample"]
    good = [s for s in samples if not s.HasField("error")]
    errors = {s.id: s.error for s in samples if s.HasField("error")}
    assert sorted(s.id for s in good) == [f"s{i}" for i in range(5)]
    assert errors["wrong-shape"].code == "INVALID_ARGUMENT"
    assert errors["s0"].code == "INVALID_ARGUMENT" and "twice" in errors["s0"].message
    summary = events[-1].summary
    assert summary.n_samples == 5 and summary.n_failed == 2
    assert list(summary.orders) == [1, 7, 12]
    assert len(summary.delta_mean.mean) == 3
    low, high = np.array(summary.delta_mean.ci_low), np.array(summary.delta_mean.ci_high)
    assert (low <= np.array(summary.delta_mean.mean)).all() and (high >= low).all()
    assert summary.clean_accuracy == np.mean([s.clean_correct for s in good])
    assert sum(c.n for c in summary.per_class) == 5


def test_audit_margins_are_the_models_own(analysis, demo_test_data, demo_repository) -> None:
    """SampleResult's margins: z_label - max other logit of the served ONNX file, recomputed
    here with onnxruntime on the clean input and on the x_adv the audit returned (normalised
    by the config's mean and std, as the server feeds the graph)."""
    import onnxruntime

    x, y = demo_test_data
    requests = list(_audit_requests(x[:3], y[:3], []))
    requests[0].config.return_adversarial = True
    samples = [
        e.sample for e in analysis.Audit(iter(requests)) if e.WhichOneof("event") == "sample"
    ]
    folder = demo_repository / "digits-cnn-adv"
    session = onnxruntime.InferenceSession(str(folder / "model.onnx"))
    name = session.get_inputs()[0].name
    norm = json.loads((folder / "config.json").read_text())["normalization"]
    mean, std = norm["mean"][0], norm["std"][0]

    def margin(inputs: np.ndarray, label: int) -> float:
        normalised = ((inputs[None] - mean) / std).astype(np.float32)
        (logits,) = session.run(None, {name: normalised})[0][:1]
        return float(logits[label] - np.max(np.delete(logits, label)))

    assert len(samples) == 3
    for sample in samples:
        k = int(sample.id[1:])
        assert sample.clean_margin == pytest.approx(margin(x[k], int(y[k])), abs=1e-4)
        adversarial = from_tensor(sample.adversarial).reshape(x[k].shape)
        assert sample.adversarial_margin == pytest.approx(margin(adversarial, int(y[k])), abs=1e-4)
        assert (sample.adversarial_margin < 0) == (not sample.robust)


def test_a_sample_resent_after_its_error_is_a_retry_not_a_duplicate(
    analysis, demo_test_data
) -> None:
    """The SDK resends a sample whose answer was a retryable error, maybe on the same stream:
    the server takes it, and the summary counts its new result instead of the failure."""
    x, y = demo_test_data
    answered = threading.Event()

    def requests():
        yield from _audit_requests(x[:1], y[:1], [])
        bad = analysis_pb2.AuditSample(id="r", input=to_tensor(x[1][:, :4]), label=int(y[1]))
        yield analysis_pb2.AuditRequest(sample=bad)
        assert answered.wait(60), "the failed sample was never answered"
        good = analysis_pb2.AuditSample(id="r", input=to_tensor(x[1]), label=int(y[1]))
        yield analysis_pb2.AuditRequest(sample=good)

    samples, summary = [], None
    for event in analysis.Audit(requests()):
        if event.WhichOneof("event") == "sample":
            samples.append(event.sample)
            if event.sample.id == "r" and event.sample.HasField("error"):
                answered.set()
        elif event.WhichOneof("event") == "summary":
            summary = event.summary
    by_id = [(s.id, s.HasField("error")) for s in samples]
    assert sorted(by_id) == [("r", False), ("r", True), ("s0", False)]
    assert summary is not None and (summary.n_samples, summary.n_failed) == (2, 0)


def test_audit_sample_before_config_is_invalid(analysis, demo_test_data) -> None:
    x, _ = demo_test_data
    sample = analysis_pb2.AuditRequest(
        sample=analysis_pb2.AuditSample(id="a", input=to_tensor(x[0]), label=0)
    )
    code, details = status_of(analysis.Audit(iter([sample])))
    assert code == StatusCode.INVALID_ARGUMENT and "AuditConfig" in details
    code, details = status_of(analysis.Audit(iter([])))
    assert code == StatusCode.INVALID_ARGUMENT


class _FailsOnBrightInputs(torch.nn.Module):
    """A TorchScript model that loads (every load probe batch holds an all-dark row) but
    raises on batches that are bright throughout, as the attack's are."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if bool(x.min() > 0.91):  # load probes stay below; attacked inputs (0.97 +- 0.05) do not
            raise RuntimeError("simulated device fault")
        return self.linear(x.flatten(1))


def test_a_model_failing_in_a_gradient_pass_gives_unavailable(tmp_path) -> None:
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        # torch 2.13 marks TorchScript deprecated; it is still the format we serve.
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.jit.save(torch.jit.script(_FailsOnBrightInputs()), buffer)
    config = models_pb2.ModelConfig(
        format=models_pb2.MODEL_FORMAT_TORCHSCRIPT,
        input=models_pb2.TensorInfo(name="input", shape=[1, 2, 2]),
        classes=["a", "b", "c"],
    )
    with (
        BackgroundServer(server_settings(tmp_path, metrics_port=None, allow_uploads=True)) as srv,
        grpc.insecure_channel(srv.address) as channel,
    ):
        models_pb2_grpc.ModelServiceStub(channel).LoadModel(
            models_pb2.LoadModelRequest(
                name="faulty",
                upload=models_pb2.UploadSource(model=buffer.getvalue(), config=config),
            )
        )
        request = analysis_pb2.AttackRequest(
            model="faulty",
            inputs=to_tensor(np.full((2, 1, 2, 2), 0.97, np.float32)),
            labels=[0, 1],
            attack=analysis_pb2.AttackSpec(kind=analysis_pb2.ATTACK_KIND_PGD, eps=0.05),
        )
        code, details = status_of(analysis_pb2_grpc.AnalysisServiceStub(channel).Attack(request))
    assert code == StatusCode.UNAVAILABLE
    assert "faulty" in details and "simulated device fault" in details
