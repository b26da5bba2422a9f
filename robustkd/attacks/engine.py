"""Where evaluation enters the attacks: :func:`perturb` checks its inputs, then runs the search or the loop.

Two attack paths, one public call:

* :func:`robustkd.attacks.pgd` (module :mod:`robustkd.attacks.pgd`): the flat training-time loop, K steps on the
  whole batch, the last iterate, no host synchronisation and no input check. Training methods call it.
* :func:`robustkd.attacks.search.search`: per-example best iterate across steps and restarts, and the early
  stop that forwards only the points still robust. Its module docstring gives the pass counts.

``perturb(..., early_stop=False, track_best=False)`` is exactly ``pgd(...)``; anything else is the search.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from robustkd.attacks.objectives import Objective, make_objective
from robustkd.attacks.pgd import MODES, attack_mode, pgd
from robustkd.attacks.search import AttackResult, search
from robustkd.attacks.threat import ThreatModel
from robustkd.errors import ConfigError

__all__ = ["MODES", "RANGE_TOL", "AttackResult", "attack_mode", "check_unit_range", "perturb", "pgd"]

# Tolerance of the [0, 1] input check: images decoded to float and rescaled can be off by rounding.
RANGE_TOL = 1e-6


def check_unit_range(x: Tensor, field: str = "x") -> None:
    """Raise ConfigError unless every entry of x is finite and in [0, 1] (up to rounding).

    Reads two numbers back from the device: call it where data enters, never once per training step.
    """
    if not torch.is_tensor(x):
        raise ConfigError(f"{field}: expected a tensor, got {type(x).__name__}")
    if not torch.is_floating_point(x):
        raise ConfigError(f"{field}: expected a floating-point image tensor in [0, 1], got dtype {x.dtype}")
    if x.numel() == 0:
        return
    lo, hi = x.min().item(), x.max().item()
    if not (lo >= -RANGE_TOL and hi <= 1 + RANGE_TOL):  # also catches NaN
        raise ConfigError(
            f"{field}: inputs must be images in [0, 1] (normalisation belongs inside the model), "
            f"got values in [{lo:.4g}, {hi:.4g}]"
        )


def _check_inputs(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    threat: ThreatModel,
    obj: Objective,
    teacher: nn.Module | None,
    reference: Tensor | None,
) -> None:
    if not isinstance(threat, ThreatModel):
        raise ConfigError(f"threat: expected a ThreatModel, got {type(threat).__name__}")
    check_unit_range(x)
    if x.dim() < 2:
        raise ConfigError(f"x: expected a batch (B, ...), got shape {tuple(x.shape)}")
    if not torch.is_tensor(y) or y.shape != (x.shape[0],):
        shape = tuple(y.shape) if torch.is_tensor(y) else type(y).__name__
        raise ConfigError(f"y: expected labels of shape ({x.shape[0]},), got {shape}")
    if y.dtype.is_floating_point or y.dtype.is_complex or y.dtype == torch.bool:
        raise ConfigError(f"y: expected integer class labels, got dtype {y.dtype}")
    if obj.needs_teacher and teacher is None:
        raise ConfigError(f"teacher: objective {obj.name!r} compares against a teacher; pass teacher=...")
    if obj.needs_reference:
        if reference is None:
            raise ConfigError(f"reference: objective {obj.name!r} needs a fixed reference distribution")
        if reference.shape[0] != x.shape[0]:
            raise ConfigError(f"reference: {reference.shape[0]} rows for {x.shape[0]} inputs")
    if not isinstance(model, nn.Module):
        raise ConfigError(f"model: expected an nn.Module, got {type(model).__name__}")


def perturb(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    threat: ThreatModel,
    objective: str | Objective = "ce",
    *,
    teacher: nn.Module | None = None,
    reference: Tensor | None = None,
    mode: str = "eval",
    early_stop: bool = True,
    track_best: bool = True,
    generator: torch.Generator | None = None,
) -> AttackResult:
    """Maximise ``objective`` over the ball of ``threat`` around each x (in [0, 1]) with PGD.

    Linf: sign steps; L2: steps along the per-example normalised gradient; each followed by projection
    onto the ball and clipping to [0, 1]. ``mode`` is the model's mode during the attack (``"eval"``,
    ``"train"`` as in ARD/IAD, or ``"keep"``); the teacher is always in eval mode; both are restored.

    ``track_best``: keep, per example and across steps and restarts, the best iterate (a successful one,
    else the highest score); costs one extra forward per restart. With False the last iterate is returned
    (as training-time attacks in the papers do) and ``restarts`` must be 1.
    ``early_stop``: freeze a point once the objective calls it broken (objectives without ``success``
    ignore it); stop when all are broken. Paper reproductions of training attacks pass False.
    ``generator`` makes random starts reproducible (a CPU generator gives the same starts on any device).

    The inputs are checked here (which reads the range of ``x`` back from the device); with
    ``early_stop=False, track_best=False`` the attack itself is :func:`pgd`, the training-time loop.
    """
    obj = make_objective(objective)
    _check_inputs(model, x, y, threat, obj, teacher, reference)
    if not track_best and threat.restarts > 1:
        raise ConfigError("restarts: restarts > 1 need track_best=True to pick among them")
    kwargs = {"teacher": teacher, "reference": reference, "mode": mode, "generator": generator}
    if not early_stop and not track_best:
        return AttackResult(x_adv=pgd(model, x, y, threat, obj, **kwargs), value=None, success=None)
    return search(model, x, y, threat, obj, early_stop=early_stop, track_best=track_best, **kwargs)
