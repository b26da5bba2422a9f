"""KDIGA (Shao et al. 2021): KD plus matching the input gradients of the label cross-entropy.

L = α·τ²·KL_red(p_T^τ(x) ‖ p_S^τ(x)) + (1 − α)·CE(S(x), y) + gradient term, with
g_S = ∇_x CE_mean(S(x), y) (kept in the graph: double backprop) and g_T = ∇_x CE_mean(T(x), y) (a constant).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from robustkd.methods.base import Batch, Method, Output, StepInfo, register_method
from robustkd.methods.common import check_kd_options, require_teacher
from robustkd.methods.losses import kd_loss

GRAD_NORMS = ("l2_batch", "l2_squared_per_example")


def kdiga_grad_term(g_s: torch.Tensor, g_t: torch.Tensor, gamma: float, grad_norm: str = "l2_batch") -> torch.Tensor:
    """The gradient-matching term, from the input gradients of CE_mean (shape (B, ...)).

    ``l2_batch`` (the reference code): (γ/B)·‖g_S − g_T‖₂, one unsquared 2-norm of the whole batch tensor.
    Since CE_mean already divides each example's gradient by B, per-example gradients ∇ℓ_i enter as
    (γ/B²)·sqrt(Σ_i ‖∇ℓ_S,i − ∇ℓ_T,i‖²).
    ``l2_squared_per_example``: γ·(1/B)·Σ_i ‖∇ℓ_S,i − ∇ℓ_T,i‖², on per-example loss gradients
    ∇ℓ_i = B·g_i, i.e. the expectation E_x ‖∇_x ℓ_S − ∇_x ℓ_T‖² written per example and independent of B.
    """
    batch = g_s.shape[0]
    diff = g_s - g_t.detach()
    if grad_norm == "l2_batch":
        return gamma / batch * diff.flatten().norm(p=2)
    if grad_norm == "l2_squared_per_example":
        return gamma * (batch * diff).flatten(1).pow(2).sum(dim=1).mean()
    raise ValueError(f"grad_norm must be one of {', '.join(GRAD_NORMS)}, got {grad_norm!r}")


def kdiga_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    y: torch.Tensor,
    g_s: torch.Tensor,
    g_t: torch.Tensor,
    *,
    alpha: float,
    temperature: float,
    gamma: float,
    reduction: str = "batchmean",
    grad_norm: str = "l2_batch",
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """L = α·τ²·KL_red(p_T^τ ‖ p_S^τ) + (1 − α)·CE + grad term; returns (L, {"kl", "ce", "grad"})."""
    kd, terms = kd_loss(student_logits, teacher_logits, y, alpha, temperature, reduction)
    grad = kdiga_grad_term(g_s, g_t, gamma, grad_norm)
    return kd + grad, {**terms, "grad": grad}


def student_input_gradient(student: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """S(x) and g_S = ∇_x CE_mean(S(x), y), graph kept, from ONE forward that also serves the KD term."""
    x = x.detach().requires_grad_(True)
    with torch.enable_grad():
        logits = student(x)
        (g_s,) = torch.autograd.grad(F.cross_entropy(logits, y), x, create_graph=True)
    return logits, g_s


def teacher_input_gradient(teacher: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """T(x) and g_T = ∇_x CE_mean(T(x), y), both detached.

    Not under no_grad (the input gradient needs a graph), but the graph is built for x only: the
    teacher's parameters are frozen, and autograd.grad never writes a parameter's .grad.
    """
    x = x.detach().requires_grad_(True)
    with torch.enable_grad():
        logits = teacher(x)
        (g_t,) = torch.autograd.grad(F.cross_entropy(logits, y), x)
    return logits.detach(), g_t.detach()


@register_method("kdiga")
@dataclass
class KDIGA(Method):
    """KDIGA as in the reference code (RulinShao/AdversariallyRobustDistillation, ``--distill_method kdiga``).

    Defaults α = 0.5, τ = 1, γ = 0.5 (used as γ/B). Deliberate choices:

    * ``kl_reduction="batchmean"`` by default (robustkd's convention); ``"mean_over_classes"`` is the
      code's ``nn.KLDivLoss()`` (C times smaller).
    * ``grad_norm="l2_batch"`` (default) is the code's unsquared norm of the whole batch difference; the
      paper's equation is not verified, so ``"l2_squared_per_example"`` offers the per-example squared
      reading (see :func:`kdiga_grad_term`).
    * One student forward serves both KD and g_S (the code runs two, each in train mode). The student
      stays in the engine's train mode, as in the code; the teacher stays in eval mode. No attack.
    """

    needs_teacher = True

    alpha: float = 0.5
    temperature: float = 1.0
    gamma: float = 0.5
    kl_reduction: str = "batchmean"
    grad_norm: str = "l2_batch"

    def __post_init__(self) -> None:
        check_kd_options(self.alpha, self.temperature, self.kl_reduction)
        if not self.gamma >= 0:
            raise ValueError(f"gamma must be >= 0, got {self.gamma}")
        if self.grad_norm not in GRAD_NORMS:
            raise ValueError(f"grad_norm must be one of {', '.join(GRAD_NORMS)}, got {self.grad_norm!r}")

    def __call__(self, student: nn.Module, teacher: nn.Module | None, batch: Batch, info: StepInfo) -> Output:
        teacher = require_teacher(teacher, self.name)
        x, y = batch.x, batch.y
        cached = batch.teacher
        if "input_grad" in cached:
            teacher_logits, g_t = cached["logits"], cached["input_grad"]
        else:
            teacher_logits, g_t = teacher_input_gradient(teacher, x, y)
        logits, g_s = student_input_gradient(student, x, y)
        loss, terms = kdiga_loss(
            logits,
            teacher_logits,
            y,
            g_s,
            g_t,
            alpha=self.alpha,
            temperature=self.temperature,
            gamma=self.gamma,
            reduction=self.kl_reduction,
            grad_norm=self.grad_norm,
        )
        return Output(loss, {k: v.detach() for k, v in terms.items()}, logits.detach())

    def passes(self) -> dict[str, int]:
        # The final backward also runs through g_S's graph (double backprop): counted as student_double_bwd.
        return {
            "student_fwd": 1,
            "student_input_grad": 1,
            "student_bwd": 1,
            "student_double_bwd": 1,
            "teacher_fwd": 1,
            "teacher_input_grad": 1,
        }

    def clean_teacher(self) -> tuple[str, ...]:
        return ("logits", "input_grad")
