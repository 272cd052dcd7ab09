"""AUTOATTACK, FAB and the DLR loss over gRPC: a real run and the refusals' statuses."""

from __future__ import annotations

import itertools

import pytest
from grpc import StatusCode

from interscope.codec import to_tensor
from interscope.v1 import analysis_pb2
from tests.server.api.test_services import status_of


def _request(x, y, **spec: object) -> analysis_pb2.AttackRequest:
    return analysis_pb2.AttackRequest(
        model="digits-cnn",
        inputs=to_tensor(x),
        labels=[int(v) for v in y],
        attack=analysis_pb2.AttackSpec(**spec),  # type: ignore[arg-type]
        omit_adversarial=True,
    )


def test_autoattack_runs_through_the_server(analysis, demo_test_data) -> None:
    x, y = demo_test_data[0][:4], demo_test_data[1][:4]
    request = _request(
        x, y, kind=analysis_pb2.ATTACK_KIND_AUTOATTACK, eps=0.2, steps=3, query_budget=20
    )
    events = list(analysis.Attack(request))
    summary = events[-1].summary
    examples = [e.example for e in events if e.WhichOneof("event") == "example"]
    assert len(examples) == 4 and summary.n == 4
    assert summary.robust_accuracy <= summary.clean_accuracy
    assert all(e.linf <= 0.2 for e in examples)
    # Each stage reports as it starts, in AutoAttack's order, with fewer examples left as the
    # earlier stages fool them; the stream never reports a stage on a batch with none left.
    stages = [
        e.progress
        for e in events
        if e.WhichOneof("event") == "progress" and e.progress.unit == "stages"
    ]
    assert stages and stages[0].stage.startswith("attack: apgd-ce (")
    assert [p.done for p in stages] == list(range(len(stages)))
    assert all(p.total == 2 + 2 * 9 and p.input_index == 0 for p in stages)  # 10 classes
    left = [int(p.stage.rsplit("(", 1)[1].split()[0]) for p in stages]
    assert left[0] == sum(e.clean_prediction == e.label for e in examples)
    assert all(0 < b <= a for a, b in itertools.pairwise(left))
    names = [p.stage.split(": ", 1)[1].split(" (")[0] for p in stages]
    order = ["apgd-ce"] + [f"apgd-t target {i}" for i in range(1, 10)]
    order += [f"fab-t target {i}" for i in range(1, 10)] + ["square"]
    assert names == order[: len(names)]
    robust = sum(e.clean_prediction == e.label and not e.success for e in examples)
    assert robust == 0 or names[-1] == "square"  # a robust example saw every stage


@pytest.mark.parametrize(
    ("spec", "phrase"),
    [
        (
            {"kind": analysis_pb2.ATTACK_KIND_AUTOATTACK, "targeted": True},
            "autoattack is untargeted",
        ),
        ({"kind": analysis_pb2.ATTACK_KIND_AUTOATTACK, "restarts": 2}, "restarts must be 1"),
        (
            {"kind": analysis_pb2.ATTACK_KIND_PGD, "loss": analysis_pb2.LOSS_DLR},
            "pgd does not take a loss choice",
        ),
        ({"kind": analysis_pb2.ATTACK_KIND_APGD, "loss": 9}, "attack.loss 9 is not known"),
        ({"kind": analysis_pb2.ATTACK_KIND_FAB, "step_size": 0.1}, "sets its own step size"),
    ],
)
def test_bad_autoattack_fab_and_loss_specs_are_invalid_argument(
    analysis, demo_test_data, spec, phrase
) -> None:
    x, y = demo_test_data[0][:2], demo_test_data[1][:2]
    request = _request(x, y, eps=0.1, **spec)
    if spec.get("targeted"):
        request.targets.extend([(int(v) + 1) % 10 for v in y])
    code, details = status_of(analysis.Attack(request))
    assert code == StatusCode.INVALID_ARGUMENT, details
    assert phrase in details
