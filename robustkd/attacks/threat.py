"""Threat models: the perturbation set an attack searches and the budget it may spend."""

from __future__ import annotations

import dataclasses
import math
import numbers
import re
from collections.abc import Mapping
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

from robustkd.errors import ConfigError, RegistryError
from robustkd.registry import Registry

NORMS = ("linf", "l2")
RANDOM_STARTS = ("uniform", "normal", "none")

# The scale of the "normal" start, as in TRADES, RSLAD and AdaAD: x + 0.001 * N(0, I).
NORMAL_START_STD = 0.001


def _real(field: str, value: Any) -> float:
    # bool is an int subclass; eps=True is almost certainly a mistake, not 1.0.
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ConfigError(f"{field}: expected a number, got {value!r}")
    try:
        out = float(value)
    except (OverflowError, ValueError, TypeError) as err:
        raise ConfigError(f"{field}: cannot use {value!r} as a float ({err})") from None
    if not math.isfinite(out):
        raise ConfigError(f"{field}: must be finite, got {value!r}")
    return out


# Upper bounds on the attack budget. The strongest published evaluations use a few hundred steps (APGD: 100,
# PGD-1000 in sanity checks) and tens of restarts; a budget beyond these is a typo that would run for days
# (steps x restarts forward-backward passes per batch), so it is refused rather than started.
MAX_STEPS = 10_000
MAX_RESTARTS = 1_000


def _integer(field: str, value: Any, minimum: int, maximum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ConfigError(f"{field}: expected an integer, got {value!r}")
    out = int(value)
    if out < minimum:
        raise ConfigError(f"{field}: must be >= {minimum}, got {out}")
    if out > maximum:
        raise ConfigError(f"{field}: must be <= {maximum} (an attack budget beyond that would not finish), got {out}")
    return out


def _choice(field: str, value: Any, choices: tuple[str, ...]) -> str:
    if not isinstance(value, str) or value.lower() not in choices:
        raise ConfigError(f"{field}: expected one of {', '.join(choices)}, got {value!r}")
    return value.lower()


@dataclass(frozen=True)
class ThreatModel:
    """An Lp ball around each input, intersected with the image box [0, 1], and a PGD budget.

    ``step_size=None`` means ``2.5 * eps / steps`` (Madry et al.'s rule: enough to cross the ball and
    come back); :attr:`alpha` is the step size actually used. ``random_start`` is ``"uniform"``
    (U(-eps, eps) per coordinate for Linf, uniform in the ball for L2), ``"normal"`` (0.001 * N(0, I),
    the TRADES/RSLAD/AdaAD start) or ``"none"``. ``eps == 0`` is allowed and means "no attack".
    Norm names are case-insensitive (``"Linf"`` and ``"L2"`` as AutoAttack spells them work).
    """

    norm: str = "linf"
    eps: float = 0.1
    step_size: float | None = None
    steps: int = 10
    restarts: int = 1
    random_start: str = "uniform"

    def __post_init__(self) -> None:
        norm = _choice("norm", self.norm, NORMS)
        eps = _real("eps", self.eps)
        if eps < 0:
            raise ConfigError(f"eps: must be >= 0, got {eps}")
        # Linf distances in [0, 1]^d never exceed 1. An L2 ball is measured in sqrt(d) units, so radii
        # above 1 are common (MNIST L2 eps = 2) and only need to be finite.
        if norm == "linf" and eps > 1:
            raise ConfigError(f"eps: inputs live in [0, 1], so a Linf eps above 1 is meaningless, got {eps}")
        steps = _integer("steps", self.steps, 1, MAX_STEPS)
        restarts = _integer("restarts", self.restarts, 1, MAX_RESTARTS)
        step_size = None
        if self.step_size is not None:
            step_size = _real("step_size", self.step_size)
            if step_size <= 0:
                raise ConfigError(f"step_size: must be > 0, got {step_size}")
            if norm == "linf" and eps > 0 and step_size > eps:
                raise ConfigError(
                    f"step_size: a Linf step of {step_size} is larger than eps={eps}; every step would "
                    "jump to a corner of the ball (use step_size <= eps, e.g. 2.5*eps/steps)"
                )
        random_start = _choice("random_start", self.random_start, RANDOM_STARTS)
        # Store canonical types so equal threat models compare and hash equal.
        for name, value in (
            ("norm", norm),
            ("eps", eps),
            ("step_size", step_size),
            ("steps", steps),
            ("restarts", restarts),
            ("random_start", random_start),
        ):
            object.__setattr__(self, name, value)

    @property
    def alpha(self) -> float:
        """The step size used: ``step_size``, or ``2.5 * eps / steps`` when it is None."""
        return self.step_size if self.step_size is not None else 2.5 * self.eps / self.steps

    @property
    def name(self) -> str:
        """The protocol name of this ball, e.g. ``"linf-0.1"`` or ``"linf-8/255"``; it parses back to the same eps.

        It names the norm and the radius only: ``ThreatModel.parse(t.name)`` has ``t``'s norm and eps (exactly),
        and the preset's budget or the default step rule, not necessarily ``t``'s steps and step size.
        """
        return f"{self.norm}-{_eps_text(self.eps)}"

    def replace(self, **changes: Any) -> ThreatModel:
        """A copy with some fields changed, validated again."""
        try:
            return dataclasses.replace(self, **changes)
        except TypeError as err:  # an unknown field name
            raise ConfigError(f"threat model: {err} (fields: {', '.join(_FIELDS)})") from None

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> ThreatModel:
        """A named protocol (see :data:`PRESETS`), or a parsed ``linf-<eps>`` / ``l2-<eps>`` name.

        ``linf-4/255`` style fractions are accepted; parsed names get the default step rule.
        """
        if isinstance(name, str) and name in PRESETS:
            base = PRESETS.get(name)
        else:
            base = _parse_preset(name)
        return base.replace(**overrides) if overrides else base

    @classmethod
    def parse(cls, value: Any, default: ThreatModel | None = None, field: str = "threat") -> ThreatModel:
        """The one way a threat model enters robustkd, at the edge (config file, command line, API call).

        ``value`` is a ThreatModel, a preset or parsed name (``"linf-0.1"``, ``"linf-8/255"``), or a mapping
        of fields; fields a mapping leaves out come from ``default`` (the caller's defaults), else from the
        dataclass. Every failure is a ConfigError that names ``field``.
        """
        if isinstance(value, ThreatModel):
            return value
        try:
            if isinstance(value, str):
                return cls.preset(value)
            if isinstance(value, Mapping):
                unknown = [key for key in value if key not in _FIELDS]
                if unknown:
                    raise ConfigError(f"unknown field {unknown[0]!r} (fields: {', '.join(_FIELDS)})")
                return (default or cls()).replace(**value)
        except (ConfigError, RegistryError) as err:
            raise ConfigError(f"{field}: {err}") from None
        raise ConfigError(
            f"{field}: expected a protocol name such as 'linf-0.1' or a mapping of {', '.join(_FIELDS)}, "
            f"got {type(value).__name__}"
        )

    def to_dict(self) -> dict[str, Any]:
        """JSON-able settings, with the step size actually used."""
        out = dataclasses.asdict(self)
        out["alpha"] = self.alpha
        return out


_FIELDS = tuple(f.name for f in dataclasses.fields(ThreatModel))


def _eps_text(eps: float) -> str:
    """eps as a protocol name writes it: a short decimal, else k/255 when that is exact, else every digit."""
    eps += 0.0  # -0.0 (allowed: it is not < 0) becomes 0.0, so the name never reads "linf--0"
    k = round(eps * 255)
    if float(f"{eps:.6g}") != eps and k / 255 == eps:
        return f"{k}/255"
    # Positional digits of the shortest repr (the name pattern has no exponent): float(text) == eps.
    text = format(Decimal(repr(eps)), "f")
    return text.removesuffix(".0")


PRESETS: Registry[ThreatModel] = Registry("threat-model preset")
# Step sizes follow METHODS.md section 9: 0.01 for the MNIST-like protocols (Madry, TRADES), 2/255 for
# CIFAR at 8/255. `steps` is the training-time budget; evaluation recipes (pgd20, cw100, ...) set theirs.
PRESETS.add("linf-0.1", ThreatModel("linf", 0.1, step_size=0.01, steps=40))  # Fashion-MNIST
PRESETS.add("linf-0.3", ThreatModel("linf", 0.3, step_size=0.01, steps=40))  # MNIST
PRESETS.add("linf-8/255", ThreatModel("linf", 8 / 255, step_size=2 / 255, steps=10))  # CIFAR
PRESETS.add("linf-2/255", ThreatModel("linf", 2 / 255, step_size=0.5 / 255, steps=10))  # CIFAR, certified
PRESETS.add("l2-0.5", ThreatModel("l2", 0.5, step_size=None, steps=10))  # CIFAR L2

_PRESET_RE = re.compile(r"^(linf|l2)-(\d+(?:\.\d*)?|\.\d+)(?:/(\d+(?:\.\d*)?))?$", re.IGNORECASE)


def _parse_preset(name: Any) -> ThreatModel:
    match = _PRESET_RE.match(name) if isinstance(name, str) else None
    if match is None:
        raise RegistryError(
            PRESETS.unknown_message(str(name)) + "; or write 'linf-<eps>' / 'l2-<eps>', e.g. 'linf-4/255'"
        )
    norm, num, den = match.groups()
    denominator = float(den) if den else 1.0
    if denominator == 0:
        raise ConfigError(f"protocol {name!r}: division by zero in eps")
    return ThreatModel(norm=norm.lower(), eps=float(num) / denominator)
