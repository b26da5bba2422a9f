"""Datasets as uint8 tensors: search paths, verified downloads, a decode cache, splits, batches, augmentation.

``load_dataset(name)`` returns a :class:`Dataset` with uint8 ``(N, C, H, W)`` images and int64 labels;
``iterate_batches`` turns a split into float batches in [0, 1] on the training device, and
``build_augment`` gives a batch augmentation that runs there too.
"""

from robustkd.data.augment import AUGMENTS, build_augment
from robustkd.data.base import Dataset, DatasetInfo, Split
from robustkd.data.batches import iterate_batches, shard_order, stratified_split
from robustkd.data.catalog import CIFAR10, CIFAR100, DATASETS, FASHION_MNIST, MNIST, SVHN, load_dataset

__all__ = [
    "AUGMENTS",
    "CIFAR10",
    "CIFAR100",
    "DATASETS",
    "FASHION_MNIST",
    "MNIST",
    "SVHN",
    "Dataset",
    "DatasetInfo",
    "Split",
    "build_augment",
    "iterate_batches",
    "load_dataset",
    "shard_order",
    "stratified_split",
]
