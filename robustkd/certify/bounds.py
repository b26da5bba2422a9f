"""Bounds on a model's logits (or on ``C @ logits``) over ``Ball_inf(x, eps) ∩ [0, 1]^d``.

Verifiers (``VERIFIERS``, a closed list):

- ``ibp``: interval bound propagation (Gowal et al. 2018), native.
- ``crown-ibp``: IBP for the hidden layers, then one CROWN backward pass from the spec to the input
  (Zhang et al. 2020), native. ReLU: upper line through (l, 0) and (u, u), adaptive lower slope
  (1 when u > -l, else 0). MaxPool is relaxed too (lower: the element with the largest lower bound;
  upper: that element when it dominates its window, else the window's largest upper bound).
- ``best``: per bound, the tighter of ``ibp`` and ``crown-ibp`` (both sound, so their intersection is).
- ``crown``: CROWN with CROWN intermediate bounds, native: each ReLU / MaxPool input gets its own backward
  pass in memory-bounded chunks (for a ReLU only the neurons IBP leaves unstable; before a MaxPool every
  neuron), intersected with IBP. Far slower than CROWN-IBP: for evaluation, not training.
- ``alpha-crown``: auto_LiRPA's optimised CROWN (needs ``pip install --no-deps auto_LiRPA==0.3``).
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from robustkd.certify._graph import LINEAR, build_graph
from robustkd.certify._propagate import BoundState, Box
from robustkd.certify.specs import margin_spec
from robustkd.errors import ConfigError, RobustKDError
from robustkd.registry import Registry


@dataclass(frozen=True)
class Verifier:
    """A named way of bounding a network; native ones work on a ``BoundState``."""

    name: str
    backend: str  # "native" or "auto_LiRPA"
    intermediate: str  # how hidden-layer bounds are computed: "ibp" or "crown"
    final: str  # "ibp", "crown" (backward pass from the spec) or "best" (tighter of both)
    lirpa_method: str | None = None

    @property
    def native(self) -> bool:
        return self.backend == "native"

    def state(self, model: nn.Module, x_lower: Tensor, x_upper: Tensor) -> BoundState:
        """Hidden-layer bounds of ``model`` (for auto_LiRPA verifiers: IBP ones, used by joint bounds)."""
        return BoundState(build_graph(model), x_lower, x_upper, self.intermediate)

    def spec_bounds(
        self, state: BoundState, C: Tensor | None, bound_lower: bool = True, bound_upper: bool = True
    ) -> Box:
        """Bounds of ``C @ logits`` (logits when ``C`` is None) from a native state."""
        if self.final == "ibp":
            return state.ibp_spec(C)
        spec = C if C is not None else _identity_spec(state)
        lower, upper = state.crown_spec(spec, bound_lower, bound_upper)
        if self.final == "best":
            ibp_lower, ibp_upper = state.ibp_spec(C)
            lower, upper = torch.maximum(lower, ibp_lower), torch.minimum(upper, ibp_upper)
        return lower, upper

    def bounds(
        self,
        model: nn.Module,
        x_lower: Tensor,
        x_upper: Tensor,
        C: Tensor | None = None,
        bound_lower: bool = True,
        bound_upper: bool = True,
    ) -> Box:
        if self.native and self.final == "ibp":
            # IBP alone reads one box at the end (a final Linear layer's input, or the output): the pass may
            # overwrite all the others.
            state = BoundState(build_graph(model), x_lower, x_upper, "ibp", ibp_spec_only=True, spec=C is not None)
            return self.spec_bounds(state, C, bound_lower, bound_upper)
        if self.native:
            return self.spec_bounds(self.state(model, x_lower, x_upper), C, bound_lower, bound_upper)
        from robustkd.certify.lirpa import lirpa_box_bounds

        build_graph(model)  # the same closed set of layers (and eval-mode BatchNorm) as the native verifiers
        return lirpa_box_bounds(model, x_lower, x_upper, self.lirpa_method, C)


def _identity_spec(state: BoundState) -> Tensor:
    lower = state.output[0]
    if lower.dim() != 2:
        raise RobustKDError(f"the model's output must be (batch, classes) logits, got {tuple(lower.shape)}")
    B, K = lower.shape
    return torch.eye(K, dtype=lower.dtype, device=lower.device).expand(B, K, K)


VERIFIERS: Registry[Verifier] = Registry("verifier")
for _verifier in (
    Verifier("ibp", "native", "ibp", "ibp"),
    Verifier("crown-ibp", "native", "ibp", "crown"),
    Verifier("best", "native", "ibp", "best"),
    Verifier("crown", "native", "crown", "crown"),
    Verifier("alpha-crown", "auto_LiRPA", "ibp", "crown", lirpa_method="alpha-CROWN"),
):
    VERIFIERS.add(_verifier.name, _verifier)


def get_verifier(method: str) -> Verifier:
    """The verifier called ``method``; unknown names raise a ``RegistryError`` listing close matches."""
    return VERIFIERS.get(method)


def input_box(x: Tensor, eps: float | Tensor, *, check_range: bool = True) -> Box:
    """``Ball_inf(x, eps) ∩ [0, 1]^d`` as a box; ``eps`` is a number, a scalar tensor or one per example.

    A plain-number eps is checked on the host; a tensor eps and the [0, 1] range of ``x`` are read back from
    the device. Training passes ``check_range=False`` (its batches come from uint8 images, in range by
    construction), so a training step with a number eps reads nothing back."""
    if not torch.is_floating_point(x):
        raise ConfigError(f"inputs must be float images in [0, 1], got dtype {x.dtype}")
    if x.dim() < 2:
        raise ConfigError(f"inputs must be batched (B, ...), got shape {tuple(x.shape)}")
    eps_t = _eps_tensor(x, eps)
    # A point outside [0, 1] means the caller normalised the data: the box would not be the intended one.
    if check_range and x.numel():
        low, high = (float(v) for v in torch.aminmax(x))
        if low < -1e-6 or high > 1 + 1e-6:
            raise ConfigError(
                f"inputs must lie in [0, 1] (got range [{low:.3g}, {high:.3g}]); "
                "normalisation belongs inside the model (robustkd.models.layers.Normalize)"
            )
    return (x - eps_t).clamp_(0, 1), (x + eps_t).clamp_(0, 1)


def _eps_tensor(x: Tensor, eps: float | Tensor) -> Tensor:
    """eps checked (finite, >= 0) and shaped to broadcast against ``x``; a number is checked without a sync."""
    if isinstance(eps, numbers.Real) and not isinstance(eps, bool):
        if not (math.isfinite(eps) and eps >= 0):
            raise ConfigError(f"eps must be finite and >= 0, got {eps}")
        return torch.as_tensor(eps, dtype=x.dtype, device=x.device)
    eps_t = torch.as_tensor(eps, dtype=x.dtype, device=x.device)
    if eps_t.dim() == 1 and eps_t.shape[0] == x.shape[0]:
        eps_t = eps_t.view(-1, *([1] * (x.dim() - 1)))
    elif eps_t.dim() != 0:
        raise ConfigError(
            f"eps must be a number or one value per example ({x.shape[0]}), got shape {tuple(eps_t.shape)}"
        )
    if bool((eps_t < 0).any()) or not bool(torch.isfinite(eps_t).all()):
        raise ConfigError(f"eps must be finite and >= 0, got {eps}")
    return eps_t


def _check_spec(C: Tensor | None, x: Tensor) -> None:
    if C is None:
        return
    if C.dim() != 3 or C.shape[0] != x.shape[0]:
        raise ConfigError(f"spec C must be (batch={x.shape[0]}, specs, classes), got shape {tuple(C.shape)}")


def interval_bounds(
    model: nn.Module,
    x: Tensor,
    eps: float | Tensor,
    *,
    method: str = "ibp",
    C: Tensor | None = None,
    bound_lower: bool = True,
    bound_upper: bool = True,
    check_range: bool = True,
) -> tuple[Tensor, Tensor]:
    """Lower and upper bounds of ``C @ model(x')`` (of the logits when ``C`` is None) for every ``x'`` in
    ``Ball_inf(x, eps) ∩ [0, 1]^d``.

    ``C`` is ``(B, S, K)`` (see ``margin_spec``); the result is ``(B, S)`` (``(B, K)`` without C). ``eps``
    may be one value per example. The model must be in eval mode wherever it has BatchNorm. Gradients
    flow through the bounds (IBP / CROWN-IBP training). ``bound_lower=False`` or ``bound_upper=False``
    skips that side of the backward pass of the CROWN methods; the side skipped is then the IBP bound.
    ``check_range=False`` skips the [0, 1] check of x (see :func:`input_box`).
    """
    verifier = get_verifier(method)
    _check_spec(C, x)
    x_lower, x_upper = input_box(x, eps, check_range=check_range)
    if C is not None:
        C = C.to(dtype=x.dtype)
    return verifier.bounds(model, x_lower, x_upper, C, bound_lower, bound_upper)


def mixed_bounds(
    model: nn.Module,
    x: Tensor,
    eps: float | Tensor,
    *,
    beta: float,
    C: Tensor | None = None,
    bound_lower: bool = True,
    bound_upper: bool = True,
) -> tuple[Tensor, Tensor]:
    """``beta * CROWN-IBP + (1 - beta) * IBP`` bounds, the CROWN-IBP training schedule's mix (beta ramps
    from 1 to 0), from one shared IBP pass; ``beta = 0`` skips the backward pass. A convex combination of
    sound bounds is sound."""
    if not 0.0 <= beta <= 1.0:
        raise ConfigError(f"beta must be in [0, 1], got {beta}")
    _check_spec(C, x)
    x_lower, x_upper = input_box(x, eps)
    if C is not None:
        C = C.to(dtype=x.dtype)
    state = BoundState(build_graph(model), x_lower, x_upper, "ibp")
    ibp_lower, ibp_upper = state.ibp_spec(C)
    if beta == 0.0:
        return ibp_lower, ibp_upper
    spec = C if C is not None else _identity_spec(state)
    crown_lower, crown_upper = state.crown_spec(spec, bound_lower, bound_upper)
    return beta * crown_lower + (1 - beta) * ibp_lower, beta * crown_upper + (1 - beta) * ibp_upper


def num_classes_of(model: nn.Module, x: Tensor) -> int:
    """Number of logits; read off a final Linear layer, else from a forward pass on one example."""
    graph = build_graph(model)
    node = graph.nodes[graph.output]
    if node.kind == LINEAR:
        return node.module.out_features
    with torch.no_grad():
        return int(model(x[:1]).shape[1])


def margin_bounds(
    model: nn.Module, x: Tensor, y: Tensor, eps: float | Tensor, *, method: str = "ibp", **kwargs
) -> tuple[Tensor, Tensor]:
    """Bounds ``(B, K-1)`` of the margins ``z_j - z_y`` (j != y, increasing j) over the ball."""
    C = margin_spec(y, num_classes_of(model, x), dtype=x.dtype)
    return interval_bounds(model, x, eps, method=method, C=C, **kwargs)


def lirpa_bounds(
    model: nn.Module, x: Tensor, eps: float | Tensor, method: str = "CROWN", C: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """auto_LiRPA bounds of ``C @ logits`` over ``Ball_inf(x, eps) ∩ [0, 1]^d``; ``method`` is one of
    ``IBP``, ``CROWN-IBP``, ``CROWN``, ``alpha-CROWN``. Raises ``RobustKDError`` naming the install
    command when auto_LiRPA is missing."""
    from robustkd.certify.lirpa import lirpa_box_bounds

    x_lower, x_upper = input_box(x, eps)
    if C is not None:
        C = C.to(dtype=x.dtype)
    return lirpa_box_bounds(model, x_lower, x_upper, method, C)
