"""Loss pieces the methods share. The KL reduction is always named: papers' code silently differ."""

from __future__ import annotations

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
