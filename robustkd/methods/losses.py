"""Loss pieces the methods share. The KL reduction is always named: papers' code silently differ."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

REDUCTIONS = ("batchmean", "sum", "mean_over_classes", "none")


def check_reduction(reduction: str) -> str:
    if reduction not in REDUCTIONS:
        raise ValueError(f"KL reduction must be one of {', '.join(REDUCTIONS)}, got {reduction!r}")
    return reduction


def reduce(per_element: torch.Tensor, reduction: str, weights: torch.Tensor | None = None) -> torch.Tensor:
    """Reduce a (B, C) tensor of per-class KL terms.

    batchmean = sum / B (the true per-example KL); sum; mean_over_classes = sum / (B * C), what
    ``nn.KLDivLoss()`` does by default; none = per-example (B,). ``weights`` (B,) scale each example's
    terms before reducing (batchmean: (1/B) Σ_i w_i KL_i), as per-example weighted distillation needs.
    """
    if weights is not None:
        per_element = per_element * weights.reshape(-1, 1)
    if reduction == "batchmean":
        return per_element.sum() / per_element.shape[0]
    if reduction == "sum":
        return per_element.sum()
    if reduction == "mean_over_classes":
        return per_element.mean()
    if reduction == "none":
        return per_element.sum(dim=1)
    raise ValueError(f"KL reduction must be one of {', '.join(REDUCTIONS)}, got {reduction!r}")


def kl_divergence(
    target_logits: torch.Tensor,
    logits: torch.Tensor,
    *,
    temperature: float = 1.0,
    reduction: str = "batchmean",
    weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """KL(softmax(target_logits / T) || softmax(logits / T)); no T² factor (callers write it out).

    Gradients flow into both arguments; detach the target where a method fixes it. ``weights``: optional
    per-example factors (B,), see :func:`reduce`.
    """
    log_p = F.log_softmax(target_logits / temperature, dim=1)
    log_q = F.log_softmax(logits / temperature, dim=1)
    return reduce(log_p.exp() * (log_p - log_q), reduction, weights)


def kl_to_probs(
    target_probs: torch.Tensor,
    logits: torch.Tensor,
    *,
    reduction: str = "batchmean",
    eps: float = 0.0,
    weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """KL(p || softmax(logits)) for given probabilities p.

    ``eps`` inside the log reproduces RSLAD's log(p + 1e-5); ``weights``: per-example factors, see
    :func:`reduce`.
    """
    log_q = F.log_softmax(logits, dim=1)
    log_p = torch.log(target_probs + eps) if eps else torch.log(target_probs.clamp_min(1e-30))
    terms = torch.where(target_probs > 0, target_probs * (log_p - log_q), torch.zeros_like(log_q))
    return reduce(terms, reduction, weights)


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


@dataclass(frozen=True)
class Term:
    """One named term of a loss: ``weight · value()``.

    ``value`` runs only when ``weight > 0``: a method skips the passes an unused term would need (a forward, an
    attack), and the term's inputs may then be None. It returns a tensor, logged under ``name``, or a dict of
    named parts, summed in order before weighting and each logged under its own name (a bracket such as
    ``a·(KL_teacher + KL_self)``).
    """

    name: str
    weight: float
    value: Callable[[], torch.Tensor | dict[str, torch.Tensor]]


def weighted_sum(*terms: Term) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Σ_k w_k·t_k over the terms with w_k > 0, in order; returns (total, {name: unweighted term}) for logging."""
    total: torch.Tensor | None = None
    logged: dict[str, torch.Tensor] = {}
    for term in terms:
        if not term.weight > 0:
            continue
        value = term.value()
        if isinstance(value, dict):
            logged.update(value)
            parts = list(value.values())
            value = parts[0]
            for part in parts[1:]:
                value = value + part
        else:
            logged[term.name] = value
        weighted = term.weight * value
        total = weighted if total is None else total + weighted
    if total is None:
        raise ValueError(f"no term has a positive weight: {', '.join(f'{t.name}={t.weight}' for t in terms)}")
    return total, logged


# ----------------------------------------------------------------------------------------------------------------
# Certified-training pieces. Margins are ``m_j = z_j - z_y`` for ``j != y`` in increasing j (the column order of
# ``robustkd.certify.margin_spec``); ``margin_upper`` holds sound upper bounds ``u_j`` of them over an eps-ball.


def certified_ce(margin_upper: torch.Tensor, y: torch.Tensor, target_probs: torch.Tensor | None = None) -> torch.Tensor:
    """CE on the worst-case logits ``z_hat`` (Gowal et al. 2018): ``z_hat_y = 0``, ``z_hat_j = u_j``; batch mean.

    Hard labels: ``CE(z_hat, y) = log(1 + Σ_{j≠y} exp(u_j))``, an upper bound of ``max_{x'} CE(z(x'), y)`` over
    the ball. ``target_probs`` p (B, K) gives ``-Σ_c p_c log softmax(z_hat)_c`` instead (soft labels); with a
    one-hot p it is the hard-label loss.
    """
    from robustkd.certify.specs import worst_case_logits

    z_hat = worst_case_logits(margin_upper, y)
    if target_probs is None:
        return F.cross_entropy(z_hat, y)
    return -(target_probs * F.log_softmax(z_hat, dim=1)).sum(dim=1).mean()


def ibp_loss(
    logits: torch.Tensor, margin_upper: torch.Tensor, y: torch.Tensor, kappa: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """L = κ·CE(z, y) + (1 − κ)·CE(ẑ, y); returns (L, CE(z, y), CE(ẑ, y)). κ = 1 gives the clean CE exactly."""
    ce = F.cross_entropy(logits, y)
    robust = certified_ce(margin_upper, y)
    loss = ce if kappa >= 1 else kappa * ce + (1.0 - kappa) * robust
    return loss, ce, robust


def confidence_lower(margin_upper: torch.Tensor) -> torch.Tensor:
    """Sound lower bound of ``f^y = softmax(z)_y`` from upper margin bounds: ``1 / (1 + Σ_{j≠y} exp(u_j))``.

    ``f^y`` decreases in every margin, so the upper margins give its minimum. Written as
    ``sigmoid(-logsumexp(u))``: no overflow for large margins, and small probabilities keep their gradient.
    """
    return torch.sigmoid(-torch.logsumexp(margin_upper, dim=1))


def confidence_upper(margin_lower: torch.Tensor) -> torch.Tensor:
    """Sound upper bound of ``f^y`` from lower margin bounds: ``1 / (1 + Σ_{j≠y} exp(l_j))``."""
    return torch.sigmoid(-torch.logsumexp(margin_lower, dim=1))


def faithful_hinge(teacher_upper: torch.Tensor, student_lower: torch.Tensor, rho: float = 0.0) -> torch.Tensor:
    """``mean_i max(0, ub f_T^y(x_i) - lb f_S^y(x_i) - rho)``: the certified confidence gap above rho.

    The teacher's bound is detached (a frozen target); the gradient reaches the student's lower bound only.
    """
    return F.relu(teacher_upper.detach() - student_lower - rho).mean()


def faithful_log_hinge(teacher_upper: torch.Tensor, margin_upper: torch.Tensor, rho: float = 0.0) -> torch.Tensor:
    """``mean_i max(0, log(ub f_T^y − rho) − log lb f_S^y)``, with ``log lb f_S^y = −log(1 + Σ_{j≠y} exp(u_j))``.

    Zero on exactly the same points as :func:`faithful_hinge` (``lb f_S^y >= ub f_T^y − rho``; a teacher bound at
    or below rho asks for nothing), but in log space: its gradient in ``u`` is ``softmax([0, u])`` where active,
    while the hinge's is that times ``lb f_S^y``, which vanishes once the student's bound is loose.
    """
    target = teacher_upper.detach() - rho
    log_lower = -torch.logsumexp(F.pad(margin_upper, (1, 0)), dim=1)
    gap = torch.log(target.clamp_min(torch.finfo(target.dtype).tiny)) - log_lower
    return torch.where(target > 0, F.relu(gap), torch.zeros_like(gap)).mean()
