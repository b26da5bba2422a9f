"""Native bound propagation over the flat graph: interval (IBP) forward and linear-relaxation backward.

Shapes: a box is a pair ``(lower, upper)`` of tensors shaped like the node's output ``(B, ...)`` (the IBP
pass carries ``(centre, width)`` pairs inside, see ``CentreWidth``). A
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


# Inside the interval pass a box travels as ``(centre, width) = ((l + u) / 2, u - l)``: an affine node maps
# the centre through itself and the width through its absolute value with no element-wise work on either
# side, and a ReLU costs four element-wise passes (``_relu``); in (lower, upper) form an affine + ReLU layer
# costs six (centre and radius in, bounds out, two ReLUs).
CentreWidth = tuple[Tensor, Tensor]

_NHWC = torch.channels_last


def _centre_width(box: Box) -> CentreWidth:
    lower, upper = box
    return torch.lerp(lower, upper, 0.5), upper - lower


def _lower_upper(cw: CentreWidth) -> Box:
    centre, width = cw
    half = width * 0.5
    return centre - half, centre + half


def _abs_weight(weight: Tensor, bias: Tensor | None) -> tuple[Tensor | None, ...]:
    return weight, weight.abs(), bias


def _paired_weight(weight: Tensor, bias: Tensor | None) -> tuple[Tensor | None, ...]:
    """Weights of one convolution with two groups computing ``W · c + b`` and ``|W| · w`` together."""
    pair_bias = None if bias is None else torch.cat([bias, torch.zeros_like(bias)])
    return torch.cat([weight, weight.abs()]), pair_bias


def _folded(m: nn.Conv2d, norm: Node) -> tuple[Tensor, Tensor]:
    """Weight and bias of ``conv(normalize(x))`` as one convolution: exact without padding, where every
    output reads only normalised pixels. The interval image is the same (a per-channel affine map takes a
    box to a box exactly, and ``|W a| = |W| |a|``)."""
    scale, shift = channel_affine(norm, 3)  # (C, 1, 1)
    weight = m.weight * scale.reshape(1, -1, 1, 1)
    bias = (m.weight * shift.reshape(1, -1, 1, 1)).sum((1, 2, 3))
    return weight, bias if m.bias is None else bias + m.bias


def _weights(
    m: nn.Module, build, grad: bool, chw: tuple[int, ...] | None = None, fold: Node | None = None
) -> tuple[Tensor | None, ...]:
    """``build(weight, bias)``: weights derived from a layer's parameters (``_abs_weight``,
    ``_paired_weight``); with ``chw``, a Linear layer's columns reordered for an input flattened from
    channels-last ``(C, H, W)`` maps; with ``fold``, a Normalize node folded into a convolution first.

    Without autograd the derived weights are cached per layer and rebuilt when a parameter or a folded
    buffer changes (its version counter moves with every in-place update: an optimiser step,
    ``load_state_dict``)."""
    if grad:
        return build(*(_folded(m, fold) if fold else (m.weight, m.bias)))
    tensors = (m.weight, m.bias, *((fold.module.mean, fold.module.std) if fold else ()))
    key = (m.weight.dtype, m.weight.device, *((t.data_ptr(), t._version) for t in tensors if t is not None))
    cache = _DERIVED.get(m)
    if cache is None:  # (WeakKeyDictionary.setdefault would make a weak reference at every call)
        cache = _DERIVED[m] = {}
    slot = (build, chw, fold is not None)
    if slot not in cache or cache[slot][0] != key:
        with torch.no_grad():
            derived = build(*(_folded(m, fold) if fold else (m.weight, m.bias)))
            if chw is not None:
                derived = tuple(t if t is None or t.dim() == 1 else _channels_last_columns(t, chw) for t in derived)
            # Convolution weights in the maps' channels-last layout, or oneDNN would reorder them at every call.
            derived = tuple(t.contiguous(memory_format=_NHWC) if t is not None and t.dim() == 4 else t for t in derived)
            cache[slot] = (key, derived)
    return cache[slot][1]


# layer -> {(builder, chw, folded): (parameter key, derived weights)}; entries go with their layer.
_DERIVED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _channels_last_columns(weight: Tensor, chw: tuple[int, ...]) -> Tensor:
    """A Linear weight whose columns read a ``(C, H, W)`` map flattened in ``(H, W, C)`` order."""
    return weight.reshape(weight.shape[0], *chw).permute(0, 2, 3, 1).reshape(weight.shape[0], -1).contiguous()


def _flat_channels_last(t: Tensor) -> Tensor:
    """A channels-last ``(B, C, H, W)`` map as ``(B, H*W*C)`` without copying it (``Flatten`` would)."""
    return t.permute(0, 2, 3, 1).reshape(t.shape[0], -1)


def _channels_last_centre_width(lower: Tensor, upper: Tensor) -> CentreWidth:
    """The input box as channels-last centre and width maps; a single channel as the two halves of one
    two-channel map, which a paired first convolution then reads without a copy."""
    B, C, H, W = lower.shape
    if C == 1:
        pair = torch.empty((B, 2, H, W), dtype=lower.dtype, device=lower.device, memory_format=_NHWC)
        centre, width = pair[:, :1], pair[:, 1:]
    else:
        centre, width = (torch.empty_like(lower, memory_format=_NHWC) for _ in range(2))
    torch.lerp(lower, upper, 0.5, out=centre)
    torch.sub(upper, lower, out=width)
    return centre, width


def _one_pair(centre: Tensor, width: Tensor) -> Tensor | None:
    """The two-channel channels-last map whose halves ``centre`` and ``width`` are, if they are."""
    B, _, H, W = centre.shape
    pair_strides = (2 * H * W, 1, 2 * W, 2)
    if centre.stride() != pair_strides or width.stride() != pair_strides:
        return None
    if width.untyped_storage().data_ptr() != centre.untyped_storage().data_ptr():
        return None
    if width.storage_offset() != centre.storage_offset() + 1:
        return None
    return centre.as_strided((B, 2, H, W), pair_strides)


def _paired_conv(m: nn.Conv2d, centre: Tensor, width: Tensor, grad: bool, fold: Node | None) -> CentreWidth:
    """Centre and width images of a single-input-channel convolution in one call with two groups.

    Timed on a CPU (oneDNN, batch 128, 28x28 maps, channels-last) while writing it, two separate convolutions
    with one input channel cost more than this one, and they leave NCHW maps for the next layer; with more input
    channels the two separate calls are cheaper, so only this case is paired."""
    if grad:
        pair = torch.cat([centre, width], 1)
    else:  # channels-last maps, which the two-group convolution keeps
        pair = _one_pair(centre, width)
        if pair is None:
            shape = (centre.shape[0], 2, *centre.shape[2:])
            pair = torch.empty(shape, dtype=centre.dtype, device=centre.device, memory_format=_NHWC)
            pair[:, :1].copy_(centre)
            pair[:, 1:].copy_(width)
    weight, bias = _weights(m, _paired_weight, grad, fold=fold)
    out = F.conv2d(pair, weight, bias, m.stride, m.padding, m.dilation, groups=2)
    return out[:, : m.out_channels], out[:, m.out_channels :]


def _affine(
    node: Node, centre: Tensor, width: Tensor, own: bool, chw: tuple[int, ...] | None, fold: Node | None
) -> CentreWidth:
    """Image of an affine node: the centre through the map, the width through its absolute value.
    ``fold``: the Normalize node before this convolution, passed through (see ``ibp_pass``)."""
    kind, m = node.kind, node.module
    grad = torch.is_grad_enabled()
    if kind == LINEAR:
        weight, weight_abs, bias = _weights(m, _abs_weight, grad, chw)
        return F.linear(centre, weight, bias), F.linear(width, weight_abs)
    if kind == CONV:
        if m.in_channels == 1 and m.groups == 1 and m.padding_mode == "zeros":
            return _paired_conv(m, centre, width, grad, fold)
        weight, weight_abs, bias = _weights(m, _abs_weight, grad, fold=fold)
        return m._conv_forward(centre, weight, bias), m._conv_forward(width, weight_abs, None)
    if kind in (NORMALIZE, BATCHNORM):
        scale, shift = channel_affine(node, centre.dim())
        if own:
            return centre.mul_(scale).add_(shift), width.mul_(scale.abs())
        return centre * scale + shift, width * scale.abs()
    raise AssertionError(kind)  # pragma: no cover - build_graph only emits the kinds above


def _relu(centre: Tensor, width: Tensor, own: bool) -> CentreWidth:
    """ReLU image: with ``u = c + w/2`` and ``l = u - w``, the new width is ``relu(u) - relu(l)``, which is
    ``min(relu(u), w)`` as ``w >= 0``, and the new centre ``relu(u) - width / 2``."""
    if own:  # four passes; in place, except on the two halves of one map (the paired convolution's), which
        # go to dense maps the next convolution reads without first copying them
        in_place = _dense(centre) and _dense(width)
        upper = (centre.add_(width, alpha=0.5) if in_place else torch.add(centre, width, alpha=0.5)).clamp_min_(0)
        new_width = torch.minimum(upper, width, out=width) if in_place else torch.minimum(upper, width)
        return upper.sub_(new_width, alpha=0.5), new_width
    # Out of place (autograd, or a box someone else holds), written with two ReLUs so that the gradient at a
    # bound exactly 0 is ReLU's, as in (lower, upper) form.
    pre_upper = torch.add(centre, width, alpha=0.5)
    upper = F.relu(pre_upper)
    new_width = upper - F.relu(pre_upper - width)
    return upper - 0.5 * new_width, new_width


def _dense(t: Tensor) -> bool:
    return t.is_contiguous() or t.is_contiguous(memory_format=_NHWC)


def _maxpool(m: nn.Module, centre: Tensor, width: Tensor, own: bool, relu_after: bool) -> CentreWidth:
    """Max pooling is monotone: the box of the pooled bounds. ``relu_after``: the ReLU this pool reads was
    skipped, and is applied here to the pooled bounds instead (the two commute exactly), on a quarter of
    the elements."""
    if own:
        upper = centre.add_(width, alpha=0.5)
        lower = torch.sub(upper, width, out=width)
    else:
        lower, upper = _lower_upper((centre, width))
    lower, upper = m(lower), m(upper)
    if relu_after:
        lower, upper = F.relu(lower), F.relu(upper)
    return _centre_width((lower, upper))


def ibp_node(
    node: Node,
    boxes: list[CentreWidth],
    own: tuple[bool, ...] = (),
    chw: tuple[int, ...] | None = None,
    relu_after: bool = False,
    fold: Node | None = None,
) -> CentreWidth:
    """Interval image of one node given the ``(centre, width)`` boxes of its inputs.

    ``own[i]`` says that the i-th input box may be overwritten (this node is its last reader, nothing else
    holds it and autograd is off); such boxes are updated in place. ``chw``: a Linear node's input box was
    flattened from channels-last ``(C, H, W)`` maps. ``relu_after``: a MaxPool node reads a ReLU node that
    was passed through; ``fold``: a convolution reads a Normalize node that was passed through (see
    ``ibp_pass``)."""
    own = own or (False,) * len(boxes)
    kind, m = node.kind, node.module
    if kind == ADD:
        (c1, w1), (c2, w2) = boxes
        if own[0] or own[1]:
            (c1, w1), (c2, w2) = boxes if own[0] else boxes[::-1]  # addition commutes, bit for bit
            return c1.add_(c2), w1.add_(w2)
        return c1 + c2, w1 + w2
    centre, width = boxes[0]
    if kind == RELU:
        return _relu(centre, width, own[0])
    if kind in (AVGPOOL, FLATTEN):
        # Linear with non-negative weights (average pooling) or a reshape: centre to centre, width to width.
        return m(centre), m(width)
    if kind == MAXPOOL:
        return _maxpool(m, centre, width, own[0], relu_after)
    return _affine(node, centre, width, own[0], chw, fold)


def ibp_box(node: Node, boxes: list[Box]) -> Box:
    """``ibp_node`` on ``(lower, upper)`` boxes, nothing overwritten (the CROWN state keeps every box)."""
    return _lower_upper(ibp_node(node, [_centre_width(b) for b in boxes]))


def ibp_pass(graph: Graph, x_lower: Tensor, x_upper: Tensor, keep: set[int]) -> dict[int, CentreWidth]:
    """IBP through ``graph``, returning only the ``(centre, width)`` boxes of the nodes in ``keep``.

    Every other box is dropped after its last reader; without autograd it is overwritten in place by that
    reader. The bounds equal those of a pass keeping every box up to float rounding (channels-last
    convolutions may sum in another order)."""
    last_read = {i: idx for idx, node in enumerate(graph.nodes) for i in node.inputs}
    grad = torch.is_grad_enabled()
    last = max(keep)  # no later node is needed
    if not grad and x_lower.dim() == 4 and any(node.kind == CONV for node in graph.nodes):
        # Without autograd, convolutions and max pooling on channels-last (NHWC) maps cost less on a CPU;
        # element-wise ops cost the same. With autograd the backward passes favour the default layout.
        boxes = {0: _channels_last_centre_width(x_lower, x_upper)}
    else:
        boxes = {0: _centre_width((x_lower, x_upper))}
    writable = {0: not grad}  # whether a node's box may be overwritten (its own, not a kept box's view)
    readers: dict[int, list[Node]] = {}
    for node in graph.nodes:
        for i in node.inputs:
            readers.setdefault(i, []).append(node)
    flat_chw: dict[int, tuple[int, ...]] = {}  # flatten nodes whose box is in (H, W, C) order -> (C, H, W)
    passed: dict[int, Node] = {}  # nodes passed through -> themselves, applied by the node reading them
    for idx, node in enumerate(graph.nodes[1 : last + 1], start=1):
        own = tuple(
            writable[i] and last_read[i] == idx and i not in keep and node.inputs.count(i) == 1 for i in node.inputs
        )
        inputs = [boxes[i] for i in node.inputs]
        only = readers[idx][0] if len(readers.get(idx, ())) == 1 and idx not in keep else None
        if not grad and node.kind == FLATTEN and _flattens_for_linear(node, inputs[0][0], only):
            # Flattening channels-last maps in their memory order costs nothing; the one Linear reading them
            # takes its columns in that order instead (a copy of the weight, cached) - the same products.
            boxes[idx] = tuple(_flat_channels_last(t) for t in inputs[0])
            flat_chw[idx] = tuple(inputs[0][0].shape[1:])
        elif _passes_to(node, only, grad):
            boxes[idx] = inputs[0]
            passed[idx] = node
        else:
            before = passed.get(node.inputs[0])
            boxes[idx] = ibp_node(
                node,
                inputs,
                own,
                flat_chw.get(node.inputs[0]) if node.kind == LINEAR else None,
                relu_after=before is not None and before.kind == RELU,
                fold=before if before is not None and before.kind == NORMALIZE else None,
            )
        through = node.kind == FLATTEN or idx in passed  # the box is (a view of) its input's
        writable[idx] = not grad and (not through or own[0])
        for i in set(node.inputs):
            if last_read[i] == idx and i not in keep:
                del boxes[i]
    return {i: boxes[i] for i in keep}


def _passes_to(node: Node, reader: Node | None, grad: bool) -> bool:
    """Whether ``node`` is left to the one node reading it: a ReLU to a max pooling (the pool goes first
    and the ReLU after it, on a quarter of the elements; the two commute exactly), or, without autograd,
    a Normalize to an unpadded convolution (folded into its cached weights)."""
    if reader is None:
        return False
    if node.kind == RELU:
        return reader.kind == MAXPOOL
    if node.kind == NORMALIZE and reader.kind == CONV and reader.module.groups == 1 and not grad:
        m = reader.module
        return m.padding == "valid" or (not isinstance(m.padding, str) and not any(m.padding))
    return False


def _flattens_for_linear(node: Node, t: Tensor, reader: Node | None) -> bool:
    """Whether a flatten node turns channels-last 4-d maps (not also contiguous) into one Linear's input."""
    if reader is None or reader.kind != LINEAR or t.dim() != 4:
        return False
    if (node.module.start_dim, node.module.end_dim) not in ((1, -1), (1, 3)):
        return False
    return t.is_contiguous(memory_format=_NHWC) and not t.is_contiguous()


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
        spec: bool = True,
    ) -> None:
        self.graph = graph
        self.tighten = tighten_with_ibp
        self.create_graph = torch.is_grad_enabled()
        if ibp_spec_only:
            # Only ibp_spec will be asked for: keep the boxes it reads, let every other one be overwritten.
            if intermediate != "ibp":
                raise ValueError("ibp_spec_only needs intermediate='ibp'")
            self._kept = ibp_pass(graph, x_lower, x_upper, self._ibp_spec_reads(spec))
            self.boxes = [None] * len(graph.nodes)  # (lower, upper) boxes made on demand, see ``output``
            return
        self._kept = {}
        self.boxes: list[Box] = [(x_lower, x_upper)]
        refine = self._needs_refinement() if intermediate == "crown" else {}
        for idx, node in enumerate(graph.nodes[1:], start=1):
            self.boxes.append(ibp_box(node, [self.boxes[i] for i in node.inputs]))
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

    def _ibp_spec_reads(self, spec: bool) -> set[int]:
        """The nodes whose boxes ``ibp_spec`` reads: with a spec and a final Linear layer, that layer's input
        (the output box is then computed only if the input is not flat), else the output."""
        node = self.graph.nodes[self.graph.output]
        return set(node.inputs) if spec and node.kind == LINEAR else {self.graph.output}

    # ------------------------------------------------------------------------------------ final bounds
    @property
    def output(self) -> Box:
        out = self.graph.output
        if self.boxes[out] is None:  # an IBP-spec-only state: its pass kept the output or stopped just before
            node = self.graph.nodes[out]
            kept = self._kept.get(out) or ibp_node(node, [self._kept[i] for i in node.inputs])
            self.boxes[out] = _lower_upper(kept)
        return self.boxes[out]

    def ibp_spec(self, C: Tensor | None) -> Box:
        """IBP bounds of ``C @ logits``; a final Linear layer is folded into ``C`` first (tighter)."""
        if C is None:
            return self.output
        node = self.graph.nodes[self.graph.output]
        if node.kind == LINEAR:
            centre, width = self._centre_width(node.inputs[0])
            if centre.dim() == 2:
                # The layer's centre image, then C; the width through |C W| per example. Element-wise products
                # summed over the last dimension: batches of tiny matrix products cost more on a CPU.
                m = node.module
                centre = (C * F.linear(centre, m.weight, m.bias).unsqueeze(1)).sum(-1)
                radius = ((C @ m.weight).abs_() * width.unsqueeze(1)).sum(-1).mul_(0.5)
                return centre - radius, centre + radius
        centre, width = self._centre_width(self.graph.output)
        centre = (C * centre.unsqueeze(1)).sum(-1)
        radius = (C.abs() * width.unsqueeze(1)).sum(-1).mul_(0.5)
        return centre - radius, centre + radius

    def _centre_width(self, idx: int) -> CentreWidth:
        return self._kept[idx] if idx in self._kept else _centre_width(self.boxes[idx])

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
