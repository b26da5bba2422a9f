"""torch.distributed for the training loop: torchrun's process group, the DDP student, reductions, rank 0 work.

``torchrun --nproc_per_node=N -m robustkd train ...`` starts N processes with ``RANK``, ``LOCAL_RANK`` and
``WORLD_SIZE`` set; each joins one process group (NCCL on GPUs, gloo on CPUs). Without those variables (or
with ``WORLD_SIZE=1``) everything here is a no-op and training runs in one process as before.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, TypeVar

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from robustkd.errors import ConfigError, RobustKDError

T = TypeVar("T")

# Ranks other than 0 wait while rank 0 validates (possibly under attack) and writes checkpoints; NCCL's
# default of 10 minutes would abort a long robust validation. A crashed rank still ends the job at once,
# because torchrun stops the other workers when one fails.
TIMEOUT = timedelta(minutes=60)


class StudentDDP(DistributedDataParallel):
    """PyTorch's DDP, except that a forward which cannot lead to parameter gradients bypasses it.

    Attack steps freeze the parameters (``attacks.attack_mode``) and no_grad forwards build no graph: neither
    can fire the reducer's gradient hooks, so they go straight to ``self.module``. They then touch no reducer
    state and start no collective (DDP broadcasts buffers at each forward), so attacks whose number of
    forwards depends on the data (early stopping) cannot make ranks fall out of step. Every forward that
    carries parameter gradients runs through DDP; a method must run the same number of those on every rank
    (all built-in methods do).
    """

    def forward(self, *inputs: Any, **kwargs: Any) -> Any:
        if torch.is_grad_enabled() and any(p.requires_grad for p in self.module.parameters()):
            return super().forward(*inputs, **kwargs)
        return self.module(*inputs, **kwargs)


@dataclass(frozen=True)
class Dist:
    """This process's place in the group; with ``world_size == 1`` every method is a cheap no-op."""

    device: torch.device
    rank: int = 0
    world_size: int = 1

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def rank_batch(self, batch_size: int) -> int:
        """The per-rank batch: ``batch_size`` is the global batch, split evenly over the ranks."""
        if batch_size % self.world_size:
            raise ConfigError(
                f"data.batch_size: {batch_size} is the global batch and must be divisible by the number of "
                f"processes ({self.world_size}); each process takes batch_size / {self.world_size}"
            )
        return batch_size // self.world_size

    def wrap(self, model: nn.Module) -> nn.Module:
        """The student as methods see it: DDP-wrapped when distributed (find_unused_parameters stays off:
        every trainable parameter gets a gradient in every method's loss), else the model itself."""
        if not self.enabled:
            return model
        device_ids = [self.device.index] if self.device.type == "cuda" else None
        return StudentDDP(model, device_ids=device_ids)

    def all_sum(self, values: torch.Tensor) -> torch.Tensor:
        if self.enabled:
            torch.distributed.all_reduce(values, op=torch.distributed.ReduceOp.SUM)
        return values

    def all_true_on_device(self, flag: torch.Tensor) -> torch.Tensor:
        """A boolean tensor, true where ``flag`` is true on every rank; it stays on the device (nothing is read
        back), so the training step that asks needs no host synchronisation."""
        if not self.enabled:
            return flag
        value = flag.to(torch.int32)  # collectives reduce numbers, not bools
        torch.distributed.all_reduce(value, op=torch.distributed.ReduceOp.MIN)
        return value.bool()

    def broadcast(self, obj: T) -> T:
        """Rank 0's ``obj`` on every rank."""
        if not self.enabled:
            return obj
        box = [obj]
        torch.distributed.broadcast_object_list(box, src=0)
        return box[0]

    def on_main(self, fn: Callable[[], T]) -> T:
        """Run ``fn`` on rank 0 only and hand its result to every rank.

        An error on rank 0 is raised on every rank; otherwise the others would wait for it forever.
        """
        if not self.enabled:
            return fn()
        result: Any = None
        error: BaseException | None = None
        if self.is_main:
            try:
                result = fn()
            except Exception as err:
                error = err
        # The other ranks get the error as text: any exception can be described, not every one pickled.
        description = f"{type(error).__name__}: {error}" if error is not None else None
        shared = self.broadcast(("error", description) if error is not None else ("ok", result))
        if error is not None:
            raise error
        if shared[0] == "error":
            raise RobustKDError(f"rank 0 failed: {shared[1]}")
        return shared[1]


def launched_world_size() -> int:
    """The process count torchrun (or an equivalent launcher) announced through ``WORLD_SIZE``."""
    value = os.environ.get("WORLD_SIZE", "1")
    try:
        return int(value)
    except ValueError:
        raise ConfigError(f"WORLD_SIZE={value!r} is not a number of processes") from None


def _rank_device(device: torch.device, local_rank: int) -> torch.device:
    if device.type == "cpu":
        return device
    if device.type != "cuda":
        raise ConfigError(f"device: distributed training runs on cpu (gloo) or cuda (NCCL), not {device.type}")
    if device.index is not None:
        raise ConfigError(
            f"device: under torchrun each process takes the GPU its LOCAL_RANK names; pass --device cuda (or "
            f"auto), not {device}"
        )
    if local_rank >= torch.cuda.device_count():
        raise ConfigError(f"device: LOCAL_RANK {local_rank} but only {torch.cuda.device_count()} GPUs are visible")
    return torch.device("cuda", local_rank)


@contextmanager
def distributed(device: torch.device) -> Iterator[Dist]:
    """Join the process group torchrun describes, or the one the caller already initialised.

    ``device`` is the configured device (``cuda`` becomes ``cuda:LOCAL_RANK``). A group created here is
    destroyed on exit; one the caller created is left alone.
    """
    pg = torch.distributed
    initialised = pg.is_available() and pg.is_initialized()
    if (pg.get_world_size() if initialised else launched_world_size()) <= 1:
        yield Dist(device)
        return
    if not pg.is_available():
        raise ConfigError("WORLD_SIZE > 1 but this PyTorch build has no torch.distributed")
    device = _rank_device(device, int(os.environ.get("LOCAL_RANK", "0")))
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if not initialised:
        pg.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=TIMEOUT)
    try:
        yield Dist(device, pg.get_rank(), pg.get_world_size())
        if not initialised:
            # Ranks tear down together: none closes its connections while a peer still finishes a collective.
            pg.barrier()
    finally:
        if not initialised:
            pg.destroy_process_group()
