"""Adversarial attacks (FGSM, PGD, margin-stopped PGD, APGD, Square, SimBA) and the runner."""

from __future__ import annotations

import importlib
import pkgutil

from interscope_server.attacks.apgd import APGD
from interscope_server.attacks.base import (
    NORMS,
    Attack,
    AttackEvent,
    AttackName,
    AttackSpec,
    AttackSummary,
    Ball,
    BatchOutcome,
    BlackBoxAttack,
    Evaluator,
    ExampleProgress,
    ExampleResult,
    Goal,
    Norm,
    StageProgress,
    WhiteBoxAttack,
    attack_class,
    attack_classes,
    black_box_attacks,
    white_box_attacks,
)
from interscope_server.attacks.fgsm import FGSM
from interscope_server.attacks.pgd import PGD
from interscope_server.attacks.pgd_margin import MarginPGD
from interscope_server.attacks.runner import (
    AttackReport,
    attack_events,
    build_attack,
    robust_at,
    run_attack,
)
from interscope_server.attacks.simba import SimBA
from interscope_server.attacks.square import Square

# An attack registers itself when its class is created, so import every module here: a new
# attack's file is found without being listed anywhere else.
for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")

#: Every attack's kind, in kind order.
ATTACK_NAMES: tuple[AttackName, ...] = tuple(attack_classes())
#: Attacks that need the model's gradients (a torch module).
WHITE_BOX_ATTACKS: tuple[AttackName, ...] = white_box_attacks()
#: Attacks that only call the evaluator (forward passes), so they work on every backend.
BLACK_BOX_ATTACKS: tuple[AttackName, ...] = black_box_attacks()

__all__ = [
    "APGD",
    "ATTACK_NAMES",
    "BLACK_BOX_ATTACKS",
    "FGSM",
    "NORMS",
    "PGD",
    "WHITE_BOX_ATTACKS",
    "Attack",
    "AttackEvent",
    "AttackName",
    "AttackReport",
    "AttackSpec",
    "AttackSummary",
    "Ball",
    "BatchOutcome",
    "BlackBoxAttack",
    "Evaluator",
    "ExampleProgress",
    "ExampleResult",
    "Goal",
    "MarginPGD",
    "Norm",
    "SimBA",
    "Square",
    "StageProgress",
    "WhiteBoxAttack",
    "attack_class",
    "attack_classes",
    "attack_events",
    "black_box_attacks",
    "build_attack",
    "robust_at",
    "run_attack",
    "white_box_attacks",
]
