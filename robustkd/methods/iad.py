"""IAD (Zhu et al., ICLR 2022): introspective adversarial distillation, IAD-I (on ARD) and IAD-II (on AKD2).

The student trusts the teacher on an adversarial example x'_i in proportion to the introspection weight
α_i = p_T(x'_i)[y_i]^β, and leans on its own clean prediction p_S(x_i) for the rest (1 − α_i).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from robustkd.attacks import ThreatModel, pgd
from robustkd.errors import ConfigError
from robustkd.methods.base import Batch, Method, Output, StepInfo, register_method
from robustkd.methods.common import ATTACK_KEYS, check_attack_mode, check_kd_options, method_threat, require_teacher
from robustkd.methods.losses import Term, kl_divergence, weighted_sum

VARIANTS = ("I", "II")
DEFAULT_BEGIN = {"I": 60, "II": 40}  # the reference scripts' --begin


def introspection_weights(teacher_adv_logits: torch.Tensor, y: torch.Tensor, beta: float) -> torch.Tensor:
    """α_i = softmax(T(x'_i))[y_i]^β, detached: a per-example constant (the code uses ``.item()``)."""
    with torch.no_grad():
        p_true = F.softmax(teacher_adv_logits.float(), dim=1).gather(1, y.long()[:, None]).squeeze(1)
        return p_true.pow(beta)


def _introspection(
    clean_logits: torch.Tensor | None,
    adv_logits: torch.Tensor,
    weights: torch.Tensor,
    reduction: str,
    detach_target: bool,
) -> torch.Tensor:
    # (1/B) Σ_i (1 − α_i) KL(p_S(x_i) ‖ p_S(x'_i)) at τ = 1 (for batchmean).
    if clean_logits is None:
        raise ValueError("IAD: the introspection term needs the clean student logits")
    target = clean_logits.detach() if detach_target else clean_logits
    return kl_divergence(target, adv_logits, reduction=reduction, weights=1.0 - weights)


def iad1_loss(
    adv_logits: torch.Tensor | None,
    teacher_logits: torch.Tensor | None,
    clean_logits: torch.Tensor | None,
    y: torch.Tensor,
    weights: torch.Tensor | None,
    alpha: float = 1.0,
    temperature: float = 1.0,
    reduction: str = "batchmean",
    weight_teacher_term: bool = True,
    detach_self_target: bool = False,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """IAD-I: L = α·τ²·KL_red[w](p_T^τ(x) ‖ p_S^τ(x')) + α·KL_red[1 − α_i](p_S(x) ‖ p_S(x'))
    + (1 − α)·CE(S(x), y).

    KL_red[w] weights example i by w_i before reducing (batchmean: (1/B) Σ_i w_i KL_i). The teacher term
    uses w = α_i when ``weight_teacher_term`` (the paper's partial trust) and w = 1 when not (the
    reference code). ``teacher_logits`` = T(x) on the clean input. ``weights`` = None means α_i = 1 for
    all i (before epoch ``begin``): no introspection term. The introspection target p_S(x) carries
    gradient unless ``detach_self_target`` (the code does not detach it).
    """
    w_t = weights if (weights is not None and weight_teacher_term) else None

    def kl_teacher() -> torch.Tensor:
        if adv_logits is None or teacher_logits is None:
            raise ValueError("iad1_loss: alpha > 0 needs the adversarial student logits and the teacher logits")
        return kl_divergence(
            teacher_logits.detach(), adv_logits, temperature=temperature, reduction=reduction, weights=w_t
        )

    def ce() -> torch.Tensor:
        if clean_logits is None:
            raise ValueError("iad1_loss: alpha < 1 needs the clean student logits for the CE term")
        return F.cross_entropy(clean_logits, y)

    return weighted_sum(
        Term("kl_teacher", alpha * temperature**2, kl_teacher),
        # No introspection before epoch ``begin`` (weights None); the term rides on α, as in the code.
        Term(
            "kl_self",
            alpha if weights is not None else 0.0,
            lambda: _introspection(clean_logits, adv_logits, weights, reduction, detach_self_target),
        ),
        Term("ce", 1.0 - alpha, ce),
    )


def iad2_loss(
    adv_logits: torch.Tensor,
    teacher_logits: torch.Tensor | None,
    st_logits: torch.Tensor | None,
    clean_logits: torch.Tensor | None,
    y: torch.Tensor,
    weights: torch.Tensor | None,
    alpha1: float = 0.5,
    alpha2: float = 0.25,
    temperature: float = 1.0,
    reduction: str = "batchmean",
    weight_teacher_term: bool = True,
    detach_self_target: bool = False,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """IAD-II: L = (1 − a1 − a2)·CE(S(x'), y)
    + a1·τ²·[KL_red[α_i](p_T^τ(x') ‖ p_S^τ(x')) + KL_red[1 − α_i](p_S(x) ‖ p_S(x'))]
    + a2·τ²·KL_red(p_ST^τ(x') ‖ p_S^τ(x')).

    Both teachers see x' (``teacher_logits`` = T(x'), ``st_logits`` = ST(x') from a standard-trained
    teacher). The introspection term sits inside the a1·τ² bracket at τ = 1, as in the reference code.
    ``weights`` = None means α_i = 1 (before epoch ``begin``).
    """
    w_t = weights if (weights is not None and weight_teacher_term) else None

    def teacher_bracket() -> dict[str, torch.Tensor]:
        # KL_red[α_i](p_T ‖ p_S) + KL_red[1 − α_i](p_S(x) ‖ p_S(x')), weighted together by a1·τ².
        if teacher_logits is None:
            raise ValueError("iad2_loss: alpha1 > 0 needs the teacher logits on x'")
        target = teacher_logits.detach()
        kl = kl_divergence(target, adv_logits, temperature=temperature, reduction=reduction, weights=w_t)
        if weights is None:
            return {"kl_teacher": kl}
        return {
            "kl_teacher": kl,
            "kl_self": _introspection(clean_logits, adv_logits, weights, reduction, detach_self_target),
        }

    def kl_st() -> torch.Tensor:
        if st_logits is None:
            raise ValueError("iad2_loss: alpha2 > 0 needs the standard-trained teacher's logits on x'")
        return kl_divergence(st_logits.detach(), adv_logits, temperature=temperature, reduction=reduction)

    return weighted_sum(
        Term("ce_adv", 1.0 - alpha1 - alpha2, lambda: F.cross_entropy(adv_logits, y)),
        Term("kl_teacher", alpha1 * temperature**2, teacher_bracket),
        Term("kl_st", alpha2 * temperature**2, kl_st),
    )


# The default ball and PGD budget of the training attack (ARD's).
THREAT = ThreatModel("linf", 8 / 255, step_size=2 / 255, steps=10, random_start="uniform")


@register_method("iad")
@dataclass
class IAD(Method):
    """Introspective adversarial distillation, after ZFancy/IAD ``IAD-I.py`` / ``IAD-II.py``.

    Inner (both variants): ARD's attack, x' maximises CE_sum(S(x'), y) by PGD from a uniform start with
    the student in train mode (``attack_mode``). Weights α_i = p_T(x')[y]^β (τ = 1, detached) apply from
    0-based epoch ``begin`` on (``StepInfo.epoch >= begin``, the code's convention); before that α_i = 1,
    the introspection term vanishes and neither S(x) (unless the CE term needs it) nor T(x') is computed.

    - ``variant="I"``: the teacher's target is T(x) on the clean input; α = 1, τ = 1, β = 0.1, begin = 60.
    - ``variant="II"``: the adversarially trained teacher and a standard-trained (ST) teacher both see
      x'; a1 = 0.5, a2 = 0.25, begin = 40. The ST teacher is not part of the method interface: attach it
      with :meth:`attach_standard_teacher` (or set ``alpha2=0`` to run without it).

    ``weight_teacher_term``: True (default) multiplies the teacher KL by α_i, the paper's partial trust
    (IAD-II's code does too); False reproduces ``IAD-I.py``, whose teacher term is never weighted (the
    paper's exact IAD-I equation is unverified). ``kl_reduction``: batchmean, as the code.
    """

    needs_teacher = True
    flat_threat_keys = ATTACK_KEYS

    variant: str = "I"
    alpha: float = 1.0
    alpha1: float = 0.5
    alpha2: float = 0.25
    temperature: float = 1.0
    beta: float = 0.1
    begin: int | None = None
    weight_teacher_term: bool = True
    detach_self_target: bool = False
    kl_reduction: str = "batchmean"
    threat: ThreatModel = THREAT
    attack_mode: str = "train"
    st_teacher: nn.Module | None = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.variant not in VARIANTS:
            raise ValueError(f"variant must be one of {', '.join(VARIANTS)}, got {self.variant!r}")
        check_kd_options(self.alpha, self.temperature, self.kl_reduction)
        for name in ("alpha1", "alpha2"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)}")
        if self.alpha1 + self.alpha2 > 1.0:
            raise ValueError(f"alpha1 + alpha2 must be <= 1 (CE weight 1 - a1 - a2), got {self.alpha1 + self.alpha2}")
        if not self.beta >= 0:
            raise ValueError(f"beta must be >= 0, got {self.beta}")
        if self.begin is not None and (
            isinstance(self.begin, bool) or not isinstance(self.begin, int) or self.begin < 0
        ):
            raise ValueError(f"begin must be a non-negative integer epoch (0-based) or null, got {self.begin!r}")
        check_attack_mode(self.attack_mode)
        self.threat = method_threat(self)

    @property
    def begin_epoch(self) -> int:
        """First 0-based epoch with introspection weights: ``begin``, or the variant's default (60 / 40)."""
        return self.begin if self.begin is not None else DEFAULT_BEGIN[self.variant]

    def attach_standard_teacher(self, model: nn.Module) -> IAD:
        """Give IAD-II its standard-trained teacher; it is frozen (eval, no parameter gradients)."""
        model.eval()
        model.requires_grad_(False)
        self.st_teacher = model
        return self

    def _introspecting(self, epoch: int | None) -> bool:
        return self.beta > 0 and (epoch is None or epoch >= self.begin_epoch)

    def __call__(self, student: nn.Module, teacher: nn.Module | None, batch: Batch, info: StepInfo) -> Output:
        teacher = require_teacher(teacher, self.name)
        x, y = batch.x, batch.y
        introspect = self._introspecting(info.epoch)
        if self.variant == "I":
            return self._step_one(student, teacher, x, y, introspect)
        return self._step_two(student, teacher, x, y, introspect)

    def _attack(self, student: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return pgd(student, x, y, self.threat, "ce", mode=self.attack_mode)

    def _step_one(
        self, student: nn.Module, teacher: nn.Module, x: torch.Tensor, y: torch.Tensor, introspect: bool
    ) -> Output:
        logs: dict[str, torch.Tensor] = {}
        adv_logits = teacher_logits = weights = None
        if self.alpha > 0:
            x_adv = self._attack(student, x, y)
            adv_logits = student(x_adv)
            logs["adv_acc"] = (adv_logits.detach().argmax(1) == y).float().mean()
            with torch.no_grad():
                teacher_logits = teacher(x)  # IAD-I's target: the teacher on the clean input
                if introspect:
                    weights = introspection_weights(teacher(x_adv), y, self.beta)
                    logs["introspection_weight"] = weights.mean()
        # One clean student forward serves both the CE term and the introspection target.
        clean_logits = student(x) if (self.alpha < 1 or weights is not None) else None
        loss, terms = iad1_loss(
            adv_logits,
            teacher_logits,
            clean_logits,
            y,
            weights,
            self.alpha,
            self.temperature,
            self.kl_reduction,
            self.weight_teacher_term,
            self.detach_self_target,
        )
        logs.update({k: v.detach() for k, v in terms.items()})
        return Output(loss, logs, clean_logits)

    def _step_two(
        self, student: nn.Module, teacher: nn.Module, x: torch.Tensor, y: torch.Tensor, introspect: bool
    ) -> Output:
        if self.alpha2 > 0 and self.st_teacher is None:
            raise ConfigError(
                "method.args.alpha2: IAD-II distils from a standard-trained teacher as well; attach it with "
                "method.attach_standard_teacher(model), or set alpha2=0"
            )
        x_adv = self._attack(student, x, y)
        adv_logits = student(x_adv)
        teacher_logits = st_logits = weights = None
        with torch.no_grad():
            # T(x') is the teacher term's target and the source of the weights: one forward for both.
            if self.alpha1 > 0:
                teacher_logits = teacher(x_adv)
                if introspect:
                    weights = introspection_weights(teacher_logits, y, self.beta)
            if self.alpha2 > 0:
                st_logits = self.st_teacher(x_adv)
        clean_logits = student(x) if weights is not None else None
        loss, terms = iad2_loss(
            adv_logits,
            teacher_logits,
            st_logits,
            clean_logits,
            y,
            weights,
            self.alpha1,
            self.alpha2,
            self.temperature,
            self.kl_reduction,
            self.weight_teacher_term,
            self.detach_self_target,
        )
        logs = {k: v.detach() for k, v in terms.items()}
        logs["adv_acc"] = (adv_logits.detach().argmax(1) == y).float().mean()
        if weights is not None:
            logs["introspection_weight"] = weights.mean()
        return Output(loss, logs, clean_logits)

    def passes(self, epoch: int | None = None) -> dict[str, int]:
        """Per step at ``epoch`` (None: from ``begin`` on, the costlier regime).

        IAD-I: k attack forwards + S(x') + S(x) (α < 1 or introspecting); T(x), and T(x') when
        introspecting. IAD-II: k + S(x') + S(x) when introspecting; T(x') (a1 > 0) and ST(x') (a2 > 0,
        counted as ``st_teacher_fwd``).
        """
        k = self.threat.steps
        on = self._introspecting(epoch)
        if self.variant == "I":
            if self.alpha == 0:
                return {
                    "student_fwd": 1,
                    "student_input_grad": 0,
                    "student_bwd": 1,
                    "teacher_fwd": 0,
                    "attack_steps": 0,
                }
            clean = self.alpha < 1 or on
            return {
                "student_fwd": k + 1 + int(clean),
                "student_input_grad": k,
                "student_bwd": 1,
                "teacher_fwd": 1 + int(on),
                "attack_steps": k,
            }
        on = on and self.alpha1 > 0
        return {
            "student_fwd": k + 1 + int(on),
            "student_input_grad": k,
            "student_bwd": 1,
            "teacher_fwd": int(self.alpha1 > 0),
            "st_teacher_fwd": int(self.alpha2 > 0),
            "attack_steps": k,
        }
