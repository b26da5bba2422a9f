"""The teacher's outputs on the clean training images, computed once per run instead of once per epoch.

A method declares what it uses from the teacher on the batch's own x (``Method.clean_teacher``: "logits",
"input_grad"). Where that x cannot change between epochs (no augmentation), the engine computes those outputs
for the whole training split before the first step, keeps them on the device, and gives each batch its rows
in ``Batch.teacher``: a gather by dataset index, no teacher pass and no host synchronisation.

The cache is keyed by what its values depend on: the teacher's tensors and the split's (their storage and
their in-place version counters, so ``load_state_dict`` into the teacher or a new split is seen), the outputs
asked for and the autocast dtype. ``TeacherCache.valid`` compares the key; the engine rebuilds on a change.
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from typing import Any

import torch
from torch import nn

from robustkd.data import Split, iterate_batches
from robustkd.methods.base import clean_teacher_outputs

# ``auto`` keeps the cache on the device only below this size (Fashion-MNIST KDIGA: ~170 MB; CIFAR-10: ~550 MB).
MAX_AUTO_BYTES = 2 * 1024**3


def cache_bytes(split: Split, num_classes: int, names: tuple[str, ...]) -> int:
    """The bytes a float32 cache of ``names`` over ``split`` takes."""
    per_example = num_classes + (split.images[0].numel() if "input_grad" in names else 0)
    return 4 * len(split) * per_example


def cache_key(teacher: nn.Module, split: Split, names: tuple[str, ...], dtype: torch.dtype | None) -> tuple[Any, ...]:
    """What the cached values depend on, read from tensor metadata only (no device read, no hashing of data)."""
    tensors = [*teacher.parameters(), *teacher.buffers(), split.images, split.labels]
    return (tuple((t.data_ptr(), t._version, tuple(t.shape)) for t in tensors), names, dtype)


class TeacherCache:
    """Per-example teacher outputs over one split, on the device; ``lookup`` serves a batch by its indices."""

    def __init__(self, outputs: dict[str, torch.Tensor], key: tuple[Any, ...]) -> None:
        self.outputs = outputs
        self.key = key

    @classmethod
    def build(
        cls,
        teacher: nn.Module,
        split: Split,
        names: tuple[str, ...],
        batch_size: int,
        autocast: AbstractContextManager[Any] | None = None,
        dtype: torch.dtype | None = None,
    ) -> TeacherCache:
        """The outputs ``names`` for every example of ``split``, in order, batch by batch under ``autocast``."""
        parts: dict[str, list[torch.Tensor]] = {}
        for x, y, _ in iterate_batches(split, batch_size, shuffle=False):
            with autocast if autocast is not None else nullcontext():
                for name, value in clean_teacher_outputs(teacher, x, y, names).items():
                    parts.setdefault(name, []).append(value)
        outputs = {name: torch.cat(values) for name, values in parts.items()}
        return cls(outputs, cache_key(teacher, split, names, dtype))

    def valid(self, teacher: nn.Module, split: Split, names: tuple[str, ...], dtype: torch.dtype | None) -> bool:
        return self.key == cache_key(teacher, split, names, dtype)

    def lookup(self, index: torch.Tensor) -> dict[str, torch.Tensor]:
        """The batch's rows: "logits" T(x); "input_grad" ∇_x CE_mean(T(x), y) over this batch (hence / B)."""
        rows = {name: values.index_select(0, index) for name, values in self.outputs.items()}
        if "input_grad" in rows:
            rows["input_grad"] = rows["input_grad"] / len(index)
        return rows


def fits(split: Split, num_classes: int, names: tuple[str, ...], limit: int = MAX_AUTO_BYTES) -> bool:
    return cache_bytes(split, num_classes, names) <= limit
