"""A user's own ``nn.Module`` as a robustkd model: ``wrap(model, mean=..., std=..., ...)``.

``WrappedModel`` is ``Sequential(normalize=Normalize(mean, std), net=<the user's module>)``, the layout every
registered architecture has, so it takes images in [0, 1], saves as safetensors with the same key names, and
(when the user's module is built from the supported layers) the bound propagators can walk it. Without
mean/std the ``Normalize`` is the identity: a module that normalises inside, or needs no normalisation,
takes [0, 1] images as they come.

A checkpoint of such a model names its architecture as an import path (``pkg.mod:Class``). That path is
data: :func:`import_arch` imports it only when the caller passes it explicitly, never because a file says so.
"""

from __future__ import annotations

import importlib
import math
import re
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from robustkd.errors import ConfigError
from robustkd.models.layers import Normalize

# ``package.module:Qual.Name``: dotted identifiers on both sides of one colon.
_IMPORT_PATH = re.compile(r"^[A-Za-z_][\w]*(\.[A-Za-z_]\w*)*:[A-Za-z_]\w*(\.[A-Za-z_]\w*)*$")


class WrappedModel(nn.Sequential):
    """A user's module behind a ``Normalize``, with what it expects: input shape, classes, normalisation.

    The forward is ``nn.Sequential``'s (normalise, then the user's module), which certification relies on.
    """

    def __init__(
        self,
        model: nn.Module,
        mean: Sequence[float],
        std: Sequence[float],
        input_shape: tuple[int, ...] | None = None,
        num_classes: int | None = None,
        arch_args: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__(OrderedDict(normalize=Normalize(mean, std), net=model))
        self.input_shape = input_shape
        self.num_classes = num_classes
        self.arch_args = dict(arch_args) if arch_args is not None else None

    @property
    def arch(self) -> str:
        """The import path of the user's class, ``module:qualname``."""
        return arch_path(self.net)

    def describe(self) -> dict[str, Any]:
        """The sidecar-like description (``arch``, ``arch_args``, classes, input shape, mean/std)."""
        return {
            "arch": self.arch,
            "arch_args": dict(self.arch_args or {}),
            "num_classes": self.num_classes,
            "input_shape": list(self.input_shape) if self.input_shape is not None else None,
            "mean": self.normalize.mean.flatten().tolist(),
            "std": self.normalize.std.flatten().tolist(),
        }


def wrap(
    model: nn.Module,
    *,
    mean: Sequence[float] | float | None = None,
    std: Sequence[float] | float | None = None,
    input_shape: Sequence[int] | None = None,
    num_classes: int | None = None,
    arch_args: Mapping[str, Any] | None = None,
) -> WrappedModel:
    """State what ``model`` expects, so robustkd can train, evaluate, certify, export and save it.

    ``mean``/``std``: the normalisation robustkd puts in front (images reach ``model`` as ``(x - mean) / std``);
    leave both out when ``model`` takes images in [0, 1] (it normalises inside, or needs nothing).
    ``input_shape`` (C, H, W) and ``num_classes``: checked against the dataset; left out, the dataset's are
    taken. ``arch_args``: the keyword arguments that rebuild ``model`` from its class, recorded in checkpoints
    so ``load_model(path, arch="pkg.mod:Class")`` can construct it. A ``WrappedModel`` is returned as it is.
    """
    if isinstance(model, WrappedModel):
        return model
    if not isinstance(model, nn.Module):
        raise ConfigError(f"wrap: expected a torch.nn.Module, got {type(model).__name__}")
    shape = _input_shape(input_shape)
    classes = _num_classes(num_classes)
    means, stds = _normalisation(mean, std, shape[0] if shape is not None else None)
    return WrappedModel(model, means, stds, shape, classes, arch_args)


def _input_shape(value: Sequence[int] | None) -> tuple[int, ...] | None:
    if value is None:
        return None
    shape = tuple(value) if isinstance(value, Sequence) else ()
    if len(shape) != 3 or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in shape):
        raise ConfigError(f"input_shape: give (channels, height, width) as positive integers, got {value!r}")
    return shape


def _num_classes(value: int | None) -> int | None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 2):
        raise ConfigError(f"num_classes: must be an integer >= 2, got {value!r}")
    return value


def _normalisation(
    mean: Sequence[float] | float | None, std: Sequence[float] | float | None, channels: int | None
) -> tuple[list[float], list[float]]:
    """Per-channel mean and std (one value broadcasts over every channel); none given: the identity."""
    means = _values("mean", mean, 0.0)
    stds = _values("std", std, 1.0)
    if len(means) == 1 and len(stds) > 1:
        means = means * len(stds)
    if len(stds) == 1 and len(means) > 1:
        stds = stds * len(means)
    if len(means) != len(stds):
        raise ConfigError(f"mean has {len(means)} values but std has {len(stds)}")
    if channels is not None and len(means) not in (1, channels):
        raise ConfigError(f"mean/std have {len(means)} values but input_shape has {channels} channels")
    if any(s <= 0 for s in stds):
        raise ConfigError(f"std: must be positive, got {stds}")
    return means, stds


def _values(name: str, value: Sequence[float] | float | None, default: float) -> list[float]:
    if value is None:
        return [default]
    items = [value] if isinstance(value, int | float) else list(value)
    try:
        numbers = [float(v) for v in items]
    except (TypeError, ValueError):
        raise ConfigError(f"{name}: must be numbers, got {value!r}") from None
    if not numbers or not all(math.isfinite(v) for v in numbers):
        raise ConfigError(f"{name}: must be one or more finite numbers, got {value!r}")
    return numbers


def arch_path(module: nn.Module) -> str:
    """``module:qualname`` of ``module``'s class: how a checkpoint names user code."""
    cls = type(module)
    return f"{cls.__module__}:{cls.__qualname__}"


def module_marker(module: nn.Module) -> str:
    """How a run config records an in-memory module it cannot hold: ``<nn.Module MyNet>``."""
    inner = module.net if isinstance(module, WrappedModel) else module
    return f"<nn.Module {type(inner).__name__}>"


def is_module_marker(value: Any) -> bool:
    return isinstance(value, str) and value.startswith("<nn.Module ") and value.endswith(">")


def is_user_arch(arch: Any) -> bool:
    """True for an architecture named by import path (``pkg.mod:Class``); registered names have no colon."""
    return isinstance(arch, str) and ":" in arch


def import_arch(spec: str) -> Callable[..., nn.Module]:
    """Import the class (or factory) ``spec`` names as ``pkg.mod:Qual.Name``.

    Call this only with a path the user typed: importing runs the module's code.
    """
    if not isinstance(spec, str) or not _IMPORT_PATH.match(spec):
        raise ConfigError(f"arch: {spec!r} is no import path; write it as 'package.module:ClassName'")
    module_name, qualname = spec.split(":")
    try:
        obj: Any = importlib.import_module(module_name)
    except ImportError as err:
        raise ConfigError(f"arch: cannot import {module_name!r} for {spec!r} ({err}); is it on sys.path?") from None
    for part in qualname.split("."):
        if not hasattr(obj, part):
            raise ConfigError(f"arch: module {module_name!r} has no {qualname!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise ConfigError(f"arch: {spec!r} is not a class or function")
    return obj


def build_user_model(spec: str, args: Mapping[str, Any] | None = None) -> nn.Module:
    """``spec(**args)``, checked to be an ``nn.Module``; the caller named ``spec`` explicitly."""
    factory = import_arch(spec)
    try:
        model = factory(**dict(args or {}))
    except TypeError as err:
        raise ConfigError(
            f"arch: {spec}(**{dict(args or {})!r}) failed ({err}); pass the constructor's arguments "
            "(arch_args=...) or load into an instance with model=..."
        ) from None
    if not isinstance(model, nn.Module):
        raise ConfigError(f"arch: {spec} returned a {type(model).__name__}, not a torch.nn.Module")
    return model


def check_model(model: nn.Module, input_shape: Sequence[int], num_classes: int, what: str, data: str) -> None:
    """Stated shape and classes against the data's, then one forward on a dummy batch; one-line errors.

    ``what`` names the model in the message (``model``, ``teacher``), ``data`` the dataset.
    """
    name = type(model.net if isinstance(model, WrappedModel) else model).__name__
    shape = tuple(input_shape)
    stated = model if isinstance(model, WrappedModel) else None
    if stated is not None and stated.input_shape is not None and tuple(stated.input_shape) != shape:
        raise ConfigError(
            f"{what}: {name} was wrapped for input {tuple(stated.input_shape)} but {data} has {shape}; "
            "fix wrap(..., input_shape=...) or choose the matching dataset"
        )
    if stated is not None and stated.num_classes is not None and stated.num_classes != num_classes:
        raise ConfigError(
            f"{what}: {name} was wrapped for {stated.num_classes} classes but {data} has {num_classes}; "
            "fix wrap(..., num_classes=...) or choose the matching dataset"
        )
    out = _probe(model, shape, what, name, data)
    if out.dim() != 2 or out.shape[-1] != num_classes:
        raise ConfigError(
            f"{what}: {name} outputs shape {tuple(out.shape)} for a batch of {data} inputs {shape}; "
            f"expected (batch, {num_classes}) logits"
        )


def _probe(model: nn.Module, shape: tuple[int, ...], what: str, name: str, data: str) -> torch.Tensor:
    """One forward of two zero images in eval mode (BatchNorm would refuse one image in train mode)."""
    param = next(model.parameters(), None)
    probe = torch.zeros(2, *shape, device=param.device if param is not None else "cpu")
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            return model(probe)
    except (RuntimeError, ValueError, TypeError, IndexError) as err:
        first = (str(err).strip().splitlines() or [type(err).__name__])[0][:200]
        raise ConfigError(f"{what}: {name} cannot take {data} input {shape} ({first})") from None
    finally:
        model.train(was_training)
