"""What the method files share: the threat-model option, attack modes, the teacher, KD options, and the pieces of
certified training (ramp schedules, the bound pass in the clean forward's model mode, the κ-weighted bound loss).

Method files import from here, from ``base`` and from ``losses``; never from a sibling method file.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from robustkd.attacks import ThreatModel
from robustkd.certify import get_verifier, input_box, interval_bounds, margin_spec
from robustkd.errors import ConfigError
from robustkd.methods.base import Batch, Method, Output, StepInfo
from robustkd.methods.losses import check_reduction, ibp_loss

ATTACK_MODES = ("eval", "train")

# The flat option names methods took before ``threat``, each with the ThreatModel field it now sets.
ATTACK_KEYS = {"eps": "eps", "step_size": "step_size", "steps": "steps", "random_start": "random_start", "norm": "norm"}
CERTIFIED_KEYS = {"eps_train": "eps"}


def check_attack_mode(mode: str) -> str:
    """The student's mode during an inner maximisation: 'eval' (BN running stats) or 'train' (batch stats)."""
    if mode not in ATTACK_MODES:
        raise ValueError(f"attack_mode must be one of {', '.join(ATTACK_MODES)}, got {mode!r}")
    return mode


def default_threat(cls: type) -> ThreatModel:
    """The default of a method class's ``threat`` field."""
    return next(f.default for f in dataclasses.fields(cls) if f.name == "threat")


def method_threat(method: Any) -> ThreatModel:
    """``method.threat`` parsed against the method's own defaults (a preset name, a mapping or a ThreatModel).

    Fields a mapping leaves out keep the method's default, not ThreatModel's. A training attack runs once, so
    restarts above 1 are refused.
    """
    threat = ThreatModel.parse(method.threat, default=default_threat(type(method)), field="method.args.threat")
    if threat.restarts != 1:
        raise ConfigError(f"method.args.threat: restarts: a training attack runs once, got {threat.restarts}")
    return threat


def linf_ball(method: Any) -> ThreatModel:
    """The threat of a certified method: a Linf ball (the bounds are interval bounds); its step fields are unused."""
    threat = method_threat(method)
    if threat.norm != "linf":
        raise ConfigError(f"method.args.threat: norm: certified training bounds Linf balls only, got {threat.norm!r}")
    return threat


def check_kl_reduction(reduction: str) -> str:
    """A named KL reduction that gives a scalar loss: batchmean, sum or mean_over_classes (not none)."""
    check_reduction(reduction)
    if reduction == "none":
        raise ValueError("kl_reduction 'none' is per-example; use batchmean, sum or mean_over_classes")
    return reduction


def check_kd_options(alpha: float, temperature: float, kl_reduction: str) -> None:
    """Refuse an α outside [0, 1], a non-positive τ and an unknown or per-example reduction."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    check_kl_reduction(kl_reduction)


def require_teacher(teacher: nn.Module | None, method: str) -> nn.Module:
    """The teacher, refused when missing or not in eval mode (train-mode BatchNorm would drift its statistics)."""
    if teacher is None:
        raise ConfigError(f"teacher: method {method!r} distils from a teacher; pass one (--teacher PATH)")
    if any(m.training for m in teacher.modules()):
        raise ConfigError(
            f"teacher: method {method!r} needs a frozen teacher in eval mode; call teacher.eval() and "
            "teacher.requires_grad_(False) (the training engine does this)"
        )
    return teacher


# ----------------------------------------------------------------------------------------------------------------
# Certified training: ramp schedules, the bound pass in the clean forward's model mode, and the
# κ-weighted bound loss that ``ibp`` and ``crown_ibp`` share.
#
# Schedules


def ramp_fraction(info: StepInfo, warmup_epochs: float, ramp_epochs: float) -> float:
    """Share r of the ramp done at ``info.step``: r = clamp((t/n − E_w) / E_r, 0, 1).

    t is the 0-based global step and n the steps per epoch, so epochs may be fractional and the ramp moves
    every step (as the CROWN-IBP code does), not once per epoch. r = 0 through the clean warm-up of E_w
    epochs; r = 1 from step n·(E_w + E_r) on. ``ramp_epochs = 0`` jumps straight to r = 1 after the warm-up.
    """
    epoch = info.step / max(1, info.steps_per_epoch)
    if epoch < warmup_epochs:
        return 0.0
    if ramp_epochs <= 0:
        return 1.0
    return min(1.0, (epoch - warmup_epochs) / ramp_epochs)


def interpolate(start: float, end: float, r: float) -> float:
    """(1 − r)·start + r·end: exactly ``start`` at r = 0 and exactly ``end`` at r = 1."""
    return (1.0 - r) * start + r * end


def check_schedule(warmup_epochs: float, ramp_epochs: float, **weights: float) -> None:
    """Refuse a negative epoch count, and weights (κ, β) outside [0, 1] (the ThreatModel refuses a negative eps)."""
    if not warmup_epochs >= 0:
        raise ValueError(f"warmup_epochs must be >= 0, got {warmup_epochs}")
    if not ramp_epochs >= 0:
        raise ValueError(f"ramp_epochs must be >= 0, got {ramp_epochs}")
    for name, value in weights.items():
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"{name} must be in [0, 1], got {value}")


# ----------------------------------------------------------------------------------------------------------------
# The bound pass in the clean forward's model mode.
#
# robustkd.certify refuses train-mode BatchNorm (its bounds would not hold for the deployed network). In training,
# the bound pass must nevertheless see the network the clean forward used: BatchNorm with the batch statistics of
# the clean batch (as the CROWN-IBP code does). So the clean forward records each such layer's batch mean and
# (biased) variance, and during the bound pass the layer acts as an eval-mode affine map with exactly those
# statistics. They stay attached to the graph, so gradients flow through them as through train-mode BatchNorm.
# Nothing is updated by the bound pass: running statistics move once per step, in the clean forward.

BatchStats = dict[nn.Module, tuple[Tensor, Tensor]]


def _batch_stat_layers(model: nn.Module) -> list[nn.Module]:
    """BatchNorm layers that normalise with batch statistics (training mode, or no running statistics)."""
    return [
        m
        for m in model.modules()
        if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)) and (m.training or m.running_mean is None)
    ]


@contextmanager
def recording_batch_stats(model: nn.Module) -> Iterator[BatchStats]:
    """While active, each batch-statistics BatchNorm layer of ``model`` records the mean and biased variance of
    its input at every forward (the statistics F.batch_norm normalises with in training)."""
    stats: BatchStats = {}

    def hook(module: nn.Module, args: tuple[Tensor, ...]) -> None:
        (inp,) = args
        dims = [0, *range(2, inp.dim())]
        # At least float32: bf16 statistics under autocast would make the bound pass imprecise.
        dtype = torch.promote_types(inp.dtype, torch.float32)
        stats[module] = (inp.mean(dims).to(dtype), inp.var(dims, correction=0).to(dtype))

    handles = [m.register_forward_pre_hook(hook) for m in _batch_stat_layers(model)]
    try:
        yield stats
    finally:
        for handle in handles:
            handle.remove()


@contextmanager
def using_batch_stats(stats: BatchStats) -> Iterator[None]:
    """Recorded BatchNorm layers act as eval-mode layers whose running statistics are the recorded batch ones."""
    saved = []
    try:
        for module, (mean, var) in stats.items():
            saved.append((module, module.training, module.running_mean, module.running_var))
            module.training = False
            module.running_mean, module.running_var = mean, var
        yield
    finally:
        for module, training, mean, var in reversed(saved):
            module.running_mean, module.running_var = mean, var
            module.training = training


@dataclass
class MarginBounds:
    """Upper bounds (B, K−1) of the margins z_j − z_y (j ≠ y, increasing j) over the ball."""

    upper: Tensor  # what the loss uses: β·CROWN-IBP + (1 − β)·IBP (IBP alone when β = 0)
    tightest: Tensor  # entrywise min of the bounds computed; sound, so it is what "certified" is read from

    def certified(self) -> Tensor:
        """Share of the batch whose every margin is certified negative (prediction y on the whole ball)."""
        return (self.tightest < 0).all(dim=1).float().mean()


def point_margins(logits: Tensor, y: Tensor) -> Tensor:
    """Margins z_j − z_y of the logits themselves: the exact bounds over a ball of radius 0."""
    C = margin_spec(y, logits.shape[1], dtype=logits.dtype)
    return torch.einsum("bsk,bk->bs", C, logits)


def margin_upper_bounds(
    model: nn.Module, x: Tensor, y: Tensor, eps: float, beta: float, num_classes: int
) -> MarginBounds:
    """u = β·u_CROWN-IBP + (1 − β)·u_IBP over Ball_inf(x, eps) ∩ [0, 1]^d, with gradients.

    Both bounds share one IBP pass for the hidden layers (CROWN-IBP keeps IBP bounds there and runs one
    backward pass from the margin spec); the CROWN pass runs only when β > 0 and only for the upper side. A
    convex combination of sound upper bounds is sound. Computed in float32 even under autocast: rounding in
    the bound pass would break the bounds.
    """
    crown_ibp, ibp = get_verifier("crown-ibp"), get_verifier("ibp")
    if crown_ibp.intermediate != ibp.intermediate:  # pragma: no cover - guards the shared pass below
        raise AssertionError("CROWN-IBP is expected to keep the IBP bounds of the hidden layers")
    with torch.autocast(device_type=x.device.type, enabled=False):
        C = margin_spec(y, num_classes, dtype=x.dtype)
        state = crown_ibp.state(model, *input_box(x, eps, check_range=False))  # batches are in [0, 1] by construction
        _, u_ibp = ibp.spec_bounds(state, C)
        if beta <= 0:
            return MarginBounds(u_ibp, u_ibp)
        _, u_crown = crown_ibp.spec_bounds(state, C, bound_lower=False)
    if beta >= 1:
        return MarginBounds(u_crown, torch.minimum(u_crown, u_ibp))
    return MarginBounds(beta * u_crown + (1.0 - beta) * u_ibp, torch.minimum(u_crown, u_ibp))


def check_boundable(model: nn.Module, x: Tensor) -> None:
    """Fail on the first step, not after the warm-up, when certify cannot bound ``model`` (one example, eps 0)."""
    with torch.no_grad():
        interval_bounds(model, x[:1], 0.0)


def bounded_forward(
    model: nn.Module, x: Tensor, y: Tensor, eps: float, beta: float = 0.0, check: bool = False
) -> tuple[Tensor, MarginBounds]:
    """The clean logits z(x) and margin upper bounds over Ball(x, eps) in the same model mode.

    At eps = 0 the ball is the point and the bounds are the logits' own margins (no bound pass). ``check``
    also verifies, cheaply, that the model can be bounded at all.
    """
    with recording_batch_stats(model) as stats:
        logits = model(x)
    with using_batch_stats(stats):
        if check:
            check_boundable(model, x)
        if eps <= 0:
            margins = point_margins(logits, y)
            return logits, MarginBounds(margins, margins)
        return logits, margin_upper_bounds(model, x, y, eps, beta, logits.shape[1])


# ----------------------------------------------------------------------------------------------------------------
# The κ-weighted bound loss shared by ``ibp`` and ``crown_ibp`` (registered in their own files).

# The default ball of certified training: Linf radius 0.1 (Fashion-MNIST's linf-0.1). Only norm and eps are used.
CERTIFIED_THREAT = ThreatModel("linf", 0.1)


@dataclass
class BoundTraining(Method):
    """L = κ_t·CE(z(x), y) + (1 − κ_t)·CE(ẑ(x, ε_t), y), ẑ from margin upper bounds over Ball_inf(x, ε_t).

    ε_t = r_t·threat.eps and κ_t = (1 − r_t)·kappa_start + r_t·kappa_end, with r_t the ramp share
    (:func:`ramp_fraction`). ``threat``'s step fields are unused (no attack runs). Subclasses choose the bound
    through :meth:`schedule`'s β_t (0: pure IBP).
    """

    mixes_crown: ClassVar[bool] = False  # whether the bound is the β-mix with CROWN-IBP (logs β)
    flat_threat_keys: ClassVar[dict[str, str]] = CERTIFIED_KEYS

    threat: ThreatModel = CERTIFIED_THREAT
    warmup_epochs: float = 1.0
    ramp_epochs: float = 10.0
    kappa_start: float = 1.0
    kappa_end: float = 0.5
    _checked: bool = field(default=False, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        self.threat = linf_ball(self)
        check_schedule(self.warmup_epochs, self.ramp_epochs, **self.weights())

    def weights(self) -> dict[str, float]:
        """End points of the weight schedules (each must lie in [0, 1])."""
        return {"kappa_start": self.kappa_start, "kappa_end": self.kappa_end}

    def schedule(self, info: StepInfo) -> dict[str, float]:
        """ε_t, κ_t and β_t (0: pure IBP) at this step."""
        r = ramp_fraction(info, self.warmup_epochs, self.ramp_epochs)
        return {"eps": r * self.threat.eps, "kappa": interpolate(self.kappa_start, self.kappa_end, r), "beta": 0.0}

    def __call__(self, student: nn.Module, teacher: nn.Module | None, batch: Batch, info: StepInfo) -> Output:
        s = self.schedule(info)
        logits, bounds = bounded_forward(student, batch.x, batch.y, s["eps"], s["beta"], check=not self._checked)
        self._checked = True
        if s["eps"] <= 0:
            # The ball is the point: CE(ẑ, y) = CE(z, y), so the loss is the clean CE whatever κ is.
            loss = ce = robust = F.cross_entropy(logits, batch.y)
        else:
            loss, ce, robust = ibp_loss(logits, bounds.upper, batch.y, s["kappa"])
        logs: dict[str, float | Tensor] = {
            "eps": s["eps"],
            "kappa": s["kappa"],
            "ce": ce.detach(),
            "bound_ce": robust.detach(),
            "cert_acc": bounds.certified(),
        }
        if self.mixes_crown:
            logs["beta"] = s["beta"]
        return Output(loss, logs, logits)
