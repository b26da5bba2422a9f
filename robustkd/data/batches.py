"""Validation splits and batch iteration over uint8 splits, with DistributedSampler-style sharding."""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch

from robustkd.data.base import Split
from robustkd.errors import ConfigError


def stratified_split(
    labels: torch.Tensor, val_fraction: float = 0.1, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sorted (train_idx, val_idx) with each class split in the same proportion, the same for a given seed.

    The validation size is ``round(N * val_fraction)`` overall; per class it is the floor of its share,
    with the leftover examples given to the classes with the largest remainders (ties: lower label).
    """
    if isinstance(val_fraction, bool) or not isinstance(val_fraction, (int, float)):
        raise ConfigError(f"val_fraction must be a number in [0, 1), got {val_fraction!r}")
    if not (math.isfinite(val_fraction) and 0 <= val_fraction < 1):
        raise ConfigError(f"val_fraction must be in [0, 1), got {val_fraction}")
    labels = torch.as_tensor(labels).cpu()
    if labels.dim() != 1 or labels.is_floating_point():
        raise ConfigError(f"labels must be a 1-D integer tensor, got {labels.dtype} {tuple(labels.shape)}")
    n = len(labels)
    if val_fraction == 0 or n == 0:
        return torch.arange(n), torch.zeros(0, dtype=torch.int64)

    classes, counts = torch.unique(labels, sorted=True, return_counts=True)
    share = counts.double() * val_fraction
    take = share.floor().long()
    leftover = math.floor(n * val_fraction + 0.5) - int(take.sum())
    if leftover > 0:
        # Stable sort on the negated remainder: largest first, lower labels first among equals.
        order = torch.sort(-(share - take.double()), stable=True).indices
        take[order[:leftover]] += 1
    take = torch.minimum(take, counts)

    generator = torch.Generator().manual_seed(int(seed))
    val_parts = []
    for cls, k in zip(classes.tolist(), take.tolist()):
        members = (labels == cls).nonzero().squeeze(1)
        val_parts.append(members[torch.randperm(len(members), generator=generator)[:k]])
    val_idx = torch.sort(torch.cat(val_parts)).values
    in_val = torch.zeros(n, dtype=torch.bool)
    in_val[val_idx] = True
    return (~in_val).nonzero().squeeze(1), val_idx


def shard_order(
    n: int,
    *,
    shuffle: bool,
    generator: torch.Generator | None = None,
    rank: int = 0,
    world_size: int = 1,
) -> torch.Tensor:
    """This rank's example order for one epoch, as ``DistributedSampler`` (without drop_last) makes it.

    The permutation is padded by wrapping around to a multiple of ``world_size`` and dealt out
    round-robin, so every rank sees the same number of examples.
    """
    if world_size < 1 or not 0 <= rank < world_size:
        raise ConfigError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
    if shuffle and world_size > 1 and generator is None:
        # Each rank's global RNG may differ; different permutations would overlap and miss examples.
        raise ConfigError("sharded shuffling needs a generator seeded identically on every rank")
    order = torch.randperm(n, generator=generator) if shuffle else torch.arange(n)
    if world_size == 1 or n == 0:
        return order
    total = math.ceil(n / world_size) * world_size
    if total > n:
        order = torch.cat([order, order.repeat(math.ceil((total - n) / n))[: total - n]])
    return order[rank:total:world_size]


def iterate_batches(
    split: Split,
    batch_size: int,
    *,
    shuffle: bool,
    generator: torch.Generator | None = None,
    drop_last: bool = False,
    device: torch.device | str | None = None,
    rank: int = 0,
    world_size: int = 1,
) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Yields ``(x, y, index)``: x float32 in [0, 1], y int64 labels, index int64 positions in ``split``.

    All three are on ``device`` (default: where the split's images are). Images stay uint8 until a batch
    is on the device, which moves a quarter of the bytes. With ``world_size > 1`` each rank gets its shard
    of one shared permutation (pass a CPU generator seeded the same on every rank, e.g. seed + epoch).
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError(f"batch_size must be a positive integer, got {batch_size!r}")
    order = shard_order(len(split), shuffle=shuffle, generator=generator, rank=rank, world_size=world_size)
    target = torch.device(device) if device is not None else split.images.device
    image_index = order.to(split.images.device)
    label_index = order.to(split.labels.device)
    # Asynchronous copies are only safe towards an accelerator; a device-to-host one could be read early.
    non_blocking = target.type != "cpu"
    for start in range(0, len(order), batch_size):
        stop = start + batch_size
        if drop_last and stop > len(order):
            break
        x = split.images[image_index[start:stop]].to(target, non_blocking=non_blocking)
        y = split.labels[label_index[start:stop]].to(target, non_blocking=non_blocking)
        yield x.float().div_(255), y, order[start:stop].to(target, non_blocking=non_blocking)
