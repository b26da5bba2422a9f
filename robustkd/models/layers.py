"""Building blocks shared by every architecture; the bound propagators in ``robustkd.certify`` know each."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn


class Normalize(nn.Module):
    """Per-channel ``(x - mean) / std``: models take images in [0, 1] and normalise themselves."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        if len(mean) != len(std):
            raise ValueError(f"mean has {len(mean)} channels but std has {len(std)}")
        if any(s <= 0 for s in std):
            raise ValueError(f"std must be positive, got {list(std)}")
        self.register_buffer("mean", torch.tensor(list(mean), dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(list(std), dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std

    def extra_repr(self) -> str:
        return f"mean={self.mean.flatten().tolist()}, std={self.std.flatten().tolist()}"


class Residual(nn.Module):
    """``body(x) + shortcut(x)``; the activation after the sum is a separate module in the parent."""

    def __init__(self, body: nn.Module, shortcut: nn.Module | None = None) -> None:
        super().__init__()
        self.body = body
        self.shortcut = shortcut if shortcut is not None else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x) + self.shortcut(x)


# The module types the CNNs and ResNets are built from, and so the ones a bound propagator must handle.
# Containers are listed because they are walked, not bounded themselves.
BOUNDABLE_TYPES: tuple[type[nn.Module], ...] = (
    nn.Sequential,
    Normalize,
    Residual,
    nn.Conv2d,
    nn.Linear,
    nn.ReLU,
    nn.Flatten,
    nn.BatchNorm2d,
    nn.BatchNorm1d,
    nn.AvgPool2d,
    nn.AdaptiveAvgPool2d,
    nn.MaxPool2d,
    nn.Identity,
)


def is_boundable(model: nn.Module) -> bool:
    """True when every submodule is exactly one of ``BOUNDABLE_TYPES`` (subclasses may change forward)."""
    return all(type(m) in BOUNDABLE_TYPES for m in model.modules())
