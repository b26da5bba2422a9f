"""RSLAD (Zi et al., ICCV 2021): L = α·KL(p_T(x) ‖ p_S(x')) + (1 − α)·KL(p_T(x) ‖ p_S(x)), α = 5/6."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from robustkd.attacks import ThreatModel, pgd
from robustkd.methods.base import Batch, Method, Output, StepInfo, register_method, teacher_logits
from robustkd.methods.common import ATTACK_KEYS, check_attack_mode, check_kd_options, method_threat, require_teacher
from robustkd.methods.losses import kl_to_probs


def rslad_loss(
    adv_logits: torch.Tensor,
    clean_logits: torch.Tensor | None,
    teacher_probs: torch.Tensor,
    alpha: float = 5 / 6,
    reduction: str = "batchmean",
    log_eps: float = 0.0,
    scale: float = 1.0,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """L = scale · [α·KL_red(p_T(x) ‖ p_S(x')) + (1 − α)·KL_red(p_T(x) ‖ p_S(x))].

    Returns (L, {"kl_adv", "kl_clean"}).

    ``teacher_probs`` = softmax(T(x)) on the clean input, the "robust soft label" that replaces y in
    both terms (detached: a fixed target). ``log_eps`` > 0 takes log(p + log_eps) for the teacher's
    log-probabilities, as the reference code (1e-5); it shifts the loss value only, not its gradient.
    """
    p = teacher_probs.detach()
    terms = {"kl_adv": kl_to_probs(p, adv_logits, reduction=reduction, eps=log_eps)}
    loss = alpha * terms["kl_adv"]
    if alpha < 1:
        if clean_logits is None:
            raise ValueError("rslad_loss: alpha < 1 needs the clean student logits")
        terms["kl_clean"] = kl_to_probs(p, clean_logits, reduction=reduction, eps=log_eps)
        loss = loss + (1.0 - alpha) * terms["kl_clean"]
    return scale * loss, terms


# The default ball and PGD budget of the training attack.
THREAT = ThreatModel("linf", 8 / 255, step_size=2 / 255, steps=10, random_start="normal")


@register_method("rslad")
@dataclass
class RSLAD(Method):
    """Robust soft label adversarial distillation, as zibojia/RSLAD ``rslad_loss.py`` runs it.

    One teacher forward per step, on the clean x under no_grad: its softmax is the fixed reference of
    the attack and the target of both loss terms. There is no CE term.
    Inner: x' maximises KL_sum(p_T(x) ‖ p_S(x')) (``"kl"`` objective, p_T(x) fixed), student in eval
    mode, start x + 0.001·N(0, I). Defaults: α = 5/6, ε = 8/255, step 2/255, 10 steps, τ = 1.

    Reference-code reproduction: ``kl_reduction="mean_over_classes"`` (``torch.mean`` over B·C in the
    code), ``log_eps=1e-5`` (its ``log(p + 1e-5)``); the CIFAR-100 script also multiplies the loss by
    10 (``scale=10``). The paper's KL is the per-example one: batchmean, robustkd's default.
    """

    needs_teacher = True
    flat_threat_keys = ATTACK_KEYS

    alpha: float = 5 / 6
    kl_reduction: str = "batchmean"
    log_eps: float = 0.0
    scale: float = 1.0
    threat: ThreatModel = THREAT
    attack_mode: str = "eval"

    def __post_init__(self) -> None:
        check_kd_options(self.alpha, 1.0, self.kl_reduction)
        if not 0.0 <= self.log_eps < 1.0:
            raise ValueError(f"log_eps must be in [0, 1), got {self.log_eps}")
        if not self.scale > 0:
            raise ValueError(f"scale must be > 0, got {self.scale}")
        if self.alpha == 0:
            raise ValueError("alpha = 0 leaves only the clean term (plain KD at τ = 1): use method 'kd'")
        check_attack_mode(self.attack_mode)
        self.threat = method_threat(self)

    def __call__(self, student: nn.Module, teacher: nn.Module | None, batch: Batch, info: StepInfo) -> Output:
        teacher = require_teacher(teacher, self.name)
        x, y = batch.x, batch.y
        # The one teacher forward of the step (or its cached copy), reused by the attack and both loss terms.
        teacher_probs = F.softmax(teacher_logits(teacher, batch).float(), dim=1)
        x_adv = pgd(student, x, y, self.threat, "kl", reference=teacher_probs, mode=self.attack_mode)
        # Two forwards (adversarial first, as the code), not one on cat([x', x]): in train mode
        # BatchNorm would mix their batch statistics.
        adv_logits = student(x_adv)
        clean_logits = student(x) if self.alpha < 1 else None
        loss, terms = rslad_loss(
            adv_logits, clean_logits, teacher_probs, self.alpha, self.kl_reduction, self.log_eps, self.scale
        )
        logs = {k: v.detach() for k, v in terms.items()}
        logs["adv_acc"] = (adv_logits.detach().argmax(1) == y).float().mean()
        return Output(loss, logs, clean_logits)

    def passes(self) -> dict[str, int]:
        """Per step: k attack forwards + S(x') + S(x) (α < 1); exactly one teacher forward, on x."""
        k = self.threat.steps
        return {
            "student_fwd": k + 1 + (1 if self.alpha < 1 else 0),
            "student_input_grad": k,
            "student_bwd": 1,
            "teacher_fwd": 1,
            "attack_steps": k,
        }

    def clean_teacher(self) -> tuple[str, ...]:
        return ("logits",)
