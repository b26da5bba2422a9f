"""The evaluation search: PGD that keeps each point's best iterate and attacks only the points still robust.

What :func:`robustkd.attacks.perturb` runs for evaluation. Around the flat loop of :mod:`robustkd.attacks.pgd`
it adds, per example and across steps and restarts, the best iterate (a successful one, else the highest
score) and, as AutoAttack does, an early stop that freezes a point once the objective calls it broken and
forwards only the points still robust.

Pass count per restart, with S the steps actually run (fewer than ``threat.steps`` only when every point is
broken early): S forwards of the model and S backwards to the input; S teacher forwards for objectives with
``needs_teacher``; ``track_best`` adds **one** no-grad forward (of the model, and the teacher if needed) at the
end of each restart to score the last iterate. With early stop and an eval-mode model, broken points leave
later forwards, so the count is an upper bound on the examples processed. ``eps == 0`` runs no attack (one
scoring forward if ``track_best``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from robustkd.attacks.objectives import Objective, make_objective
from robustkd.attacks.pgd import _input_grad, _logits, _start, _step, attack_mode
from robustkd.attacks.threat import ThreatModel


@dataclass
class AttackResult:
    """What :func:`robustkd.attacks.perturb` found.

    ``value``: per-example best objective score (the objective's ``score``); ``success``: per-example bool
    for objectives that define success. Both are None when ``track_best=False`` (then nothing is scored
    at the returned point, to save the forward).
    """

    x_adv: Tensor
    value: Tensor | None
    success: Tensor | None


@dataclass(frozen=True)
class _Outputs:
    """One forward of some points, with their labels and reference rows: what an objective reads."""

    logits: Tensor
    y: Tensor
    teacher_logits: Tensor | None
    reference: Tensor | None

    def of(self, fn: Callable[..., Tensor | None]) -> Tensor | None:
        """``fn`` (an objective's value, score or success) on these outputs."""
        return fn(self.logits, self.y, teacher_logits=self.teacher_logits, reference=self.reference)


class _Best:
    """Per example: the best iterate so far, its score and whether it broke the point."""

    def __init__(self, x: Tensor) -> None:
        self.x = x.clone()
        self.score = torch.full((x.shape[0],), float("-inf"), device=x.device)
        self.success = torch.zeros(x.shape[0], dtype=torch.bool, device=x.device)
        self.has_success = True  # False once the objective shows it has no success criterion

    def record(self, obj: Objective, cand: Tensor, idx: Tensor, out: _Outputs) -> None:
        """Keep ``cand`` (the rows ``idx``) where it beats the best: success first, then score."""
        score = out.of(obj.score).detach().float()
        succ = out.of(obj.success)
        if succ is None:
            self.has_success = False
            succ = torch.zeros_like(self.success[idx])
        old_s, old_v = self.success[idx], self.score[idx]
        better = (succ & ~old_s) | ((succ == old_s) & (score > old_v))
        where = idx[better]
        self.x[where] = cand[better].detach()
        self.score[where] = score[better]
        self.success[where] = succ[better]

    def result(self, tracked: bool) -> AttackResult:
        if not tracked:
            return AttackResult(x_adv=self.x.detach(), value=None, success=None)
        return AttackResult(x_adv=self.x.detach(), value=self.score, success=self.success if self.has_success else None)


class _Search:
    """One call of the search; built inside :func:`attack_mode`, so the model's mode is the attack's."""

    def __init__(
        self,
        model: nn.Module,
        teacher: nn.Module | None,
        obj: Objective,
        threat: ThreatModel,
        x: Tensor,
        y: Tensor,
        reference: Tensor | None,
        track_best: bool,
    ) -> None:
        self.model, self.teacher, self.obj, self.threat = model, teacher, obj, threat
        self.x, self.y, self.reference, self.track_best = x, y, reference, track_best
        self.all_idx = torch.arange(x.shape[0], device=x.device)
        self.best = _Best(x)
        # In eval mode a forward treats examples independently, so broken points can be left out of later
        # forwards. In train mode BatchNorm couples the batch; keep it whole to keep the paper's statistics.
        self.subset_ok = not any(m.training for m in model.modules())
        self.can_freeze = False

    def run(self, early_stop: bool, generator: torch.Generator | None) -> AttackResult:
        # Freezing needs a success criterion; known after the first call (objectives return None otherwise).
        self.can_freeze = early_stop
        if self.threat.eps == 0:
            return self._no_attack()
        x_last = self.x
        for _ in range(self.threat.restarts):
            # Draw the start for the whole batch, so a point's start does not depend on which points broke.
            x_adv = _start(self.x, self.threat, generator)
            active = ~self.best.success if self.can_freeze else None
            if active is not None and not bool(active.any()):
                break
            x_adv, active = self._restart(x_adv, active)
            if self.track_best and (active is None or bool(active.any())):
                self._score(x_adv, active)
            x_last = x_adv
        if not self.track_best:
            return AttackResult(x_adv=x_last.detach(), value=None, success=None)
        return self.best.result(True)

    def _no_attack(self) -> AttackResult:
        if self.track_best:
            with torch.no_grad():
                self.best.record(self.obj, self.x, self.all_idx, self._forward(self.x, None))
        return self.best.result(self.track_best)

    def _forward(self, inp: Tensor, idx: Tensor | None) -> _Outputs:
        """Forward ``inp``, the rows ``idx`` of the batch (None: all of it)."""
        y = self.y if idx is None else self.y[idx]
        ref = self.reference if (self.reference is None or idx is None) else self.reference[idx]
        logits, t_logits = _logits(self.model, self.teacher, inp)
        return _Outputs(logits, y, t_logits, ref)

    def _restart(self, x_adv: Tensor, active: Tensor | None) -> tuple[Tensor, Tensor | None]:
        """The steps of one restart; ``active`` (None: no freezing) marks the points still robust."""
        for _ in range(self.threat.steps):
            # idx=None is the whole batch: no masks, no host syncs (after the first step when nothing freezes).
            idx = None if active is None else (self.all_idx[active] if self.subset_ok else self.all_idx)
            inp = (x_adv if idx is None else x_adv[idx]).detach().requires_grad_(True)
            out = self._forward(inp, idx)
            grad = _input_grad(out.of(self.obj.value), inp)
            with torch.no_grad():
                x_adv, active, done = self._advance(x_adv, active, inp, grad, idx, out)
            if done:
                break
        return x_adv, active

    def _advance(
        self, x_adv: Tensor, active: Tensor | None, inp: Tensor, grad: Tensor, idx: Tensor | None, out: _Outputs
    ) -> tuple[Tensor, Tensor | None, bool]:
        """Record, freeze the points just broken, step the rest; True when none is left to attack."""
        rows_idx = self.all_idx if idx is None else idx
        if self.track_best:
            self.best.record(self.obj, inp, rows_idx, out)
        if active is not None:
            self._freeze_broken(active, rows_idx, out)
        if active is None or not self.can_freeze:
            stepped = _step(inp, grad, self.x if idx is None else self.x[idx], self.threat)
            if idx is None:
                return stepped, None, False
            x_adv[idx] = stepped
            return x_adv, None, False
        upd = self.all_idx[active]
        if upd.numel() == 0:
            return x_adv, active, True
        # Rows of `rows_idx` still active (rows_idx is the active set or the whole batch).
        rows = active[rows_idx]
        x_adv[upd] = _step(inp[rows], grad[rows], self.x[upd], self.threat)
        return x_adv, active, False

    def _freeze_broken(self, active: Tensor, rows_idx: Tensor, out: _Outputs) -> None:
        succ = out.of(self.obj.success)
        if succ is None:
            self.can_freeze = False
        else:
            # A broken point keeps the iterate that broke it.
            active[rows_idx[succ]] = False

    def _score(self, x_adv: Tensor, active: Tensor | None) -> None:
        """Score the last iterate of a restart (the points still active, where the batch may be split)."""
        idx = self.all_idx if active is None or not self.subset_ok else self.all_idx[active]
        with torch.no_grad():
            self.best.record(self.obj, x_adv[idx], idx, self._forward(x_adv[idx], idx))


def search(
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
    """The best-iterate, restarts and early-stop search behind :func:`robustkd.attacks.perturb`.

    Inputs are not checked here (``perturb`` checks them where evaluation enters).
    """
    obj = make_objective(objective)
    x, y = x.detach(), y.detach().long()
    reference = reference.detach() if reference is not None else None
    teacher_used = teacher if obj.needs_teacher else None
    with attack_mode(model, teacher, mode), torch.enable_grad():
        state = _Search(model, teacher_used, obj, threat, x, y, reference, track_best)
        return state.run(early_stop, generator)
