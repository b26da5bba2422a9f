"""Where work runs and how it is seeded: device resolution, seeds, freezing a teacher, and progress bars.

Neutral ground below every layer: the engine, the jobs and the maths packages all use it, and it imports
nothing of robustkd but its errors.
"""

from __future__ import annotations

import contextlib
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
