"""Plain conv-then-dense networks: the certified-training CNNs of Gowal et al. (2018) and a fast baseline."""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

from torch import nn

from robustkd.errors import ConfigError
from robustkd.models._factory import register_model

GOWAL_2018 = "Gowal et al. 2018, On the Effectiveness of Interval Bound Propagation (arXiv:1810.12715)"


class Conv(NamedTuple):
    """One conv layer, followed by a ReLU and, when ``pool > 1``, a max-pool of that window."""

    out_channels: int
    kernel: int
    stride: int = 1
    padding: int = 0
    pool: int = 1


def conv_mlp(
    convs: Sequence[Conv], hidden: Sequence[int], *, num_classes: int, in_channels: int, input_size: int
) -> nn.Sequential:
    """Conv-ReLU(-MaxPool) layers, Flatten, then Linear-ReLU layers and a Linear classifier."""
    layers: list[nn.Module] = []
    channels, size = in_channels, input_size
    for conv in convs:
        layers += [nn.Conv2d(channels, conv.out_channels, conv.kernel, conv.stride, conv.padding), nn.ReLU()]
        size = (size + 2 * conv.padding - conv.kernel) // conv.stride + 1
        if conv.pool > 1:
            layers.append(nn.MaxPool2d(conv.pool))
            size //= conv.pool
        if size < 1:
            raise ConfigError(f"input_size {input_size} is too small for this network (feature map vanishes)")
        channels = conv.out_channels
    layers.append(nn.Flatten())
    features = channels * size * size
    for width in hidden:
        layers += [nn.Linear(features, width), nn.ReLU()]
        features = width
    layers.append(nn.Linear(features, num_classes))
    return nn.Sequential(*layers)


@register_model(boundable=True, reference=GOWAL_2018 + ", DM-small")
def dm_small(
    num_classes: int = 10,
    in_channels: int = 3,
    input_size: int = 32,
    *,
    padding: int = 0,
    linear_size: int = 100,
) -> nn.Module:
    """DM-small: conv16 4x4/2, conv32 4x4/1, FC100, classifier (no padding, as the reference 'VALID')."""
    convs = [Conv(16, 4, 2, padding), Conv(32, 4, 1, padding)]
    return conv_mlp(convs, [linear_size], num_classes=num_classes, in_channels=in_channels, input_size=input_size)


@register_model(boundable=True, reference=GOWAL_2018 + ", DM-medium")
def dm_medium(
    num_classes: int = 10, in_channels: int = 3, input_size: int = 32, *, linear_size: int = 512
) -> nn.Module:
    """DM-medium: conv32 3x3/1, conv32 4x4/2, conv64 3x3/1, conv64 4x4/2, FC512, FC512, classifier."""
    convs = [Conv(32, 3, 1), Conv(32, 4, 2), Conv(64, 3, 1), Conv(64, 4, 2)]
    return conv_mlp(convs, [linear_size] * 2, num_classes=num_classes, in_channels=in_channels, input_size=input_size)


@register_model(boundable=True, reference=GOWAL_2018 + ", DM-large")
def dm_large(num_classes: int = 10, in_channels: int = 3, input_size: int = 32, *, linear_size: int = 512) -> nn.Module:
    """DM-large: conv64, conv64, conv128/2, conv128, conv128 (3x3, padding 1), FC512, classifier."""
    convs = [Conv(64, 3, 1, 1), Conv(64, 3, 1, 1), Conv(128, 3, 2, 1), Conv(128, 3, 1, 1), Conv(128, 3, 1, 1)]
    return conv_mlp(convs, [linear_size], num_classes=num_classes, in_channels=in_channels, input_size=input_size)


@register_model(boundable=True, reference="fast baseline")
def small_cnn(
    num_classes: int = 10, in_channels: int = 3, input_size: int = 32, *, width: int = 32, hidden: int = 128
) -> nn.Module:
    """Fast baseline: conv(width) 3x3, pool 2, conv(2*width) 3x3, pool 2, FC(hidden), classifier."""
    convs = [Conv(width, 3, 1, 1, pool=2), Conv(2 * width, 3, 1, 1, pool=2)]
    return conv_mlp(convs, [hidden], num_classes=num_classes, in_channels=in_channels, input_size=input_size)
