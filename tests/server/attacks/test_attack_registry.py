"""The attack registry is read from the classes: every AttackKind has one, and what a class
declares (kind, white-box, norms, defaults) is what the runner, the API and the SDK use."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from interscope import _options
from interscope.v1 import analysis_pb2
from interscope_server import attacks
from interscope_server.api import specs
from interscope_server.attacks import AttackSpec, WhiteBoxAttack, attack_classes, build_attack
from interscope_server.errors import FailedPrecondition


def _enum_kinds() -> set[str]:
    return {
        name.removeprefix("ATTACK_KIND_").lower()
        for name, value in analysis_pb2.AttackKind.items()
        if value != analysis_pb2.ATTACK_KIND_UNSPECIFIED
    }


def test_every_attack_kind_but_unspecified_has_exactly_one_class() -> None:
    assert set(attack_classes()) == _enum_kinds()
    assert set(attacks.ATTACK_NAMES) == _enum_kinds()
    # The API's enum table maps each wire value to the class that declares its name.
    for value, kind in specs.ATTACK_NAMES.items():
        assert analysis_pb2.AttackKind.Name(value) == f"ATTACK_KIND_{kind.upper()}"
    assert analysis_pb2.ATTACK_KIND_UNSPECIFIED not in specs.ATTACK_NAMES
    assert len(specs.ATTACK_NAMES) == len(attack_classes())


def test_the_sdk_offers_every_kind_under_the_protos_name() -> None:
    assert {a.replace("-", "_") for a in _options.ATTACKS} == _enum_kinds()
    for name in _options.ATTACKS:
        spec = _options.AttackOptions(attack=name).to_proto()
        assert specs.ATTACK_NAMES[spec.kind] == name.replace("-", "_")


def test_white_and_black_box_lists_follow_the_classes() -> None:
    classes = attack_classes()
    assert tuple(k for k, c in classes.items() if c.white_box) == attacks.WHITE_BOX_ATTACKS
    assert tuple(k for k, c in classes.items() if not c.white_box) == attacks.BLACK_BOX_ATTACKS
    assert set(attacks.WHITE_BOX_ATTACKS).isdisjoint(attacks.BLACK_BOX_ATTACKS)
    for kind, cls in classes.items():
        attack = build_attack(AttackSpec(kind))
        assert type(attack) is cls and cls.kind == kind
        assert isinstance(attack, WhiteBoxAttack) == cls.white_box == AttackSpec(kind).white_box


@pytest.mark.parametrize("kind", sorted(attack_classes()))
def test_declared_defaults_and_norms_are_what_the_spec_resolves(kind: str) -> None:
    cls = attack_classes()[kind]
    spec = AttackSpec(kind, eps=0.1)
    assert spec.resolved_steps == cls.default_steps
    assert spec.resolved_random_start == cls.default_random_start
    assert spec.resolved_step_size == cls.default_step_size(spec)
    for norm in cls.norms:
        assert AttackSpec(kind, norm=norm).norm == norm


@pytest.mark.parametrize("kind", sorted(attack_classes()))
def test_the_runner_asks_for_gradients_exactly_when_the_class_is_white_box(kind: str) -> None:
    x = np.full((2, 1, 8, 8), 0.5, dtype=np.float32)
    y = np.array([0, 1])
    # Four classes: autoattack's targeted DLR loss needs them.
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 4)).eval()

    def evaluate(batch: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return np.asarray(model(torch.from_numpy(batch)).numpy())

    cls = attack_classes()[kind]
    spec = AttackSpec(kind, eps=0.1, query_budget=5) if not cls.white_box else AttackSpec(kind)
    if kind == "autoattack":  # the standard budget would take seconds here
        spec = AttackSpec(kind, steps=2, query_budget=5)
    if cls.white_box:
        with pytest.raises(FailedPrecondition, match=", ".join(attacks.BLACK_BOX_ATTACKS)):
            attacks.run_attack(spec, x, y, None, evaluate)
        report = attacks.run_attack(spec, x, y, model, evaluate)
    else:
        # Forward passes only: no torch module is needed.
        report = attacks.run_attack(spec, x, y, None, evaluate)
    assert report.summary.n_examples == 2


def test_a_second_class_claiming_a_kind_is_refused() -> None:
    with pytest.raises(TypeError, match="two attack classes declare kind 'pgd'"):

        class Again(attacks.PGD):
            kind = "pgd"

    assert attack_classes()["pgd"] is attacks.PGD
