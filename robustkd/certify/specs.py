"""Specification matrices and what follows from margin bounds: certificates, softmax intervals, gaps."""

from __future__ import annotations

import torch
from torch import Tensor


def other_classes(y: Tensor, num_classes: int) -> Tensor:
    """``(B, K-1)`` class indices j != y_i in increasing order: the column order of every margin tensor."""
    # Column j is class j below y_i and j + 1 from y_i on: no boolean mask, so nothing is read back from the device.
    columns = torch.arange(num_classes - 1, device=y.device).unsqueeze(0)
    return columns + (columns >= y.unsqueeze(1)).long()


def margin_spec(y: Tensor, num_classes: int, dtype: torch.dtype = torch.float32) -> Tensor:
    """Spec matrix ``(B, K-1, K)`` with rows ``e_j - e_y`` for each ``j != y``: ``C @ z`` are the margins
    ``z_j - z_y``, and a point is certified when every upper margin bound is negative."""
    if y.dim() != 1:
        raise ValueError(f"labels must be a 1-D tensor of class indices, got shape {tuple(y.shape)}")
    if num_classes < 2:
        raise ValueError(f"a margin spec needs at least 2 classes, got {num_classes}")
    eye = torch.eye(num_classes, dtype=dtype, device=y.device)
    return eye[other_classes(y, num_classes)] - eye[y].unsqueeze(1)


def certified_from_margins(margin_upper: Tensor) -> Tensor:
    """Per example: every margin ``z_j - z_y`` is certified negative, i.e. the prediction is y on the ball."""
    return (margin_upper < 0).all(dim=1)


def worst_case_logits(margin_upper: Tensor, y: Tensor) -> Tensor:
    """IBP-training logits ``z_hat`` (Gowal et al.): ``z_hat_y = 0`` and ``z_hat_j = u_j`` for ``j != y``.

    ``CE(z_hat, y)`` upper-bounds the worst-case cross-entropy over the ball; gradients flow into ``u``.
    """
    B, S = margin_upper.shape
    index = other_classes(y, S + 1)
    return margin_upper.new_zeros(B, S + 1).scatter(1, index, margin_upper)


def confidence_interval(margin_lower: Tensor, margin_upper: Tensor) -> tuple[Tensor, Tensor]:
    """Sound interval for the softmax probability ``f^y`` of the class the margins are taken against.

    ``f^y = 1 / (1 + sum_j exp(m_j))`` decreases in every margin ``m_j = z_j - z_y``, so the lower end uses
    the upper margins and the upper end the lower margins. Written as ``sigmoid(-logsumexp(m))`` so that
    large margins neither overflow nor lose the small probabilities.
    """
    lower = torch.sigmoid(-torch.logsumexp(margin_upper, dim=1))
    upper = torch.sigmoid(-torch.logsumexp(margin_lower, dim=1))
    return lower, upper


def joint_gap_upper(ref_margin_lower: Tensor, ref_margin_upper: Tensor, shift_upper: Tensor) -> Tensor:
    """Upper bound on ``f_R^y(x') - f_O^y(x')`` over the ball from a *joint* bound on the margin difference.

    ``R`` is the reference network (margins in ``[l, u]``), ``O`` the other one, and ``shift_upper[:, j]``
    bounds ``m_O^j - m_R^j`` from above at the same input. With ``d = max_j shift_upper`` and
    ``t = logsumexp(m_R)``, ``f_R^y = sigmoid(-t)`` and ``f_O^y >= sigmoid(-t - d)``. Their difference, as a
    function of t in ``[logsumexp(l), logsumexp(u)]``, rises then falls with its peak at ``t = -d/2``, so the
    supremum is at that point clamped to the interval (or at an end when ``d <= 0``).
    """
    d = shift_upper.max(dim=1).values
    t_lo, t_hi = torch.logsumexp(ref_margin_lower, dim=1), torch.logsumexp(ref_margin_upper, dim=1)
    candidates = torch.stack([t_lo, t_hi, torch.minimum(torch.maximum(-d / 2, t_lo), t_hi)])
    gaps = torch.sigmoid(-candidates) - torch.sigmoid(-candidates - d)
    return gaps.max(dim=0).values
