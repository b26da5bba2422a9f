"""The flat training-time attack: K projected gradient steps on the whole batch, the last iterate out.

Pass count: ``threat.steps`` forwards of the model and as many backwards to the input
(``torch.autograd.grad`` w.r.t. x' only); objectives with ``needs_teacher`` add as many teacher forwards
inside the same graph (the backward also runs through the teacher). Nothing is scored, nothing is masked and
nothing waits for the device: no ``.item()``, no boolean indexing, no data-dependent branch. The same pieces
(modes, start, step, projection) serve the evaluation search in :mod:`robustkd.attacks.search`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import Tensor, nn

from robustkd.attacks.objectives import Objective, make_objective
from robustkd.attacks.threat import NORMAL_START_STD, ThreatModel
from robustkd.errors import ConfigError, RobustKDError

MODES = ("eval", "train", "keep")


def _check_mode(mode: str) -> None:
    if mode not in MODES:
        raise ConfigError(f"mode: expected one of {', '.join(MODES)}, got {mode!r}")


@contextlib.contextmanager
def attack_mode(model: nn.Module, teacher: nn.Module | None = None, mode: str = "eval") -> Iterator[None]:
    """Set the attack-time modes and freeze parameters; restore both exactly, even on error.

    ``mode`` applies to ``model`` (``"keep"`` leaves it alone); the teacher is always in eval mode.
    Every submodule's ``training`` flag and every parameter's ``requires_grad`` flag is restored to what
    it was, so mixed states (e.g. frozen BatchNorm inside a training model) survive.
    """
    _check_mode(mode)
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


def _logits(model: nn.Module, teacher: nn.Module | None, inp: Tensor) -> tuple[Tensor, Tensor | None]:
    """The model's logits, then the teacher's (None when the objective needs no teacher)."""
    logits = model(inp)
    return logits, (teacher(inp) if teacher is not None else None)


def _input_grad(value: Tensor, inp: Tensor) -> Tensor:
    """d sum(value) / d inp; zeros where the objective ignores the input's path (a blind network)."""
    # requires_grad is a flag on the tensor, not a device value: checking it costs no synchronisation.
    if not value.requires_grad:
        raise RobustKDError(
            "the attack objective does not depend on the input: does the model's forward run "
            "under torch.no_grad() or detach its input?"
        )
    (grad,) = torch.autograd.grad(value.sum(), inp, allow_unused=True)
    return torch.zeros_like(inp) if grad is None else grad


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
    iterate, restarts and only the points still robust, calls :func:`robustkd.attacks.perturb`.
    """
    _check_mode(mode)
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
            logits, t_logits = _logits(model, t_net, inp)
            grad = _input_grad(obj.value(logits, y, teacher_logits=t_logits, reference=ref), inp)
            with torch.no_grad():
                x_adv = _step(inp, grad, x, threat)
    return x_adv.detach()
