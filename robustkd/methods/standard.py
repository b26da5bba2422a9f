"""Standard training: cross-entropy on clean inputs."""

from __future__ import annotations

from dataclasses import dataclass

import torch.nn.functional as F
from torch import nn

from robustkd.methods.base import Batch, Method, Output, StepInfo, register_method


@register_method("standard")
@dataclass
class Standard(Method):
    """L = CE(S(x), y), mean over the batch."""

    label_smoothing: float = 0.0

    def __post_init__(self) -> None:
        if not 0.0 <= self.label_smoothing < 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1), got {self.label_smoothing}")

    def __call__(self, student: nn.Module, teacher: nn.Module | None, batch: Batch, info: StepInfo) -> Output:
        logits = student(batch.x)
        loss = F.cross_entropy(logits, batch.y, label_smoothing=self.label_smoothing)
        return Output(loss, {"ce": loss.detach()}, logits)

    def passes(self) -> dict[str, int]:
        return {"student_fwd": 1, "student_bwd": 1}
