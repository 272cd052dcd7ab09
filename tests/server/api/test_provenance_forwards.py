"""A Profile's provenance.forwards is what the model ran, counted at the model (the batcher's
forward-pass counter), for the label and the predicted-class choice alike."""

from __future__ import annotations

import numpy as np
import pytest

from interscope.codec import to_tensor
from interscope.v1 import analysis_pb2, analysis_pb2_grpc
from interscope_server.server import BackgroundServer
from tests.server.api.conftest import grid


def _forwards(srv: BackgroundServer) -> float:
    assert srv.server is not None
    value = srv.server.metrics.registry.get_sample_value(
        "interscope_model_forward_passes_total", {"model": "digits-cnn"}
    )
    return value or 0.0


@pytest.mark.parametrize(
    "choice", [analysis_pb2.CLASS_CHOICE_LABEL, analysis_pb2.CLASS_CHOICE_PREDICTED]
)
@pytest.mark.parametrize(
    "estimator", [analysis_pb2.ESTIMATOR_KIND_EXACT, analysis_pb2.ESTIMATOR_KIND_SAMPLED]
)
def test_provenance_forwards_equal_the_models_count(
    server: BackgroundServer,
    analysis: analysis_pb2_grpc.AnalysisServiceStub,
    demo_test_data: tuple[np.ndarray, np.ndarray],
    choice: int,
    estimator: int,
) -> None:
    x, y = demo_test_data
    request = analysis_pb2.ProfileRequest(
        model="digits-cnn",
        inputs=to_tensor(x[:2]),
        labels=[int(v) for v in y[:2]] if choice == analysis_pb2.CLASS_CHOICE_LABEL else [],
        class_choice=choice,
        spec=grid(2, 3, estimator=estimator),
    )
    before = _forwards(server)
    result = list(analysis.Profile(request))[-1].result
    assert result.provenance.forwards > 0
    assert result.provenance.forwards == _forwards(server) - before


def test_omit_input_profiles_sends_the_same_result_without_the_per_input_events(
    analysis: analysis_pb2_grpc.AnalysisServiceStub,
    demo_test_data: tuple[np.ndarray, np.ndarray],
) -> None:
    x, y = demo_test_data

    def events(omit: bool) -> list[analysis_pb2.ProfileEvent]:
        request = analysis_pb2.ProfileRequest(
            model="digits-cnn",
            inputs=to_tensor(x[:3]),
            labels=[int(v) for v in y[:3]],
            class_choice=analysis_pb2.CLASS_CHOICE_LABEL,
            spec=grid(2, 2, estimator=analysis_pb2.ESTIMATOR_KIND_EXACT),
            omit_input_profiles=omit,
        )
        return list(analysis.Profile(request))

    full, omitted = events(False), events(True)
    assert [e.WhichOneof("event") for e in full] == ["profile"] * 3 + ["result"]
    assert [e.WhichOneof("event") for e in omitted] == ["result"]
    streamed = [e.profile for e in full[:3]]
    for result in (full[-1].result, omitted[0].result):
        assert [p.input_index for p in result.profiles] == [0, 1, 2]
        assert list(result.profiles) == streamed  # every input's profile, identical values
    assert omitted[0].result.provenance.forwards == full[-1].result.provenance.forwards
