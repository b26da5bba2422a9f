"""CIFAR-style residual networks: ResNet-18, PreActResNet-18 and Wide ResNets.

Built only from ``layers.BOUNDABLE_TYPES`` so the bound propagators can walk them: a block is a
``Residual(body, shortcut)`` and any activation after the sum is a separate ``nn.ReLU`` beside it.
"""

from __future__ import annotations

import functools
from collections import OrderedDict
from collections.abc import Callable, Sequence

from torch import nn

from robustkd.errors import ConfigError
from robustkd.models._factory import register_model
from robustkd.models.layers import Residual

HE_2016 = "He et al. 2016, Deep Residual Learning (arXiv:1512.03385), CIFAR variant"
HE_2016_PREACT = "He et al. 2016, Identity Mappings in Deep Residual Networks (arXiv:1603.05027)"
# "standard": projection shortcuts read the pre-activated input, BN-ReLU before the pool (He et al.; RobustBench's
# Rice2020Overfitting L2 model). "fast": the layout of Wong et al. 2020, Fast is better than free.
PREACT_VARIANTS = ("standard", "fast")
ZAGORUYKO_2016 = "Zagoruyko & Komodakis 2016, Wide Residual Networks (arXiv:1605.07146)"


def _conv3x3(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 3, stride, 1, bias=False)


def _basic_block(cin: int, cout: int, stride: int) -> nn.Sequential:
    body = nn.Sequential(
        _conv3x3(cin, cout, stride),
        nn.BatchNorm2d(cout),
        nn.ReLU(),
        _conv3x3(cout, cout),
        nn.BatchNorm2d(cout),
    )
    shortcut = None
    if stride != 1 or cin != cout:
        shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
    return nn.Sequential(Residual(body, shortcut), nn.ReLU())


def _preact_block(cin: int, cout: int, stride: int, *, shortcut_reads_input: bool = False) -> nn.Module:
    def body(*first: nn.Module) -> nn.Sequential:
        return nn.Sequential(*first, _conv3x3(cin, cout, stride), nn.BatchNorm2d(cout), nn.ReLU(), _conv3x3(cout, cout))

    if stride == 1 and cin == cout:
        return Residual(body(nn.BatchNorm2d(cin), nn.ReLU()))
    shortcut = nn.Conv2d(cin, cout, 1, stride, bias=False)
    if shortcut_reads_input:
        # Wong et al.'s layout: only the body is pre-activated, the projection reads the raw block input.
        return Residual(body(nn.BatchNorm2d(cin), nn.ReLU()), shortcut)
    # The projection shortcut reads the pre-activated input (as in the reference code), so BN-ReLU move
    # in front of the Residual and both branches start from the same tensor.
    return nn.Sequential(nn.BatchNorm2d(cin), nn.ReLU(), Residual(body(), shortcut))


def _stages(
    block: Callable[[int, int, int], nn.Module],
    cin: int,
    widths: Sequence[int],
    depths: Sequence[int],
    strides: Sequence[int],
) -> list[tuple[str, nn.Module]]:
    stages = []
    for i, (width, depth, stride) in enumerate(zip(widths, depths, strides), start=1):
        blocks = []
        for j in range(depth):
            blocks.append(block(cin, width, stride if j == 0 else 1))
            cin = width
        stages.append((f"layer{i}", nn.Sequential(*blocks)))
    return stages


def resnet(
    widths: Sequence[int], depths: Sequence[int], *, num_classes: int, in_channels: int, stem: int = 64
) -> nn.Sequential:
    """Post-activation ResNet with a 3x3 stride-1 stem and no max-pool (for 32x32 inputs)."""
    strides = [1] + [2] * (len(widths) - 1)
    return nn.Sequential(
        OrderedDict(
            [
                ("stem", nn.Sequential(_conv3x3(in_channels, stem), nn.BatchNorm2d(stem), nn.ReLU())),
                *_stages(_basic_block, stem, widths, depths, strides),
                ("pool", nn.AdaptiveAvgPool2d(1)),
                ("flatten", nn.Flatten()),
                ("fc", nn.Linear(widths[-1], num_classes)),
            ]
        )
    )


def preact_resnet(
    widths: Sequence[int],
    depths: Sequence[int],
    *,
    num_classes: int,
    in_channels: int,
    stem: int,
    variant: str = "standard",
) -> nn.Sequential:
    """Pre-activation ResNet: a bare 3x3 stem conv, BN-ReLU-conv blocks, and BN-ReLU before the pool.

    ``variant="fast"`` is the layout of Wong et al. 2020 (RobustBench's Wong2020Fast): projection shortcuts
    read the raw block input and there is no BN-ReLU before the pool.
    """
    if variant not in PREACT_VARIANTS:
        raise ConfigError(f"preact variant must be one of {', '.join(PREACT_VARIANTS)}, got {variant!r}")
    fast = variant == "fast"
    strides = [1] + [2] * (len(widths) - 1)
    block = functools.partial(_preact_block, shortcut_reads_input=fast)
    head = [] if fast else [("norm", nn.BatchNorm2d(widths[-1])), ("relu", nn.ReLU())]
    return nn.Sequential(
        OrderedDict(
            [
                ("stem", _conv3x3(in_channels, stem)),
                *_stages(block, stem, widths, depths, strides),
                *head,
                ("pool", nn.AdaptiveAvgPool2d(1)),
                ("flatten", nn.Flatten()),
                ("fc", nn.Linear(widths[-1], num_classes)),
            ]
        )
    )


@register_model(boundable=True, input_sizes=(32,), reference=HE_2016)
def resnet18(num_classes: int = 10, in_channels: int = 3, input_size: int = 32, *, width: int = 64) -> nn.Module:
    """ResNet-18 for CIFAR: 3x3 stem, no max-pool, stages of width, 2, 4, 8 x ``width``."""
    widths = [width, 2 * width, 4 * width, 8 * width]
    return resnet(widths, [2, 2, 2, 2], num_classes=num_classes, in_channels=in_channels, stem=width)


@register_model(boundable=True, input_sizes=(32,), reference=HE_2016_PREACT)
def preact_resnet18(
    num_classes: int = 10, in_channels: int = 3, input_size: int = 32, *, width: int = 64, variant: str = "standard"
) -> nn.Module:
    """PreActResNet-18 for CIFAR, the usual model of fast adversarial training (``variant``: standard, fast)."""
    widths = [width, 2 * width, 4 * width, 8 * width]
    return preact_resnet(
        widths, [2, 2, 2, 2], num_classes=num_classes, in_channels=in_channels, stem=width, variant=variant
    )


@register_model(boundable=True, input_sizes=(32,), reference=ZAGORUYKO_2016)
def wrn(
    num_classes: int = 10, in_channels: int = 3, input_size: int = 32, *, depth: int = 34, width: int = 10
) -> nn.Module:
    """Wide ResNet WRN-depth-width (pre-activation; default WRN-34-10), as in TRADES and Madry et al."""
    if depth < 10 or (depth - 4) % 6:
        raise ConfigError(f"wrn depth must be 6n+4 with n >= 1 (10, 16, 22, 28, 34, ...), got {depth}")
    if width < 1:
        raise ConfigError(f"wrn width must be >= 1, got {width}")
    blocks = (depth - 4) // 6
    model = preact_resnet(
        [16 * width, 32 * width, 64 * width],
        [blocks] * 3,
        num_classes=num_classes,
        in_channels=in_channels,
        stem=16,
    )
    # Initialised as the WRN reference code does, so training recipes taken from papers carry over.
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(module, nn.Linear):
            nn.init.zeros_(module.bias)
    return model


@register_model(boundable=True, input_sizes=(32,), reference=ZAGORUYKO_2016)
def wrn_34_10(
    num_classes: int = 10, in_channels: int = 3, input_size: int = 32, *, depth: int = 34, width: int = 10
) -> nn.Module:
    """WRN-34-10, the usual robust teacher of adversarial distillation (46.2M parameters)."""
    return wrn(num_classes, in_channels, input_size, depth=depth, width=width)


@register_model(boundable=True, input_sizes=(32,), reference=ZAGORUYKO_2016)
def wrn_28_10(
    num_classes: int = 10, in_channels: int = 3, input_size: int = 32, *, depth: int = 28, width: int = 10
) -> nn.Module:
    """WRN-28-10 (36.5M parameters)."""
    return wrn(num_classes, in_channels, input_size, depth=depth, width=width)
