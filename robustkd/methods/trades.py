"""TRADES (Zhang et al., ICML 2019): L = CE(S(x), y) + β · KL(p_S(x) ‖ p_S(x'))."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from robustkd.attacks import ThreatModel, make_objective, pgd
from robustkd.attacks import attack_mode as attack_modes
from robustkd.methods.base import Batch, Method, Output, StepInfo, register_method
from robustkd.methods.common import ATTACK_KEYS, check_attack_mode, check_kl_reduction, method_threat
from robustkd.methods.losses import kl_divergence


def trades_loss(
    clean_logits: torch.Tensor,
    adv_logits: torch.Tensor,
    y: torch.Tensor,
    beta: float,
    reduction: str = "batchmean",
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """L = CE_mean(S(x), y) + β · KL(p_S(x) ‖ p_S(x')); returns (L, {"ce", "kl"}).

    Neither side of the KL is detached: as in the reference code, the gradient also flows through
    p_S(x), pulling the clean prediction towards the adversarial one.
    """
    ce = F.cross_entropy(clean_logits, y)
    kl = kl_divergence(clean_logits, adv_logits, reduction=reduction)
    return ce + beta * kl, {"ce": ce, "kl": kl}


# The default ball and PGD budget of the training attack.
THREAT = ThreatModel("linf", 0.031, step_size=0.007, steps=10, random_start="normal")


@register_method("trades")
@dataclass
class TRADES(Method):
    """TRADES with the attack of yaodongyu/TRADES ``trades.py``.

    Inner: x' maximises KL_sum(p_S(x) ‖ p_S(x')) with p_S(x) fixed (computed once, in the attack's
    mode, without a graph), starting from x + 0.001·N(0, I), student in eval mode (``attack_mode``).
    Outer: CE(S(x), y) + β · KL_batchmean(p_S(x) ‖ p_S(x')), both forwards in train mode.
    Defaults are the CIFAR-10 ones of the reference code: β = 6, ε = 0.031, step 0.007, 10 steps
    (MNIST in that code: β = 1, ε = 0.3, step 0.01, 40 steps). ``kl_reduction`` other than batchmean
    departs from the reference and only exists for experiments.
    """

    flat_threat_keys = ATTACK_KEYS

    beta: float = 6.0
    threat: ThreatModel = THREAT
    attack_mode: str = "eval"
    kl_reduction: str = "batchmean"

    def __post_init__(self) -> None:
        if not self.beta >= 0:
            raise ValueError(f"beta must be >= 0, got {self.beta}")
        check_attack_mode(self.attack_mode)
        self.threat = method_threat(self)
        check_kl_reduction(self.kl_reduction)

    def __call__(self, student: nn.Module, teacher: nn.Module | None, batch: Batch, info: StepInfo) -> Output:
        x, y = batch.x, batch.y
        # The attack's fixed reference p_S(x), in the same mode as the attack forwards (the reference
        # code switches to eval before computing it inside its loop).
        with attack_modes(student, None, self.attack_mode), torch.no_grad():
            reference = F.softmax(student(x), dim=1)
        x_adv = pgd(student, x, y, self.threat, make_objective("kl"), reference=reference, mode=self.attack_mode)
        # Two forwards, not one on cat([x, x']): in train mode BatchNorm would mix their statistics.
        clean_logits = student(x)
        adv_logits = student(x_adv)
        loss, terms = trades_loss(clean_logits, adv_logits, y, self.beta, self.kl_reduction)
        logs = {k: v.detach() for k, v in terms.items()}
        logs["adv_acc"] = (adv_logits.detach().argmax(1) == y).float().mean()
        return Output(loss, logs, clean_logits)

    def passes(self) -> dict[str, int]:
        k = self.threat.steps
        # 1 no-grad reference forward + k attack forwards + clean and adversarial forwards.
        return {"student_fwd": k + 3, "student_input_grad": k, "student_bwd": 1, "attack_steps": k}
