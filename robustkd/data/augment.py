"""Batch augmentations on float images in [0, 1], run on whatever device the batch is on.

Crops and flips are written here with plain tensor ops (one gather per batch, no per-image loop);
AutoAugment and RandAugment come from kornia, imported only when asked for (its import takes ~2 s).
Randomness comes from torch's global generator on the batch's device, which the engine seeds.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from robustkd.data.base import DatasetInfo
from robustkd.errors import ConfigError
from robustkd.registry import Registry

Augment = Callable[[torch.Tensor], torch.Tensor]
AUGMENTS: Registry[Callable[[DatasetInfo], Augment | None]] = Registry("augmentation")


def _check_batch(x: torch.Tensor) -> None:
    if x.dim() != 4 or not x.is_floating_point():
        raise ConfigError(f"augmentations take float batches (N, C, H, W) in [0, 1], got {x.dtype} {tuple(x.shape)}")


def crop_padding(info: DatasetInfo) -> int:
    """Padding for random crops: 4 pixels at CIFAR size and above, 2 for 28x28 and smaller images."""
    return 2 if min(info.input_shape[1:]) <= 28 else 4


def random_crop(x: torch.Tensor, padding: int) -> torch.Tensor:
    """Each image shifted by up to ``padding`` pixels each way, with zeros shifted in (pad, then crop)."""
    n, c, h, w = x.shape
    if padding <= 0 or n == 0:
        return x
    padded = F.pad(x, (padding, padding, padding, padding))
    offset_y = torch.randint(0, 2 * padding + 1, (n, 1, 1, 1), device=x.device)
    offset_x = torch.randint(0, 2 * padding + 1, (n, 1, 1, 1), device=x.device)
    rows = (offset_y + torch.arange(h, device=x.device).view(1, 1, h, 1)).expand(n, c, h, w + 2 * padding)
    cols = (offset_x + torch.arange(w, device=x.device).view(1, 1, 1, w)).expand(n, c, h, w)
    return padded.gather(2, rows).gather(3, cols)


def random_flip(x: torch.Tensor, p: float = 0.5) -> torch.Tensor:
    """Each image mirrored left-right with probability ``p``."""
    flip = torch.rand(x.shape[0], device=x.device) < p
    return torch.where(flip.view(-1, 1, 1, 1), x.flip(3), x)


class CropFlip:
    """Random crop with zero padding and/or random horizontal flip."""

    def __init__(self, padding: int = 0, flip: bool = False) -> None:
        self.padding = padding
        self.flip = flip

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        _check_batch(x)
        if self.padding:
            x = random_crop(x, self.padding)
        if self.flip:
            x = random_flip(x)
        return x

    def __repr__(self) -> str:
        return f"CropFlip(padding={self.padding}, flip={self.flip})"


class KorniaPolicy:
    """A kornia auto-augmentation policy, made to accept greyscale and to keep values in [0, 1].

    kornia's colour operations require three channels, so a one-channel batch is repeated to three and
    averaged back afterwards (the colour ops then act as their greyscale counterparts).

    kornia draws one sub-policy for a whole batch; the papers' pipelines (torchvision transforms in a data
    loader) draw one per image. A whole batch inverted or solarised at once gives a batch of one-class
    teacher targets and a gradient about 4x the usual, which can kill every ReLU of a small student
    (docs/methods/advfunmatch.md, "Stability"), so each image gets its own draw, as in the papers.
    """

    def __init__(self, module: torch.nn.Module) -> None:
        self.module = module

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        _check_batch(x)
        grey = x.shape[1] == 1
        with torch.no_grad():
            x3 = x.repeat(1, 3, 1, 1) if grey else x
            out = torch.cat([self.module(image[None]) for image in x3])
        if grey:
            out = out.mean(dim=1, keepdim=True)
        return out.clamp_(0.0, 1.0)

    def __repr__(self) -> str:
        return f"KorniaPolicy({type(self.module).__name__})"


@AUGMENTS.register("none")
def _none(info: DatasetInfo) -> Augment | None:
    return None


@AUGMENTS.register("crop_flip")
def _crop_flip(info: DatasetInfo) -> Augment | None:
    return CropFlip(padding=crop_padding(info), flip=True)


@AUGMENTS.register("crop")
def _crop(info: DatasetInfo) -> Augment | None:
    return CropFlip(padding=crop_padding(info))


@AUGMENTS.register("flip")
def _flip(info: DatasetInfo) -> Augment | None:
    return CropFlip(flip=True)


@AUGMENTS.register("autoaugment")
def _autoaugment(info: DatasetInfo) -> Augment | None:
    from kornia.augmentation.auto import AutoAugment

    return KorniaPolicy(AutoAugment(policy="cifar10"))


@AUGMENTS.register("randaugment")
def _randaugment(info: DatasetInfo) -> Augment | None:
    from kornia.augmentation.auto import RandAugment

    return KorniaPolicy(RandAugment(n=2, m=9))


def build_augment(name: str, info: DatasetInfo) -> Augment | None:
    """The named augmentation for ``info``'s images, or None for ``"none"``.

    Flips are offered for every dataset but are wrong for digits; ``info.default_augment`` is the safe choice.
    """
    return AUGMENTS.get(name)(info)
