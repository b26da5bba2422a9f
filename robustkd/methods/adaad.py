"""AdaAD (Huang et al., CVPR 2023): L = α·KL(p_T(x') ‖ p_S(x')) + (1 − α)·KL(p_T(x) ‖ p_S(x)).

x' = argmax over Ball(x, ε) of KL(p_T(x') ‖ p_S(x')): the teacher is evaluated at x' too and the attack
differentiates through both networks, so x' goes where the two disagree most (the "adaptive" part).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from robustkd.attacks import ThreatModel, pgd
from robustkd.methods.base import Batch, Method, Output, StepInfo, register_method
from robustkd.methods.common import ATTACK_KEYS, check_attack_mode, check_kd_options, method_threat, require_teacher
from robustkd.methods.losses import Term, kl_divergence, weighted_sum


def adaad_loss(
    adv_logits: torch.Tensor | None,
    teacher_adv_logits: torch.Tensor | None,
    clean_logits: torch.Tensor | None,
    teacher_clean_logits: torch.Tensor | None,
    alpha: float = 1.0,
    reduction: str = "batchmean",
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """L = α·KL_red(p_T(x') ‖ p_S(x')) + (1 − α)·KL_red(p_T(x) ‖ p_S(x)); returns (L, {"kl_adv", "kl_clean"}).

    Teacher logits are detached (fixed targets, computed under no_grad in the method); τ = 1. A term
    whose weight is 0 is not computed, so its inputs may be None.
    """

    def kl_adv() -> torch.Tensor:
        if adv_logits is None or teacher_adv_logits is None:
            raise ValueError("adaad_loss: alpha > 0 needs the student and teacher logits on x'")
        return kl_divergence(teacher_adv_logits.detach(), adv_logits, reduction=reduction)

    def kl_clean() -> torch.Tensor:
        if clean_logits is None or teacher_clean_logits is None:
            raise ValueError("adaad_loss: alpha < 1 needs the student and teacher logits on x")
        return kl_divergence(teacher_clean_logits.detach(), clean_logits, reduction=reduction)

    if math.isnan(alpha):
        raise ValueError(f"adaad_loss: alpha must be in [0, 1], got {alpha}")
    return weighted_sum(Term("kl_adv", alpha, kl_adv), Term("kl_clean", 1.0 - alpha, kl_clean))


# The default ball and PGD budget of the training attack.
THREAT = ThreatModel("linf", 8 / 255, step_size=2 / 255, steps=10, random_start="normal")


@register_method("adaad")
@dataclass
class AdaAD(Method):
    """Adaptive adversarial distillation, as boyellow/AdaAD ``main.py`` / ``AT_helper.py`` run it.

    Inner: ``"mismatch"`` objective, KL_sum(p_T(x') ‖ p_S(x')) with gradients through both networks,
    student and teacher in eval mode, start x + 0.001·N(0, I). The outer teacher forwards run under
    no_grad (the teacher stays frozen; the code never freezes it). Defaults: α = 1, ε = 8/255, step
    2/255, 10 steps (the README's Table 2 command; the argparse defaults 16/255 and 4/255 are its
    "larger search radius" variant).

    Reference-code reproduction: ``kl_reduction="mean_over_classes"`` is the CIFAR-10 code's
    ``nn.KLDivLoss()``; its CIFAR-100 code uses batchmean (robustkd's default, the per-example KL).
    With α = 1 the code still computes the clean term; here S(x) and T(x) are only run when α < 1
    (then ``Output.logits`` is S(x); otherwise None).
    """

    needs_teacher = True
    flat_threat_keys = ATTACK_KEYS

    alpha: float = 1.0
    kl_reduction: str = "batchmean"
    threat: ThreatModel = THREAT
    attack_mode: str = "eval"

    def __post_init__(self) -> None:
        check_kd_options(self.alpha, 1.0, self.kl_reduction)
        check_attack_mode(self.attack_mode)
        self.threat = method_threat(self)

    def __call__(self, student: nn.Module, teacher: nn.Module | None, batch: Batch, info: StepInfo) -> Output:
        teacher = require_teacher(teacher, self.name)
        x, y = batch.x, batch.y
        adv_logits = teacher_adv = clean_logits = teacher_clean = None
        logs: dict[str, torch.Tensor] = {}
        if self.alpha > 0:
            x_adv = pgd(student, x, y, self.threat, "mismatch", teacher=teacher, mode=self.attack_mode)
            adv_logits = student(x_adv)
            with torch.no_grad():
                # The attack saw T at earlier iterates only: the final x' needs its own teacher forward.
                teacher_adv = teacher(x_adv)
            logs["adv_acc"] = (adv_logits.detach().argmax(1) == y).float().mean()
        if self.alpha < 1:
            clean_logits = student(x)
            with torch.no_grad():
                teacher_clean = teacher(x)
        loss, terms = adaad_loss(adv_logits, teacher_adv, clean_logits, teacher_clean, self.alpha, self.kl_reduction)
        logs.update({k: v.detach() for k, v in terms.items()})
        return Output(loss, logs, clean_logits)

    def passes(self) -> dict[str, int]:
        """Per step: k attack steps, each a forward and an input-gradient backward through S and T; then
        S(x') and T(x') (α > 0), S(x) and T(x) (α < 1)."""
        k = self.threat.steps if self.alpha > 0 else 0
        adv = 1 if self.alpha > 0 else 0
        clean = 1 if self.alpha < 1 else 0
        return {
            "student_fwd": k + adv + clean,
            "student_input_grad": k,
            "student_bwd": 1,
            "teacher_fwd": k + adv + clean,
            "teacher_input_grad": k,
            "attack_steps": k,
        }
