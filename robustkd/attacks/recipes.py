"""Named evaluation attacks: ``clean``, ``pgd<k>``, ``cw<k>``, ``autoattack``, ``autoattack-rand``.

A recipe turns a protocol (a :class:`ThreatModel` giving norm, eps, step size and restarts) into
adversarial inputs. ``pgd<k>`` / ``cw<k>`` take k steps of the protocol's step size, or of
2.5 * eps / k when the protocol leaves it unset; ``cw`` uses the CW-inf margin with kappa = 50. All
gradient recipes attack in eval mode with early stopping and best-iterate tracking.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from robustkd.attacks.autoattack import autoattack
from robustkd.attacks.engine import perturb
from robustkd.attacks.objectives import CWMargin, Objective, make_objective
from robustkd.attacks.threat import ThreatModel
from robustkd.errors import ConfigError, RegistryError
from robustkd.registry import Registry

CW_KAPPA = 50.0


@dataclass(frozen=True)
class AttackRecipe:
    """One named evaluation attack, ready to run on batches."""

    name: str
    kind: str  # the registry key, e.g. "pgd<k>"
    steps: int | None = None

    def threat(self, protocol: ThreatModel) -> ThreatModel:
        """The threat model this recipe runs under the given protocol."""
        if self.steps is None:
            return protocol
        return protocol.replace(steps=self.steps)

    def settings(self, protocol: ThreatModel) -> dict[str, Any]:
        """JSON-able description of exactly what runs (for reports)."""
        out: dict[str, Any] = {"kind": self.kind}
        if self.kind in ("pgd<k>", "cw<k>"):
            threat = self.threat(protocol)
            out.update(
                objective="ce" if self.kind == "pgd<k>" else "cw",
                steps=threat.steps,
                step_size=threat.alpha,
                restarts=threat.restarts,
                random_start=threat.random_start,
                early_stop=True,
                mode="eval",
            )
            if self.kind == "cw<k>":
                out["kappa"] = CW_KAPPA
        elif self.kind.startswith("autoattack"):
            out.update(version="rand" if self.kind == "autoattack-rand" else "standard", package="pyautoattack")
        if self.kind != "clean":
            out.update(norm=protocol.norm, eps=protocol.eps)
        return out

    def run(
        self,
        model: nn.Module,
        x: Tensor,
        y: Tensor,
        protocol: ThreatModel,
        *,
        generator: torch.Generator | None = None,
        seed: int = 0,
        batch_size: int = 256,
    ) -> Tensor:
        """Adversarial inputs for one batch (x itself for ``clean``)."""
        if self.kind == "clean":
            return x
        if self.kind.startswith("autoattack"):
            version = "rand" if self.kind == "autoattack-rand" else "standard"
            return autoattack(
                model,
                x,
                y,
                protocol.eps,
                norm=protocol.norm,
                version=version,
                batch_size=batch_size,
                seed=seed,
            )
        objective: Objective = make_objective("ce") if self.kind == "pgd<k>" else CWMargin(kappa=CW_KAPPA)
        result = perturb(model, x, y, self.threat(protocol), objective, mode="eval", generator=generator)
        return result.x_adv


ATTACKS: Registry[Callable[[str, int | None], AttackRecipe]] = Registry("attack")


def _simple(kind: str) -> Callable[[str, int | None], AttackRecipe]:
    def make(name: str, steps: int | None) -> AttackRecipe:
        return AttackRecipe(name=name, kind=kind, steps=steps)

    return make


for _kind in ("clean", "pgd<k>", "cw<k>", "autoattack", "autoattack-rand"):
    ATTACKS.add(_kind, _simple(_kind))

_STEPS_RE = re.compile(r"^(pgd|cw)(\d+)$")


def get_attack(name: str) -> AttackRecipe:
    """Resolve an attack name: ``clean``, ``pgd20``, ``cw100``, ``autoattack``, ``autoattack-rand`` ...

    Unknown names raise a RegistryError listing close matches.
    """
    if not isinstance(name, str):
        raise ConfigError(f"attacks: expected attack names, got {name!r}")
    match = _STEPS_RE.match(name)
    if match:
        family, steps = match.group(1), int(match.group(2))
        if steps < 1:
            raise ConfigError(f"attacks: {name!r} needs at least one step")
        return ATTACKS.get(f"{family}<k>")(name, steps)
    if name in ATTACKS and "<k>" not in name:
        return ATTACKS.get(name)(name, None)
    if name in ("pgd", "cw", "pgd<k>", "cw<k>"):
        raise RegistryError(f"attack {name!r} needs a step count, e.g. {name.split('<')[0]}20")
    raise RegistryError(ATTACKS.unknown_message(name) + " (<k> is a step count, e.g. pgd20)")
