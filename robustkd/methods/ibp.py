"""Interval bound propagation training (Gowal et al. 2018, arXiv:1810.12715).

L = κ_t·CE(z(x), y) + (1 − κ_t)·CE(ẑ(x, ε_t), y),  ẑ_y = 0,  ẑ_j = u_j ≥ max_{x' ∈ B} z_j(x') − z_y(x'),

with B = Ball_inf(x, ε_t) ∩ [0, 1]^d and u the IBP upper bounds of the margins (the spec rows e_j − e_y are
folded into the last linear layer). Schedules are functions of the step: a clean warm-up, then ε_t rises
linearly from 0 to threat.eps and κ_t goes from kappa_start to kappa_end over ramp_epochs. The loss, the
schedules and the bound pass live in ``robustkd.methods.common`` (``crown_ibp`` and ``faithful`` share them).
"""

from __future__ import annotations

from dataclasses import dataclass

from robustkd.methods.base import register_method
from robustkd.methods.common import BoundTraining


@register_method("ibp")
@dataclass
class IBP(BoundTraining):
    """IBP training (Gowal et al. 2018): L = κ_t·CE(z(x), y) + (1 − κ_t)·CE(ẑ(x, ε_t), y).

    ε_t = r_t·threat.eps and κ_t = (1 − r_t)·kappa_start + r_t·kappa_end, with r_t the ramp share
    (:func:`robustkd.methods.common.ramp_fraction`): 0 through ``warmup_epochs`` of clean training, then linear
    to 1 over ``ramp_epochs``. Gowal et al.: κ from 1 to 0.5, a training eps a little above the test eps (0.4
    for MNIST 0.3). Defaults here: ``threat`` a Linf ball of 0.1 (Fashion-MNIST's linf-0.1; its step fields are
    unused), 1 warm-up epoch, a 10-epoch ramp.

    Model mode: the bound pass sees the network of the clean forward, BatchNorm included (batch statistics of
    the clean batch in training; see :func:`robustkd.methods.common.recording_batch_stats`). Certify the
    trained model in eval mode: the logged ``cert_acc`` (share of the batch certified at ε_t by this step's
    bounds) is a training-time reading. At ε_t = 0 the loss is the clean CE and no bound pass runs.
    """

    def passes(self) -> dict[str, int]:
        """Per step once ε_t > 0 (the warm-up runs the clean forward and backward only). One interval pass
        costs about two forwards (centre and radius), and its backward about two backwards."""
        return {"student_fwd": 1, "student_ibp": 1, "student_bwd": 1}
