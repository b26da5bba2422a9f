"""Knowledge distillation (Hinton, Vinyals, Dean 2015).

L = α·τ²·KL(p_T^τ(x) ‖ p_S^τ(x)) + (1 − α)·CE(S(x), y).
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from robustkd.methods.base import Batch, Method, Output, StepInfo, register_method, teacher_logits
from robustkd.methods.common import check_kd_options, require_teacher
from robustkd.methods.losses import kd_loss


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
        target = teacher_logits(teacher, batch)
        logits = student(batch.x)
        loss, terms = kd_loss(logits, target, batch.y, self.alpha, self.temperature, self.kl_reduction)
        return Output(loss, {k: v.detach() for k, v in terms.items()}, logits)

    def passes(self) -> dict[str, int]:
        return {"student_fwd": 1, "student_bwd": 1, "teacher_fwd": 1}

    def clean_teacher(self) -> tuple[str, ...]:
        return ("logits",)
