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


def _conv_bn(cin: int, cout: int, kernel: int, stride: int = 1, groups: int = 1, act: bool = True) -> nn.Sequential:
    conv = (
        DepthwiseConv2d(cin, kernel, stride, kernel // 2)
        if groups == cin == cout
        else nn.Conv2d(cin, cout, kernel, stride, kernel // 2, groups=groups, bias=False)
    )
    layers: list[nn.Module] = [conv, nn.BatchNorm2d(cout)]
    if act:
        layers.append(nn.ReLU6())
    return nn.Sequential(*layers)


def _inverted_residual(cin: int, cout: int, stride: int, expansion: int) -> nn.Module:
    hidden = cin * expansion
    layers = [_conv_bn(cin, hidden, 1)] if expansion != 1 else []
    layers += [_conv_bn(hidden, hidden, 3, stride, groups=hidden), _conv_bn(hidden, cout, 1, act=False)]
    body = nn.Sequential(*layers)
    # The paper adds the input back only where shapes match; no projection shortcuts.
    return Residual(body) if stride == 1 and cin == cout else body


@register_model(boundable=False, input_sizes=(32,), reference=SANDLER_2018)
def mobilenet_v2(
    num_classes: int = 10,
    in_channels: int = 3,
    input_size: int = 32,
    *,
    width_mult: float = 1.0,
    dropout: float = 0.0,
) -> nn.Module:
    """MobileNetV2 with a stride-1 stem and a stride-1 second stage for 32x32 inputs."""
    if width_mult <= 0:
        raise ConfigError(f"mobilenet_v2 width_mult must be positive, got {width_mult}")
    if not 0.0 <= dropout < 1.0:
        raise ConfigError(f"mobilenet_v2 dropout must be in [0, 1), got {dropout}")
    cin = _round8(32 * width_mult)
    layers: list[nn.Module] = [_conv_bn(in_channels, cin, 3, 1)]
    for expansion, channels, repeats, stride in _STAGES:
        cout = _round8(channels * width_mult)
        for i in range(repeats):
            layers.append(_inverted_residual(cin, cout, stride if i == 0 else 1, expansion))
            cin = cout
    last = _round8(1280 * max(1.0, width_mult))
    layers += [
        _conv_bn(cin, last, 1),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Dropout(dropout),
        nn.Linear(last, num_classes),
    ]
    return nn.Sequential(*layers)
