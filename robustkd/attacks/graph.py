"""The training attack on a GPU: all ``threat.steps`` PGD steps captured in one CUDA graph and replayed.

On a GPU an attack step of a small network is a few hundred short kernels, each launched from Python; the
launches, not the arithmetic, then bound its time. :func:`pgd` (what methods call, as
``robustkd.attacks.pgd``) captures the whole K-step loop of :func:`robustkd.attacks.pgd.pgd` once per
(model, shapes, threat, objective, autocast) and then replays it as one launch. The random start is drawn
eagerly, exactly as the eager loop draws it, and copied in, so both paths start from the same point and
run the same kernels on it.

Where the graph applies (``fast_path == "auto"``, the default): CUDA tensors, no explicit generator, a
model that is in eval mode during the attack (``mode="eval"``, or ``"keep"`` on a model with no module in
training mode) and not wrapped in DistributedDataParallel. A train-mode attack is not captured: its
forwards normalise with batch statistics and update BatchNorm's running averages at every step, which a
replay is not checked to reproduce. Those attacks, CPU tensors, and a batch smaller than the largest one
seen for the same model (the last partial batch of an epoch) run the eager loop. ``off`` (the
training config's ``fast_path``, or :func:`fast_path`) always runs the eager loop.

bf16 autocast and channels-last inputs are honoured as the caller sets them (``bf16`` and ``channels_last``
in the training config): a graph captured under autocast replays the same bf16 kernels.
"""

from __future__ import annotations

import contextlib
from collections import OrderedDict
from collections.abc import Iterator
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from robustkd.attacks.objectives import Objective, make_objective

# The eager loop's own pieces, so that both paths run the same operations.
from robustkd.attacks.pgd import _check_mode, _input_grad, _logits, _start, _step, attack_mode
from robustkd.attacks.pgd import pgd as eager_pgd
from robustkd.attacks.threat import ThreatModel
from robustkd.errors import ConfigError

FAST_PATHS = ("auto", "off")
# Graphs kept at once (each holds its own static buffers and memory pool); the oldest goes first.
MAX_GRAPHS = 4
# Eager runs of the loop before capture, on a side stream, as CUDA graph capture requires.
WARMUP_RUNS = 1

_SETTING: ContextVar[str] = ContextVar("robustkd_fast_path", default="auto")


def check_fast_path(setting: str) -> str:
    if setting not in FAST_PATHS:
        raise ConfigError(f"fast_path: expected one of {', '.join(FAST_PATHS)}, got {setting!r}")
    return setting


@contextlib.contextmanager
def fast_path(setting: str) -> Iterator[None]:
    """Within the block, ``"auto"`` lets :func:`pgd` replay a captured graph on CUDA; ``"off"`` never."""
    token = _SETTING.set(check_fast_path(setting))
    try:
        yield
    finally:
        _SETTING.reset(token)


def fast_path_setting() -> str:
    return _SETTING.get()


@dataclass
class _Captured:
    graph: Any  # torch.cuda.CUDAGraph
    x: Tensor
    y: Tensor
    start: Tensor
    reference: Tensor | None
    out: Tensor


_GRAPHS: OrderedDict[tuple, _Captured] = OrderedDict()
_LARGEST: dict[tuple, int] = {}  # (model, teacher) -> largest batch seen


def _attack_in_eval(model: nn.Module, mode: str) -> bool:
    return mode == "eval" or (mode == "keep" and not any(m.training for m in model.modules()))


def applies(model: nn.Module, x: Tensor, threat: ThreatModel, mode: str, generator: Any) -> bool:
    """Whether :func:`pgd` would replay a graph for this call (see the module docstring)."""
    return (
        _SETTING.get() == "auto"
        and x.is_cuda
        and generator is None
        and threat.steps > 0
        and threat.eps > 0
        and _attack_in_eval(model, mode)
        and not isinstance(model, nn.parallel.DistributedDataParallel)
    )


def _key(model, teacher, x, y, threat, obj, reference, mode) -> tuple:
    params = tuple(p.data_ptr() for net in (model, teacher) if net is not None for p in net.parameters())
    autocast = torch.is_autocast_enabled("cuda"), torch.get_autocast_dtype("cuda")
    ref = None if reference is None else (tuple(reference.shape), reference.dtype, reference.stride())
    return (
        id(model),
        id(teacher),
        params,
        tuple(x.shape),
        x.stride(),
        x.dtype,
        x.device,
        tuple(y.shape),
        threat,
        obj,
        ref,
        mode,
        autocast,
    )


def _loop(model, t_net, cap: _Captured, threat: ThreatModel, obj: Objective) -> Tensor:
    """The eager loop's K steps on the static buffers (the body that is captured)."""
    x_adv = cap.start
    for _ in range(threat.steps):
        inp = x_adv.detach().requires_grad_(True)
        logits, t_logits = _logits(model, t_net, inp)
        grad = _input_grad(obj.value(logits, cap.y, teacher_logits=t_logits, reference=cap.reference), inp)
        with torch.no_grad():
            x_adv = _step(inp, grad, cap.x, threat)
    return x_adv


def _capture(model, teacher, x, y, reference, threat, obj, mode) -> _Captured:
    t_net = teacher if obj.needs_teacher else None
    cap = _Captured(
        graph=torch.cuda.CUDAGraph(),
        x=x.clone(),
        y=y.clone(),
        start=x.clone(),
        reference=None if reference is None else reference.clone(),
        out=torch.empty_like(x),
    )
    # Autocast's weight cache would hold tensors made during capture; graphs need it off.
    autocast = torch.is_autocast_enabled("cuda")
    amp = torch.autocast("cuda", dtype=torch.get_autocast_dtype("cuda"), cache_enabled=False)
    side = torch.cuda.Stream(device=x.device)
    side.wait_stream(torch.cuda.current_stream(x.device))
    with attack_mode(model, teacher, mode), torch.enable_grad():
        with torch.cuda.stream(side), amp if autocast else contextlib.nullcontext():
            for _ in range(WARMUP_RUNS):
                _loop(model, t_net, cap, threat, obj)
        torch.cuda.current_stream(x.device).wait_stream(side)
        with torch.cuda.graph(cap.graph), amp if autocast else contextlib.nullcontext():
            cap.out.copy_(_loop(model, t_net, cap, threat, obj))
    return cap


def _graphed(model, teacher, x, y, threat, obj, reference, mode) -> Tensor | None:
    """The attack replayed from a graph, or None where the batch should run eagerly (a partial batch)."""
    nets = (id(model), id(teacher))
    largest = _LARGEST.setdefault(nets, x.shape[0])
    if x.shape[0] < largest:
        return None
    _LARGEST[nets] = x.shape[0]
    key = _key(model, teacher, x, y, threat, obj, reference, mode)
    cap = _GRAPHS.get(key)
    if cap is None:
        cap = _capture(model, teacher, x, y, reference, threat, obj, mode)
        _GRAPHS[key] = cap
        while len(_GRAPHS) > MAX_GRAPHS:
            _GRAPHS.popitem(last=False)
    _GRAPHS.move_to_end(key)
    cap.x.copy_(x)
    cap.y.copy_(y)
    if cap.reference is not None:
        cap.reference.copy_(reference)
    cap.start.copy_(_start(x, threat, None))  # the eager loop's draw, from the same generator
    cap.graph.replay()
    return cap.out.clone()


def clear() -> None:
    """Drop every captured graph (their memory pools go with them)."""
    _GRAPHS.clear()
    _LARGEST.clear()


def pgd(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    threat: ThreatModel,
    objective: str | Objective = "ce",
    *,
    teacher: nn.Module | None = None,
    reference: Tensor | None = None,
    mode: str = "eval",
    generator: torch.Generator | None = None,
) -> Tensor:
    """:func:`robustkd.attacks.pgd.pgd`, replayed from a CUDA graph where one applies (module docstring).

    Same arguments, same result: the same start and the same kernels, so the iterates agree with the eager
    loop's up to the non-determinism of GPU reductions (a gradient entry within rounding of 0 can take the
    other sign)."""
    _check_mode(mode)
    if applies(model, x, threat, mode, generator):
        obj = make_objective(objective)
        ref = reference.detach() if reference is not None else None
        out = _graphed(model, teacher, x.detach(), y.detach().long(), threat, obj, ref, mode)
        if out is not None:
            return out
    return eager_pgd(
        model, x, y, threat, objective, teacher=teacher, reference=reference, mode=mode, generator=generator
    )
