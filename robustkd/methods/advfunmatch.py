"""AdvFunMatch (Wu et al. 2023): adversarial function matching with consistent teaching.

min_θ E_{x, A} max_{x'∈Ball(A(x), ε)} τ²·KL(p_T^τ(x') ‖ p_S^τ(x')): teacher and student see the same
augmented input A(x), and then the same mismatched example x'.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from robustkd.attacks import ThreatModel, make_objective, pgd
from robustkd.methods.base import Batch, Method, Output, StepInfo, register_method
from robustkd.methods.common import ATTACK_KEYS, check_attack_mode, check_kl_reduction, method_threat, require_teacher
from robustkd.methods.losses import kl_divergence


def mixup(x: torch.Tensor, alpha: float) -> tuple[torch.Tensor, torch.Tensor, float]:
    """One mixup draw for the whole batch: λ ~ Beta(α, α), x_mix = λ·x + (1 − λ)·x[perm].

    Returns (x_mix, perm, λ). A convex combination of images in [0, 1] stays in [0, 1]. Randomness
    comes from torch's global generators, which the engine seeds per epoch.
    """
    a = torch.tensor(float(alpha))
    lam = float(torch.distributions.Beta(a, a).sample())
    perm = torch.randperm(x.shape[0], device=x.device)
    return lam * x + (1.0 - lam) * x[perm], perm, lam


def function_matching_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    temperature: float = 1.0,
    reduction: str = "batchmean",
) -> torch.Tensor:
    """τ²·KL_red(p_T^τ ‖ p_S^τ) with the teacher's output a constant (both taken at the same input)."""
    return temperature**2 * kl_divergence(
        teacher_logits.detach(), student_logits, temperature=temperature, reduction=reduction
    )


def advfunmatch_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    y: torch.Tensor,
    *,
    temperature: float = 1.0,
    ce_weight: float = 0.0,
    reduction: str = "batchmean",
    y_mix: torch.Tensor | None = None,
    lam: float = 1.0,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """L = τ²·KL_red(p_T^τ(x') ‖ p_S^τ(x')) + w·CE(S(x'), y); returns (L, {"kl"[, "ce"]}).

    With mixup, the CE is the mixed one, λ·CE(·, y) + (1 − λ)·CE(·, y_mix); the KL needs no labels.
    """
    kl = function_matching_loss(student_logits, teacher_logits, temperature, reduction)
    terms = {"kl": kl}
    loss = kl
    if ce_weight:
        ce = F.cross_entropy(student_logits, y)
        if y_mix is not None and lam != 1.0:
            ce = lam * ce + (1.0 - lam) * F.cross_entropy(student_logits, y_mix)
        terms["ce"] = ce
        loss = loss + ce_weight * ce
    return loss, terms


def majority_share(logits: torch.Tensor) -> torch.Tensor:
    """Share of the batch on its most frequent predicted class: 1 for a network that predicts one constant class.

    one_hot().sum() rather than bincount, which would wait for the device to size its output.
    """
    counts = F.one_hot(logits.argmax(1), logits.shape[1]).sum(0)
    return counts.max().float() / logits.shape[0]


# The default ball and PGD budget of the training attack.
THREAT = ThreatModel("linf", 8 / 255, step_size=2 / 255, steps=10, random_start="normal")


@register_method("advfunmatch")
@dataclass
class AdvFunMatch(Method):
    """AdvFunMatch as robustkd reads the paper (its code was not available; see METHODS.md §4).

    * Consistent teaching: the engine draws the augmentation (``data.augment``: randaugment or
      autoaugment) once per step, and both networks see that exact tensor. ``mixup_alpha > 0`` adds one
      mixup draw per step inside the method, shared by both networks (0 = off, the default).
    * Inner: x' ∈ Ball(A(x), ε) maximises KL_sum(p_T^τ(x') ‖ p_S^τ(x')), teacher and student both at
      x' and the gradient flowing through both (objective ``"mismatch"``), from x + 0.001·N(0, I).
    * Outer: τ²·KL_batchmean(p_T^τ(x') ‖ p_S^τ(x')), teacher output at x' detached (one no-grad teacher
      forward: the attack's last teacher output is at the point before the final step). Optional
      ``ce_weight``·CE(S(x'), y) (default 0: pure function matching).
    * ``pred_major`` (logged): the share of the batch on the student's most frequent class at x'. It goes to 1
      when a BatchNorm-free student collapses to a constant prediction (docs/methods/advfunmatch.md,
      "Stability": large early steps switch every hidden ReLU off for good).

    Assumptions, not from the paper: ε = 8/255, step 2/255, 10 steps, the 0.001·N(0, I) start and the
    eval-mode student during the attack (``attack_mode``) of AdaAD, whose inner step this reading shares;
    τ = 1; batchmean.
    """

    needs_teacher = True
    flat_threat_keys = ATTACK_KEYS

    temperature: float = 1.0
    threat: ThreatModel = THREAT
    attack_mode: str = "eval"
    mixup_alpha: float = 0.0
    ce_weight: float = 0.0
    kl_reduction: str = "batchmean"

    def __post_init__(self) -> None:
        if not self.temperature > 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        if not self.mixup_alpha >= 0:
            raise ValueError(f"mixup_alpha must be >= 0 (0 = off), got {self.mixup_alpha}")
        if not self.ce_weight >= 0:
            raise ValueError(f"ce_weight must be >= 0, got {self.ce_weight}")
        check_kl_reduction(self.kl_reduction)
        check_attack_mode(self.attack_mode)
        self.threat = method_threat(self)
        self.objective = make_objective("mismatch", temperature=self.temperature)

    def __call__(self, student: nn.Module, teacher: nn.Module | None, batch: Batch, info: StepInfo) -> Output:
        teacher = require_teacher(teacher, self.name)
        x, y = batch.x, batch.y
        y_mix, lam = None, 1.0
        if self.mixup_alpha > 0:
            x, perm, lam = mixup(x, self.mixup_alpha)
            y_mix = y[perm]
        x_adv = pgd(student, x, y, self.threat, self.objective, teacher=teacher, mode=self.attack_mode)
        # The very same tensor goes to both networks.
        with torch.no_grad():
            teacher_logits = teacher(x_adv)
        logits = student(x_adv)
        loss, terms = advfunmatch_loss(
            logits,
            teacher_logits,
            y,
            temperature=self.temperature,
            ce_weight=self.ce_weight,
            reduction=self.kl_reduction,
            y_mix=y_mix,
            lam=lam,
        )
        logs = {k: v.detach() for k, v in terms.items()}
        logs["agree_adv"] = (logits.detach().argmax(1) == teacher_logits.argmax(1)).float().mean()
        logs["pred_major"] = majority_share(logits.detach())
        if self.mixup_alpha > 0:
            logs["mixup_lambda"] = lam
        # The student never sees the un-perturbed input here, so there are no clean logits to report.
        return Output(loss, logs, None)

    def passes(self) -> dict[str, int]:
        k = self.threat.steps
        return {
            "student_fwd": k + 1,
            "student_input_grad": k,
            "student_bwd": 1,
            "teacher_fwd": k + 1,
            "teacher_input_grad": k,
            "attack_steps": k,
        }
