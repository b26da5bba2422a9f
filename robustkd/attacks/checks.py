"""Sanity checks of an evaluation, in the spirit of AutoAttack's ``checks.py``.

Each check emits a :class:`RobustnessWarning` subclass (never aborts), so a caller can filter or record
them and a report can list them.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class RobustnessWarning(UserWarning):
    """Something makes a robustness number less trustworthy than it looks."""


class AutoAttackWarning(RobustnessWarning):
    """A warning raised by the AutoAttack library's own checks."""


class ProbabilityOutputWarning(RobustnessWarning):
    """The model seems to output probabilities; attacks expect logits."""


class RandomizedModelWarning(RobustnessWarning):
    """Two forwards on the same input differ: a randomised model needs EOT attacks (autoattack-rand)."""


class ZeroGradientWarning(RobustnessWarning):
    """Some points have an exactly zero input gradient: gradient attacks cannot move them (masking?)."""


def check_output_is_logits(logits: Tensor, tol: float = 1e-5) -> bool:
    """Warn when every row looks like a probability vector; returns True when the check passed."""
    looks_like_probs = (
        bool(logits.min() > -tol) and bool(logits.max() < 1 + tol) and bool(((logits.sum(-1) - 1).abs() < tol).all())
    )
    if looks_like_probs:
        warnings.warn(
            ProbabilityOutputWarning(
                "the model's outputs are probability vectors; attacks and the CE/CW objectives expect "
                "logits (drop the final softmax)"
            ),
            stacklevel=2,
        )
    return not looks_like_probs


def check_deterministic(model: nn.Module, x: Tensor, tol: float = 1e-4) -> bool:
    """Warn when two forwards of the same batch differ; returns True when the check passed."""
    with torch.no_grad():
        a, b = model(x), model(x)
    scale = a.abs().max().clamp_min(1e-12)
    if (a - b).abs().max() / scale > tol:
        warnings.warn(
            RandomizedModelWarning(
                "two forwards of the same input differ: the model is randomised in eval mode; "
                "use the 'autoattack-rand' attack (EOT) for a meaningful evaluation"
            ),
            stacklevel=2,
        )
        return False
    return True


def check_zero_gradients(model: nn.Module, x: Tensor, y: Tensor) -> int:
    """Warn when some points have an exactly zero CE input gradient; returns their number.

    Parameters must already be frozen (as inside :func:`robustkd.attacks.attack_mode`).
    """
    with torch.enable_grad():
        inp = x.detach().clone().requires_grad_(True)
        loss = F.cross_entropy(model(inp).float(), y, reduction="sum")
        if not loss.requires_grad:
            zero = x.shape[0]
        else:
            (grad,) = torch.autograd.grad(loss, inp, allow_unused=True)
            zero = x.shape[0] if grad is None else int((grad.flatten(1).abs().sum(1) == 0).sum())
    if zero:
        warnings.warn(
            ZeroGradientWarning(
                f"{zero} of {x.shape[0]} points have a zero input gradient; gradient-based attacks cannot "
                "move them, so robust accuracy may be overestimated (gradient masking or saturated logits)"
            ),
            stacklevel=2,
        )
    return zero
