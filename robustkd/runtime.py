"""Where work runs and how it is seeded: device resolution, seeds, freezing a teacher, and progress bars.

Neutral ground below every layer: the engine, the jobs and the maths packages all use it, and it imports
nothing of robustkd but its errors.
"""

from __future__ import annotations

import contextlib
import copy
import ctypes
import os
import random
import sys
from typing import Any

import numpy as np
import torch
from torch import nn

from robustkd.errors import ConfigError


def resolve_device(name: str | torch.device) -> torch.device:
    """``auto`` (CUDA when present), ``cpu``, ``cuda`` or ``cuda:N``; refused when CUDA is absent."""
    if isinstance(name, torch.device):
        return name
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError) as err:
        raise ConfigError(f"device: {name!r} is not a device (auto, cpu, cuda, cuda:N)") from err
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device: CUDA was asked for but is not available; use --device cpu or auto")
    return device


def derive_seed(seed: int, *parts: int) -> int:
    """A seed per (run seed, epoch, ...) so every epoch replays identically after a resume."""
    value = seed & 0xFFFFFFFF
    for part in parts:
        value = (value * 1_000_003 + part + 1) & 0x7FFFFFFF
    return value


def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's and torch's global generators (every device) from one number."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def freeze(model: nn.Module) -> nn.Module:
    """A teacher: eval mode, no parameter gradients, ever."""
    model.eval()
    model.requires_grad_(False)
    return model


# glibc's mallopt parameters (malloc.h) and the values set: heap chunks up to 1 GiB, and up to 2 GiB of free
# memory at the top of the heap kept rather than handed back. 32 MiB is the largest mmap threshold that every
# 64-bit glibc accepts, tried when 1 GiB is refused.
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
KEEP_TRIM, KEEP_MMAP, KEEP_MMAP_FALLBACK = 2**31 - 1, 2**30, 2**25
KEEP_FREED_ENV = "ROBUSTKD_KEEP_FREED_MEMORY"
# Settings that mean the process's allocator is already someone's choice: left alone.
ALLOCATOR_ENV = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_", "GLIBC_TUNABLES", "LD_PRELOAD")
_KEPT: list[bool] = []  # set once per process


def keep_freed_memory() -> bool:
    """Keep freed memory in this process instead of handing it back to the kernel (glibc only; once).

    A training step frees and reallocates the same large activations at every step. With glibc's defaults
    each of them is unmapped or trimmed when freed and comes back as fresh pages, faulted in one by one: keeping
    them saved a fifth to a quarter of a CPU AdvFunMatch step (docs/PERFORMANCE.md, "Whole processes").
    Raising glibc's mmap and trim thresholds (what ``MALLOC_MMAP_THRESHOLD_`` / ``MALLOC_TRIM_THRESHOLD_`` do
    at start-up) keeps those pages mapped: the process's resident memory then stays near its peak.
    Process-wide, so it is skipped where the allocator is already chosen (those variables,
    ``GLIBC_TUNABLES``, ``LD_PRELOAD``), off with ``ROBUSTKD_KEEP_FREED_MEMORY=0``, and a no-op without
    glibc. Returns whether the thresholds are set.
    """
    if not _KEPT:
        _KEPT.append(_set_thresholds())
    return _KEPT[0]


def _set_thresholds() -> bool:
    if os.environ.get(KEEP_FREED_ENV, "1").strip().lower() in ("0", "false", "no", "off"):
        return False
    if any(os.environ.get(name) for name in ALLOCATOR_ENV):
        return False
    libc = _glibc()
    if libc is None:
        return False
    if not libc.mallopt(M_MMAP_THRESHOLD, KEEP_MMAP) and not libc.mallopt(M_MMAP_THRESHOLD, KEEP_MMAP_FALLBACK):
        return False
    return bool(libc.mallopt(M_TRIM_THRESHOLD, KEEP_TRIM))


def _glibc() -> Any:
    """The C library when it is glibc (it has ``gnu_get_libc_version`` and ``mallopt``), else None."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None)  # the symbols already loaded into this process, the C library's among them
    except OSError:
        return None
    if not hasattr(libc, "gnu_get_libc_version") or not hasattr(libc, "mallopt"):
        return None
    libc.mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    libc.mallopt.restype = ctypes.c_int
    return libc


def teacher_channels_last(model: nn.Module, device: torch.device, setting: str = "auto", cuda: bool = False) -> bool:
    """Whether a frozen teacher should hold its convolution weights channels-last on ``device``.

    ``auto``: on a CPU, any network with 2-D convolutions. oneDNN then runs every convolution on
    channels-last maps instead of reordering the activations into its blocked layout and back at each call;
    the teacher's forward and input gradient cost 0.70-0.95 of the contiguous ones for the registered
    convolutional networks, except DM-small (1.13-1.21), which is never the larger network of a pair
    (``python -m benchmarks.run --only layout``, docs/PERFORMANCE.md). On CUDA ``auto`` follows ``cuda``, the
    run's ``channels_last`` switch. The layout changes which kernels run, hence the rounding: outputs agree to
    float rounding, and an input gradient can differ more only where a pre-activation lies within rounding of
    a ReLU's kink. The rule depends on the model and the device alone, so a rerun or a resume takes the same
    kernels.
    """
    if setting != "auto":
        return setting == "always"
    if device.type == "cuda":
        return cuda
    return any(isinstance(m, nn.Conv2d) for m in model.modules())


def teacher_layout(
    model: nn.Module, device: torch.device, setting: str = "auto", cuda: bool = False, *, caller_owns: bool = False
) -> nn.Module:
    """The frozen teacher in the layout :func:`teacher_channels_last` picks. ``caller_owns``: the module is the
    caller's, so a copy is converted and theirs keeps its tensors' layout (a module that cannot be copied is
    used as it is)."""
    if not teacher_channels_last(model, device, setting, cuda):
        return model
    if caller_owns:
        try:
            model = copy.deepcopy(model)
        except (TypeError, RuntimeError, AttributeError):
            return model
    return model.to(memory_format=torch.channels_last)


def _isatty(stream: Any) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False


def interactive() -> bool:
    """True when both stdout and stderr are terminals: the one rule for drawing live progress bars.

    Off a terminal (a log, a pipe) a bar would only leave its last frame behind; the per-epoch lines and the
    results are the progress there."""
    return _isatty(sys.stdout) and _isatty(sys.stderr)


def progress_bar(enabled: bool, *, transient: bool = False) -> Any:
    """A rich progress bar on stderr (stdout stays clean for JSON), or ``nullcontext()`` (which yields None)
    when ``enabled`` is False or the output is not :func:`interactive`."""
    if not (enabled and interactive()):
        return contextlib.nullcontext()
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    return Progress(
        TextColumn("{task.description:>16}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=Console(stderr=True),
        transient=transient,
    )
