"""Building blocks shared by every architecture; the bound propagators in ``robustkd.certify`` know each."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn


class Normalize(nn.Module):
    """Per-channel ``(x - mean) / std``: models take images in [0, 1] and normalise themselves."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        if len(mean) != len(std):
            raise ValueError(f"mean has {len(mean)} channels but std has {len(std)}")
        if not all(math.isfinite(v) for v in (*mean, *std)):
            raise ValueError(f"mean and std must be finite, got {list(mean)} and {list(std)}")
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


class _DepthwiseConv(torch.autograd.Function):
    """A depthwise convolution whose backward is built from ordinary convolutions.

    PyTorch's derivative of a grouped convolution's backward (``_convolution_double_backward``) loops over the
    groups, one small convolution per channel: a KDIGA step through MobileNetV2 spent most of its time there.
    Written with two first-order convolutions instead, the second derivative costs about what the first does.
    Without ``create_graph`` the native backward runs unchanged.
    """

    @staticmethod
    def forward(ctx, x, weight, stride, padding, dilation):  # type: ignore[override]
        ctx.save_for_backward(x, weight)
        ctx.conf = (stride, padding, dilation)
        return torch.nn.functional.conv2d(x, weight, None, stride, padding, dilation, x.shape[1])

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        x, weight = ctx.saved_tensors
        stride, padding, dilation = ctx.conf
        (n, channels, height, width), kernel = x.shape, weight.shape[2:]
        if not torch.is_grad_enabled():  # a plain backward: the native kernel
            grad_x, grad_w, _ = torch.ops.aten.convolution_backward(
                grad, x, weight, None, stride, padding, dilation, False, [0, 0], channels,
                [ctx.needs_input_grad[0], ctx.needs_input_grad[1], False],
            )  # fmt: skip
            return grad_x, grad_w, None, None, None
        grad_x = grad_w = None
        if ctx.needs_input_grad[0]:
            # The transposed convolution, with the rows and columns that the stride's rounding dropped.
            lost = [
                size - ((out - 1) * s - 2 * p + d * (k - 1) + 1)
                for size, out, s, p, d, k in zip(
                    (height, width), grad.shape[2:], stride, padding, dilation, kernel, strict=True
                )
            ]
            grad_x = torch.nn.functional.conv_transpose2d(grad, weight, None, stride, padding, lost, channels, dilation)
        if ctx.needs_input_grad[1]:
            # Each (example, channel) map correlated with its own output gradient: one group per pair, the
            # output gradient as a kernel dilated by the stride.
            per_example = torch.nn.functional.conv2d(
                x.reshape(1, n * channels, height, width),
                grad.reshape(n * channels, 1, *grad.shape[2:]),
                None,
                dilation,
                padding,
                stride,
                n * channels,
            )
            grad_w = per_example[..., : kernel[0], : kernel[1]].reshape(n, channels, *kernel).sum(0).unsqueeze(1)
        return grad_x, grad_w, None, None, None


class DepthwiseConv2d(nn.Conv2d):
    """``nn.Conv2d`` with ``groups == in_channels == out_channels`` and a cheap double backward (see above).

    The parameters and state dict are ``nn.Conv2d``'s, so checkpoints load either way.
    """

    def __init__(self, channels: int, kernel_size: int, stride: int = 1, padding: int = 0, bias: bool = False):
        super().__init__(channels, channels, kernel_size, stride, padding, groups=channels, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Under autocast the backward would meet bf16 gradients and float32 saved tensors: native path.
        if not torch.is_grad_enabled() or torch.is_autocast_enabled(x.device.type):
            return super().forward(x)
        out = _DepthwiseConv.apply(x, self.weight, self.stride, self.padding, self.dilation)
        return out if self.bias is None else out + self.bias.view(1, -1, 1, 1)
