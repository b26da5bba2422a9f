"""Certified bounds on a model or a teacher-student pair over ``Ball_inf(x, eps) ∩ [0, 1]^d``.

Native (pure torch, batched, differentiable, any device): IBP, CROWN-IBP, their per-bound best, and CROWN,
for models built from ``nn.Sequential``, ``Normalize``, ``nn.Linear``, ``nn.Conv2d``, eval-mode
``nn.BatchNorm1d/2d``, ``nn.ReLU``, ``nn.MaxPool2d``, ``nn.AvgPool2d``, ``nn.AdaptiveAvgPool2d``,
``nn.Flatten``, ``nn.Identity`` and ``Residual``. Optional auto_LiRPA backend (``robustkd.certify.lirpa``)
for alpha-CROWN; it is imported only when asked for.

``robustkd.certify(teacher, student, x, y, eps, ...)`` is :func:`certify`.
"""

from robustkd.certify._graph import SUPPORTED_MODULES, UnsupportedModelError
from robustkd.certify.bounds import (
    VERIFIERS,
    Verifier,
    get_verifier,
    input_box,
    interval_bounds,
    margin_bounds,
    mixed_bounds,
)
from robustkd.certify.pair import certified_accuracy, certify, certify_model, certify_pair, joint_gap_bound
from robustkd.certify.specs import (
    certified_from_margins,
    confidence_interval,
    joint_gap_upper,
    margin_spec,
    worst_case_logits,
)

__all__ = [
    "SUPPORTED_MODULES",
    "VERIFIERS",
    "UnsupportedModelError",
    "Verifier",
    "certified_accuracy",
    "certified_from_margins",
    "certify",
    "certify_model",
    "certify_pair",
    "confidence_interval",
    "get_verifier",
    "input_box",
    "interval_bounds",
    "joint_gap_bound",
    "joint_gap_upper",
    "margin_bounds",
    "margin_spec",
    "mixed_bounds",
    "worst_case_logits",
]

from robustkd._callable import make_module_callable

make_module_callable(__name__, "certify")
