"""Adversarial attacks (FGSM, PGD, margin-stopped PGD, APGD, Square, SimBA) and the runner."""

from __future__ import annotations

from interscope_server.attacks.apgd import APGD
from interscope_server.attacks.base import (
    ATTACK_NAMES,
    BLACK_BOX_ATTACKS,
    NORMS,
    WHITE_BOX_ATTACKS,
    Attack,
    AttackEvent,
    AttackName,
    AttackSpec,
    AttackSummary,
    Ball,
    BatchOutcome,
    BlackBoxAttack,
    Evaluator,
    ExampleResult,
    Goal,
    Norm,
    Progress,
    WhiteBoxAttack,
)
from interscope_server.attacks.fgsm import FGSM
from interscope_server.attacks.margin_pgd import MarginPGD
from interscope_server.attacks.pgd import PGD
from interscope_server.attacks.runner import AttackReport, attack_events, build_attack, run_attack
from interscope_server.attacks.simba import SimBA
from interscope_server.attacks.square import Square

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
    "ExampleResult",
    "Goal",
    "MarginPGD",
    "Norm",
    "Progress",
    "SimBA",
    "Square",
    "WhiteBoxAttack",
    "attack_events",
    "build_attack",
    "run_attack",
]
