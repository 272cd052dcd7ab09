"""AttackSpec validation: bad values are InvalidArgument naming what is allowed."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from interscope_server import attacks
from interscope_server.attacks import ATTACK_NAMES, AttackSpec
from interscope_server.errors import InvalidArgument


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"name": "cw"}, "allowed: apgd, autoattack, fab, fgsm, pgd, pgd_margin, simba, square"),
        ({"name": "pgd", "norm": "l1"}, "allowed: linf, l2"),
        ({"name": "pgd", "eps": 0.0}, "eps must be"),
        ({"name": "pgd", "eps": float("nan")}, "eps must be"),
        ({"name": "pgd", "eps": 2.0}, "0 < eps <= high - low"),
        ({"name": "pgd", "steps": 0}, "steps must be in 1.."),
        ({"name": "fgsm", "steps": 5}, "fgsm takes exactly one step"),
        ({"name": "apgd", "step_size": 0.1}, "sets its own step size"),
        ({"name": "pgd", "step_size": -1.0}, "step_size must be"),
        ({"name": "pgd", "restarts": 0}, "restarts must be in 1.."),
        ({"name": "pgd", "targeted": True}, "needs target_classes"),
        ({"name": "pgd", "target_classes": (1,)}, "targeted is false"),
        ({"name": "pgd", "targeted": True, "target_classes": (-1,)}, "non-negative"),
        ({"name": "pgd_margin", "targeted": True, "target_classes": (1,)}, "untargeted"),
        ({"name": "pgd_margin", "margin_threshold": 0.0}, "margin_threshold"),
        ({"name": "square", "query_budget": 0}, "query_budget must be in 1.."),
        ({"name": "square", "restarts": 2}, "restarts must be 1"),
        ({"name": "square", "p_init": 1.5}, "p_init must be in (0, 1]"),
        ({"name": "simba", "restarts": 2}, "simba spends its whole query budget"),
        (
            {"name": "simba", "eps": 1.5, "value_range": ((0.0, 1.0), (0.0, 100.0))},
            "0 < eps <= 1 (eps is in units of each feature's range width)",
        ),
        ({"name": "simba", "value_range": ((0.0, 1.0), (2.0, 2.0))}, "low < high"),
        ({"name": "simba", "value_range": ((0.0, 1.0), (0.0,))}, "one (low, high) per feature"),
        ({"name": "simba", "layout": "NWHC"}, "allowed: NCHW, NHWC, features"),
        ({"name": "pgd", "seed": -1}, "seed must be in 0.."),
        ({"name": "pgd", "value_range": (1.0, 0.0)}, "low < high"),
        ({"name": "pgd", "value_range": (0.0, float("inf"))}, "finite"),
    ],
)
def test_invalid_specs_say_what_is_allowed(fields: dict[str, Any], message: str) -> None:
    with pytest.raises(InvalidArgument, match=message.replace("(", r"\(").replace(")", r"\)")):
        AttackSpec(**fields)


def test_defaults_resolve_per_attack() -> None:
    assert AttackSpec("pgd").resolved_steps == 10
    assert AttackSpec("pgd", eps=0.1, steps=20).resolved_step_size == pytest.approx(0.0125)
    assert AttackSpec("fgsm", eps=0.1).resolved_step_size == 0.1
    assert AttackSpec("simba", eps=0.1).resolved_step_size == 0.1
    assert AttackSpec("simba", norm="l2", eps=0.1).resolved_step_size == 0.05
    assert AttackSpec("simba", eps=0.1, step_size=0.02).resolved_step_size == 0.02
    assert AttackSpec("pgd_margin", eps=32 / 255).resolved_step_size == pytest.approx(2 / 255)
    assert AttackSpec("pgd").resolved_random_start
    assert not AttackSpec("pgd_margin").resolved_random_start
    black_box = {"simba", "square"}
    assert [AttackSpec(name).white_box for name in ATTACK_NAMES] == [
        name not in black_box for name in ATTACK_NAMES
    ]
    assert len(ATTACK_NAMES) == 8


def test_numpy_scalars_are_accepted_and_bools_are_not() -> None:
    spec = AttackSpec("pgd", eps=np.float32(0.1), steps=np.int64(5), seed=np.uint32(3))
    assert spec.resolved_steps == 5
    with pytest.raises(InvalidArgument, match="steps must be an integer"):
        AttackSpec("pgd", steps=True)


def test_public_names_are_exported() -> None:
    assert all(hasattr(attacks, name) for name in attacks.__all__)
    assert len(set(attacks.__all__)) == len(attacks.__all__)
