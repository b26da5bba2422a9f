"""Faithful distillation: robustkd's reconstruction after Lamb et al. 2023 ("Faithful Knowledge Distillation",
arXiv:2306.04431), whose loss was not available; see METHODS.md, "Faithful distillation", section 4.

L = (1 − κ_t)·L_KD(x) + κ_t·L_F(x, y; ε_t)
L_KD = τ²·KL(p_T^τ(x) ‖ p_S^τ(x)) [+ ce_weight·CE(z_S(x), y)]
L_F  = mean_i max(0, ub_ε f_T^y(x_i) − lb_ε f_S^y(x_i) − ρ)                          (loss_form "hinge")
     = mean_i max(0, log(ub_ε f_T^y(x_i) − ρ) − log lb_ε f_S^y(x_i))                (loss_form "log_hinge")
     = mean_i −Σ_c p_T^c(x_i)·log softmax(ẑ_S(x_i, ε_t))_c                          (loss_form "soft_ce")

f = softmax(z), both bounds over Ball_inf(x, ε_t) ∩ [0, 1]^d for the label y, from margin bounds:
lb f_S^y = 1 / (1 + Σ_{j≠y} exp(u_j^S)) and ub f_T^y = 1 / (1 + Σ_{j≠y} exp(l_j^T)). The teacher is frozen and
its bound is a constant; the gradient flows through the student's bound only.

The hinge (METHODS.md's form, the default) is zero once lb f_S^y ≥ ub f_T^y − ρ, but its gradient is
proportional to lb f_S^y, so it fades where the student's bound is loose (a KD-trained student's IBP bound is
near 0 from small eps on, and the hinge then cannot pull it back). ``log_hinge`` is zero on the same points and
keeps IBP training's log-space gradient (−log lb f_S^y is CE(ẑ_S, y)).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from robustkd.attacks import ThreatModel
from robustkd.certify import interval_bounds, joint_gap_bound, margin_spec
from robustkd.errors import ConfigError
from robustkd.methods.base import Batch, Method, Output, StepInfo, register_method
from robustkd.methods.common import (
    CERTIFIED_KEYS,
    CERTIFIED_THREAT,
    bounded_forward,
    check_kl_reduction,
    check_schedule,
    interpolate,
    linf_ball,
    point_margins,
    ramp_fraction,
    require_teacher,
)
from robustkd.methods.losses import (
    certified_ce,
    confidence_lower,
    confidence_upper,
    faithful_hinge,
    faithful_log_hinge,
    kl_divergence,
)

STUDENT_BOUNDS = ("ibp", "crown-ibp")
TEACHER_BOUNDS = ("ibp", "crown-ibp", "best")
LOSS_FORMS = ("hinge", "log_hinge", "soft_ce")
GAP_BOUNDS = ("decoupled", "joint")


def teacher_margin_lower(teacher: nn.Module, x: Tensor, y: Tensor, eps: float, method: str, num_classes: int) -> Tensor:
    """Lower bounds (B, K−1) of the teacher's margins z_j − z_y over the ball, under no_grad (a constant).

    Only the lower side is computed (CROWN methods skip the upper backward pass); float32 under autocast.
    """
    with torch.no_grad(), torch.autocast(device_type=x.device.type, enabled=False):
        C = margin_spec(y, num_classes, dtype=x.dtype)
        lower, _ = interval_bounds(teacher, x, eps, method=method, C=C, bound_upper=False, check_range=False)
    return lower


def faithful_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    y: Tensor,
    kappa: float,
    *,
    temperature: float,
    ce_weight: float = 0.0,
    kl_reduction: str = "batchmean",
    faithful_term: Tensor | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """(1 − κ)·(τ²·KL_red(p_T^τ ‖ p_S^τ) + ce_weight·CE) + κ·L_F; returns (L, {"kd", "kl", "ce"?}).

    A term with weight 0 is left out, so κ = 0 is the KD loss exactly and κ = 1 is L_F exactly. τ² never
    depends on κ or ce_weight (as in ``kd``).
    """
    kl = kl_divergence(teacher_logits.detach(), student_logits, temperature=temperature, reduction=kl_reduction)
    kd = temperature**2 * kl
    terms = {"kl": kl}
    if ce_weight > 0:
        ce = F.cross_entropy(student_logits, y)
        kd = kd + ce_weight * ce
        terms["ce"] = ce
    terms["kd"] = kd
    if kappa <= 0 or faithful_term is None:
        return kd, terms
    if kappa >= 1:
        return faithful_term, terms
    return (1.0 - kappa) * kd + kappa * faithful_term, terms


@register_method("faithful")
@dataclass
class Faithful(Method):
    """Faithful distillation (robustkd's reconstruction): (1 − κ_t)·L_KD + κ_t·L_F, see the module docstring.

    Schedules follow the ramp share r_t of :func:`robustkd.methods.common.ramp_fraction`: clean KD through
    ``warmup_epochs``, then ε_t = r_t·threat.eps, κ_t = r_t·kappa_max and, for ``bound="crown-ibp"``,
    β_t = (1 − r_t)·beta_start + r_t·beta_end in the student's bound β·CROWN-IBP + (1 − β)·IBP.

    Options: ``threat``, a Linf ball (its eps is the final radius of the ramp; its step fields are unused);
    ``bound`` (student) ibp | crown-ibp; ``teacher_bound`` ibp | crown-ibp | best (the tightest sound
    bound affordable: the teacher's bound is a constant, so it is not mixed); ``loss_form`` hinge | log_hinge
    | soft_ce (the teacher's clean soft labels p_T(x) against the student's worst-case logits ẑ_S, Gowal et
    al.'s construction; with one-hot labels it is IBP's CE(ẑ, y); it needs no teacher bound); ``rho``: the
    gap tolerated by the hinges; ``temperature`` τ and ``kl_reduction`` of the KD term; ``ce_weight``;
    ``gap_bound`` decoupled | joint: with ``loss_form="hinge"``, ``joint`` bounds the gap by the smaller of
    ``ub f_T^y − lb f_S^y`` and the joint bound of ``robustkd.certify.joint_gap_bound`` (one backward pass
    through both networks from the shared box, as ``robustkd certify --joint``), so the student is pushed on the
    bound a joint certificate reads; students without BatchNorm only.

    Readings (METHODS.md leaves them open; robustkd's defaults): τ = 1, because L_F compares confidences at
    temperature 1; rho = 0; the class is the label y; L_F averages over the whole batch; the teacher's bound
    is recomputed every step at ε_t (nothing cached: ε_t moves and x may be augmented); the student's bound
    pass uses the clean forward's model mode (see ``ibp``). At ε_t = 0 the bounds are the logits' own values.
    """

    needs_teacher = True
    flat_threat_keys = CERTIFIED_KEYS

    threat: ThreatModel = CERTIFIED_THREAT
    warmup_epochs: float = 1.0
    ramp_epochs: float = 10.0
    kappa_max: float = 0.5
    beta_start: float = 1.0
    beta_end: float = 0.0
    bound: str = "ibp"
    teacher_bound: str = "ibp"
    loss_form: str = "hinge"
    rho: float = 0.0
    temperature: float = 1.0
    ce_weight: float = 0.0
    kl_reduction: str = "batchmean"
    gap_bound: str = "decoupled"
    _checked: bool = field(default=False, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        self.threat = linf_ball(self)
        check_schedule(
            self.warmup_epochs,
            self.ramp_epochs,
            kappa_max=self.kappa_max,
            beta_start=self.beta_start,
            beta_end=self.beta_end,
        )
        for name, value, allowed in (
            ("bound", self.bound, STUDENT_BOUNDS),
            ("teacher_bound", self.teacher_bound, TEACHER_BOUNDS),
            ("loss_form", self.loss_form, LOSS_FORMS),
            ("gap_bound", self.gap_bound, GAP_BOUNDS),
        ):
            if value not in allowed:
                raise ValueError(f"{name} must be one of {', '.join(allowed)}, got {value!r}")
        if not 0.0 <= self.rho < 1.0:
            raise ValueError(f"rho must be in [0, 1), got {self.rho}")
        if not self.temperature > 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        if not self.ce_weight >= 0:
            raise ValueError(f"ce_weight must be >= 0, got {self.ce_weight}")
        check_kl_reduction(self.kl_reduction)
        if self.gap_bound == "joint" and self.loss_form != "hinge":
            raise ValueError(f"gap_bound joint bounds the gap itself: it needs loss_form hinge, got {self.loss_form!r}")

    def schedule(self, info: StepInfo) -> dict[str, float]:
        """ε_t, κ_t and β_t (0 for an IBP student bound) at this step."""
        r = ramp_fraction(info, self.warmup_epochs, self.ramp_epochs)
        beta = interpolate(self.beta_start, self.beta_end, r) if self.bound == "crown-ibp" else 0.0
        return {"eps": r * self.threat.eps, "kappa": r * self.kappa_max, "beta": beta}

    def __call__(self, student: nn.Module, teacher: nn.Module | None, batch: Batch, info: StepInfo) -> Output:
        teacher = require_teacher(teacher, self.name)
        x, y = batch.x, batch.y
        s = self.schedule(info)
        with torch.no_grad():
            teacher_logits = teacher(x)
        logits, bounds = bounded_forward(student, x, y, s["eps"], s["beta"], check=not self._checked)
        if not self._checked:
            with torch.no_grad():
                interval_bounds(teacher, x[:1], 0.0)  # the teacher must be boundable too: fail now, not later
            self._checked = True
        student_lower = confidence_lower(bounds.upper)
        if self.loss_form == "soft_ce":
            soft_labels = F.softmax(teacher_logits, dim=1)
            term = certified_ce(bounds.upper, y, soft_labels)
            teacher_upper = None
        else:
            if s["eps"] > 0:
                teacher_lower = teacher_margin_lower(
                    teacher, x, y, s["eps"], self.teacher_bound, teacher_logits.shape[1]
                )
            else:
                teacher_lower = point_margins(teacher_logits, y)
            teacher_upper = confidence_upper(teacher_lower)
            gap = teacher_upper - student_lower
            if self.gap_bound == "joint" and s["eps"] > 0:
                gap = self._joint_gap(student, teacher, x, y, s["eps"], gap)
                term = F.relu(gap - self.rho).mean()
            elif self.loss_form == "hinge":
                term = faithful_hinge(teacher_upper, student_lower, self.rho)
            else:
                term = faithful_log_hinge(teacher_upper, bounds.upper, self.rho)
        loss, terms = faithful_loss(
            logits,
            teacher_logits,
            y,
            s["kappa"],
            temperature=self.temperature,
            ce_weight=self.ce_weight,
            kl_reduction=self.kl_reduction,
            faithful_term=term,
        )
        logs: dict[str, float | Tensor] = {
            "eps": s["eps"],
            "kappa": s["kappa"],
            **{k: v.detach() for k, v in terms.items()},
            "faithful": term.detach(),
            "cert_acc": bounds.certified(),
            "student_conf_lb": student_lower.detach().mean(),
        }
        if teacher_upper is not None:
            # Mean certified bound on the one-sided gap max_{x'} f_T^y(x') − f_S^y(x') at ε_t (the bound trained on).
            logs["gap_bound"] = gap.detach().mean()
        if self.bound == "crown-ibp":
            logs["beta"] = s["beta"]
        return Output(loss, logs, logits)

    def _joint_gap(self, student: nn.Module, teacher: nn.Module, x: Tensor, y: Tensor, eps: float, decoupled: Tensor):
        """The smaller of the decoupled and the joint gap bound (both sound), with gradients into the student."""
        if any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in student.modules()):
            raise ConfigError(
                "faithful: gap_bound joint supports students without BatchNorm (its bound pass would need the "
                "batch statistics); use gap_bound decoupled"
            )
        with torch.autocast(device_type=x.device.type, enabled=False):
            joint = joint_gap_bound(teacher, student, x, y, eps)
        return torch.minimum(decoupled, joint)

    def passes(self) -> dict[str, int]:
        """Per step once ε_t > 0 (the warm-up costs a KD step: one teacher and one student forward). The
        teacher's bound pass runs under no_grad; ``soft_ce`` needs none."""
        passes = {"student_fwd": 1, "student_ibp": 1, "student_bwd": 1, "teacher_fwd": 1}
        if self.bound == "crown-ibp":
            passes["student_crown_bwd"] = 1
        if self.loss_form != "soft_ce":
            passes["teacher_ibp"] = 1
            if self.teacher_bound != "ibp":
                passes["teacher_crown_bwd"] = 1
        if self.gap_bound == "joint":  # both networks' IBP passes again, and one backward pass through both
            for name in ("student_ibp", "teacher_ibp", "student_crown_bwd", "teacher_crown_bwd"):
                passes[name] = passes.get(name, 0) + 1
        return passes
