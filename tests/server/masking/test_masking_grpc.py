"""Gradient-masking flags and eps sweeps through the real server over gRPC: each flag fires on
a model built to hide its gradients (or an attack built not to converge) and stays quiet on
the demo models."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest

from interscope import _diagnostics as diagnostics
from interscope._models import SampleResult
from interscope._summary import summarize
from interscope.cli import main
from interscope.codec import to_tensor
from interscope.v1 import analysis_pb2, analysis_pb2_grpc, models_pb2, models_pb2_grpc
from interscope_server.server import BackgroundServer
from tests.server.api.conftest import grid, server_settings
from tests.server.masking.masking_models import build_masking_repository

N = 48


@pytest.fixture(scope="module")
def address(demo_repository: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    repository = build_masking_repository(demo_repository, tmp_path_factory.mktemp("masking"))
    # The adversarially trained demo model too, for the quiet cases.
    shutil.copytree(demo_repository / "digits-cnn-adv-ts", repository / "digits-cnn-adv-ts")
    with BackgroundServer(server_settings(repository)) as srv:
        yield srv.address


@pytest.fixture()
def stub(address: str) -> Iterator[analysis_pb2_grpc.AnalysisServiceStub]:
    with grpc.insecure_channel(address) as channel:
        yield analysis_pb2_grpc.AnalysisServiceStub(channel)


def _attack(stub, model: str, data, n: int = N, **fields) -> analysis_pb2.AttackSummary:
    x, y = data
    spec = analysis_pb2.AttackSpec(kind=analysis_pb2.ATTACK_KIND_PGD, eps=0.1, **fields)
    request = analysis_pb2.AttackRequest(
        model=model,
        inputs=to_tensor(x[:n]),
        labels=[int(v) for v in y[:n]],
        attack=spec,
        omit_adversarial=True,
    )
    events = list(stub.Attack(request))
    return events[-1].summary, [e.example for e in events if e.HasField("example")]


def _codes(summary) -> set[str]:
    return {f.code for f in summary.masking_flags}


@pytest.mark.parametrize("model", ["digits-cnn-ts", "digits-cnn-adv-ts"])
def test_demo_models_raise_no_flag(stub, demo_test_data, model: str) -> None:
    summary, examples = _attack(stub, model, demo_test_data)
    assert _codes(summary) == set()
    checked = [e for e in examples if e.HasField("checks")]
    # Checks ran on exactly the examples the attack attacked and did not fool.
    assert len(checked) == sum(e.clean_prediction == e.label and not e.success for e in examples)
    assert all(e.checks.gradient_l1 > diagnostics.ZERO_GRADIENT for e in checked)
    assert all(e.checks.HasField("black_box_fooled") for e in checked)


def test_quantised_input_has_zero_gradients(stub, demo_test_data) -> None:
    summary, examples = _attack(stub, "digits-quantised", demo_test_data)
    assert "LOSS_FLAT" in _codes(summary)
    (flag,) = [f for f in summary.masking_flags if f.code == "LOSS_FLAT"]
    checked = [e for e in examples if e.HasField("checks")]
    assert flag.numbers["n_checked"] == len(checked)
    assert flag.numbers["n_zero_gradient"] == len(checked)  # torch.round: d/dx = 0 everywhere
    assert flag.meaning and flag.advice


def test_saturated_softmax_is_beaten_by_the_black_box_check(stub, demo_test_data) -> None:
    summary, examples = _attack(stub, "digits-saturated", demo_test_data)
    assert {"LOSS_FLAT", "BLACK_BOX_WINS"} <= _codes(summary)
    (flag,) = [f for f in summary.masking_flags if f.code == "BLACK_BOX_WINS"]
    fooled = [e for e in examples if e.HasField("checks") and e.checks.black_box_fooled]
    assert flag.numbers["n_fooled"] == len(fooled) >= diagnostics.MIN_WINS
    # With the check off no black-box forwards are spent and the flag cannot fire.
    off, examples = _attack(stub, "digits-saturated", demo_test_data, check_queries=0)
    assert "BLACK_BOX_WINS" not in _codes(off)
    assert not any(e.checks.HasField("black_box_fooled") for e in examples if e.HasField("checks"))
    assert off.provenance.forwards < summary.provenance.forwards


def test_an_attack_that_has_not_converged_is_flagged(stub, demo_test_data) -> None:
    # Two steps of 0.02 reach at most 0.04 + the random start inside eps 0.1: more steps win.
    summary, _ = _attack(stub, "digits-cnn-ts", demo_test_data, steps=2, step_size=0.02)
    assert "MORE_STEPS_WIN" in _codes(summary)


def test_a_randomised_defence_falls_with_more_steps(stub, demo_test_data) -> None:
    # Noise on the input: each step follows one draw's gradient, and a longer run fools
    # examples the attack left robust (about 40% of them, measured). Every robust example of
    # 96 is re-run (about 35), so the flag's threshold (10%, 2 examples) is far below.
    summary, examples = _attack(stub, "digits-randomised", demo_test_data, n=96, check_reruns=64)
    assert "MORE_STEPS_WIN" in _codes(summary)
    (flag,) = [f for f in summary.masking_flags if f.code == "MORE_STEPS_WIN"]
    reruns = [
        e.checks.more_steps_fooled
        for e in examples
        if e.HasField("checks") and e.checks.HasField("more_steps_fooled")
    ]
    assert flag.numbers["n_rerun"] == len(reruns) >= diagnostics.MIN_CHECKED
    assert flag.numbers["n_fooled"] == sum(reruns) >= diagnostics.MIN_WINS
    assert flag.numbers["share"] == pytest.approx(sum(reruns) / len(reruns))
    assert flag.numbers["share"] >= diagnostics.WIN_SHARE
    assert flag.meaning and flag.advice


def test_the_randomised_model_is_listed_stochastic_with_gradients(
    address: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with grpc.insecure_channel(address) as channel:
        service = models_pb2_grpc.ModelServiceStub(channel)
        models = service.ListModels(models_pb2.ListModelsRequest()).models
    assert {m.name: m.stochastic for m in models} == {
        m.name: m.name == "digits-randomised" for m in models
    }
    assert all(m.gradients_available for m in models if m.name == "digits-randomised")
    assert main(["models", "list", "--address", address]) == 0
    lines = {line.split()[0]: line for line in capsys.readouterr().out.splitlines()}
    assert lines["digits-randomised"].endswith("gradients, stochastic")
    assert not lines["digits-cnn-ts"].endswith("stochastic")


def test_profiles_of_a_randomised_model_are_refused(stub, demo_test_data) -> None:
    x, y = demo_test_data
    name = "digits-randomised"
    summary, _ = _attack(stub, name, demo_test_data, n=2)  # an attack alone runs
    assert summary.n == 2
    with_profile = analysis_pb2.AttackRequest(
        model=name,
        inputs=to_tensor(x[:2]),
        labels=[int(v) for v in y[:2]],
        attack=analysis_pb2.AttackSpec(kind=analysis_pb2.ATTACK_KIND_PGD, eps=0.1),
        perturbation_profile=grid(2, 2),
    )
    calls = {
        "a Profile": lambda: list(
            stub.Profile(
                analysis_pb2.ProfileRequest(model=name, inputs=to_tensor(x[:2]), spec=grid(2, 2))
            )
        ),
        "an Audit": lambda: _audit(stub, name, demo_test_data, [], n=1),
        "a perturbation_profile": lambda: list(stub.Attack(with_profile)),
    }
    for what, call in calls.items():
        with pytest.raises(grpc.RpcError) as info:
            call()
        assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION, what
        details = info.value.details()
        assert details.startswith(what) and f"model {name!r} is stochastic" in details
        assert "load a deterministic version" in details


def _audit(stub, model: str, data, sweep, n: int = N):
    x, y = data
    config = analysis_pb2.AuditConfig(
        model=model,
        attack=analysis_pb2.AttackSpec(
            kind=analysis_pb2.ATTACK_KIND_PGD, eps=0.1, check_queries=0, check_reruns=0
        ),
        profile=grid(2, 2, orders=analysis_pb2.OrderSpec(orders=[0, 2])),
        eps_sweep=sweep,
    )

    def requests():
        yield analysis_pb2.AuditRequest(config=config)
        for i in range(n):
            yield analysis_pb2.AuditRequest(
                sample=analysis_pb2.AuditSample(id=str(i), input=to_tensor(x[i]), label=int(y[i]))
            )

    events = list(stub.Audit(requests()))
    samples = [e.sample for e in events if e.HasField("sample")]
    return events[-1].summary, samples


def test_eps_sweep_on_a_demo_model_is_non_increasing(stub, demo_test_data) -> None:
    sweep = [0.15, 0.02, 0.05, 0.1]
    summary, samples = _audit(stub, "digits-cnn-ts", demo_test_data, sweep)
    curve = summary.robustness_curve
    assert list(curve.eps) == sorted(sweep)
    assert len(curve.robust_accuracy) == len(sweep)
    assert all(
        a >= b for a, b in zip(curve.robust_accuracy, curve.robust_accuracy[1:], strict=False)
    )
    assert curve.robust_accuracy[0] > curve.robust_accuracy[-1]
    rows = np.array([list(s.sweep_robust) for s in samples])
    np.testing.assert_array_equal(curve.robust_accuracy, rows.mean(axis=0))
    assert "NON_MONOTONE" not in _codes(summary)
    # The SDK's summary, recomputed from the samples, says the same.
    local = summarize([SampleResult.from_proto(s) for s in samples], (), sorted(sweep))
    assert local.robustness_curve is not None
    np.testing.assert_array_equal(local.robustness_curve.robust_accuracy, curve.robust_accuracy)
    assert [f.code for f in local.masking_flags] == [f.code for f in summary.masking_flags]


def test_a_detector_that_saturates_makes_the_curve_rise(stub, demo_test_data) -> None:
    summary, samples = _audit(stub, "digits-gated", demo_test_data, [0.03, 0.05, 0.07, 0.1])
    assert "NON_MONOTONE" in _codes(summary)
    (flag,) = [f for f in summary.masking_flags if f.code == "NON_MONOTONE"]
    assert flag.numbers["rise"] >= diagnostics.RISE_SHARE
    assert flag.numbers["eps_low"] < flag.numbers["eps_high"]
    local = summarize([SampleResult.from_proto(s) for s in samples], (), [0.03, 0.05, 0.07, 0.1])
    assert [(f.code, dict(f.numbers)) for f in local.masking_flags] == [
        (f.code, dict(f.numbers)) for f in summary.masking_flags
    ]


@pytest.mark.parametrize(
    "sweep, message",
    [
        ([0.1, -0.1], "eps must be"),
        ([0.0], "eps must be"),
        ([0.01 * (i + 1) for i in range(17)], "at most 16"),
        ([0.1, 0.1], "repeats"),
    ],
)
def test_invalid_sweeps_are_refused(stub, demo_test_data, sweep, message: str) -> None:
    with pytest.raises(grpc.RpcError) as info:
        _audit(stub, "digits-cnn-ts", demo_test_data, sweep, n=1)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert message in info.value.details()


def test_cli_audit_sweep_reports_the_curve_and_the_flag(
    address: str, demo_test_data, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    x, y = demo_test_data
    data = tmp_path / "digits.npz"
    np.savez(data, x=x[:N], y=y[:N])
    out = tmp_path / "out"
    argv = ["audit", "--address", address, "--model", "digits-gated", "--data", str(data)]
    argv += ["--eps", "0.1", "--eps-sweep", "0.03,0.05,0.07,0.1", "--check-queries", "0"]
    argv += ["--grid", "2x2", "--estimator", "exact", "--gallery", "0", "--no-plots"]
    assert main([*argv, "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "robust accuracy by eps: 0.03: " in printed and "flag NON_MONOTONE" in printed
    report = json.loads((out / "report.json").read_text())
    assert report["robustness_curve"]["eps"] == [0.03, 0.05, 0.07, 0.1]
    codes = [f["code"] for f in report["masking_flags"]]
    assert "NON_MONOTONE" in codes
    # The SDK recomputed the curve from every sample (two streams each saw only some).
    rows = np.array([s["sweep_robust"] for s in report["samples"]])
    assert report["robustness_curve"]["robust_accuracy"] == rows.mean(axis=0).tolist()
    assert len(report["server_summaries"]) == 2
    page = (out / "report.html").read_text()
    assert "Gradient masking: digits-gated" in page and "NON_MONOTONE" in page
