"""The model registry, its metadata and ``create_model``; architecture modules register into ``MODELS``."""

from __future__ import annotations

import difflib
import inspect
import math
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from robustkd.errors import ConfigError
from robustkd.models.layers import Normalize
from robustkd.registry import Registry

MODELS: Registry[Callable[..., nn.Module]] = Registry("model")

TIMM_PREFIX = "timm/"

# Every constructor takes these; anything else it accepts is an architecture option.
_COMMON_ARGS = ("num_classes", "in_channels", "input_size")

F = TypeVar("F", bound=Callable[..., nn.Module])

# The largest model built: 1e9 parameters are 4 GB of float32 weights and about four times that to train
# (gradients, optimiser state), while WRN-34-10, the largest usual teacher, has 46M. Arguments past it are a
# typo or an edited sidecar, and building them would end in an out-of-memory crash instead of a message.
MAX_PARAMETERS = 1_000_000_000
# Integer architecture options are refused above these before even a build on the meta device, which
# allocates no tensors but still creates a Python module per layer (a few milliseconds per ViT block).
MAX_OPTION = 100_000
MAX_DEPTH = 1_000  # options named ``depth``: layers, not channels


@dataclass(frozen=True)
class ModelInfo:
    """What is known about an architecture without building it (copied into checkpoint sidecars)."""

    name: str
    summary: str
    # The input sizes the architecture is meant for and tested at; others may work.
    input_sizes: tuple[int, ...]
    # True when the body uses only the module types in ``layers.BOUNDABLE_TYPES``.
    boundable: bool
    reference: str = ""


_INFO: dict[str, ModelInfo] = {}


def register_model(
    *, boundable: bool, input_sizes: tuple[int, ...] = (28, 32), reference: str = ""
) -> Callable[[F], F]:
    """Register a constructor under its function name, with its metadata."""

    def decorator(fn: F) -> F:
        name = fn.__name__
        MODELS.add(name, fn)
        summary = (inspect.getdoc(fn) or "").split("\n", 1)[0]
        _INFO[name] = ModelInfo(name, summary, tuple(input_sizes), boundable, reference)
        return fn

    return decorator


def list_models(pattern: str = "*", exclude: str | None = None) -> list[str]:
    """Registered architecture names matching a wildcard pattern (``timm/...`` names are not listed)."""
    return MODELS.names(pattern, exclude)


def model_info(arch: str) -> ModelInfo:
    """Metadata of a registered architecture."""
    if arch.startswith(TIMM_PREFIX):
        return ModelInfo(arch, "timm model", (), boundable=False, reference="timm")
    MODELS.get(arch)  # raises with close matches
    return _INFO[arch]


def model_options(arch: str) -> dict[str, Any]:
    """The options a registered architecture accepts beyond the common ones, with their defaults."""
    params = inspect.signature(MODELS.get(arch)).parameters
    return {
        name: (None if p.default is inspect.Parameter.empty else p.default)
        for name, p in params.items()
        if name not in _COMMON_ARGS and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
    }


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameters (shared ones counted once)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def create_model(
    arch: str,
    *,
    num_classes: int = 10,
    in_channels: int = 3,
    input_size: int = 32,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    **kwargs: Any,
) -> nn.Module:
    """Build ``Sequential(normalize=Normalize(mean, std), net=<arch body>)`` for images in [0, 1].

    ``mean``/``std`` default to 0/1 per channel (no normalisation); a single value applies to every
    channel. Options set to ``None`` are dropped so the architecture's defaults apply. ``timm/<name>``
    builds a timm model when timm is installed (never downloading weights). A registered architecture
    is first built on the meta device and refused (``ConfigError``) when it would exceed
    ``MAX_PARAMETERS``, so absurd options end in a message, not an out-of-memory crash.
    """
    build = _builder(arch, num_classes, in_channels, input_size, mean, std, kwargs)
    if not arch.startswith(TIMM_PREFIX):
        shapes = _meta_shapes(arch, build, kwargs)
        total = sum(math.prod(shape) for shape in shapes.values())
        if total > MAX_PARAMETERS:
            raise ConfigError(
                f"model {arch!r} with {_show_options(kwargs)} would hold {total:,} parameters "
                f"({total * 4 / 2**30:,.1f} GiB in float32), more than the {MAX_PARAMETERS:,} allowed; "
                "check the architecture's options"
            )
    return build()


def model_shapes(
    arch: str,
    *,
    num_classes: int = 10,
    in_channels: int = 3,
    input_size: int = 32,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    **kwargs: Any,
) -> dict[str, tuple[int, ...]]:
    """Shapes of the state dict ``create_model`` would give, found on the meta device (nothing allocated)."""
    if arch.startswith(TIMM_PREFIX):
        raise ConfigError(f"model {arch!r}: shapes are known only for registered architectures, not timm ones")
    build = _builder(arch, num_classes, in_channels, input_size, mean, std, kwargs)
    return _meta_shapes(arch, build, kwargs)


def _builder(
    arch: str,
    num_classes: int,
    in_channels: int,
    input_size: int,
    mean: Sequence[float] | None,
    std: Sequence[float] | None,
    kwargs: dict[str, Any],
) -> Callable[[], nn.Module]:
    """Check the arguments and return the function that builds the model (on the current default device)."""
    for field, value in (
        ("num_classes", num_classes),
        ("in_channels", in_channels),
        ("input_size", input_size),
    ):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"{field} must be a positive integer, got {value!r}")
    mean_values = _per_channel("mean", mean, 0.0, in_channels)
    std_values = _per_channel("std", std, 1.0, in_channels)
    if any(s <= 0 for s in std_values):
        raise ConfigError(f"std must be positive, got {std_values}")
    options = {key: value for key, value in kwargs.items() if value is not None}

    if arch.startswith(TIMM_PREFIX):
        from robustkd.models._timm_compat import create_timm_model

        def body() -> nn.Module:
            return create_timm_model(
                arch[len(TIMM_PREFIX) :],
                num_classes=num_classes,
                in_channels=in_channels,
                input_size=input_size,
                **options,
            )
    else:
        constructor = MODELS.get(arch)
        _check_options(arch, constructor, options)
        for key, value in options.items():
            limit = MAX_DEPTH if key == "depth" else MAX_OPTION
            if isinstance(value, int) and not isinstance(value, bool) and abs(value) > limit:
                raise ConfigError(
                    f"model {arch!r}: option {key}={value} is over {limit:,}; check the architecture's options"
                )

        def body() -> nn.Module:
            return constructor(num_classes=num_classes, in_channels=in_channels, input_size=input_size, **options)

    return lambda: nn.Sequential(OrderedDict(normalize=Normalize(mean_values, std_values), net=body()))


class _SkipRandomInit(TorchFunctionMode):
    """Random initialisation as a no-op: meta tensors hold no values, and PyTorch's meta ``normal_`` goes
    through a slow Python decomposition (seconds for a WRN)."""

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        if func in (torch.Tensor.normal_, torch.Tensor.uniform_):
            return args[0]
        return func(*args, **(kwargs or {}))


def _meta_shapes(arch: str, build: Callable[[], nn.Module], kwargs: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    try:
        with torch.device("meta"), _SkipRandomInit():
            model = build()
    except (RuntimeError, OverflowError, MemoryError, TypeError, ValueError) as err:
        if isinstance(err, ConfigError):
            raise
        # Sizes past what a tensor can describe, or options of the wrong type.
        reason = (str(err).strip().splitlines() or [type(err).__name__])[0][:200]
        raise ConfigError(f"model {arch!r} cannot be built with {_show_options(kwargs)} ({reason})") from None
    return {key: tuple(value.shape) for key, value in model.state_dict().items()}


def _show_options(options: dict[str, Any]) -> str:
    shown = ", ".join(f"{key}={value!r}" for key, value in options.items() if value is not None)
    return shown or "its default options"


def _per_channel(field: str, values: Sequence[float] | None, default: float, channels: int) -> list[float]:
    if values is None:
        return [default] * channels
    if isinstance(values, (int, float)):
        values = [values]
    values = [float(v) for v in values]
    if not all(math.isfinite(v) for v in values):
        raise ConfigError(f"{field} must be finite numbers, got {values}")
    if len(values) == 1:
        return values * channels
    if len(values) != channels:
        raise ConfigError(f"{field} has {len(values)} values but the model has {channels} input channels")
    return values


def _check_options(arch: str, constructor: Callable[..., nn.Module], options: dict[str, Any]) -> None:
    params = inspect.signature(constructor).parameters
    if any(p.kind is p.VAR_KEYWORD for p in params.values()):
        return
    accepted = list(model_options(arch))
    unknown = sorted(set(options) - set(accepted))
    if not unknown:
        return
    hints = []
    for name in unknown:
        close = difflib.get_close_matches(name, accepted, n=2, cutoff=0.5)
        hints.append(f"{name!r}" + (f" (did you mean {' or '.join(map(repr, close))}?)" if close else ""))
    known = ", ".join(accepted) if accepted else "none"
    raise ConfigError(f"model {arch!r} has no option {', '.join(hints)}; its options are: {known}")
