"""Attacks: threat models, objectives, the flat PGD loop, the evaluation search, AutoAttack and named recipes.

Inputs are images in [0, 1]; gradients are taken with respect to the input only; the model mode during
an attack is explicit and restored afterwards.
"""

from robustkd.attacks.autoattack import autoattack
from robustkd.attacks.checks import (
    AutoAttackWarning,
    ProbabilityOutputWarning,
    RandomizedModelWarning,
    RobustnessWarning,
    ZeroGradientWarning,
)
from robustkd.attacks.engine import check_unit_range, perturb
from robustkd.attacks.graph import pgd  # the eager loop, or its CUDA-graph replay on a GPU
from robustkd.attacks.objectives import (
    OBJECTIVES,
    ConfidenceGap,
    ConfidenceGapOver,
    CrossEntropy,
    CWMargin,
    Disagreement,
    FixedKL,
    Mismatch,
    Objective,
    make_objective,
    register_objective,
)
from robustkd.attacks.pgd import attack_mode
from robustkd.attacks.recipes import ATTACKS, AttackRecipe, get_attack
from robustkd.attacks.search import AttackResult
from robustkd.attacks.threat import PRESETS, ThreatModel

__all__ = [
    "ATTACKS",
    "OBJECTIVES",
    "PRESETS",
    "AttackRecipe",
    "AttackResult",
    "AutoAttackWarning",
    "CWMargin",
    "ConfidenceGap",
    "ConfidenceGapOver",
    "CrossEntropy",
    "Disagreement",
    "FixedKL",
    "Mismatch",
    "Objective",
    "ProbabilityOutputWarning",
    "RandomizedModelWarning",
    "RobustnessWarning",
    "ThreatModel",
    "ZeroGradientWarning",
    "attack_mode",
    "autoattack",
    "check_unit_range",
    "get_attack",
    "make_objective",
    "perturb",
    "pgd",
    "register_objective",
]
