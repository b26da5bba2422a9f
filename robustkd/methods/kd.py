"""Knowledge distillation (Hinton, Vinyals, Dean 2015).

L = α·τ²·KL(p_T^τ(x) ‖ p_S^τ(x)) + (1 − α)·CE(S(x), y).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from robustkd.errors import ConfigError
from robustkd.methods.base import Batch, Method, Output, StepInfo, register_method
from robustkd.methods.losses import check_reduction, kl_divergence


def check_kd_options(alpha: float, temperature: float, kl_reduction: str) -> None:
    """Refuse an α outside [0, 1], a non-positive τ and an unknown or per-example reduction."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    check_kl_reduction(kl_reduction)


def check_kl_reduction(reduction: str) -> str:
    """A named KL reduction that gives a scalar loss: batchmean, sum or mean_over_classes (not none)."""
    check_reduction(reduction)
    if reduction == "none":
        raise ValueError("kl_reduction 'none' is per-example; use batchmean, sum or mean_over_classes")
    return reduction


def require_teacher(teacher: nn.Module | None, method: str) -> nn.Module:
    """The teacher, refused when missing or not in eval mode (train-mode BatchNorm would drift its statistics)."""
    if teacher is None:
        raise ConfigError(f"teacher: method {method!r} distils from a teacher; pass one (--teacher PATH)")
    if any(m.training for m in teacher.modules()):
        raise ConfigError(
            f"teacher: method {method!r} needs a frozen teacher in eval mode; call teacher.eval() and "
            "teacher.requires_grad_(False) (the training engine does this)"
        )
    return teacher


def kd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    y: torch.Tensor,
    alpha: float,
    temperature: float,
    reduction: str = "batchmean",
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """L = α·τ²·KL_red(p_T^τ ‖ p_S^τ) + (1 − α)·CE_mean(S, y); returns (L, {"kl", "ce"}).

    τ² keeps the soft-target gradients on the hard-target scale as τ changes; it never depends on α.
    The teacher's logits are detached here: the teacher is a fixed target.
    """
    kl = kl_divergence(teacher_logits.detach(), student_logits, temperature=temperature, reduction=reduction)
    ce = F.cross_entropy(student_logits, y)
    return alpha * temperature**2 * kl + (1.0 - alpha) * ce, {"kl": kl, "ce": ce}


@register_method("kd")
@dataclass
class KD(Method):
    """Hinton KD; teacher and student see the same (augmented) x, the teacher under no_grad.

    The paper gives τ in 2–20 and a "considerably lower" weight on the hard term and no single default;
    α = 0.9, τ = 4 is a common choice in later work, taken here as robustkd's default. ``kl_reduction``:
    batchmean (robustkd's convention), sum, or mean_over_classes (``nn.KLDivLoss()``'s default).
    """

    needs_teacher = True

    alpha: float = 0.9
    temperature: float = 4.0
    kl_reduction: str = "batchmean"

    def __post_init__(self) -> None:
        check_kd_options(self.alpha, self.temperature, self.kl_reduction)

    def __call__(self, student: nn.Module, teacher: nn.Module | None, batch: Batch, info: StepInfo) -> Output:
        teacher = require_teacher(teacher, self.name)
        with torch.no_grad():
            teacher_logits = teacher(batch.x)
        logits = student(batch.x)
        loss, terms = kd_loss(logits, teacher_logits, batch.y, self.alpha, self.temperature, self.kl_reduction)
        return Output(loss, {k: v.detach() for k, v in terms.items()}, logits)

    def passes(self) -> dict[str, int]:
        return {"student_fwd": 1, "student_bwd": 1, "teacher_fwd": 1}
