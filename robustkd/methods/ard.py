"""ARD (Goldblum et al., AAAI 2020): L = α·τ²·KL(p_T^τ(x) ‖ p_S^τ(x')) + (1 − α)·CE(S(x), y)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from robustkd.attacks import ThreatModel, pgd
from robustkd.methods.base import Batch, Method, Output, StepInfo, register_method, teacher_logits
from robustkd.methods.common import ATTACK_KEYS, check_attack_mode, check_kd_options, method_threat, require_teacher
from robustkd.methods.losses import Term, kl_divergence, weighted_sum


def ard_loss(
    adv_logits: torch.Tensor | None,
    teacher_logits: torch.Tensor | None,
    clean_logits: torch.Tensor | None,
    y: torch.Tensor,
    alpha: float,
    temperature: float,
    reduction: str = "batchmean",
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """L = α·τ²·KL_red(p_T^τ(x) ‖ p_S^τ(x')) + (1 − α)·CE_mean(S(x), y); returns (L, {"kl", "ce"}).

    ``teacher_logits`` are T(x) on the *clean* input (detached here: a fixed target), ``adv_logits``
    S(x'), ``clean_logits`` S(x). A term whose weight is 0 is not computed, so its inputs may be None.
    """

    def kl() -> torch.Tensor:
        if adv_logits is None or teacher_logits is None:
            raise ValueError("ard_loss: alpha > 0 needs the adversarial student logits and the teacher logits")
        return kl_divergence(teacher_logits.detach(), adv_logits, temperature=temperature, reduction=reduction)

    def ce() -> torch.Tensor:
        if clean_logits is None:
            raise ValueError("ard_loss: alpha < 1 needs the clean student logits for the CE term")
        return F.cross_entropy(clean_logits, y)

    return weighted_sum(Term("kl", alpha * temperature**2, kl), Term("ce", 1.0 - alpha, ce))


# The default ball and PGD budget of the training attack.
THREAT = ThreatModel("linf", 8 / 255, step_size=2 / 255, steps=10, random_start="uniform")


@register_method("ard")
@dataclass
class ARD(Method):
    """Adversarially robust distillation, as goldblum/AdversariallyRobustDistillation ``main.py`` runs it.

    Inner: x' maximises CE_sum(S(x'), y) (labels, not the teacher) by PGD from a uniform start.
    The teacher sees the clean x; the student sees x' in the KL term and x in the CE term.
    Defaults are the paper's CIFAR-10 settings: α = 1, τ = 30, ε = 8/255, step 2/255, 10 steps.

    Reference-code reproduction:
    - ``kl_reduction="mean_over_classes"`` is the code's ``nn.KLDivLoss()`` (sum / (B·C)); with τ = 30
      on 10 classes the per-example KL weight is then τ²/C = 90 instead of τ² = 900 (batchmean, the
      per-example KL of the paper's formula and robustkd's convention).
    - ``attack_mode="train"`` (default, as the code): the attack runs with batch statistics and each
      of its forwards updates BatchNorm's running averages; ``"eval"`` freezes them during the attack.
    - The code computes S(x) even when α = 1 and its CE weight is 0; here no unused pass runs (α = 1:
      no clean student forward; α = 0: no attack and no teacher forward).
    """

    needs_teacher = True
    flat_threat_keys = ATTACK_KEYS

    alpha: float = 1.0
    temperature: float = 30.0
    kl_reduction: str = "batchmean"
    threat: ThreatModel = THREAT
    attack_mode: str = "train"

    def __post_init__(self) -> None:
        check_kd_options(self.alpha, self.temperature, self.kl_reduction)
        check_attack_mode(self.attack_mode)
        self.threat = method_threat(self)

    def __call__(self, student: nn.Module, teacher: nn.Module | None, batch: Batch, info: StepInfo) -> Output:
        teacher = require_teacher(teacher, self.name)
        x, y = batch.x, batch.y
        adv_logits = target = clean_logits = None
        logs: dict[str, torch.Tensor] = {}
        if self.alpha > 0:
            x_adv = pgd(student, x, y, self.threat, "ce", mode=self.attack_mode)
            adv_logits = student(x_adv)
            target = teacher_logits(teacher, batch)  # ARD's teacher sees the clean input
            logs["adv_acc"] = (adv_logits.detach().argmax(1) == y).float().mean()
        if self.alpha < 1:
            clean_logits = student(x)
        loss, terms = ard_loss(adv_logits, target, clean_logits, y, self.alpha, self.temperature, self.kl_reduction)
        logs.update({k: v.detach() for k, v in terms.items()})
        return Output(loss, logs, clean_logits)

    def passes(self) -> dict[str, int]:
        """Per step: k attack forwards + S(x') (α > 0) + S(x) (α < 1); one teacher forward on x (α > 0)."""
        k = self.threat.steps if self.alpha > 0 else 0
        fwd = (k + 1 if self.alpha > 0 else 0) + (1 if self.alpha < 1 else 0)
        return {
            "student_fwd": fwd,
            "student_input_grad": k,
            "student_bwd": 1,
            "teacher_fwd": 1 if self.alpha > 0 else 0,
            "attack_steps": k,
        }

    def clean_teacher(self) -> tuple[str, ...]:
        return ("logits",) if self.alpha > 0 else ()
