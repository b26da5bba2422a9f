"""Turn a model built from the supported layer types into a flat graph the bound propagators walk.

``nn.Sequential`` chains are flattened and each ``Residual`` becomes an ``add`` node with two inputs, so
every propagator is a loop over nodes in topological order (forward) or in reverse order (backward).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn
from torch.nn.parallel import DistributedDataParallel

from robustkd.errors import RobustKDError
from robustkd.models.layers import Normalize, Residual

# Node kinds. Each maps one supported module type onto the operation the propagators implement.
INPUT, NORMALIZE, LINEAR, CONV, BATCHNORM, RELU, MAXPOOL, AVGPOOL, FLATTEN, ADD = (
    "input",
    "normalize",
    "linear",
    "conv",
    "batchnorm",
    "relu",
    "maxpool",
    "avgpool",
    "flatten",
    "add",
)

# A subclass is accepted only when it keeps the base class's forward: an overridden forward could compute
# anything, and a bound for the base operation would then be unsound.
_LEAVES: tuple[tuple[type[nn.Module], str], ...] = (
    (Normalize, NORMALIZE),
    (nn.Linear, LINEAR),
    (nn.Conv2d, CONV),
    (nn.BatchNorm1d, BATCHNORM),
    (nn.BatchNorm2d, BATCHNORM),
    (nn.ReLU, RELU),
    (nn.MaxPool2d, MAXPOOL),
    (nn.AvgPool2d, AVGPOOL),
    (nn.AdaptiveAvgPool2d, AVGPOOL),
    (nn.Flatten, FLATTEN),
)

_EXACT = dict(_LEAVES)

SUPPORTED_MODULES = (
    "nn.Sequential, Normalize, nn.Linear, nn.Conv2d, nn.BatchNorm1d/2d (eval mode), nn.ReLU, nn.MaxPool2d, "
    "nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.Flatten, nn.Identity, Residual"
)


class UnsupportedModelError(RobustKDError):
    """The model holds a module (or a module state) the bound propagators cannot handle soundly."""


@dataclass
class Node:
    kind: str
    module: nn.Module | None
    inputs: tuple[int, ...]
    name: str


@dataclass
class Graph:
    """Nodes in topological order; node 0 is the input and ``output`` the index of the logits."""

    nodes: list[Node] = field(default_factory=list)
    output: int = 0

    def add(self, kind: str, module: nn.Module | None, inputs: tuple[int, ...], name: str) -> int:
        self.nodes.append(Node(kind, module, inputs, name))
        return len(self.nodes) - 1


def _plain(module: nn.Module, base: type[nn.Module]) -> bool:
    return isinstance(module, base) and type(module).forward is base.forward


def _check_leaf(module: nn.Module, kind: str, name: str) -> None:
    where = f"{name or 'the model'} ({type(module).__name__})"
    if kind == BATCHNORM:
        if module.training:
            raise UnsupportedModelError(
                f"{where} is in training mode: its output depends on the batch, and bounds computed with "
                "batch statistics do not hold for the deployed network. Call model.eval() before certifying."
            )
        if module.running_mean is None or module.running_var is None:
            raise UnsupportedModelError(
                f"{where} has track_running_stats=False, so even in eval mode it normalises with batch "
                "statistics; certification needs running statistics"
            )
    elif kind == MAXPOOL and module.return_indices:
        raise UnsupportedModelError(f"{where} returns indices; only the pooled tensor can be bounded")
    elif kind == FLATTEN and module.start_dim == 0:
        raise UnsupportedModelError(f"{where} flattens the batch dimension (start_dim=0)")
    elif kind == CONV and isinstance(module.padding, str) and module.padding not in ("same", "valid"):
        raise UnsupportedModelError(f"{where} has an unknown padding {module.padding!r}")


def _build(module: nn.Module, graph: Graph, inp: int, name: str) -> int:
    if _plain(module, nn.Sequential):
        out = inp
        for child_name, child in module.named_children():
            out = _build(child, graph, out, f"{name}.{child_name}" if name else child_name)
        return out
    if _plain(module, Residual):
        prefix = f"{name}." if name else ""
        body = _build(module.body, graph, inp, prefix + "body")
        shortcut = _build(module.shortcut, graph, inp, prefix + "shortcut")
        return graph.add(ADD, module, (body, shortcut), name)
    if _plain(module, nn.Identity):
        return inp
    kind = _EXACT.get(type(module))  # the common case, without walking _LEAVES
    if kind is None:
        kind = next((kind for base, kind in _LEAVES if _plain(module, base)), None)
    if kind is not None:
        _check_leaf(module, kind, name)
        return graph.add(kind, module, (inp,), name)
    where = f"module {name!r}" if name else "the model"
    raise UnsupportedModelError(
        f"cannot bound {where}: unsupported module type {type(module).__qualname__}. "
        f"Certification supports {SUPPORTED_MODULES} (subclasses only when they keep the base forward)."
    )


def build_graph(model: nn.Module) -> Graph:
    """The flat graph of ``model``; raises ``UnsupportedModelError`` naming the first unsupported module."""
    if isinstance(model, DistributedDataParallel):  # the training engine's student under torchrun
        model = model.module
    graph = Graph()
    graph.add(INPUT, None, (), "input")
    graph.output = _build(model, graph, 0, "")
    return graph
