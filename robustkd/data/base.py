"""The containers every loader returns: dataset metadata and uint8 image splits."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from robustkd.errors import DataError


@dataclass(frozen=True)
class DatasetInfo:
    """What a model needs to know about a dataset; copied into checkpoint sidecars."""

    name: str
    num_classes: int
    input_shape: tuple[int, int, int]  # (C, H, W)
    mean: tuple[float, ...]  # per channel, for the model's Normalize layer
    std: tuple[float, ...]
    classes: tuple[str, ...]
    default_augment: str  # "none" where flips would change the class (digits), "crop_flip" for natural images

    def __post_init__(self) -> None:
        channels = self.input_shape[0]
        if len(self.classes) != self.num_classes:
            raise DataError(f"{self.name}: {len(self.classes)} class names for {self.num_classes} classes")
        if len(self.mean) != channels or len(self.std) != channels:
            raise DataError(f"{self.name}: mean/std need {channels} values, got {self.mean} and {self.std}")
        if any(s <= 0 for s in self.std):
            raise DataError(f"{self.name}: std must be positive, got {self.std}")


@dataclass
class Split:
    """Images as uint8 (N, C, H, W) and labels as int64 (N,), on any device."""

    images: torch.Tensor
    labels: torch.Tensor

    def __post_init__(self) -> None:
        if self.images.dtype != torch.uint8 or self.images.dim() != 4:
            raise DataError(
                f"split images must be uint8 (N, C, H, W), got {self.images.dtype} {tuple(self.images.shape)}"
            )
        if self.labels.dtype != torch.int64 or self.labels.dim() != 1:
            raise DataError(f"split labels must be int64 (N,), got {self.labels.dtype} {tuple(self.labels.shape)}")
        if len(self.images) != len(self.labels):
            raise DataError(f"split has {len(self.images)} images but {len(self.labels)} labels")

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, index: torch.Tensor) -> Split:
        """The examples at ``index`` (integer or boolean tensor), in that order."""
        index = torch.as_tensor(index)
        return Split(self.images[index.to(self.images.device)], self.labels[index.to(self.labels.device)])

    def to(self, device: torch.device | str | None) -> Split:
        """A copy on ``device``, still uint8 (a quarter of the memory of float32)."""
        return Split(self.images.to(device), self.labels.to(device))


@dataclass
class Dataset:
    """A named dataset with its train and test splits.

    ``source`` says which files were read (and, for CIFAR-10, whether the official binary release or the
    JPEG re-encoding), so reports can state it.
    """

    info: DatasetInfo
    train: Split
    test: Split
    source: str = ""
