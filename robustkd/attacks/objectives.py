"""Attack objectives: per-example quantities an attack maximises over the threat model's ball.

Every objective maps logits (and, for teacher–student objectives, the teacher's logits at the same
perturbed input, or a fixed reference distribution) to a tensor of shape (B,) to be **maximised**.
``success`` says when a point counts as broken, for objectives that define it; the attack engine uses
it for early stopping and for choosing the best iterate.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor

from robustkd.errors import ConfigError
from robustkd.registry import Registry


class Objective:
    """Base class; subclasses are small dataclasses whose fields are the objective's options."""

    name: ClassVar[str] = ""
    needs_teacher: ClassVar[bool] = False
    needs_reference: ClassVar[bool] = False

    def value(
        self,
        logits: Tensor,
        y: Tensor,
        *,
        teacher_logits: Tensor | None = None,
        reference: Tensor | None = None,
    ) -> Tensor:
        """The per-example quantity (B,) whose input gradient the attack ascends."""
        raise NotImplementedError

    def score(
        self,
        logits: Tensor,
        y: Tensor,
        *,
        teacher_logits: Tensor | None = None,
        reference: Tensor | None = None,
    ) -> Tensor:
        """Per-example quantity (B,) ranking iterates: the value, unless a surrogate is ascended."""
        return self.value(logits, y, teacher_logits=teacher_logits, reference=reference)

    def success(
        self,
        logits: Tensor,
        y: Tensor,
        *,
        teacher_logits: Tensor | None = None,
        reference: Tensor | None = None,
    ) -> Tensor | None:
        """Bool (B,), True where the point is broken; None when the objective has no such notion."""
        return None


OBJECTIVES: Registry[type[Objective]] = Registry("attack objective")


def register_objective(name: str) -> Callable[[type[Objective]], type[Objective]]:
    """Class decorator: register an Objective subclass under ``name``."""

    def decorator(cls: type[Objective]) -> type[Objective]:
        cls.name = name
        OBJECTIVES.add(name, cls)
        return cls

    return decorator


def make_objective(objective: str | Objective, **options: Any) -> Objective:
    """An objective instance from a registered name (with options) or an instance passed through."""
    if isinstance(objective, Objective):
        if options:
            raise ConfigError("objective: options can only be given with an objective name")
        return objective
    if not isinstance(objective, str):
        raise ConfigError(f"objective: expected a name or an Objective, got {type(objective).__name__}")
    cls = OBJECTIVES.get(objective)
    try:
        return cls(**options)
    except TypeError as err:
        raise ConfigError(f"objective {objective!r}: {err}") from None


def _check_temperature(temperature: float) -> None:
    if not temperature > 0:
        raise ConfigError(f"temperature: must be > 0, got {temperature}")


def _other_max(z: Tensor, y: Tensor) -> Tensor:
    """max_{j != y} z_j per row."""
    return z.masked_fill(F.one_hot(y, z.shape[-1]).bool(), float("-inf")).amax(dim=-1)


def _true(z: Tensor, y: Tensor) -> Tensor:
    return z.gather(-1, y[:, None]).squeeze(-1)


def _kl_rows(p: Tensor, log_p: Tensor, log_q: Tensor) -> Tensor:
    # sum_c p (log p - log q); p log p is taken as 0 where p == 0 (log_p may be -inf there).
    return (torch.where(p > 0, p * log_p, torch.zeros_like(p)) - p * log_q).sum(dim=-1)


def _need(tensor: Tensor | None, what: str, objective: str) -> Tensor:
    if tensor is None:
        raise ConfigError(f"objective {objective!r} needs {what}")
    return tensor


@register_objective("ce")
@dataclass(frozen=True)
class CrossEntropy(Objective):
    """Cross-entropy of the label (the PGD objective of Madry et al.). Broken: argmax != y."""

    def value(self, logits, y, *, teacher_logits=None, reference=None):
        return F.cross_entropy(logits.float(), y, reduction="none")

    def success(self, logits, y, *, teacher_logits=None, reference=None):
        return logits.argmax(dim=-1) != y


@register_objective("cw")
@dataclass(frozen=True)
class CWMargin(Objective):
    """CW-inf margin max_{j!=y} z_j - z_y, clamped above at kappa (50, as in Madry's and IAD's code).

    The clamp equals the Madry loss -relu(z_y - max_{j!=y} z_j + kappa) up to the constant kappa: once the
    margin passes kappa the point is "broken enough" and the gradient stops. Broken: margin > 0.
    """

    kappa: float = 50.0

    def value(self, logits, y, *, teacher_logits=None, reference=None):
        z = logits.float()
        return (_other_max(z, y) - _true(z, y)).clamp(max=self.kappa)

    def success(self, logits, y, *, teacher_logits=None, reference=None):
        z = logits.float()
        return _other_max(z, y) - _true(z, y) > 0


@register_objective("kl")
@dataclass(frozen=True)
class FixedKL(Objective):
    """KL(reference || softmax(logits / T)) summed over classes, with the reference held fixed.

    The reference is a probability distribution (B, C) given by the caller: the teacher's clean softmax
    (RSLAD) or the model's own clean softmax (TRADES). No T^2 factor: it rescales every example alike and
    sign/normalised steps ignore scale.
    """

    temperature: float = 1.0
    needs_reference: ClassVar[bool] = True

    def __post_init__(self) -> None:
        _check_temperature(self.temperature)

    def value(self, logits, y, *, teacher_logits=None, reference=None):
        p = _need(reference, "a reference distribution (reference=...)", "kl").detach().float()
        if p.shape != logits.shape:
            raise ConfigError(f"reference: shape {tuple(p.shape)} does not match logits {tuple(logits.shape)}")
        log_q = F.log_softmax(logits.float() / self.temperature, dim=-1)
        return _kl_rows(p, torch.log(p), log_q)


@register_objective("mismatch")
@dataclass(frozen=True)
class Mismatch(Objective):
    """KL(softmax(T(x')/t) || softmax(S(x')/t)) with both networks at x' and gradients through both.

    The AdaAD / AdvFunMatch inner objective. No success criterion: the attack looks for the largest
    mismatch, not for a flip.
    """

    temperature: float = 1.0
    needs_teacher: ClassVar[bool] = True

    def __post_init__(self) -> None:
        _check_temperature(self.temperature)

    def value(self, logits, y, *, teacher_logits=None, reference=None):
        t = _need(teacher_logits, "a teacher (teacher=...)", "mismatch").float() / self.temperature
        log_p = F.log_softmax(t, dim=-1)
        log_q = F.log_softmax(logits.float() / self.temperature, dim=-1)
        return _kl_rows(log_p.exp(), log_p, log_q)


@register_objective("disagreement")
@dataclass(frozen=True)
class Disagreement(Objective):
    """max_{j!=y} [(z_S^j - z_S^y) - (z_T^j - z_T^y)]: push the student to some j while the teacher holds y.

    ``flip="teacher"`` is the mirror, max_{j!=y} [(z_T^j - z_T^y) - (z_S^j - z_S^y)]: the teacher is pushed
    off y while the student holds it. Broken (either way): the two networks' argmaxes differ at x'.
    """

    flip: str = "student"
    needs_teacher: ClassVar[bool] = True

    def __post_init__(self) -> None:
        if self.flip not in ("student", "teacher"):
            raise ConfigError(f"flip: expected 'student' or 'teacher', got {self.flip!r}")

    def value(self, logits, y, *, teacher_logits=None, reference=None):
        zt = _need(teacher_logits, "a teacher (teacher=...)", "disagreement").float()
        zs = logits.float()
        diff = (zs - _true(zs, y)[:, None]) - (zt - _true(zt, y)[:, None])
        return _other_max(diff if self.flip == "student" else -diff, y)

    def success(self, logits, y, *, teacher_logits=None, reference=None):
        zt = _need(teacher_logits, "a teacher (teacher=...)", "disagreement")
        return logits.argmax(dim=-1) != zt.argmax(dim=-1)


@register_objective("confidence_gap")
@dataclass(frozen=True)
class ConfidenceGap(Objective):
    """Gap in the label's softmax confidence at the same x'.

    ``direction="under"``: f_T^y(x') - f_S^y(x') (the student less confident than the teacher);
    ``"over"``: f_S^y - f_T^y. With ``log_space=True`` the attack ascends the log-ratio
    log f_T^y - log f_S^y (saturated softmax kills the plain gap's gradient), while iterates are still
    ranked by the true gap. No success criterion.
    """

    direction: str = "under"
    log_space: bool = False
    needs_teacher: ClassVar[bool] = True

    def __post_init__(self) -> None:
        if self.direction not in ("under", "over"):
            raise ConfigError(f"direction: expected 'under' or 'over', got {self.direction!r}")

    def _sign(self) -> float:
        return 1.0 if self.direction == "under" else -1.0

    def value(self, logits, y, *, teacher_logits=None, reference=None):
        if not self.log_space:
            return self.score(logits, y, teacher_logits=teacher_logits)
        zt = _need(teacher_logits, "a teacher (teacher=...)", self.name).float()
        log_t = _true(F.log_softmax(zt, dim=-1), y)
        log_s = _true(F.log_softmax(logits.float(), dim=-1), y)
        return self._sign() * (log_t - log_s)

    def score(self, logits, y, *, teacher_logits=None, reference=None):
        zt = _need(teacher_logits, "a teacher (teacher=...)", self.name).float()
        f_t = _true(F.softmax(zt, dim=-1), y)
        f_s = _true(F.softmax(logits.float(), dim=-1), y)
        return self._sign() * (f_t - f_s)


@register_objective("confidence_gap_over")
@dataclass(frozen=True)
class ConfidenceGapOver(ConfidenceGap):
    """f_S^y(x') - f_T^y(x'): the student more confident than the teacher."""

    direction: str = "over"
