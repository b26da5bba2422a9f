"""PGD adversarial training (Madry et al., ICLR 2018): min_θ E max_{x'∈Ball(x,ε)} CE(S(x'), y)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from robustkd.attacks import ThreatModel, pgd
from robustkd.methods.base import Batch, Method, Output, StepInfo, register_method
from robustkd.methods.common import ATTACK_KEYS, check_attack_mode, method_threat


def pgd_at_loss(adv_logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """L = (1/B) Σ_i CE(S(x'_i), y_i): the outer loss sees adversarial points only."""
    return F.cross_entropy(adv_logits, y)


# The default ball and PGD budget of the training attack.
THREAT = ThreatModel("linf", 8 / 255, step_size=2 / 255, steps=10, random_start="uniform")


@register_method("pgd_at")
@dataclass
class PGDAT(Method):
    """Madry PGD-AT: L = CE_mean(S(x'), y), x' = PGD on CE_sum(S(·), y) from a uniform start in Ball(x, ε).

    Defaults are the CIFAR-10 settings of MadryLab/cifar10_challenge (ε = 8/255, step 2/255, 10 steps).
    ``attack_mode="eval"`` (default) attacks with BatchNorm's running statistics, as most PyTorch
    reproductions do; ``"train"`` reproduces Madry's TensorFlow code, whose attack runs on the training
    graph (batch statistics, and every attack forward updates the running averages). All steps are run
    on every point (no early stop) and the last iterate is used, as in the reference code.
    """

    flat_threat_keys = ATTACK_KEYS

    threat: ThreatModel = THREAT
    attack_mode: str = "eval"

    def __post_init__(self) -> None:
        check_attack_mode(self.attack_mode)
        self.threat = method_threat(self)

    def __call__(self, student: nn.Module, teacher: nn.Module | None, batch: Batch, info: StepInfo) -> Output:
        # Every point takes all steps (no early stop) and the last iterate is used, as in the reference code.
        x_adv = pgd(student, batch.x, batch.y, self.threat, "ce", mode=self.attack_mode)
        adv_logits = student(x_adv)
        loss = pgd_at_loss(adv_logits, batch.y)
        adv_acc = (adv_logits.detach().argmax(1) == batch.y).float().mean()
        # No clean forward is run, so there are no clean logits to report.
        return Output(loss, {"ce_adv": loss.detach(), "adv_acc": adv_acc}, None)

    def passes(self) -> dict[str, int]:
        k = self.threat.steps
        return {"student_fwd": k + 1, "student_input_grad": k, "student_bwd": 1, "attack_steps": k}
