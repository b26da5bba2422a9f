"""The foreign state-dict formats: how each source names its tensors and which robustkd architecture computes
the same function.

A format says which keys identify it (``signature``), reads the architecture's arguments from tensor shapes
(``infer``) and lists, module by module, the source's name and ours (``modules``); the tensor names inside a
module (weight, bias, running_mean, ...) are the same on both sides. Each source's forward pass was read from
its own code; ``tests/test_import.py`` re-states each one and compares logits.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from robustkd.models.mobilenet import mobilenet_v2_strides
from robustkd.registry import Registry

Shapes = Mapping[str, tuple[int, ...]]
Pairs = list[tuple[str, str]]  # (source module path, our module path inside the model's ``net``)


@dataclass(frozen=True)
class Format:
    """One family of foreign checkpoints and the robustkd architecture it imports as."""

    summary: str  # what the user knows the files as
    arch: str
    signature: tuple[str, ...]  # keys every file of the format has
    infer: Callable[[Shapes], dict[str, Any]]  # arch_args plus num_classes and in_channels
    modules: Callable[[Shapes, dict[str, Any]], Pairs]
    # Tensors the source's own forward pass never reads (TRADES' and Carmon et al.'s ``sub_block1``).
    unused: tuple[str, ...] = ()
    excludes: tuple[str, ...] = ()  # keys no file of the format has (they tell two families apart)
    sources: tuple[str, ...] = field(default_factory=tuple)  # models known to be in this format


FORMATS: Registry[Format] = Registry("checkpoint format")


def _indices(shapes: Shapes, prefix: str) -> list[int]:
    """The block numbers under ``prefix`` (``layer1.`` -> [0, 1]), sorted."""
    pattern = re.compile(re.escape(prefix) + r"(\d+)\.")
    return sorted({int(m.group(1)) for key in shapes if (m := pattern.match(key))})


def _common(shapes: Shapes, stem: str, head: str) -> dict[str, Any]:
    return {"num_classes": shapes[head][0], "in_channels": shapes[stem][1]}


def _preact_pairs(src: str, ours: str, projection: bool, shortcut: str, shortcut_reads_input: bool) -> Pairs:
    """A pre-activation block: bn1, conv1, bn2, conv2 (+ a projection) onto robustkd's ``_preact_block``."""
    if not projection:
        return [(f"{src}.bn1", f"{ours}.body.0"), (f"{src}.conv1", f"{ours}.body.2"),
                (f"{src}.bn2", f"{ours}.body.3"), (f"{src}.conv2", f"{ours}.body.5")]  # fmt: skip
    if shortcut_reads_input:
        return [*_preact_pairs(src, ours, False, shortcut, False), (f"{src}.{shortcut}", f"{ours}.shortcut")]
    return [(f"{src}.bn1", f"{ours}.0"), (f"{src}.conv1", f"{ours}.2.body.0"), (f"{src}.bn2", f"{ours}.2.body.1"),
            (f"{src}.conv2", f"{ours}.2.body.3"), (f"{src}.{shortcut}", f"{ours}.2.shortcut")]  # fmt: skip


# WideResNet: TRADES' models/wideresnet.py, copied by RobustBench (architectures/wide_resnet.py) and by Carmon
# et al.'s semisup-adv. conv1, block{1,2,3}.layer.{j} (bn1, conv1, bn2, conv2, convShortcut where the width
# changes), bn1, fc; depth = 6n + 4 for n blocks a stage, width = block1's channels / 16.
def _wrn_infer(shapes: Shapes) -> dict[str, Any]:
    blocks = len(_indices(shapes, "block1.layer."))
    width = shapes["block1.layer.0.conv1.weight"][0] // 16
    return {"depth": 6 * blocks + 4, "width": width, **_common(shapes, "conv1.weight", "fc.weight")}


def _wrn_modules(shapes: Shapes, args: dict[str, Any]) -> Pairs:
    pairs = [("conv1", "stem"), ("bn1", "norm"), ("fc", "fc")]
    for stage in (1, 2, 3):
        for j in _indices(shapes, f"block{stage}.layer."):
            src = f"block{stage}.layer.{j}"
            projection = f"{src}.convShortcut.weight" in shapes
            pairs += _preact_pairs(src, f"layer{stage}.{j}", projection, "convShortcut", False)
    return pairs


FORMATS.add(
    "wideresnet",
    Format(
        summary="WideResNet (TRADES, RobustBench, Carmon et al.)",
        arch="wrn",
        signature=(
            "conv1.weight",
            "block1.layer.0.conv1.weight",
            "block3.layer.0.bn1.weight",
            "bn1.weight",
            "fc.weight",
        ),
        infer=_wrn_infer,
        modules=_wrn_modules,
        unused=("sub_block1.",),
        sources=(
            "TRADES WRN-34-10",
            "RobustBench Carmon2019Unlabeled (WRN-28-10)",
            "RobustBench Zhang2019Theoretically (WRN-34-10)",
            "RobustBench Rice2020Overfitting Linf (WRN-34-20)",
        ),
    ),
)


# PreActResNet-18: RobustBench's architectures/resnet.py. conv1, layer{1-4}.{0,1} (bn1, conv1, bn2, conv2,
# shortcut.0), [bn], linear. A file with ``bn`` (bn_before_fc) is PreActBlockV2 (Rice2020Overfitting L2): our
# standard variant; one without is PreActBlock (Wong2020Fast), whose shortcut reads the raw input: "fast".
def _preact_infer(shapes: Shapes) -> dict[str, Any]:
    variant = "standard" if "bn.weight" in shapes else "fast"
    return {"width": shapes["conv1.weight"][0], "variant": variant, **_common(shapes, "conv1.weight", "linear.weight")}


def _preact_modules(shapes: Shapes, args: dict[str, Any]) -> Pairs:
    pairs = [("conv1", "stem"), ("bn", "norm"), ("linear", "fc")]
    fast = args.get("variant") == "fast"
    for stage in (1, 2, 3, 4):
        for j in _indices(shapes, f"layer{stage}."):
            src = f"layer{stage}.{j}"
            projection = f"{src}.shortcut.0.weight" in shapes
            pairs += _preact_pairs(src, f"layer{stage}.{j}", projection, "shortcut.0", fast)
    return pairs


FORMATS.add(
    "preact-resnet",
    Format(
        summary="PreActResNet-18 (RobustBench)",
        arch="preact_resnet18",
        signature=("conv1.weight", "layer1.0.bn1.weight", "layer4.0.conv2.weight", "linear.weight"),
        infer=_preact_infer,
        modules=_preact_modules,
        excludes=("bn1.weight",),  # the post-activation ResNet's stem BN
        sources=(
            "RobustBench Wong2020Fast (variant fast)",
            "RobustBench Rice2020Overfitting L2 (variant standard)",
        ),
    ),
)


# ResNet-18: the ARD and RSLAD repositories' models/resnet.py (also RobustBench's ResNet). conv1, bn1,
# layer{1-4}.{0,1} (conv1, bn1, conv2, bn2, shortcut.0 conv, shortcut.1 BN), linear; post-activation.
def _resnet_infer(shapes: Shapes) -> dict[str, Any]:
    return {"width": shapes["conv1.weight"][0], **_common(shapes, "conv1.weight", "linear.weight")}


def _resnet_modules(shapes: Shapes, args: dict[str, Any]) -> Pairs:
    pairs = [("conv1", "stem.0"), ("bn1", "stem.1"), ("linear", "fc")]
    for stage in (1, 2, 3, 4):
        for j in _indices(shapes, f"layer{stage}."):
            src, ours = f"layer{stage}.{j}", f"layer{stage}.{j}.0"
            names = [("conv1", "body.0"), ("bn1", "body.1"), ("conv2", "body.3"), ("bn2", "body.4"),
                     ("shortcut.0", "shortcut.0"), ("shortcut.1", "shortcut.1")]  # fmt: skip
            pairs += [(f"{src}.{theirs}", f"{ours}.{mine}") for theirs, mine in names]
    return pairs


FORMATS.add(
    "cifar-resnet",
    Format(
        summary="ResNet-18 (ARD, RSLAD, RobustBench)",
        arch="resnet18",
        signature=("conv1.weight", "bn1.weight", "layer1.0.conv1.weight", "layer1.0.bn1.weight", "linear.weight"),
        infer=_resnet_infer,
        modules=_resnet_modules,
        sources=("ARD ResNet18", "RSLAD resnet18"),
    ),
)


# MobileNetV2: the ARD and RSLAD repositories' CIFAR MobileNetV2. conv1, bn1, layers.{k} (conv1, bn1, conv2,
# bn2, conv3, bn3, shortcut.0, shortcut.1), conv2, bn2, linear; our ``mobilenet_v2(variant="cifar")``.
def _mobilenet_infer(shapes: Shapes) -> dict[str, Any]:
    return {
        "width_mult": shapes["conv1.weight"][0] / 32,
        "variant": "cifar",
        **_common(shapes, "conv1.weight", "linear.weight"),
    }


def _mobilenet_modules(shapes: Shapes, args: dict[str, Any]) -> Pairs:
    strides = mobilenet_v2_strides()
    last = len(strides) + 1
    pairs = [("conv1", "0.0"), ("bn1", "0.1"), ("conv2", f"{last}.0"), ("bn2", f"{last}.1"), ("linear", f"{last + 4}")]
    for k in _indices(shapes, "layers."):
        # Our stride-1 blocks are Residual(body, shortcut); stride-2 blocks are the body alone.
        body = f"{k + 1}.body" if k < len(strides) and strides[k] == 1 else f"{k + 1}"
        for i in (1, 2, 3):
            pairs += [(f"layers.{k}.conv{i}", f"{body}.{i - 1}.0"), (f"layers.{k}.bn{i}", f"{body}.{i - 1}.1")]
        pairs += [(f"layers.{k}.shortcut.0", f"{k + 1}.shortcut.0"), (f"layers.{k}.shortcut.1", f"{k + 1}.shortcut.1")]
    return pairs


FORMATS.add(
    "cifar-mobilenetv2",
    Format(
        summary="MobileNetV2 (ARD, RSLAD)",
        arch="mobilenet_v2",
        signature=("conv1.weight", "bn1.weight", "layers.0.conv1.weight", "conv2.weight", "linear.weight"),
        infer=_mobilenet_infer,
        modules=_mobilenet_modules,
        sources=("ARD MobileNetV2", "RSLAD mobilenet_v2"),
    ),
)
