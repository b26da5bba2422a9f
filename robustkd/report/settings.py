"""What a report measures (``ReportSettings``) and what it asks of a student (``Thresholds``)."""

from __future__ import annotations

import dataclasses
import difflib
import math
import numbers
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from robustkd.errors import ConfigError

DEFAULT_ATTACKS = ("clean", "pgd20", "cw20")
DEFAULT_RHO = (0.05, 0.1, 0.2)


def _number(field: str, value: Any, *, positive: bool = False, at_most_one: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise ConfigError(f"{field}: expected a finite number, got {value!r}")
    if value < 0 or (positive and value == 0):
        raise ConfigError(f"{field}: must be {'> 0' if positive else '>= 0'}, got {value!r}")
    if at_most_one and value > 1:
        raise ConfigError(f"{field}: a rate lies in [0, 1], got {value!r}")
    return float(value)


def _integer(field: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"{field}: expected an integer >= {minimum}, got {value!r}")
    return value


def _numbers(field: str, values: Any, *, positive: bool) -> tuple[float, ...]:
    if isinstance(values, str) or not isinstance(values, Sequence) or len(values) == 0:
        raise ConfigError(f"{field}: expected a non-empty list of numbers, got {values!r}")
    return tuple(_number(field, v, positive=positive) for v in values)


@dataclass(frozen=True)
class ReportSettings:
    """The evaluations behind a report; every cached result is keyed by these values.

    ``eps`` is the stated Linf radius of the table and the verdict. ``eps_sweep`` are the radii of the
    plots (default eps/4, eps/2, eps; ``eps`` is always added). ``attacks`` are ``robustkd evaluate``
    recipes, run at every radius of the sweep. ``n_examples`` is the size of the test subset (the first N
    test points; None: the whole test set). ``faithfulness_steps``/``faithfulness_restarts`` are those of
    the empirical disagreement and gap searches, ``certify_method`` the verifier of ``robustkd certify``,
    ``rho`` the gap thresholds both record. ``checkpoint`` is which checkpoint of a run dir is the student.
    """

    eps: float = 0.1
    eps_sweep: tuple[float, ...] | None = None
    attacks: tuple[str, ...] = DEFAULT_ATTACKS
    n_examples: int | None = 1000
    seed: int = 0
    certify_method: str = "crown-ibp"
    faithfulness_steps: int = 20
    faithfulness_restarts: int = 1
    rho: tuple[float, ...] = DEFAULT_RHO
    batch_size: int = 256
    checkpoint: str = "best"

    def __post_init__(self) -> None:
        from robustkd.attacks import get_attack
        from robustkd.certify import get_verifier
        from robustkd.errors import RegistryError

        eps = _number("eps", self.eps, positive=True)
        sweep = (
            _numbers("eps_sweep", self.eps_sweep, positive=True) if self.eps_sweep is not None else (eps / 4, eps / 2)
        )
        if isinstance(self.attacks, str) or not isinstance(self.attacks, Sequence) or not self.attacks:
            raise ConfigError(f"attacks: expected a non-empty list of attack names, got {self.attacks!r}")
        for name in self.attacks:
            try:
                get_attack(name)
            except (RegistryError, ConfigError) as err:
                raise ConfigError(f"attacks: {err}") from None
        if len(set(self.attacks)) != len(self.attacks):
            raise ConfigError(f"attacks: an attack is listed more than once in {list(self.attacks)}")
        try:
            get_verifier(self.certify_method)
        except RegistryError as err:
            raise ConfigError(f"certify_method: {err}") from None
        if self.n_examples is not None:
            _integer("n_examples", self.n_examples, 1)
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ConfigError(f"seed: expected an integer, got {self.seed!r}")
        _integer("faithfulness_steps", self.faithfulness_steps, 1)
        _integer("faithfulness_restarts", self.faithfulness_restarts, 1)
        _integer("batch_size", self.batch_size, 1)
        if max(sweep) > 1:
            raise ConfigError(f"eps_sweep: images live in [0, 1], so radii lie in (0, 1]; got {list(sweep)}")
        rho = _numbers("rho", self.rho, positive=False)
        if self.checkpoint not in ("best", "last"):
            raise ConfigError(f"checkpoint: choose 'best' or 'last', got {self.checkpoint!r}")
        object.__setattr__(self, "eps", eps)
        object.__setattr__(self, "eps_sweep", tuple(sorted({*sweep, eps})))
        object.__setattr__(self, "attacks", tuple(self.attacks))
        object.__setattr__(self, "rho", rho)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class Thresholds:
    """What a student must meet to replace its teacher at the stated eps; None switches a check off.

    Drops are teacher minus student (accuracy points as fractions). ``max_gap`` bounds the 90th percentile
    of the empirical confidence gap G_under on the teacher-correct points, ``max_certified_gap`` the 90th
    percentile of its certified upper bound; ``min_certified_agreement`` is a share of the teacher-correct
    points. The certified checks are off by default: certificates at useful radii need certified training.
    """

    max_clean_drop: float | None = 0.02
    max_robust_drop: float | None = 0.03
    max_disagreement: float | None = 0.10
    max_gap: float | None = 0.10
    min_certified_agreement: float | None = None
    max_certified_gap: float | None = None

    def __post_init__(self) -> None:
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if value is not None:
                object.__setattr__(self, field.name, _number(field.name, value, at_most_one=True))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def split_options(options: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Sort keyword options into ReportSettings and Thresholds fields; unknown names get suggestions."""
    setting_names = {f.name for f in dataclasses.fields(ReportSettings)}
    threshold_names = {f.name for f in dataclasses.fields(Thresholds)}
    settings, thresholds = {}, {}
    for key, value in options.items():
        if key in setting_names:
            settings[key] = value
        elif key in threshold_names:
            thresholds[key] = value
        else:
            close = difflib.get_close_matches(key, [*setting_names, *threshold_names], n=3)
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            known = ", ".join(sorted(setting_names | threshold_names))
            raise ConfigError(f"{key}: not a report option{hint} (options: {known})")
    return settings, thresholds
