"""The one attack engine: projected gradient ascent of a pluggable objective over a threat model's ball.

Pass count per restart, with S the steps actually run (fewer than ``threat.steps`` only when every
point is broken early):

* ``S`` forwards of ``model`` and ``S`` backwards to the input (``torch.autograd.grad`` w.r.t. x' only);
* for objectives with ``needs_teacher``: ``S`` teacher forwards (inside the same graph: the backward
  also runs through the teacher);
* ``track_best=True`` adds **one** no-grad forward of the model (and the teacher, if needed) at the end
  of each restart, to score the last iterate; ``track_best=False`` adds nothing.

With ``early_stop`` and eval mode, broken points are dropped from later forwards, so the count above is an
upper bound on the examples processed. ``eps == 0`` runs no attack (one scoring forward if ``track_best``).
Training-time calls (``early_stop=False, track_best=False``) take a fast path: whole-batch tensors, no
masks and no host synchronisation, i.e. the cost of a hand-written PGD loop.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from robustkd.attacks.objectives import Objective, make_objective
from robustkd.attacks.threat import NORMAL_START_STD, ThreatModel
from robustkd.errors import ConfigError, RobustKDError

MODES = ("eval", "train", "keep")
# Tolerance of the [0, 1] input check: images decoded to float and rescaled can be off by rounding.
RANGE_TOL = 1e-6


@dataclass
class AttackResult:
    """What :func:`perturb` found.

    ``value``: per-example best objective score (the objective's ``score``); ``success``: per-example bool
    for objectives that define success. Both are None when ``track_best=False`` (then nothing is scored
    at the returned point, to save the forward).
    """

    x_adv: Tensor
    value: Tensor | None
    success: Tensor | None


def check_unit_range(x: Tensor, field: str = "x") -> None:
    """Raise ConfigError unless every entry of x is finite and in [0, 1] (up to rounding)."""
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


@contextlib.contextmanager
def attack_mode(model: nn.Module, teacher: nn.Module | None = None, mode: str = "eval") -> Iterator[None]:
    """Set the attack-time modes and freeze parameters; restore both exactly, even on error.

    ``mode`` applies to ``model`` (``"keep"`` leaves it alone); the teacher is always in eval mode.
    Every submodule's ``training`` flag and every parameter's ``requires_grad`` flag is restored to what
    it was, so mixed states (e.g. frozen BatchNorm inside a training model) survive.
    """
    if mode not in MODES:
        raise ConfigError(f"mode: expected one of {', '.join(MODES)}, got {mode!r}")
    nets = [model] if teacher is None else [model, teacher]
    modes = [(m, m.training) for net in nets for m in net.modules()]
    flags: dict[int, tuple[nn.Parameter, bool]] = {}
    for net in nets:
        for p in net.parameters():
            flags.setdefault(id(p), (p, p.requires_grad))
    try:
        if mode != "keep":
            model.train(mode == "train")
        if teacher is not None:
            teacher.eval()
        for p, _ in flags.values():
            # No parameter graph is built and no .grad accumulates: the attack differentiates w.r.t. x' only.
            p.requires_grad_(False)
        yield
    finally:
        for p, flag in flags.values():
            p.requires_grad_(flag)
        for m, training in modes:
            m.training = training


def _batch_independent(model: nn.Module) -> bool:
    # In eval mode a forward treats examples independently, so broken points can be left out of later
    # forwards. In train mode BatchNorm couples the batch; keep it whole to keep the paper's statistics.
    return not any(m.training for m in model.modules())


def _rand(shape: torch.Size, x: Tensor, generator: torch.Generator | None, kind: str) -> Tensor:
    # Draw on the generator's device and move: a CPU generator then gives the same start on any device.
    device = generator.device if generator is not None else x.device
    draw = torch.rand if kind == "uniform" else torch.randn
    return draw(shape, generator=generator, device=device, dtype=torch.float32).to(x.device, x.dtype)


def _flat_norm(t: Tensor) -> Tensor:
    return t.flatten(1).norm(dim=1).view(-1, *([1] * (t.dim() - 1)))


def _project(delta: Tensor, threat: ThreatModel) -> Tensor:
    if threat.norm == "linf":
        return delta.clamp(-threat.eps, threat.eps)
    norm = _flat_norm(delta)
    return delta * torch.where(norm > threat.eps, threat.eps / norm.clamp_min(1e-12), torch.ones_like(norm))


def _start(x: Tensor, threat: ThreatModel, generator: torch.Generator | None) -> Tensor:
    if threat.random_start == "none":
        return x.clone()
    if threat.random_start == "normal":
        delta = NORMAL_START_STD * _rand(x.shape, x, generator, "normal")
    elif threat.norm == "linf":
        delta = (2 * _rand(x.shape, x, generator, "uniform") - 1) * threat.eps
    else:
        # Uniform in the L2 ball: a uniform direction and a radius eps * U^(1/d).
        direction = _rand(x.shape, x, generator, "normal")
        direction = direction / _flat_norm(direction).clamp_min(1e-12)
        d = x[0].numel()
        radius = threat.eps * _rand(torch.Size([x.shape[0]]), x, generator, "uniform") ** (1.0 / d)
        delta = direction * radius.view(-1, *([1] * (x.dim() - 1)))
    # Always start inside the feasible set (some reference code skips this clip; we never leave [0, 1]).
    return (x + _project(delta, threat)).clamp(0, 1)


def _step(x_adv: Tensor, grad: Tensor, x: Tensor, threat: ThreatModel) -> Tensor:
    if threat.norm == "linf":
        moved = x_adv + threat.alpha * grad.sign()
    else:
        moved = x_adv + threat.alpha * grad / _flat_norm(grad).clamp_min(1e-12)
    # Ball projection, then the box: exact for Linf (both separable); for L2 the clamp only shrinks |delta|,
    # so the point stays feasible.
    return (x + _project(moved - x, threat)).clamp(0, 1)


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


def pgd(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    threat: ThreatModel,
    objective: str | Objective = "ce",
    *,
    teacher: nn.Module | None = None,
    reference: Tensor | None = None,
    mode: str = "eval",
    generator: torch.Generator | None = None,
) -> Tensor:
    """The training-time attack: ``threat.steps`` PGD steps on the whole batch, returning the last iterate.

    No scoring, no best-iterate tracking, no restarts, no early stop, and no host synchronisation: the cost
    of a hand-written PGD loop. The [0, 1] range of ``x`` is not checked here; it is checked once where the
    data enters (the training engine builds batches from uint8 images). ``mode`` is the model's mode during
    the attack (the teacher is always in eval mode); both are restored. Evaluation, which wants the best
    iterate, restarts and only the points still robust, calls :func:`perturb`.
    """
    obj = make_objective(objective)
    x, y = x.detach(), y.detach().long()
    ref = reference.detach() if reference is not None else None
    t_net = teacher if obj.needs_teacher else None
    if threat.eps == 0:
        return x.clone()
    with attack_mode(model, teacher, mode), torch.enable_grad():
        x_adv = _start(x, threat, generator)
        for _ in range(threat.steps):
            inp = x_adv.detach().requires_grad_(True)
            t_logits = t_net(inp) if t_net is not None else None
            value = obj.value(model(inp), y, teacher_logits=t_logits, reference=ref)
            (grad,) = torch.autograd.grad(value.sum(), inp, allow_unused=True)
            if grad is None:
                grad = torch.zeros_like(inp)
            with torch.no_grad():
                x_adv = _step(inp, grad, x, threat)
    return x_adv.detach()


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
    """
    obj = make_objective(objective)
    _check_inputs(model, x, y, threat, obj, teacher, reference)
    if not track_best and threat.restarts > 1:
        raise ConfigError("restarts: restarts > 1 need track_best=True to pick among them")
    x, y = x.detach(), y.detach().long()
    if reference is not None:
        reference = reference.detach()
    n = x.shape[0]
    teacher_used = teacher if obj.needs_teacher else None

    def forward(inp: Tensor, idx: Tensor | None) -> tuple[Tensor, Tensor, Tensor | None, Tensor | None]:
        y_i = y if idx is None else y[idx]
        ref = reference if (reference is None or idx is None) else reference[idx]
        logits = model(inp)
        t_logits = teacher_used(inp) if teacher_used is not None else None
        return logits, y_i, t_logits, ref

    with attack_mode(model, teacher, mode), torch.enable_grad():
        subset_ok = _batch_independent(model)
        best_x = x.clone()
        best_score = torch.full((n,), float("-inf"), device=x.device)
        best_success = torch.zeros(n, dtype=torch.bool, device=x.device)
        has_success = True

        def record(cand: Tensor, idx: Tensor, logits: Tensor, y_i: Tensor, t_logits, ref) -> None:
            nonlocal has_success
            score = obj.score(logits, y_i, teacher_logits=t_logits, reference=ref).detach().float()
            succ = obj.success(logits, y_i, teacher_logits=t_logits, reference=ref)
            if succ is None:
                has_success = False
                succ = torch.zeros_like(best_success[idx])
            old_s, old_v = best_success[idx], best_score[idx]
            better = (succ & ~old_s) | ((succ == old_s) & (score > old_v))
            where = idx[better]
            best_x[where] = cand[better].detach()
            best_score[where] = score[better]
            best_success[where] = succ[better]

        if threat.eps == 0:
            if track_best:
                with torch.no_grad():
                    logits, y_i, t_logits, ref = forward(x, None)
                    record(x, torch.arange(n, device=x.device), logits, y_i, t_logits, ref)
            return _result(best_x, best_score, best_success, has_success, track_best)

        all_idx = torch.arange(n, device=x.device)
        x_last = x
        # Freezing needs a success criterion; known after the first call (objectives return None otherwise).
        can_freeze = early_stop
        for _ in range(threat.restarts):
            # Draw the start for the whole batch, so a point's start does not depend on which points broke.
            x_adv = _start(x, threat, generator)
            active = ~best_success if can_freeze else None
            if active is not None and not bool(active.any()):
                break
            for _ in range(threat.steps):
                # idx=None is the fast path (no freezing): whole-batch tensors, no masks, no host syncs.
                idx = None if active is None else (all_idx[active] if subset_ok else all_idx)
                inp = (x_adv if idx is None else x_adv[idx]).detach().requires_grad_(True)
                logits, y_i, t_logits, ref = forward(inp, idx)
                value = obj.value(logits, y_i, teacher_logits=t_logits, reference=ref)
                if not value.requires_grad:
                    raise RobustKDError(
                        "the attack objective does not depend on the input: does the model's forward run "
                        "under torch.no_grad() or detach its input?"
                    )
                (grad,) = torch.autograd.grad(value.sum(), inp, allow_unused=True)
                if grad is None:
                    grad = torch.zeros_like(inp)
                with torch.no_grad():
                    rows_idx = all_idx if idx is None else idx
                    if track_best:
                        record(inp, rows_idx, logits, y_i, t_logits, ref)
                    if active is not None:
                        succ = obj.success(logits, y_i, teacher_logits=t_logits, reference=ref)
                        if succ is None:
                            can_freeze = False
                        else:
                            # A broken point keeps the iterate that broke it.
                            active[rows_idx[succ]] = False
                    if active is None or not can_freeze:
                        stepped = _step(inp, grad, x if idx is None else x[idx], threat)
                        if idx is None:
                            x_adv = stepped
                        else:
                            x_adv[idx] = stepped
                        active = None
                        continue
                    upd = all_idx[active]
                    if upd.numel() == 0:
                        break
                    # Rows of `rows_idx` still active (rows_idx is the active set or the whole batch).
                    rows = active[rows_idx]
                    x_adv[upd] = _step(inp[rows], grad[rows], x[upd], threat)
            if track_best and (active is None or bool(active.any())):
                with torch.no_grad():
                    idx = all_idx if active is None or not subset_ok else all_idx[active]
                    logits, y_i, t_logits, ref = forward(x_adv[idx], idx)
                    record(x_adv[idx], idx, logits, y_i, t_logits, ref)
            x_last = x_adv
        if not track_best:
            return AttackResult(x_adv=x_last.detach(), value=None, success=None)
        return _result(best_x, best_score, best_success, has_success, track_best)


def _result(best_x: Tensor, score: Tensor, success: Tensor, has_success: bool, tracked: bool) -> AttackResult:
    if not tracked:
        return AttackResult(x_adv=best_x.detach(), value=None, success=None)
    return AttackResult(x_adv=best_x.detach(), value=score, success=success if has_success else None)
