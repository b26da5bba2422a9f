"""MobileNetV2 for small images (a compact student; not built for bound propagation)."""

from __future__ import annotations

from torch import nn

from robustkd.errors import ConfigError
from robustkd.models._factory import register_model
from robustkd.models.layers import DepthwiseConv2d, Residual

SANDLER_2018 = "Sandler et al. 2018, MobileNetV2 (arXiv:1801.04381), CIFAR variant"

# (expansion t, output channels c, repeats n, stride s) per stage, as in the paper's Table 2 except the
# strides: the stem and the 24-channel stage keep stride 1 so a 32x32 input ends at 4x4, not 1x1.
_STAGES = (
    (1, 16, 1, 1),
    (6, 24, 2, 1),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
)


def _round8(channels: float) -> int:
    # Channel counts stay multiples of 8 (never dropping below 90%), as in the reference width scaling.
    rounded = max(8, int(channels + 4) // 8 * 8)
    return rounded + 8 if rounded < 0.9 * channels else rounded


def _conv_bn(
    cin: int, cout: int, kernel: int, stride: int = 1, groups: int = 1, act: type[nn.Module] | None = nn.ReLU6
) -> nn.Sequential:
    conv = (
        DepthwiseConv2d(cin, kernel, stride, kernel // 2)
        if groups == cin == cout
        else nn.Conv2d(cin, cout, kernel, stride, kernel // 2, groups=groups, bias=False)
    )
    layers: list[nn.Module] = [conv, nn.BatchNorm2d(cout)]
    if act is not None:
        layers.append(act())
    return nn.Sequential(*layers)


def _inverted_residual(cin: int, cout: int, stride: int, expansion: int) -> nn.Module:
    hidden = cin * expansion
    layers = [_conv_bn(cin, hidden, 1)] if expansion != 1 else []
    layers += [_conv_bn(hidden, hidden, 3, stride, groups=hidden), _conv_bn(hidden, cout, 1, act=None)]
    body = nn.Sequential(*layers)
    # The paper adds the input back only where shapes match; no projection shortcuts.
    return Residual(body) if stride == 1 and cin == cout else body


def _cifar_block(cin: int, cout: int, stride: int, expansion: int) -> nn.Module:
    """The block of the common CIFAR implementation (ARD, RSLAD): ReLU, the 1x1 expansion conv even at
    expansion 1, and a conv1x1-BN projection shortcut on the stride-1 blocks that change width."""
    hidden = cin * expansion
    body = nn.Sequential(
        _conv_bn(cin, hidden, 1, act=nn.ReLU),
        _conv_bn(hidden, hidden, 3, stride, groups=hidden, act=nn.ReLU),
        _conv_bn(hidden, cout, 1, act=None),
    )
    if stride != 1:
        return body
    return Residual(body, _conv_bn(cin, cout, 1, act=None) if cin != cout else None)


# "paper": Sandler et al.'s blocks (ReLU6, no expansion conv at t=1, identity shortcuts only); "cifar": the
# MobileNetV2 of the ARD and RSLAD repositories (see _cifar_block), whose checkpoints import as this variant.
MOBILENET_VARIANTS = {"paper": (_inverted_residual, nn.ReLU6), "cifar": (_cifar_block, nn.ReLU)}


def mobilenet_v2_strides() -> list[int]:
    """The stride of each inverted-residual block, in order (the same for every width and variant)."""
    return [stride if i == 0 else 1 for _, _, repeats, stride in _STAGES for i in range(repeats)]


@register_model(boundable=False, input_sizes=(32,), reference=SANDLER_2018)
def mobilenet_v2(
    num_classes: int = 10,
    in_channels: int = 3,
    input_size: int = 32,
    *,
    width_mult: float = 1.0,
    dropout: float = 0.0,
    variant: str = "paper",
) -> nn.Module:
    """MobileNetV2 with a stride-1 stem and a stride-1 second stage for 32x32 inputs (``variant``: paper, cifar)."""
    if width_mult <= 0:
        raise ConfigError(f"mobilenet_v2 width_mult must be positive, got {width_mult}")
    if not 0.0 <= dropout < 1.0:
        raise ConfigError(f"mobilenet_v2 dropout must be in [0, 1), got {dropout}")
    if variant not in MOBILENET_VARIANTS:
        raise ConfigError(f"mobilenet_v2 variant must be one of {', '.join(MOBILENET_VARIANTS)}, got {variant!r}")
    block, act = MOBILENET_VARIANTS[variant]
    cin = _round8(32 * width_mult)
    layers: list[nn.Module] = [_conv_bn(in_channels, cin, 3, 1, act=act)]
    for expansion, channels, repeats, stride in _STAGES:
        cout = _round8(channels * width_mult)
        for i in range(repeats):
            layers.append(block(cin, cout, stride if i == 0 else 1, expansion))
            cin = cout
    last = _round8(1280 * max(1.0, width_mult))
    layers += [
        _conv_bn(cin, last, 1, act=act),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Dropout(dropout),
        nn.Linear(last, num_classes),
    ]
    return nn.Sequential(*layers)
