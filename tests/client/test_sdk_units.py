"""SDK pieces that need no server: errors, options, checkpoints, summaries, reports, progress."""

from __future__ import annotations

import io
import json
from pathlib import Path

import grpc
import numpy as np
import pytest

import interscope
from interscope._checkpoint import Checkpoint, fingerprint
from interscope._client import combined_target, service_config, split_addresses
from interscope._exceptions import error_for_code, from_rpc_error
from interscope._models import InteractionProfile, PerturbationProfile, SampleResult
from interscope._progress import ProgressBar, format_duration
from interscope._summary import Z95, summarize
from interscope.report import band_means, load_report, render_html, write_report
from interscope.v1 import analysis_pb2


class _FakeRpcError(grpc.RpcError):
    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        self._code, self._details = code, details

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details


@pytest.mark.parametrize(
    ("code", "cls"),
    [
        (grpc.StatusCode.INVALID_ARGUMENT, interscope.InvalidArgumentError),
        (grpc.StatusCode.NOT_FOUND, interscope.NotFoundError),
        (grpc.StatusCode.FAILED_PRECONDITION, interscope.FailedPreconditionError),
        (grpc.StatusCode.RESOURCE_EXHAUSTED, interscope.ResourceExhaustedError),
        (grpc.StatusCode.UNAUTHENTICATED, interscope.UnauthenticatedError),
        (grpc.StatusCode.UNAVAILABLE, interscope.UnavailableError),
        (grpc.StatusCode.DEADLINE_EXCEEDED, interscope.DeadlineExceededError),
        (grpc.StatusCode.CANCELLED, interscope.CancelledError),
        (grpc.StatusCode.INTERNAL, interscope.InternalError),
        (grpc.StatusCode.UNKNOWN, interscope.InternalError),
    ],
)
def test_status_codes_map_to_exceptions(code: grpc.StatusCode, cls: type) -> None:
    error = from_rpc_error(_FakeRpcError(code, "what was wrong"))
    assert type(error) is cls
    assert error.code == code.name
    assert str(error) == f"{code.name}: what was wrong"
    assert type(error_for_code(code.name, "x")) is cls


def test_addresses_and_targets() -> None:
    assert split_addresses("a:1, b:2") == ["a:1", "b:2"]
    assert combined_target(["localhost:1", "127.0.0.2:2"]) == "ipv4:127.0.0.1:1,127.0.0.2:2"
    assert combined_target(["dns:///svc:50051"]) == "dns:///svc:50051"
    assert combined_target(["host-a:1", "host-b:2"]) == "host-a:1"
    config = service_config(4)
    assert config["loadBalancingConfig"] == [{"round_robin": {}}]
    assert config["methodConfig"][0]["retryPolicy"]["retryableStatusCodes"] == ["UNAVAILABLE"]
    with pytest.raises(ValueError, match="at least one address"):
        split_addresses(" , ")


def test_profile_options_to_spec() -> None:
    spec = interscope.ProfileOptions(
        grid=(4, 4), estimator="exact", value="log-odds", return_pairs=True, ratios=[0.5]
    ).to_proto()
    assert (spec.players.grid.rows, spec.players.grid.cols) == (4, 4)
    assert spec.estimator == analysis_pb2.ESTIMATOR_KIND_EXACT
    assert spec.value == analysis_pb2.VALUE_FUNCTION_LOG_ODDS
    assert spec.return_pairs and list(spec.orders.ratios) == [0.5]
    assert spec.baseline.zero
    with pytest.raises(ValueError, match="exactly one of"):
        interscope.ProfileOptions().to_proto()
    with pytest.raises(ValueError, match="unknown estimator"):
        interscope.ProfileOptions(grid=(2, 2), estimator="magic").to_proto()
    with pytest.raises(ValueError, match="unknown ProfileOptions fields"):
        interscope.ProfileOptions.coerce({"grid": (2, 2), "bogus": 1})
    attack = interscope.AttackOptions.coerce({"attack": "pgd", "eps": 0.1, "steps": 3}).to_proto()
    assert attack.kind == analysis_pb2.ATTACK_KIND_PGD and attack.steps == 3
    with pytest.raises(ValueError, match="eps must be > 0"):
        interscope.AttackOptions(eps=0).to_proto()


def _sample(sample_id: str, label: int, clean: list[float], adv: list[float]) -> SampleResult:
    orders = np.arange(len(clean))

    def profile(values: list[float]) -> InteractionProfile:
        arr = np.asarray(values, dtype=np.float64)
        z = np.zeros_like(arr)
        return InteractionProfile(
            0,
            len(clean) + 2,
            orders,
            orders / max(len(clean) - 1, 1),
            z,
            z,
            arr,
            z,
            z,
            z,
            None,
            None,
            None,
            None,
            None,
            0.0,
            0.0,
            0.0,
            label,
            label,
            "exact",
            1,
        )

    delta = np.asarray(clean) - np.asarray(adv)
    perturbation = PerturbationProfile(
        orders,
        profile(clean),
        profile(adv),
        delta,
        delta * 0,
        np.abs(delta),
        0.0,
        0.0,
        0.0,
        delta * 0,
        0.0,
    )
    return SampleResult(
        sample_id,
        label,
        label,
        1 - label,
        True,
        label == 0,
        label == 1,
        0.1,
        0.5,
        10,
        perturbation,
        None,
        None,
    )


def test_summary_means_cis_and_classes() -> None:
    samples = [
        _sample("a", 0, [1.0, 2.0, 3.0], [1.0, 1.0, 1.0]),
        _sample("b", 1, [3.0, 2.0, 1.0], [2.0, 2.0, 2.0]),
        interscope.SampleResult(
            "c",
            1,
            0,
            0,
            False,
            False,
            False,
            0,
            0,
            0,
            None,
            None,
            interscope.SampleError("INVALID_ARGUMENT", "bad tensor"),
        ),
    ]
    summary = summarize(samples, ["zero", "one"])
    assert (summary.n_samples, summary.n_failed) == (2, 1)
    assert summary.clean_accuracy == 1.0 and summary.robust_accuracy == 0.5
    np.testing.assert_allclose(summary.clean_mean_abs.mean, [2.0, 2.0, 2.0])
    half = Z95 * np.std([1.0, 3.0], ddof=1) / np.sqrt(2)
    np.testing.assert_allclose(summary.clean_mean_abs.ci_high[0], 2.0 + half)
    assert [(c.name, c.n) for c in summary.per_class] == [("zero", 1), ("one", 1)]


def _result(sample_id: str) -> analysis_pb2.SampleResult:
    return analysis_pb2.SampleResult(id=sample_id, label=1, clean_correct=True, linf=0.1)


def test_checkpoint_resumes_cuts_torn_lines_and_refuses_other_configs(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    fp = fingerprint({"model": "m", "eps": 0.1})
    assert fp == fingerprint({"eps": 0.1, "model": "m"})
    with Checkpoint.open(path, fp, {"model": "m"}) as checkpoint:
        assert checkpoint.done == {}
        checkpoint.append(_result("s0"))
        checkpoint.append(_result("s1"))
    with path.open("a") as f:
        f.write('{"sample": {"id": "s2", "lab')  # a crash mid-line
    with Checkpoint.open(path, fp, {"model": "m"}) as checkpoint:
        assert sorted(checkpoint.done) == ["s0", "s1"]
        checkpoint.append(_result("s2"))
    lines = path.read_text().splitlines()
    assert len(lines) == 4 and all(json.loads(line) for line in lines)
    with pytest.raises(interscope.CheckpointError, match="another configuration"):
        Checkpoint.open(path, fingerprint({"model": "other"}), {})
    (tmp_path / "junk").write_text("not json\n")
    with pytest.raises(interscope.CheckpointError, match="not an interscope checkpoint"):
        Checkpoint.open(tmp_path / "junk", fp, {})


def _report_dict(model: str) -> dict[str, object]:
    return {
        "model": model,
        "n_players": 16,
        "n_samples": 2,
        "clean_accuracy": 1.0,
        "robust_accuracy": 0.5,
        "profile": {
            "orders": [0, 7, 14],
            "ratios": [0.0, 0.5, 1.0],
            "clean_mean_abs": [0.3, 0.2, 0.1],
            "clean_mean_abs_ci": [[0.2, 0.1, 0.0], [0.4, 0.3, 0.2]],
            "adversarial_mean_abs": [0.3, 0.3, 0.4],
            "adversarial_mean_abs_ci": [[0.2, 0.2, 0.3], [0.4, 0.4, 0.5]],
            "delta_mean": [0.0, -0.1, -0.3],
            "delta_mean_ci": [[-0.1, -0.2, -0.4], [0.1, 0.0, -0.2]],
        },
        "per_class": [
            {"label": 0, "name": "0", "n": 2, "clean_accuracy": 1.0, "robust_accuracy": 0.5}
        ],
        "samples": [{"id": "0"}, {"id": "1"}],
    }


def test_reports_write_json_pngs_and_a_self_contained_page(tmp_path: Path) -> None:
    single = write_report(_report_dict("m1"), tmp_path / "one")
    assert load_report(tmp_path / "one")["n_samples"] == 2
    for name in ("report.json", "report.html", "interactions_by_order.png", "delta_by_order.png"):
        assert name in single and single[name].stat().st_size > 0
    assert (tmp_path / "one" / "delta_by_order.png").read_bytes()[:4] == b"\x89PNG"
    page = (tmp_path / "one" / "report.html").read_text()
    assert "data:image/png;base64," in page and "src='http" not in page
    both = write_report([_report_dict("m1"), _report_dict("m2")], tmp_path / "two")
    assert "m1/report.json" in both and "m2/report.json" in both
    assert render_html([_report_dict("m1"), _report_dict("m2")]).count("<tr><td>m") == 2
    assert band_means(_report_dict("m1"), "clean_mean_abs") == pytest.approx((0.3, 0.2, 0.1))


def test_progress_on_a_pipe_is_a_plain_line_at_every_tenth() -> None:
    piped = io.StringIO()
    bar = ProgressBar("audit", stream=piped, terminal=False)
    for done in range(0, 41):
        bar.update(done, 40)
    bar.close()
    lines = piped.getvalue().splitlines()
    # 0%, 10%, ..., 100%: eleven lines, no carriage returns, the last one complete.
    assert len(lines) == 11 and "\r" not in piped.getvalue()
    assert lines[0].startswith("audit: 0/40 (0%)") and lines[-1].startswith("audit: 40/40 (100%)")
    assert all("/s" in line and "elapsed" in line for line in lines)
    assert "eta" in lines[5] and "eta" not in lines[-1]


def test_progress_on_a_terminal_redraws_one_line_with_rate_and_eta() -> None:
    shown = io.StringIO()
    with ProgressBar("audit", stream=shown, terminal=True) as bar:
        bar.update(1, 4)
        bar.update(4, 4)
    text = shown.getvalue()
    assert text.count("\raudit [") == 2 and text.endswith("\n")
    assert "1/4 (25%)" in text and "elapsed" in text and "4/4 (100%)" in text
    quiet = io.StringIO()
    ProgressBar("audit", stream=quiet, enabled=False).update(1, 2)
    assert quiet.getvalue() == ""


def test_durations_read_as_people_write_them() -> None:
    assert [format_duration(s) for s in (0, 42.4, 185, 3720)] == ["0s", "42s", "3m05s", "1h02m"]
