"""CROWN-IBP training (Zhang et al., ICLR 2020, arXiv:1906.06316).

L = κ_t·CE(z(x), y) + (1 − κ_t)·CE(ẑ(x, ε_t), y), as in IBP training, but ẑ_j = u_j with the mixed bound
u = β_t·u_CROWN-IBP + (1 − β_t)·u_IBP: IBP bounds for the hidden layers, one CROWN backward pass from the
margin spec for the last layer, blended with the pure IBP bound while β_t falls from 1 to 0 over the ramp.
"""

from __future__ import annotations

from dataclasses import dataclass

from robustkd.methods.base import StepInfo, register_method
from robustkd.methods.common import BoundTraining, interpolate, ramp_fraction


@register_method("crown_ibp")
@dataclass
class CrownIBP(BoundTraining):
    """CROWN-IBP: ε_t = r_t·threat.eps, κ_t from kappa_start to kappa_end, β_t from beta_start to beta_end.

    All three follow the same ramp share r_t (the reference code ties κ and β linearly to ε). Defaults are
    the paper's: κ 1 → 0 and β 1 → 0; a Linf ball of 0.1 (``threat``, step fields unused), 1 warm-up epoch
    and a 10-epoch ramp as in ``ibp``.
    Once β_t = 0 the CROWN pass is skipped and a step costs what an IBP step does. The CROWN backward pass
    is much dearer on networks with large feature maps (every spec carries a coefficient per activation):
    prefer stride convolutions to max-pooling, and small feature maps.
    """

    mixes_crown = True

    kappa_end: float = 0.0
    beta_start: float = 1.0
    beta_end: float = 0.0

    def weights(self) -> dict[str, float]:
        return {**super().weights(), "beta_start": self.beta_start, "beta_end": self.beta_end}

    def schedule(self, info: StepInfo) -> dict[str, float]:
        r = ramp_fraction(info, self.warmup_epochs, self.ramp_epochs)
        return {
            "eps": r * self.threat.eps,
            "kappa": interpolate(self.kappa_start, self.kappa_end, r),
            "beta": interpolate(self.beta_start, self.beta_end, r),
        }

    def passes(self) -> dict[str, int]:
        """Per step during the ramp (β_t > 0): the clean forward, one interval pass, one CROWN backward pass
        with K−1 specs (upper side only), and the backward through all of them. With β_t = 0: as ``ibp``."""
        return {"student_fwd": 1, "student_ibp": 1, "student_crown_bwd": 1, "student_bwd": 1}
