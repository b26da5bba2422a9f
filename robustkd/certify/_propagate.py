"""Native bound propagation over the flat graph: interval (IBP) forward and linear-relaxation backward.

Shapes: a box is a pair ``(lower, upper)`` of tensors shaped like the node's output ``(B, ...)``. A
linear bound on specs is a coefficient tensor ``A`` of shape ``(B, S, ...)`` (one row per spec and
example) plus a bias ``(B, S)``; ``backward`` only ever computes *lower* bounds, and an upper bound is
minus the lower bound of the negated spec, so each relaxation is written once.

Everything is plain differentiable torch code on the tensors' own device, so IBP and CROWN-IBP training
can backpropagate through the bounds.
"""

from __future__ import annotations

import math
import weakref

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from robustkd.certify._graph import (
    ADD,
    AVGPOOL,
    BATCHNORM,
    CONV,
    FLATTEN,
    LINEAR,
    MAXPOOL,
    NORMALIZE,
    RELU,
    Graph,
    Node,
)

Box = tuple[Tensor, Tensor]

# Largest coefficient tensor (in elements) one chunk of a CROWN intermediate-bound pass may build.
_CROWN_CHUNK_ELEMENTS = 2**24


def channel_affine(node: Node, ndim: int) -> tuple[Tensor, Tensor]:
    """Per-channel ``scale`` and ``shift`` of a Normalize / eval BatchNorm node, viewed to broadcast over
    the trailing ``(C, *spatial)`` dims of an input with ``ndim`` dimensions (batch included)."""
    m = node.module
    if node.kind == NORMALIZE:
        std = m.std.reshape(-1)
        scale = 1.0 / std
        shift = -m.mean.reshape(-1) / std
    else:  # eval-mode batch norm: (x - mean) / sqrt(var + eps) * weight + bias
        scale = torch.rsqrt(m.running_var + m.eps)
        if m.weight is not None:
            scale = scale * m.weight
        shift = -m.running_mean * scale
        if m.bias is not None:
            shift = shift + m.bias
    view = (-1,) + (1,) * (ndim - 2)
    return scale.reshape(view), shift.reshape(view)


class _Pool:
    """Buffers of dead intermediate boxes, handed out again to later nodes of the same size, so that one IBP
    pass allocates (and the allocator faults in) a few large tensors per layer instead of ten. ``enabled``
    is False under autograd, where every result is a fresh tensor."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self.free: list[Tensor] = []

    def take(self, like: Tensor) -> Tensor:
        for i, buf in enumerate(self.free):
            if buf.shape == like.shape and buf.stride() == like.stride() and buf.dtype == like.dtype:
                return self.free.pop(i)
        return torch.empty_like(like)

    def give(self, *tensors: Tensor) -> None:
        if self.enabled:
            self.free.extend(t for t in tensors if t.is_contiguous() or t.is_contiguous(memory_format=_NHWC))


_NHWC = torch.channels_last


def _halves(m: nn.Module) -> tuple[Tensor, ...]:
    return m.weight * 0.5, m.weight.abs() * 0.5


def _pair(m: nn.Module) -> tuple[Tensor, ...]:
    """Weights of one convolution with two groups computing ``W/2 · s + b`` and ``|W|/2 · d`` together."""
    half, half_abs = _halves(m)
    bias = None if m.bias is None else torch.cat([m.bias, torch.zeros_like(m.bias)])
    return (torch.cat([half, half_abs]),) if bias is None else (torch.cat([half, half_abs]), bias)


def _weights(m: nn.Module, build, grad: bool, chw: tuple[int, ...] | None = None) -> tuple[Tensor, ...]:
    """``build(m)``: weights derived from a layer's parameters (see ``_halves`` and ``_pair``); with ``chw``,
    a Linear layer's columns reordered for an input flattened from channels-last ``(C, H, W)`` maps.

    The affine step takes ``u + l`` and ``u - l`` (twice the centre and radius) through the halved weights:
    the same products as ``(u + l) / 2`` through ``W``, bit for bit, with two element-wise passes fewer.
    Without autograd the derived weights are cached per layer and rebuilt when a parameter changes (its
    version counter moves with every in-place update: an optimiser step, ``load_state_dict``)."""
    if grad:
        return build(m)
    key = (build, *((p.data_ptr(), p._version, p.dtype, p.device) for p in (m.weight, m.bias) if p is not None))
    cache = _DERIVED.setdefault(m, {})
    if (build, chw) not in cache or cache[build, chw][0] != key:
        with torch.no_grad():
            derived = build(m)
            if chw is not None:
                derived = tuple(_channels_last_columns(t, chw) for t in derived)
            # Convolution weights in the maps' channels-last layout, or oneDNN would reorder them at every call.
            derived = tuple(t.contiguous(memory_format=_NHWC) if t.dim() == 4 else t for t in derived)
            cache[build, chw] = (key, derived)
    return cache[build, chw][1]


def _channels_last_columns(weight: Tensor, chw: tuple[int, ...]) -> Tensor:
    """A Linear weight whose columns read a ``(C, H, W)`` map flattened in ``(H, W, C)`` order."""
    return weight.reshape(weight.shape[0], *chw).permute(0, 2, 3, 1).reshape(weight.shape[0], -1).contiguous()


def _flat_channels_last(t: Tensor) -> Tensor:
    """A channels-last ``(B, C, H, W)`` map as ``(B, H*W*C)`` without copying it (``Flatten`` would)."""
    return t.permute(0, 2, 3, 1).reshape(t.shape[0], -1)


# layer -> {builder: (parameter key, derived weights)}; entries go with their layer.
_DERIVED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _paired_conv(m: nn.Conv2d, lower: Tensor, upper: Tensor, pool: _Pool) -> tuple[Tensor, Tensor]:
    """Centre and radius images of a single-input-channel convolution in one call with two groups.

    Measured on a CPU (oneDNN, batch 128, 28x28 maps, channels-last), two separate convolutions with one
    input channel cost 9x this one and fault a scratch buffer in at every call; with more input channels
    the two separate calls are slightly cheaper, so only this case is paired."""
    if pool.enabled:
        shape = (lower.shape[0], 2, *lower.shape[2:])
        pair = torch.empty(shape, dtype=lower.dtype, device=lower.device, memory_format=_NHWC)
        torch.add(upper, lower, out=pair[:, :1])
        torch.sub(upper, lower, out=pair[:, 1:])
    else:
        pair = torch.cat([upper + lower, upper - lower], 1)
    weight, *bias = _weights(m, _pair, not pool.enabled)
    out = F.conv2d(pair, weight, bias[0] if bias else None, m.stride, m.padding, m.dilation, groups=2)
    return out[:, : m.out_channels], out[:, m.out_channels :]


def _affine_box(node: Node, lower: Tensor, upper: Tensor, own: bool, pool: _Pool, chw: tuple[int, ...] | None) -> Box:
    """Interval image of an affine node: the centre through the map, the radius through its absolute value."""
    kind, m = node.kind, node.module
    if kind == CONV and m.in_channels == 1 and m.groups == 1 and m.padding_mode == "zeros":
        mid, rad = _paired_conv(m, lower, upper, pool)
    else:
        reuse = own and pool.enabled
        if pool.enabled:
            twice_mid = torch.add(upper, lower, out=pool.take(lower))
            twice_rad = upper.sub_(lower) if reuse else torch.sub(upper, lower, out=pool.take(lower))
        else:
            twice_mid, twice_rad = upper + lower, upper - lower
        if reuse:
            pool.give(lower)
        mid, rad = _affine_pair(node, twice_mid, twice_rad, not pool.enabled, chw)
        pool.give(twice_mid, twice_rad)
    if not pool.enabled:
        return mid - rad, mid + rad
    out_lower = torch.sub(mid, rad, out=pool.take(mid))
    out_upper = rad.add_(mid) if rad.is_contiguous(memory_format=_NHWC) or rad.is_contiguous() else mid + rad
    pool.give(mid)
    return out_lower, out_upper


def _affine_pair(
    node: Node, twice_mid: Tensor, twice_rad: Tensor, grad: bool, chw: tuple[int, ...] | None = None
) -> tuple[Tensor, Tensor]:
    """``(centre, radius)`` of an affine node's image from twice its input's centre and radius."""
    kind, m = node.kind, node.module
    if kind == LINEAR:
        half, half_abs = _weights(m, _halves, grad, chw)
        return F.linear(twice_mid, half, m.bias), F.linear(twice_rad, half_abs)
    if kind == CONV:
        half, half_abs = _weights(m, _halves, grad)
        return m._conv_forward(twice_mid, half, m.bias), m._conv_forward(twice_rad, half_abs, None)
    if kind in (NORMALIZE, BATCHNORM):
        scale, shift = channel_affine(node, twice_mid.dim())
        return twice_mid * (scale * 0.5) + shift, twice_rad * (scale.abs() * 0.5)
    raise AssertionError(kind)  # pragma: no cover - build_graph only emits the kinds above


def ibp_node(
    node: Node,
    boxes: list[Box],
    own: tuple[bool, ...] = (),
    pool: _Pool | None = None,
    chw: tuple[int, ...] | None = None,
) -> Box:
    """Interval image of one node given the boxes of its inputs.

    ``own[i]`` says that the i-th input box may be overwritten (this node is its last reader and nothing
    else holds it); with an enabled ``pool`` such boxes are updated in place and dead buffers reused.
    ``chw``: a Linear node's input box was flattened from channels-last ``(C, H, W)`` maps."""
    pool = pool or _Pool(False)
    own = own or (False,) * len(boxes)
    kind, m = node.kind, node.module
    if kind == ADD:
        (l1, u1), (l2, u2) = boxes
        if pool.enabled and (own[0] or own[1]):
            (l1, u1), (l2, u2) = boxes if own[0] else boxes[::-1]  # addition commutes, bit for bit
            return l1.add_(l2), u1.add_(u2)
        return l1 + l2, u1 + u2
    lower, upper = boxes[0]
    if kind == RELU:  # not m(lower): an in-place ReLU would overwrite the stored pre-activation bounds
        if pool.enabled and own[0]:
            return lower.relu_(), upper.relu_()
        return F.relu(lower), F.relu(upper)
    if kind in (MAXPOOL, AVGPOOL, FLATTEN):
        # Monotone maps (average pooling has non-negative weights), so the box maps to a box.
        out = m(lower), m(upper)
        if own[0] and kind != FLATTEN:  # a flattened box is a view of its input
            pool.give(lower, upper)
        return out
    return _affine_box(node, lower, upper, own[0], pool, chw)


def ibp_pass(graph: Graph, x_lower: Tensor, x_upper: Tensor, keep: set[int]) -> dict[int, Box]:
    """IBP through ``graph``, returning only the boxes of the nodes in ``keep``.

    Every other box is dropped after its last reader; without autograd it is overwritten in place by that
    reader and its buffers reused, which spares the allocator most of a pass's large tensors. The bounds
    equal those of a pass keeping every box up to float rounding (channels-last convolutions may sum in
    another order)."""
    last_read = {i: idx for idx, node in enumerate(graph.nodes) for i in node.inputs}
    pool = _Pool(not torch.is_grad_enabled())
    if pool.enabled and x_lower.dim() == 4 and any(node.kind == CONV for node in graph.nodes):
        # Without autograd, convolutions and max pooling on channels-last (NHWC) maps cost less on a CPU;
        # element-wise ops cost the same. With autograd the backward passes favour the default layout.
        x_lower, x_upper = x_lower.contiguous(memory_format=_NHWC), x_upper.contiguous(memory_format=_NHWC)
    boxes: dict[int, Box] = {0: (x_lower, x_upper)}
    writable = {0: False}  # whether a node's box is its own (not the caller's input, not a kept box's view)
    flat_chw: dict[int, tuple[int, ...]] = {}  # flatten nodes whose box is in (H, W, C) order -> (C, H, W)
    for idx, node in enumerate(graph.nodes[1:], start=1):
        own = tuple(
            writable[i] and last_read[i] == idx and i not in keep and node.inputs.count(i) == 1 for i in node.inputs
        )
        inputs = [boxes[i] for i in node.inputs]
        if pool.enabled and _flattens_for_linear(graph, idx, inputs[0][0], keep):
            # Flattening channels-last maps in their memory order costs nothing; the one Linear reading them
            # takes its columns in that order instead (a copy of the weight, cached) - the same products.
            boxes[idx] = tuple(_flat_channels_last(t) for t in inputs[0])
            flat_chw[idx] = tuple(inputs[0][0].shape[1:])
        else:
            chw = flat_chw.get(node.inputs[0]) if node.kind == LINEAR else None
            boxes[idx] = ibp_node(node, inputs, own, pool, chw)
        writable[idx] = node.kind != FLATTEN or own[0]
        for i in set(node.inputs):
            if last_read[i] == idx and i not in keep:
                del boxes[i]
    return {i: boxes[i] for i in keep}


def _flattens_for_linear(graph: Graph, idx: int, t: Tensor, keep: set[int]) -> bool:
    """Whether node ``idx`` flattens channels-last 4-d maps (not also contiguous) for one Linear node alone."""
    node = graph.nodes[idx]
    if node.kind != FLATTEN or idx in keep or idx == graph.output or t.dim() != 4:
        return False
    if (node.module.start_dim, node.module.end_dim) not in ((1, -1), (1, 3)):
        return False
    if t.is_contiguous() or not t.is_contiguous(memory_format=_NHWC):
        return False
    readers = [n for n in graph.nodes if idx in n.inputs]
    return len(readers) == 1 and readers[0].kind == LINEAR


def _transpose(fn, A: Tensor, in_shape: torch.Size, create_graph: bool) -> Tensor:
    """``A`` pulled back through the linear map ``fn`` (its vector-Jacobian product at 0)."""
    B, S = A.shape[:2]
    with torch.enable_grad():
        dummy = torch.zeros((B * S, *in_shape[1:]), dtype=A.dtype, device=A.device, requires_grad=True)
        (grad,) = torch.autograd.grad(fn(dummy), dummy, A.reshape(B * S, *A.shape[2:]), create_graph=create_graph)
    return grad.reshape(B, S, *in_shape[1:])


def _sum_rest(t: Tensor) -> Tensor:
    return t.flatten(2).sum(-1)


class BoundState:
    """Bounds of every node of ``graph`` over the input box ``[x_lower, x_upper]``.

    ``intermediate="ibp"`` keeps interval bounds for the hidden layers (CROWN-IBP); ``"crown"`` tightens the
    input of every ReLU and MaxPool with a backward pass of its own (CROWN). With ``tighten_with_ibp``
    (the default) that pass covers only the neurons IBP (propagated from the refined bounds) leaves
    unstable, and each keeps the tighter of its CROWN and IBP bounds (both are sound). With
    ``tighten_with_ibp=False`` every neuron gets a CROWN bound that replaces the IBP one: plain CROWN, as
    auto_LiRPA computes it for convolutional layers (a slower reference for tests).
    """

    def __init__(
        self,
        graph: Graph,
        x_lower: Tensor,
        x_upper: Tensor,
        intermediate: str = "ibp",
        tighten_with_ibp: bool = True,
        *,
        ibp_spec_only: bool = False,
    ) -> None:
        self.graph = graph
        self.tighten = tighten_with_ibp
        self.create_graph = torch.is_grad_enabled()
        if ibp_spec_only:
            # Only ibp_spec will be asked for: keep the boxes it reads, let every other one be overwritten.
            if intermediate != "ibp":
                raise ValueError("ibp_spec_only needs intermediate='ibp'")
            kept = ibp_pass(graph, x_lower, x_upper, self._ibp_spec_reads())
            self.boxes = [kept.get(i) for i in range(len(graph.nodes))]
            return
        self.boxes: list[Box] = [(x_lower, x_upper)]
        refine = self._needs_refinement() if intermediate == "crown" else {}
        for idx, node in enumerate(graph.nodes[1:], start=1):
            self.boxes.append(ibp_node(node, [self.boxes[i] for i in node.inputs]))
            if idx in refine:
                self.boxes[idx] = self._crown_box(idx, only_unstable=refine[idx] and self.tighten)

    # ----------------------------------------------------------------------------------------- helpers
    def _needs_refinement(self) -> dict[int, bool]:
        """Nodes whose bounds enter a relaxation -> whether only ReLU-unstable neurons matter."""
        out: dict[int, bool] = {}
        nodes = self.graph.nodes
        for node in nodes:
            if node.kind not in (RELU, MAXPOOL):
                continue
            i, all_neurons = node.inputs[0], node.kind == MAXPOOL
            if node.kind == MAXPOOL and nodes[i].kind == RELU:
                # ReLU -> MaxPool: refine every pre-activation neuron (the pool uses the bounds of active
                # ones too); the ReLU's image of that box is as tight as a pass from its output would be.
                i = nodes[i].inputs[0]
            if i == 0:  # the input box is exact
                continue
            # Only unstable neurons' bounds shape a ReLU relaxation.
            out[i] = out.get(i, True) and not all_neurons
        return out

    def _crown_box(self, idx: int, only_unstable: bool) -> Box:
        lower, upper = self.boxes[idx]
        B = lower.shape[0]
        flat_l, flat_u = lower.flatten(1), upper.flatten(1)
        n = flat_l.shape[1]
        if only_unstable:
            neurons = torch.nonzero(((flat_l < 0) & (flat_u > 0)).any(0)).flatten()
        else:
            neurons = torch.arange(n, device=lower.device)
        if neurons.numel() == 0:
            return lower, upper
        widest = max(math.prod(b[0].shape[1:]) for b in self.boxes[: idx + 1])
        chunk = max(1, _CROWN_CHUNK_ELEMENTS // (2 * B * widest))
        new_l, new_u = [], []
        for part in neurons.split(chunk):
            rows = F.one_hot(part, n).to(lower.dtype).unsqueeze(0).expand(B, -1, -1)
            rows = rows.reshape(B, -1, *lower.shape[1:])
            low = self.lower(idx, torch.cat([rows, -rows], 1))
            new_l.append(low[:, : part.numel()])
            new_u.append(-low[:, part.numel() :])
        cl, cu = torch.cat(new_l, 1), torch.cat(new_u, 1)
        flat_l = flat_l.index_copy(1, neurons, torch.maximum(flat_l[:, neurons], cl) if self.tighten else cl)
        flat_u = flat_u.index_copy(1, neurons, torch.minimum(flat_u[:, neurons], cu) if self.tighten else cu)
        return flat_l.view_as(lower), flat_u.view_as(upper)

    def _ibp_spec_reads(self) -> set[int]:
        """The nodes whose boxes ``ibp_spec`` reads: the output, and the input of a final Linear layer."""
        node = self.graph.nodes[self.graph.output]
        return {self.graph.output, *node.inputs} if node.kind == LINEAR else {self.graph.output}

    # ------------------------------------------------------------------------------------ final bounds
    @property
    def output(self) -> Box:
        return self.boxes[self.graph.output]

    def ibp_spec(self, C: Tensor | None) -> Box:
        """IBP bounds of ``C @ logits``; a final Linear layer is folded into ``C`` first (tighter)."""
        if C is None:
            return self.output
        node = self.graph.nodes[self.graph.output]
        if node.kind == LINEAR and self.boxes[node.inputs[0]][0].dim() == 2:
            lower, upper = self.boxes[node.inputs[0]]
            m = node.module
            weight = C @ m.weight  # (B, S, in)
            mid, rad = (upper + lower) / 2, (upper - lower) / 2
            centre = torch.einsum("bsi,bi->bs", weight, mid)
            if m.bias is not None:
                centre = centre + C @ m.bias
            radius = torch.einsum("bsi,bi->bs", weight.abs(), rad)
        else:
            lower, upper = self.output
            mid, rad = (upper + lower) / 2, (upper - lower) / 2
            centre = torch.einsum("bsk,bk->bs", C, mid)
            radius = torch.einsum("bsk,bk->bs", C.abs(), rad)
        return centre - radius, centre + radius

    def crown_spec(self, C: Tensor, bound_lower: bool = True, bound_upper: bool = True) -> Box:
        """Backward (CROWN) bounds of ``C @ logits``; a side not asked for is the IBP bound instead."""
        S = C.shape[1]
        rows = [C] if bound_lower else []
        if bound_upper:
            rows.append(-C)
        low = self.lower(self.graph.output, torch.cat(rows, 1))
        if bound_lower and bound_upper:
            return low[:, :S], -low[:, S:]
        ibp_l, ibp_u = self.ibp_spec(C)
        return (low, ibp_u) if bound_lower else (ibp_l, -low)

    # ---------------------------------------------------------------------------------------- backward
    def lower(self, start: int, A: Tensor) -> Tensor:
        """Lower bounds ``(B, S)`` of ``A · node_start(x)`` over the input box."""
        A0, bias = self.backward(start, A)
        return self.concretize(A0, bias)

    def concretize(self, A0: Tensor | None, bias: Tensor) -> Tensor:
        if A0 is None:
            return bias
        x_lower, x_upper = self.boxes[0]
        mid, rad = ((x_upper + x_lower) / 2).flatten(1), ((x_upper - x_lower) / 2).flatten(1)
        A0 = A0.flatten(2)
        return torch.einsum("bsi,bi->bs", A0, mid) - torch.einsum("bsi,bi->bs", A0.abs(), rad) + bias

    def backward(self, start: int, A: Tensor) -> tuple[Tensor | None, Tensor]:
        """Linear lower bound ``A0 · x + bias`` of ``A · node_start(x)`` valid on the input box."""
        pending: dict[int, Tensor] = {start: A}
        bias = A.new_zeros(A.shape[:2])
        for idx in range(start, 0, -1):
            A = pending.pop(idx, None)
            if A is None:
                continue
            node = self.graph.nodes[idx]
            if node.kind == ADD:
                pulled = [(i, A) for i in node.inputs]
            else:
                A_in, b = self._pull(node, A)
                pulled = [(node.inputs[0], A_in)]
                if b is not None:
                    bias = bias + b
            for i, A_in in pulled:
                pending[i] = pending[i] + A_in if i in pending else A_in
        return pending.get(0), bias

    def _pull(self, node: Node, A: Tensor) -> tuple[Tensor, Tensor | None]:
        """Coefficients on the node's input and the bias collected, for a lower bound of ``A · node``."""
        kind, m = node.kind, node.module
        lower, upper = self.boxes[node.inputs[0]]
        in_shape = lower.shape
        B, S = A.shape[:2]
        if kind == LINEAR:
            bias = None
            if m.bias is not None:
                bias = A @ m.bias  # (B, S, *leading dims of a Linear applied to a >2-D input)
                bias = _sum_rest(bias) if bias.dim() > 2 else bias
            return A @ m.weight, bias
        if kind == CONV:
            return self._pull_conv(m, A, in_shape)
        if kind in (NORMALIZE, BATCHNORM):
            scale, shift = channel_affine(node, len(in_shape))
            channels = A.shape[2]
            shift_c = shift.reshape(-1).expand(channels) if shift.numel() == 1 else shift.reshape(-1)
            bias = A.reshape(B, S, channels, -1).sum(-1) @ shift_c
            return A * scale, bias
        if kind == FLATTEN:
            return A.reshape(B, S, *in_shape[1:]), None
        if kind == AVGPOOL:
            return _transpose(m, A, in_shape, self.create_graph), None
        if kind == RELU:
            return self._pull_relu(A, lower, upper)
        if kind == MAXPOOL:
            return self._pull_maxpool(m, A, lower, upper)
        raise AssertionError(kind)  # pragma: no cover - INPUT and ADD never reach here

    def _pull_conv(self, m: nn.Conv2d, A: Tensor, in_shape: torch.Size) -> tuple[Tensor, Tensor | None]:
        B, S = A.shape[:2]
        bias = A.sum((-2, -1)) @ m.bias if m.bias is not None else None
        if m.padding_mode != "zeros" or isinstance(m.padding, str):
            # Rare layouts (padding="same", reflect/circular padding): transpose through autograd.
            A_in = _transpose(lambda t: m._conv_forward(t, m.weight, None), A, in_shape, self.create_graph)
            return A_in, bias
        out_hw = A.shape[-2:]
        output_padding = tuple(
            in_shape[2 + d]
            - ((out_hw[d] - 1) * m.stride[d] - 2 * m.padding[d] + m.dilation[d] * (m.kernel_size[d] - 1) + 1)
            for d in range(2)
        )
        A_in = F.conv_transpose2d(
            A.reshape(B * S, *A.shape[2:]),
            m.weight,
            None,
            m.stride,
            m.padding,
            output_padding,
            m.groups,
            m.dilation,
        )
        return A_in.reshape(B, S, *in_shape[1:]), bias

    @staticmethod
    def _pull_relu(A: Tensor, lower: Tensor, upper: Tensor) -> tuple[Tensor, Tensor]:
        # Upper line through (l, relu(l)) and (u, relu(u)): slope u+/(u+ - l-), which is 1 on active and 0
        # on inactive neurons, and u/(u - l) on unstable ones; it passes through (l-, 0).
        u_pos, l_neg = upper.clamp(min=0).unsqueeze(1), lower.clamp(max=0).unsqueeze(1)
        slope_up = u_pos / (u_pos - l_neg).clamp(min=1e-12)
        # Adaptive lower line (CROWN-IBP): slope 1 when u > -l, else 0; exact on stable neurons too.
        slope_low = (upper > -lower).to(A.dtype).unsqueeze(1)
        A_pos, A_neg = A.clamp(min=0), A.clamp(max=0)
        A_in = A_pos * slope_low + A_neg * slope_up
        bias = _sum_rest(A_neg * (-slope_up * l_neg))
        return A_in, bias

    @staticmethod
    def _pull_maxpool(m: nn.MaxPool2d, A: Tensor, lower: Tensor, upper: Tensor) -> tuple[Tensor, Tensor]:
        # Lower relaxation: max(window) >= x_i* with i* the element of largest lower bound. Upper: exactly
        # x_i* when i* dominates (l_i* >= u_j for every other j in its window), else the constant max u.
        B, S = A.shape[:2]
        args = (m.kernel_size, m.stride, m.padding, m.dilation, m.ceil_mode)
        l_star, index = F.max_pool2d(lower, *args, return_indices=True)
        u_max = F.max_pool2d(upper, *args)
        dominant = torch.zeros_like(l_star, dtype=torch.bool)
        ks, st, dl = (nn.modules.utils._pair(v) for v in (m.kernel_size, m.stride or m.kernel_size, m.dilation))
        if all(st[d] >= dl[d] * (ks[d] - 1) + 1 for d in range(2)):
            # Windows do not overlap: hide each window's i* and take the max upper bound of the rest.
            hidden = upper.flatten(2).scatter(-1, index.flatten(2), float("-inf")).view_as(upper)
            dominant = l_star >= F.max_pool2d(hidden, *args)
        A_pos, A_neg = A.clamp(min=0), A.clamp(max=0)
        dom = dominant.unsqueeze(1)
        coeff = A_pos + torch.where(dom, A_neg, torch.zeros_like(A_neg))
        bias = _sum_rest(torch.where(dom, torch.zeros_like(A_neg), A_neg * u_max.unsqueeze(1)))
        C, H, W = lower.shape[1:]
        flat_index = index.flatten(2).unsqueeze(1).expand(B, S, C, -1)
        A_in = A.new_zeros(B, S, C, H * W).scatter_add(-1, flat_index, coeff.flatten(3))
        return A_in.view(B, S, C, H, W), bias
