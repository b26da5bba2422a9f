"""What every benchmark shares: the setting record, data and models, and interleaved timing."""

from __future__ import annotations

import contextlib
import math
import os
import platform
import resource
import statistics
import time
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn

from robustkd.models import create_model
from robustkd.runtime import teacher_layout

FASHION_MNIST = (1, 28, 28)
INPUT = FASHION_MNIST  # the input shape (C, H, W) of every benchmark's models; `--dataset-shape` sets it
CLASSES = 10
# Architectures by role ("student", "teacher"), replacing a benchmark's defaults; `--arch` sets them.
ARCH: dict[str, str] = {}
# Each timed sample runs a function often enough to last this long, so timer resolution and one-off
# scheduler hiccups weigh little against it.
MIN_SAMPLE_S = 0.05
# Where every benchmark's models and batches live; `python -m benchmarks.run --device` sets it once.
DEVICE = torch.device("cpu")


def use_device(name: str) -> torch.device:
    """Run the benchmarks on ``name`` (cpu, cuda, cuda:N); refused when that device is not there."""
    global DEVICE
    device = torch.device(name)
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"--device {name}: only cpu and cuda are supported")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: this machine has no CUDA device")
    DEVICE = device
    return device


def use_shape(text: str) -> tuple[int, int, int]:
    """Models and batches of shape ``C,H,W`` (e.g. ``3,32,32``); anything but Fashion-MNIST's 1,28,28 is
    synthetic data (timings do not depend on pixel values)."""
    global INPUT
    try:
        shape = tuple(int(v) for v in text.split(","))
    except ValueError:
        shape = ()
    if len(shape) != 3 or min(shape) < 1 or shape[1] != shape[2]:
        raise ValueError(f"--dataset-shape {text}: expected C,H,W with H == W, e.g. 3,32,32")
    INPUT = shape  # type: ignore[assignment]
    return INPUT


def use_arch(text: str) -> dict[str, str]:
    """Architectures by role, ``role=arch`` pairs separated by commas (``student=resnet18,teacher=wrn_34_10``)."""
    from robustkd.models import MODELS

    pairs = [item.split("=", 1) for item in text.split(",") if item]
    if not pairs or any(len(pair) != 2 for pair in pairs):
        raise ValueError(f"--arch {text}: expected role=arch pairs, e.g. student=resnet18,teacher=wrn_34_10")
    for role, arch in pairs:
        if role not in ("student", "teacher"):
            raise ValueError(f"--arch {text}: unknown role {role!r} (student, teacher)")
        MODELS.get(arch)  # an unknown name raises, listing close matches
    ARCH.update(dict(pairs))
    return ARCH


def arch(role: str, default: str) -> str:
    return ARCH.get(role, default)


def synchronize() -> None:
    """Wait for the device's queued work, so a timer around it measures the work and not its launch."""
    if DEVICE.type == "cuda":
        torch.cuda.synchronize(DEVICE)


def _device_name() -> str:
    return torch.cuda.get_device_name(DEVICE) if DEVICE.type == "cuda" else platform.processor() or "cpu"


def setting(threads: int, repeats: int, **extra: Any) -> dict[str, Any]:
    """The conditions a figure was measured under; printed with every benchmark's JSON.

    The 1-minute load average at the start says how busy a shared machine was (other people's jobs).
    """
    return {
        "device": str(DEVICE),
        "device_name": _device_name(),
        "cpu_count": os.cpu_count(),
        "threads": threads,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "repeats": repeats,
        "load_average": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,
        "input": list(INPUT),
        **extra,
    }


def load_images(n: int, seed: int = 0, split: str = "train") -> tuple[torch.Tensor, torch.Tensor, str]:
    """``n`` Fashion-MNIST images in [0, 1] (N, 1, 28, 28) with labels, and where they came from.

    Falls back to uniform noise with random labels when the dataset is not installed, so timings (which do
    not depend on pixel values) still run; accuracies are then meaningless and the source says so.
    """
    generator = torch.Generator().manual_seed(seed)
    if INPUT != FASHION_MNIST:
        x = torch.rand((n, *INPUT), generator=generator)
        y = torch.randint(0, CLASSES, (n,), generator=generator)
        return x.to(DEVICE), y.to(DEVICE), "synthetic {}x{}x{}".format(*INPUT)
    try:
        from robustkd.data import load_dataset

        data = getattr(load_dataset("fashion-mnist"), split)
    except Exception:  # any failure to find or read the files: the fallback below is announced in `source`
        x = torch.rand((n, *INPUT), generator=generator)
        y = torch.randint(0, CLASSES, (n,), generator=generator)
        return x.to(DEVICE), y.to(DEVICE), "random (Fashion-MNIST not installed)"
    index = torch.randperm(len(data), generator=generator)[:n]
    x, y = data.images[index].float().div(255), data.labels[index]
    return x.to(DEVICE), y.to(DEVICE), f"fashion-mnist {split}"


def make_model(arch: str, seed: int = 0) -> nn.Module:
    """A registered architecture for inputs of shape ``INPUT``, initialised from ``seed``."""
    torch.manual_seed(seed)
    return create_model(arch, num_classes=CLASSES, in_channels=INPUT[0], input_size=INPUT[1]).to(DEVICE)


def frozen(model: nn.Module) -> nn.Module:
    """A teacher as a hand-written loop holds it: eval mode, no parameter gradients."""
    model.eval()
    model.requires_grad_(False)
    return model


def engine_teacher(model: nn.Module) -> nn.Module:
    """A teacher as the training engine holds it on ``DEVICE``: frozen, in the layout ``teacher_channels_last:
    auto`` picks (channels-last convolution weights on a CPU)."""
    return teacher_layout(frozen(model), DEVICE)


def median(values: list[float]) -> float:
    return statistics.median(values)


def calibrate(fn: Callable[[], Any], warmup: int = 2) -> int:
    """Calls per sample so that one sample lasts about MIN_SAMPLE_S (after ``warmup`` untimed calls)."""
    for _ in range(max(0, warmup - 1)):
        fn()
    synchronize()
    start = time.perf_counter()
    fn()
    synchronize()
    once = time.perf_counter() - start
    return max(1, math.ceil(MIN_SAMPLE_S / max(once, 1e-6)))


def cpu_seconds() -> float:
    """User + system CPU time of this process so far (every thread): what a timed call costs the machine,
    whatever else runs on it. System time counts too: memory the allocator returns to the OS and faults back
    in is paid there."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def sample_both(fn: Callable[[], Any], calls: int) -> tuple[float, float]:
    """Wall seconds and CPU seconds (user + system) per call, averaged over ``calls`` back-to-back calls."""
    synchronize()
    cpu, start = cpu_seconds(), time.perf_counter()
    for _ in range(calls):
        fn()
    synchronize()
    return (time.perf_counter() - start) / calls, (cpu_seconds() - cpu) / calls


def sample(fn: Callable[[], Any], calls: int) -> float:
    """Seconds per call, averaged over ``calls`` back-to-back calls."""
    return sample_both(fn, calls)[0]


def interleaved(
    fns: dict[str, Callable[[], Any]],
    repeats: int,
    warmup: int = 2,
    cpu: dict[str, list[float]] | None = None,
) -> dict[str, list[float]]:
    """Seconds per call of each function, one sample per round, the functions taking turns in every round.

    Load from other processes then hits all functions of a round alike, so ratios taken within a round
    (see :func:`round_ratios`) are steadier than ratios of separately measured medians. The order turns by
    one place every round: a function timed right after a large one (CROWN, a training step) starts with
    cold caches, measured at up to 6 % of an IBP pass, and no function should always take that seat.
    ``cpu``, when given, receives the CPU seconds (user + system) per call of the same samples.
    """
    calls = {name: calibrate(fn, warmup) for name, fn in fns.items()}
    samples: dict[str, list[float]] = {name: [] for name in fns}
    names = list(fns)
    for r in range(repeats):
        turn = r % len(names)
        for name in names[turn:] + names[:turn]:
            fn = fns[name]
            wall, used = sample_both(fn, calls[name])
            samples[name].append(wall)
            if cpu is not None:
                cpu.setdefault(name, []).append(used)
    return samples


def round_ratios(numerator: list[float], denominator: list[float]) -> list[float]:
    """Per-round ratios of two interleaved series."""
    return [a / b for a, b in zip(numerator, denominator, strict=True)]


def ms(seconds: float) -> float:
    return round(seconds * 1e3, 3)


def summary(samples: list[float]) -> dict[str, float]:
    """Median and spread (min, max) of a series of seconds, in milliseconds."""
    return {"median_ms": ms(median(samples)), "min_ms": ms(min(samples)), "max_ms": ms(max(samples))}


def robust_model(quick: bool = False, seed: int = 0) -> tuple[nn.Module, dict[str, Any]]:
    """dm_small adversarially trained on Fashion-MNIST for a few seconds, so attacks face a model with
    robust and non-robust points alike (against an untrained one every attack wins at once).

    PGD-AT (robustkd's ``pgd_at``, eps 0.1, 5 steps of 0.025) on 10 000 training images for 2 epochs, plain
    momentum SGD; returned in eval mode with a description of how it was made.
    """
    from robustkd.methods import Batch, StepInfo, build_method

    n, epochs, steps = (256, 1, 1) if quick else (10_000, 2, 5)
    x, y, source = load_images(n, seed=seed)
    model = make_model("dm_small", seed=seed).train()
    method = build_method("pgd_at", {"threat": {"eps": 0.1, "step_size": 0.025, "steps": steps}})
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    generator = torch.Generator().manual_seed(seed)
    info = StepInfo(epoch=0, step=0, epochs=epochs, steps_per_epoch=1)
    for _ in range(epochs):
        order = torch.randperm(n, generator=generator)
        for start in range(0, n, 128):
            index = order[start : start + 128]
            loss = method(model, None, Batch(x[index], y[index]), info).loss
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    model.eval()
    training = f"pgd_at eps 0.1, {steps} steps of 0.025, {epochs} epochs on {n} images, SGD lr 0.05"
    about = {"arch": "dm_small", "training": training, "data": source}
    return model, about


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return float((model(x).argmax(1) == y).float().mean())


@contextlib.contextmanager
def models_of(shape: tuple[int, int, int], **roles: str) -> Iterator[None]:
    """Within the block, models and batches of input ``shape`` and architectures ``roles`` (a benchmark part
    with its own models, such as the CIFAR one); the run's settings come back afterwards."""
    global INPUT
    saved_input, saved_arch = INPUT, dict(ARCH)
    INPUT = shape  # type: ignore[assignment]
    ARCH.update(roles)
    try:
        yield
    finally:
        INPUT = saved_input
        ARCH.clear()
        ARCH.update(saved_arch)
