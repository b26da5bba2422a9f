"""The method interface: a small object that turns (student, teacher, batch) into a loss."""

from __future__ import annotations

import dataclasses
import difflib
import warnings
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from robustkd.errors import ConfigError
from robustkd.registry import Registry


@dataclass
class Batch:
    """One training batch after augmentation: images in [0, 1] on the training device."""

    x: torch.Tensor
    y: torch.Tensor
    index: torch.Tensor | None = None  # dataset indices, for per-example caches
    # The teacher's outputs on this x where the engine caches them (see ``Method.clean_teacher``): "logits" is
    # T(x), "input_grad" is ∇_x CE_mean(T(x), y) over this batch. Empty: the method computes what it needs.
    teacher: dict[str, torch.Tensor] = field(default_factory=dict)


@dataclass
class StepInfo:
    """Where training stands, for methods with schedules (eps ramps, warm-ups, late-starting weights)."""

    epoch: int  # 0-based
    step: int  # global optimisation step, 0-based
    epochs: int
    steps_per_epoch: int

    @property
    def progress(self) -> float:
        """Fraction of training done, in [0, 1]."""
        return min(1.0, self.step / max(1, self.epochs * self.steps_per_epoch))


@dataclass
class Output:
    """A method's result: the loss to minimise, scalars to log and, optionally, logits for accuracy."""

    loss: torch.Tensor
    logs: dict[str, float | torch.Tensor] = field(default_factory=dict)
    logits: torch.Tensor | None = None  # student logits on the batch's clean x, when computed anyway


class Method:
    """Base class. Subclasses are dataclasses whose fields are the method's options.

    A method never moves tensors between devices, wraps models or logs by itself; it may call
    ``robustkd.attacks`` for an inner maximisation and must state the model mode it uses there.
    A method with a ball (an attack's, or a certified method's training radius) has one field ``threat``, a
    :class:`robustkd.attacks.ThreatModel`; ``getattr(method, "threat", None)`` is None for the others.
    """

    name: ClassVar[str] = ""
    needs_teacher: ClassVar[bool] = False
    # Flat option names the method took before its ``threat`` field, each with the ThreatModel field it sets;
    # build_method still accepts them, with a DeprecatedOptionWarning.
    flat_threat_keys: ClassVar[dict[str, str]] = {}

    def __call__(self, student: nn.Module, teacher: nn.Module | None, batch: Batch, info: StepInfo) -> Output:
        raise NotImplementedError

    def passes(self) -> dict[str, int]:
        """Forward/backward passes one step costs, for benchmarks (keys: student_fwd, student_bwd, ...)."""
        return {}

    def clean_teacher(self) -> tuple[str, ...]:
        """The teacher's outputs this method uses on the batch's own x (``TEACHER_OUTPUTS``), none by default.

        Declaring them lets the engine compute them once per run where x does not change between epochs (no
        augmentation) and pass them in ``Batch.teacher``; the method reads them through :func:`teacher_logits`
        (or ``batch.teacher``) and computes them itself when they are absent.
        """
        return ()


TEACHER_OUTPUTS = ("logits", "input_grad")


def clean_teacher_outputs(
    teacher: nn.Module, x: torch.Tensor, y: torch.Tensor, names: tuple[str, ...]
) -> dict[str, torch.Tensor]:
    """Per example, detached: "logits" T(x); "input_grad" ∇_x CE_sum(T(x), y), each example's own gradient.

    Per example, so that a cache can serve any batch: ∇_x CE_mean over a batch of B is these rows divided by B.
    """
    if "input_grad" not in names:
        with torch.no_grad():
            return {"logits": teacher(x)}
    x = x.detach().requires_grad_(True)
    with torch.enable_grad():  # a graph for x only: the teacher's parameters are frozen
        logits = teacher(x)
        (grad,) = torch.autograd.grad(F.cross_entropy(logits, y, reduction="sum"), x)
    return {"logits": logits.detach(), "input_grad": grad.detach()}


def teacher_logits(teacher: nn.Module, batch: Batch) -> torch.Tensor:
    """T(batch.x) under no_grad: the engine's cached copy when ``batch.teacher`` holds one."""
    cached = batch.teacher.get("logits")
    if cached is not None:
        return cached
    with torch.no_grad():
        return teacher(batch.x)


METHODS: Registry[type[Method]] = Registry("method")


def register_method(name: str):
    def decorator(cls: type[Method]) -> type[Method]:
        if not dataclasses.is_dataclass(cls):
            raise TypeError(f"method {name!r} must be a dataclass")
        cls.name = name
        METHODS.add(name, cls)
        return cls

    return decorator


class DeprecatedOptionWarning(FutureWarning):
    """A method option spelled the old way; the message gives the new spelling.

    A FutureWarning, not a DeprecationWarning: Python shows it by default, and the user who wrote the config
    must see it."""


def fold_flat_threat(name: str, cls: type[Method], args: dict[str, Any]) -> dict[str, Any]:
    """Move old flat threat options (``eps``, ``steps``, ``eps_train``, ...) into ``threat``, with a warning.

    Fields left out keep the method's default threat; writing both spellings is refused.
    """
    flat = {key: args.pop(key) for key in list(args) if key in cls.flat_threat_keys}
    if not flat:
        return args
    if "threat" in args:
        raise ConfigError(
            f"method.args: {', '.join(sorted(flat))} and threat both set the threat model of {name!r}; keep threat only"
        )
    threat = {cls.flat_threat_keys[key]: value for key, value in flat.items()}
    spelled = ", ".join(f"{key}: {value}" for key, value in threat.items())
    warnings.warn(
        f"method.args.{', method.args.'.join(flat)}: write the threat model as one option, "
        f"method.args.threat: {{{spelled}}}",
        DeprecatedOptionWarning,
        stacklevel=3,
    )
    return {**args, "threat": threat}


def build_method(name: str, args: dict[str, Any] | None = None) -> Method:
    """Instantiate a registered method; unknown option names are refused with close matches."""
    cls = METHODS.get(name)
    args = fold_flat_threat(name, cls, dict(args or {}))
    fields = {f.name for f in dataclasses.fields(cls) if f.init}
    for key in args:
        if key not in fields:
            close = difflib.get_close_matches(key, sorted(fields), n=3, cutoff=0.5)
            hint = f"; did you mean {', '.join(map(repr, close))}?" if close else ""
            raise ConfigError(
                f"method.args.{key}: method {name!r} has no option {key!r}{hint} "
                f"(options: {', '.join(sorted(fields)) or 'none'})"
            )
    try:
        return cls(**args)
    except ConfigError:
        raise  # already names its field
    except (TypeError, ValueError) as err:
        raise ConfigError(f"method.args: {err}") from err
